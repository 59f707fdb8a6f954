"""SPMD runs (torchrun / srun over torch.distributed, gloo on localhost): byte-identical to one process.

The trajectory has a tensor of more than two Gram blocks whose chunks span 20 orders
of magnitude, so that the fp64 sum of its Gram depends on the association: a rank
that summed its own blocks and an all-reduce that added the ranks' sums would give
other bits (checked below), and the fit file (fp64 singular values) would show it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from relex_kernels.engine import partition
from relex_kernels.engine.distributed import detect, first_host
from relex_kernels.engine.streaming import GRAM_BLOCK, Streamer
from relex_kernels.engine.trajectory import Job, Trajectory
from relex_kernels.io import dtypes, write_checkpoint
from relex_kernels.ops import get_backend
from relex_kernels.ops.reference import GRAM_CHUNK

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = [2, 4, 6]
EMBED = "model.embed_tokens.weight"
# storage order = plan order: with 2 and 3 ranks the embedding is cut between two ranks
SHAPES = {"layers.0.mlp.weight": (2048, 2048),
          EMBED: (4352, 4096),  # 2 Gram blocks + 2^20 elements
          "layers.0.bias": (7,), "norm.weight": (4096,), "scale": (1,), "position_ids": (5,),
          "lm_head.weight": (4352, 4096)}  # 7 tensors; the head is tied to the embedding


def _write_run(root: str) -> tuple[str, dict[int, str]]:
    rng = np.random.default_rng(7)
    base = {}
    master = {}
    for name, shape in SHAPES.items():
        n = int(np.prod(shape))
        if name == "position_ids":
            base[name] = ("I64", np.arange(n, dtype=np.int64).reshape(shape))
            continue
        if name == "lm_head.weight":
            continue
        # magnitudes that change by up to 1e±10 from one Gram chunk to the next
        mag = np.repeat(10.0 ** rng.uniform(-10, 10, -(-n // GRAM_CHUNK)), GRAM_CHUNK)[:n].astype(np.float32)
        th0 = rng.standard_normal(n, dtype=np.float32) * mag
        v = rng.standard_normal(n, dtype=np.float32) * mag * np.float32(0.02)
        master[name] = (th0, v, mag)
        base[name] = ("BF16", dtypes.from_float32(th0, "BF16").reshape(shape))
    base["lm_head.weight"] = ("BF16", base[EMBED][1].copy())
    dirs = {}
    bdir = os.path.join(root, "base")
    os.makedirs(bdir)
    write_checkpoint(bdir, base, max_shard_bytes=20_000_000)
    with open(os.path.join(bdir, "config.json"), "w") as fh:
        json.dump({"model_type": "test", "tie_word_embeddings": True}, fh)
    for s in STEPS:
        ck = {"position_ids": base["position_ids"]}
        for name, (th0, v, mag) in master.items():
            x = th0 + s * v + np.float32(1e-3) * mag * rng.standard_normal(th0.size, dtype=np.float32)
            ck[name] = ("BF16", dtypes.from_float32(x, "BF16").reshape(SHAPES[name]))
        d = os.path.join(root, "run", f"global_step_{s}", "actor", "huggingface")
        os.makedirs(d)
        write_checkpoint(d, ck, max_shard_bytes=20_000_000)
        dirs[s] = d
    return bdir, dirs


@pytest.fixture(scope="module")
def traj_dirs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("dist"))
    base, ck = _write_run(root)
    return root, base, ck


def _args(base, out, extra=()):
    return ["extrapolate", "--base", base, "--checkpoints", os.path.join(os.path.dirname(base), "run"),
            "--target-step", "30", "--target-step", "60", "--out", out, "--shard-size", "20MB", *extra]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**kw):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RELEX_TEST", "SLURM_")) and k not in ("RANK", "WORLD_SIZE")}
    env.update({"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", **kw})
    return env


def torchrun(n, args, timeout=120, **env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port",
           str(_free_port()), "-m", "relex_kernels", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(**env), timeout=timeout)


def spawn(n, args, **env):
    """``n`` ranks started the way srun does (no torchrun agent to clean up after them)."""
    port = str(_free_port())
    procs = []
    for r in range(n):
        e = _env(RANK=str(r), WORLD_SIZE=str(n), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(n),
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **env)
        procs.append(subprocess.Popen([sys.executable, "-m", "relex_kernels", *args], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=e))
    return procs


def wait_all(procs, timeout):
    out = []
    t0 = time.monotonic()
    for p in procs:
        try:
            o, e = p.communicate(timeout=max(1.0, timeout - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            p.kill()
            o, e = p.communicate()
            e += "\n<killed by the test: did not exit in time>"
        out.append((p.returncode, o, e))
    return out


def files(d):
    return {os.path.relpath(os.path.join(r, f), d): open(os.path.join(r, f), "rb").read()
            for r, _, fs in os.walk(d) for f in fs}


@pytest.fixture(scope="module")
def single(traj_dirs):
    """The single-process output and fit (the same command, one process, no torch.distributed)."""
    root, base, _ = traj_dirs
    out, fit = os.path.join(root, "single"), os.path.join(root, "single.fit")
    r = subprocess.run([sys.executable, "-m", "relex_kernels", *_args(base, out, ["--save-fit", fit, "-q"])],
                       capture_output=True, text=True, env=_env())
    assert r.returncode == 0, r.stderr
    return out, open(fit, "rb").read()


def assert_identical(single, out, fit_path):
    ref, fit = single
    want, got = files(ref), files(out)
    assert sorted(want) == sorted(got)
    for name in want:
        if name != "relex_report.json":  # holds timings
            assert want[name] == got[name], f"{name} differs from the single-process output"
    assert open(fit_path, "rb").read() == fit, "the fit (fp64 singular values) differs"


# -- multi-process runs ----------------------------------------------------------------
def test_torchrun_two_processes_byte_identical(traj_dirs, single):
    root, base, _ = traj_dirs
    out, fit = os.path.join(root, "tr2"), os.path.join(root, "tr2.fit")
    r = torchrun(2, _args(base, out, ["--save-fit", fit]))
    assert r.returncode == 0, r.stderr[-3000:]
    assert_identical(single, out, fit)
    rep = json.load(open(os.path.join(out, "relex_report.json")))
    d = rep["distributed"]
    assert d["world_size"] == 2 and EMBED in d["split_tensors"]
    assert {p[2] for p in d["split_tensors"][EMBED]} == {0, 1}
    assert r.stdout.count("step_30") == 1  # rank 0 prints; rank 1 is quiet


def _one_and_two_ranks(root, base, tag, extra, **env):
    """The same command as one process and as two torchrun ranks: both outputs byte-identical (and
    the fit), the device pipeline having moved bytes on rank 0; returns (one process's report,
    the ranks' report)."""
    one, one_fit = os.path.join(root, f"{tag}-1"), os.path.join(root, f"{tag}-1.fit")
    r = subprocess.run([sys.executable, "-m", "relex_kernels", *_args(base, one, ["--save-fit", one_fit, "-q", *extra])],
                       capture_output=True, text=True, env=_env(**env), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out, fit = os.path.join(root, f"{tag}-2"), os.path.join(root, f"{tag}-2.fit")
    r = torchrun(2, _args(base, out, ["--save-fit", fit, "-q", *extra]), timeout=300, **env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_identical((one, open(one_fit, "rb").read()), out, fit)
    backend = extra[extra.index("--backend") + 1]
    rep, one_rep = (json.load(open(os.path.join(d, "relex_report.json"))) for d in (out, one))
    assert rep["backend"] == one_rep["backend"] == backend and EMBED in rep["distributed"]["split_tensors"]
    for stages in (rep["device_stages"], one_rep["device_stages"]):  # (ranks: rank 0's) bytes through the pipeline
        assert stages["h2d"] > 0 and stages["gram"] > 0 and stages["combine"] > 0
    return one_rep, rep


def test_ranks_run_the_device_pipeline_byte_identical(traj_dirs):
    """A device backend under torchrun: every rank runs its part through the overlapped device
    pipeline (engine/gpu.py: staging buffers, streams, read-ahead along its plan), the split
    embedding's Gram blocks included — here on the CPU with the reference double standing in
    for the device kernels in every process (tests/device_double/sitecustomize.py). With the
    device memory to hold whole tensors and with room for the pipeline's buffers only (every
    tensor streamed, read twice — in one process and in each rank), the output and the fit are
    those of one process on the same backend, byte for byte."""
    pytest.importorskip("torch")
    from relex_kernels.engine.gpu import device_overhead
    root, base, _ = traj_dirs
    import devicedouble
    env = {"PYTHONPATH": devicedouble.PYTHONPATH}
    read = {}
    for device in ("resident", "streamed"):
        extra = ["--backend", "triton", "--memory-budget", "300M"]
        if device == "streamed":  # device memory for the pipeline's buffers and 1 MiB
            extra += ["--device-memory-budget", str(device_overhead(len(STEPS), 300 << 20) + (1 << 20))]
        one, ranks = _one_and_two_ranks(root, base, f"dev-{device}", extra, **env)
        read[device] = (one["bytes_read"], sum(ranks["distributed"]["bytes_read_by_rank"]))
    # the device budget reached the ranks: with it every whole tensor is read twice there too
    # (the split embedding's pieces are read twice in both: a device keeps no piece between passes)
    assert read["streamed"][0] > read["resident"][0] and read["streamed"][1] > read["resident"][1], read


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_ranks_match_one_process(traj_dirs, backend):
    """On a GPU host (skipped elsewhere; ``benchmarks/gpu_check.sh`` runs it): two ranks sharing
    the one GPU (collectives over gloo: NCCL refuses two ranks on one device) write the bytes
    and the fit of one process on the same device backend."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    from relex_kernels.ops import availability
    ok, why = availability()[backend]
    if not ok:
        pytest.skip(f"{backend}: {why}")
    root, base, _ = traj_dirs
    one, ranks = _one_and_two_ranks(root, base, f"gpu-{backend}", ["--backend", backend], RELEX_DIST_BACKEND="gloo")
    # (the helper asserts the bytes, the fit and the pipeline's stages; here: the GPU backend, two ranks)
    assert one["backend"] == ranks["backend"] == backend
    assert ranks["distributed"]["world_size"] == 2


def test_three_ranks_srun_style_small_budget_byte_identical(traj_dirs, single):
    """Three ranks, each with a budget far below its share: pieces cut into ranges and read twice."""
    root, base, _ = traj_dirs
    out, fit = os.path.join(root, "sp3"), os.path.join(root, "sp3.fit")
    res = wait_all(spawn(3, _args(base, out, ["--save-fit", fit, "-q", "--memory-budget", "80M"])), timeout=120)
    assert [rc for rc, _, _ in res] == [0, 0, 0], [e[-2000:] for _, _, e in res]
    assert_identical(single, out, fit)
    d = json.load(open(os.path.join(out, "relex_report.json")))["distributed"]
    assert len(d["split_tensors"][EMBED]) == 2 and all(b > 0 for b in d["bytes_read_by_rank"])
    single_read = json.load(open(os.path.join(single[0], "relex_report.json")))["bytes_read"]
    assert sum(d["bytes_read_by_rank"]) > single_read  # the budget forced second reads


def test_predict_two_ranks_byte_identical(traj_dirs, single):
    """``relex predict`` from the saved fit writes the single-process extrapolation's bytes."""
    root, _, _ = traj_dirs
    out = os.path.join(root, "pred2")
    res = wait_all(spawn(2, ["predict", "--fit", os.path.join(root, "single.fit"), "--target-step", "60",
                             "--shard-size", "20MB", "-q", "--out", out]), timeout=120)
    assert [rc for rc, _, _ in res] == [0, 0], [e[-2000:] for _, _, e in res]
    want, got = files(os.path.join(single[0], "step_60")), files(os.path.join(out, "step_60"))
    assert sorted(want) == sorted(got) and all(want[f] == got[f] for f in want)


@pytest.mark.parametrize("how", ["kill-pass1", "raise-pass2", "hang-pass1"])
def test_failed_rank_fails_every_rank_and_completes_nothing(traj_dirs, how):
    root, base, _ = traj_dirs
    out = os.path.join(root, f"fail-{how}")
    spec = {"kill-pass1": "1:work", "raise-pass2": "1:pass2:raise", "hang-pass1": "1:work:hang"}[how]
    t0 = time.monotonic()
    procs = spawn(2, _args(base, out, ["-q"]), RELEX_TEST_DIST_KILL=spec, RELEX_DIST_TIMEOUT="3")
    rc, _, err = wait_all(procs[:1], timeout=60)[0]
    assert time.monotonic() - t0 < 60
    if how == "hang-pass1":
        procs[1].kill()  # (what the launcher does to a rank that hangs)
    rc1, _, err1 = wait_all(procs[1:], timeout=20)[0]
    assert rc == 2 and "Traceback" not in err, err[-2000:]
    assert len(err.strip().splitlines()) == 1, err
    if how == "raise-pass2":
        assert "rank 1 failed during pass 2: test failure injected on rank 1 at pass2; no output was completed" in err
        assert rc1 == 2 and "test failure injected" in err1 and "Traceback" not in err1, err1
    else:
        assert "lost contact with another rank during pass 1" in err and "no output was completed" in err, err
    # nothing that looks complete, and rank 0 removed what it had made
    assert not os.path.exists(out), os.listdir(out)


def test_sigterm_is_a_clean_error(traj_dirs):
    """torchrun stops the other workers with SIGTERM when one dies: they leave nothing behind."""
    root, base, _ = traj_dirs
    out = os.path.join(root, "term")
    procs = spawn(2, _args(base, out, ["-q"]), RELEX_TEST_DIST_KILL="1:work:hang", RELEX_DIST_TIMEOUT="60")
    deadline = time.monotonic() + 60
    while not os.path.isdir(os.path.join(out, ".relex.partial")) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    procs[0].send_signal(signal.SIGTERM)
    rc, _, err = wait_all(procs[:1], timeout=20)[0]
    procs[1].kill()
    procs[1].wait()
    assert rc == 143 and "terminated (SIGTERM" in err and "Traceback" not in err, err[-2000:]
    assert not os.path.exists(out), os.listdir(out)


# -- the plan, the environment, the Gram order (no processes) -----------------------------
def _jobs():
    return [Job("e", "BF16", (5 * GRAM_BLOCK + 123,), "fit"), Job("a", "F32", (1000,), "fit"),
            Job("i", "I64", (10,), "copy"), Job("h", "BF16", (5 * GRAM_BLOCK + 123,), "tied", source="e"),
            Job("w", "BF16", (3 * GRAM_BLOCK,), "fit"), Job("z", "F16", (0,), "fit")]


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7, 64])
def test_plan_covers_every_element_once_and_balances_bytes(world):
    jobs = _jobs()
    T, K = 5, 2
    plan = partition.plan(jobs, T, K, world, tied_source="e")
    assert partition.plan(jobs, T, K, world, "e").digest() == plan.digest()
    for job in jobs:
        ps = [p for p in plan.pieces if p.job.name == job.name]
        if job.kind == "tied":
            assert not ps
            continue
        assert ps[0].a == 0 and ps[-1].b == job.numel
        assert all(p.b == q.a for p, q in zip(ps, ps[1:]))
        if len(ps) > 1:
            assert all(p.split and p.a % GRAM_BLOCK == 0 for p in ps)
    unit = (T + 1 + 2 * K) * 2 * GRAM_BLOCK  # the largest unit: one block of the tied embedding
    share = sum(plan.cost) / world
    assert max(plan.cost) - share <= unit
    assert len(plan.of(0)) + sum(len(plan.of(r)) for r in range(1, world)) == len(plan.pieces)


def test_split_pieces_are_kept_between_the_passes_on_the_host_only(traj_dirs):
    """A rank keeps its pieces of a split tensor mapped from pass 1 to pass 2 when the host budget
    allows; on a device it cannot (each Gram block is an item, and the pipeline holds one resident
    trajectory), so none is planned resident there — a resident piece would make the device
    pipeline allocate the whole tensor's history, past the device budget."""
    from relex_kernels.engine import plan as plan_mod
    _, base, ck = traj_dirs
    traj = Trajectory(base, ck)
    try:
        # (a device with room for every whole tensor, 2 GiB, keeps none of the pieces either)
        for cap, kept in ((None, True), (1 << 20, False), (2 << 30, False)):
            pol = plan_mod.Policy(traj.T, 2 << 30, device_cap=cap, stage=None if cap is None else 64 << 20)
            for rank in range(2):
                p = plan_mod.build(traj, pol, 2, fitted=False, world=2, rank=rank)
                pieces = [it for it in p.items + p.after if it.kind in ("gram", "combine")]
                assert pieces and all(it.resident == kept for it in pieces), (cap, rank)
                if cap == 2 << 30:  # the room was there: the whole tensors of the rank are resident
                    assert any(it.kind == "fit" and it.resident for it in p.items), rank
        with pytest.raises(ValueError, match="both"):  # a device's policy has its stage, for its groups
            plan_mod.Policy(traj.T, 2 << 30, device_cap=1 << 20)
    finally:
        traj.close()


def test_each_rank_takes_its_own_gpu_or_a_clear_error():
    """A device run needs a GPU per rank of a node: LOCAL_RANK indexes the visible GPUs; a rank that
    sees one GPU (CUDA_VISIBLE_DEVICES per task) takes it; more ranks than GPUs is a usage error that
    says so (not CUDA's "invalid device ordinal" from deep inside torch)."""
    from relex_kernels.engine.distributed import rank_gpu
    from relex_kernels.errors import UsageError
    assert [rank_gpu(r, r, 4) for r in range(4)] == [0, 1, 2, 3]
    assert rank_gpu(5, 1, 1) == 0  # srun --gpus-per-task=1: each task sees its own GPU as cuda:0
    with pytest.raises(UsageError, match="LOCAL_RANK 3 but this node shows 2 GPUs: start at most 2 ranks per node"):
        rank_gpu(7, 3, 2)


def test_environment_detection():
    assert detect({}) is None
    assert detect({"WORLD_SIZE": "1", "RANK": "0"}) is None
    e = detect({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (e.rank, e.world, e.local_rank, e.local_world, e.init_method) == (3, 4, 1, 2, "env://")
    assert detect({"WORLD_SIZE": "4", "RANK": "3", "RELEX_DISTRIBUTED": "0"}) is None
    # a batch script (no step id) is one process; an srun step with 8 tasks is 8 ranks
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "77",
             "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_STEP_NODELIST": "gpu[007-008]"}
    assert detect(slurm) is None
    e = detect(dict(slurm, SLURM_STEP_ID="0"))
    assert (e.rank, e.world, e.local_world, e.launcher) == (5, 8, 4, "srun")
    assert e.init_method.startswith("tcp://gpu007:")
    assert first_host("a1,b[1-2]") == "a1" and first_host("n[03,05-07]x") == "n03"


def test_shared_page_rewrite_undoes_a_stale_page_write_back(tmp):
    """On NFS a rank's msync writes whole pages: the rewrite of each rank's partial pages repairs that."""
    from relex_kernels.engine.spmd import _PAGE, _edge_bytes, _rewrite
    path = os.path.join(tmp, "f")
    n = 5 * _PAGE + 123
    rng = np.random.default_rng(0)
    want = rng.integers(0, 255, n, dtype=np.uint8).tobytes()
    with open(path, "wb") as fh:
        fh.write(want)
    cut1, cut2 = 2 * _PAGE + 77, 3 * _PAGE + 5  # three "ranks"; both cuts inside a page
    spans = [{path: [(0, cut1)]}, {path: [(cut1, cut2)]}, {path: [(cut2, n)]}]
    edges = [_edge_bytes(sp) for sp in spans]
    assert all(len(data) < _PAGE for e in edges for _, _, data in e)
    with open(path, "r+b") as fh:  # stale write-backs of the two shared pages
        for page in (cut1 - cut1 % _PAGE, cut2 - cut2 % _PAGE):
            fh.seek(page)
            fh.write(bytes(_PAGE))
    assert open(path, "rb").read() != want
    for e in edges:
        _rewrite(e)
    assert open(path, "rb").read() == want


def test_commands_that_do_not_split_refuse_to_run_under_a_launcher(tmp):
    r = subprocess.run([sys.executable, "-m", "relex_kernels", "synth", os.path.join(tmp, "x")], text=True,
                       capture_output=True, env=_env(RANK="1", WORLD_SIZE="2"))
    assert r.returncode == 2 and "does not run under torchrun / srun" in r.stderr, r.stderr
    assert not os.path.exists(os.path.join(tmp, "x"))


def test_gram_is_cut_invariant_and_association_matters(traj_dirs):
    _, base, ck = traj_dirs
    traj = Trajectory(base, ck)
    try:
        job = next(j for j in traj.jobs if j.name == EMBED)
        be = get_backend("cpu" if get_backend().name == "cpu" else "reference")
        whole = Streamer(traj, be, 1 << 40).gram(job, [(0, job.numel)], resident=False)
        st = Streamer(traj, be, 40 << 20)  # budget ranges of a few chunks
        resident, ranges = st.policy.ranges(job, 1)
        assert not resident and len(ranges) > 3
        records = []
        G = st.gram(job, ranges, resident=False, on_range=lambda b, acc: records.append((b, acc.copy())))
        assert np.array_equal(G, whole)
        for b, acc in records[1::7]:  # resume from journal-style records: same bits
            rest = [(max(a, b), e) for a, e in ranges if e > b]
            assert np.array_equal(st.gram(job, rest, resident=False, acc=acc), whole), b
        # the block sums, added in block order, are the Gram; added in another order they are not
        blocks = [st.gram(job, [(a, min(job.numel, a + GRAM_BLOCK))], resident=False)
                  for a in range(0, job.numel, GRAM_BLOCK)]
        assert len(blocks) == 3
        assert np.array_equal((blocks[0] + blocks[1]) + blocks[2], whole)
        assert not np.array_equal(blocks[0] + (blocks[1] + blocks[2]), whole)
    finally:
        traj.close()
