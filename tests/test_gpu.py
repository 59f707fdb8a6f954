"""The device pipeline (engine/gpu.py) and the CUDA kernels, with the device as an axis.

* ``double``: the pipeline on the CPU with the reference ops standing in for the device
  kernels (same interface). Every group, range, Gram block, resident/streamed choice
  and output offset is then checked bit for bit against the reference engine — in CI.
* ``triton`` / ``cuda``: the real kernels on a GPU (skipped without one): outputs within
  one ulp of the reference engine (the Gram's fp32 order is each backend's own), and a
  streamed run bit-identical to a resident one.
* the real Triton kernels through the whole CLI under ``TRITON_INTERPRET=1`` (subprocess).

Nothing here queries CUDA at import.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from trajgen import make_trajectory

torch = pytest.importorskip("torch")

import devicedouble  # noqa: E402
from relex_kernels.engine import default_memory_budget, extrapolate, predict  # noqa: E402
from relex_kernels.engine import gpu, plan  # noqa: E402
from relex_kernels.engine.plan import ranges_from  # noqa: E402
from relex_kernels.engine.streaming import GRAM_BLOCK  # noqa: E402
from relex_kernels.engine.trajectory import Trajectory  # noqa: E402
from relex_kernels.fit import FitOptions  # noqa: E402
from relex_kernels.io import Checkpoint, dtypes  # noqa: E402
from relex_kernels.io.writer import ShardedWriter, merged_spans  # noqa: E402
from relex_kernels.ops import get_backend, reference, resolve_backend  # noqa: E402
from relex_kernels.ops.reference import GRAM_CHUNK  # noqa: E402

STEPS = [2, 4, 6, 8]
SHAPES = {"model.embed_tokens.weight": (300, 64), "lm_head.weight": (300, 64), "big": (3 * GRAM_CHUNK + 77,),
          "w.weight": (33, 17), "b.bias": (7,), "f32": (1000,), "f16": (999,), "ids": (5,)}
EXTRA = {"f32": "F32", "f16": "F16", "ids": "I32"}
TIED = {"model_type": "test", "tie_word_embeddings": True}


@pytest.fixture(params=["double", "triton", "cuda"])
def device_backend(request, monkeypatch):
    """The backend name to run ``--backend`` with; the ``double`` patches triton's kernels."""
    if request.param == "double":
        devicedouble.install(monkeypatch.setattr)
        return "triton", True
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    from relex_kernels.ops import availability
    ok, why = availability()[request.param]
    if not ok:
        pytest.skip(f"{request.param}: {why}")
    return request.param, False


def _outputs(out_dir):
    ck = Checkpoint(out_dir)
    vals = {n: np.array(loc.file.view(n)) for n, loc in ck.tensors.items()}
    ck.close()
    return vals


def _ordered(raw):
    """Integers ordered like the floats they encode (adjacent floats differ by 1)."""
    bits = raw.view({1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}[raw.dtype.itemsize]).astype(np.int64)
    sign = np.int64(1) << (raw.dtype.itemsize * 8 - 1)
    mag = bits & (sign - 1)
    return np.where(bits < 0, -mag, mag)


def assert_same(a_dir, b_dir, exact):
    a, b = _outputs(a_dir), _outputs(b_dir)
    assert a.keys() == b.keys()
    for n in a:
        if exact or a[n].dtype.kind in "iub" and dtypes.raw_numpy("BF16") != a[n].dtype:
            np.testing.assert_array_equal(a[n].view(np.uint8), b[n].view(np.uint8), err_msg=n)
        else:
            d = np.abs(_ordered(a[n]) - _ordered(b[n]))
            assert d.max(initial=0) <= 1, (n, d.max())


#: budgets under which "big" (2 MB of trajectory) streams and the embedding (190 KB) stays resident
def _small(steps=STEPS) -> dict:
    return dict(memory_budget=24 << 20, device_memory_budget=gpu.device_overhead(len(steps), 24 << 20) + (1 << 20))


SMALL = _small()


def _traj(tmp, dtype="BF16", shapes=SHAPES, steps=STEPS, **kw):
    return make_trajectory(tmp, shapes, steps, dtype=dtype, extra_dtypes=EXTRA, config=TIED, **kw)


#: small tensors of mixed dtypes, run in groups of GROUPED_MAX (several groups: slots and buffers reused)
GROUPED = {f"e{i}.weight": (40 + i, 33) for i in range(18)}
GROUPED_EXTRA = {f"e{i}.weight": ("F16", "F32")[i % 2] for i in range(0, 18, 5)}
GROUPED_MAX = 4


def _grouped_traj(tmp, **kw):
    return make_trajectory(tmp, GROUPED, STEPS, dtype="BF16", extra_dtypes=GROUPED_EXTRA, **kw)


def per_tensor(monkeypatch) -> None:
    """Every tensor on its own (no groups of small tensors): for the tests of the per-tensor
    pipeline; the groups have theirs (test_device_groups_*)."""
    monkeypatch.setattr(plan, "GROUP_MAX", 1)


def _recorded_done(monkeypatch, want: dict) -> list:
    """Spy on the executor's done records: ``[(tensor, landed)]`` in record order, ``landed``: its
    outputs already in the maps, byte for byte ``want[tensor]``."""
    from relex_kernels.engine.executor import Executor
    seen, done = [], Executor._done

    def recording_done(self, *names):
        for n in names:
            got = np.array(self.writers[0].view(n, 0, want[n].size))
            seen.append((n, bool(np.array_equal(got.view(np.uint8), want[n].reshape(-1).view(np.uint8)))))
        return done(self, *names)
    monkeypatch.setattr(Executor, "_done", recording_done)
    return seen


@pytest.mark.parametrize("budgets", ["resident", "streamed"])
def test_pipeline_outputs_match_reference_engine(tmp, device_backend, budgets, monkeypatch):
    name, exact = device_backend
    monkeypatch.setattr(gpu, "READ_PIECE", 1000 if budgets == "streamed" else gpu.READ_PIECE)  # rows in pieces
    base, ck = _traj(tmp)
    fo = FitOptions(rank=2)
    ref = extrapolate(base, ck, [20, 40], os.path.join(tmp, "ref"), fo, backend="reference")
    kw = {}
    if budgets == "streamed":  # only the small tensors fit; "big" streams through stage slots in groups
        kw = SMALL
    got = extrapolate(base, ck, [20, 40], os.path.join(tmp, "got"), fo, backend=name, **kw)
    assert got.backend == name
    for r, g in zip(ref.outputs, got.outputs):
        assert_same(r, g, exact)
    T = len(STEPS)
    fitted = sum(np.prod(s) * (4 if n == "f32" else 2) for n, s in SHAPES.items() if n not in ("ids", "lm_head.weight"))
    once = (T + 1) * fitted + 5 * 4  # plus the copied int tensor
    if budgets == "resident":
        assert got.bytes_read == once
    else:  # "big" is read in both passes
        assert got.bytes_read == once + (T + 1) * SHAPES["big"][0] * 2
    if exact:
        assert got.report["tensors"] == ref.report["tensors"]
    # the tied head equals the predicted embedding
    o = _outputs(got.outputs[0])
    np.testing.assert_array_equal(o["lm_head.weight"], o["model.embed_tokens.weight"])


def test_pipeline_fp16_deltas_and_predict(tmp, device_backend):
    name, exact = device_backend
    base, ck = _traj(tmp, dtype="F16")
    fo = FitOptions(fp16_deltas=True)
    fit = os.path.join(tmp, "fit.relexfit")
    ref = extrapolate(base, ck, [30], os.path.join(tmp, "ref"), fo, backend="reference")
    got = extrapolate(base, ck, [30], os.path.join(tmp, "got"), fo, backend=name, save_fit=fit, **SMALL)
    assert_same(ref.outputs[0], got.outputs[0], exact)
    # predict: pass 2 only, planned as such by the reader
    p = predict(fit, [50], os.path.join(tmp, "pred"), backend=name, **SMALL)
    pr = predict(fit, [50], os.path.join(tmp, "pred_ref"), backend="reference")
    assert_same(pr.outputs[0], p.outputs[0], True if exact else False)


def test_gram_resumes_bit_identically_across_blocks(tmp, device_backend):
    """The two-level Gram sum: resuming from any journal point gives the same bits."""
    name, _ = device_backend
    n = GRAM_BLOCK + 3 * GRAM_CHUNK + 5
    base, ck = make_trajectory(tmp, {"x": (n,)}, [1, 2], dtype="BF16")
    traj = Trajectory(base, ck)
    try:
        st = gpu.make_streamer(traj, get_backend(name), 64 << 20,
                               device_memory_budget=gpu.device_overhead(2, 64 << 20) + (1 << 20))
        job = traj.jobs[0]
        resident, ranges = st.policy.ranges(job, 1)
        assert not resident
        ranges = [(0, GRAM_BLOCK), (GRAM_BLOCK, GRAM_BLOCK + GRAM_CHUNK), (GRAM_BLOCK + GRAM_CHUNK, n)]
        points = []
        G = st.gram(job, ranges, False, on_range=lambda b, acc: points.append((b, acc.copy())))
        # not inside block 1, where the state is not the sum alone
        assert [b for b, _ in points] == [GRAM_BLOCK, n]
        np.testing.assert_array_equal(points[-1][1], G)
        b, acc = points[0]
        again = st.gram(job, ranges_from(ranges, b), False, acc=acc)
        np.testing.assert_array_equal(G, again)
        host = get_backend("reference")
        cpu = gpu.Streamer(traj, host, 64 << 20).gram(job, [(0, n)], True)
        if name == "triton" and isinstance(st.kern, devicedouble.RefKernels):
            np.testing.assert_array_equal(G, cpu)
        else:
            np.testing.assert_allclose(G, cpu, rtol=1e-5)
        gpu.close_streamer(st)
    finally:
        traj.close()


def test_device_budget_too_small_is_a_usage_error(tmp, device_backend):
    name, _ = device_backend
    base, ck = _traj(tmp)
    from relex_kernels.errors import UsageError
    with pytest.raises(UsageError, match="device-memory-budget"):
        extrapolate(base, ck, [20], os.path.join(tmp, "o"), backend=name, device_memory_budget=1 << 20)


def test_auto_prefers_a_device_backend_only_with_a_gpu(monkeypatch):
    from relex_kernels.ops import cuda as cmod
    monkeypatch.setattr(cmod, "gpu_present", lambda: False)
    assert resolve_backend("auto").name in ("cpu", "reference")
    assert resolve_backend("reference").name == "reference"


def test_backends_report_says_why_no_gpu():
    r = subprocess.run([sys.executable, "-m", "relex_kernels"], capture_output=True, text=True, timeout=120,
                       env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert r.returncode == 0, r.stderr
    lines = {ln.split()[0]: ln for ln in r.stdout.splitlines() if ln.startswith("  ")}
    for b in ("triton", "cuda"):
        if " no " in lines[b]:
            assert any(w in lines[b] for w in ("no GPU", "not built", "not installed", "needs torch")), lines[b]


def _cli_args(base, ck, targets, *extra) -> list[str]:
    """``relex extrapolate`` of ``base`` and the checkpoints ``ck`` ({step: dir}) to ``targets``, quiet."""
    args = ["extrapolate", "--base", base, "-q", *extra]
    for t in targets:
        args += ["--target-step", str(t)]
    for step, d in ck.items():
        args += ["--checkpoint", f"{step}={d}"]
    return args


def test_cli_with_interpreted_triton_kernels(tmp, monkeypatch):
    """The real Triton kernels through the whole pipeline and CLI, on the CPU (TRITON_INTERPRET=1):
    resident, streamed, and small tensors in a group ("v" and "b.bias" by default) or alone."""
    pytest.importorskip("triton")
    shapes = {"model.embed_tokens.weight": (40, 16), "lm_head.weight": (40, 16), "v": (700,), "b.bias": (7,)}
    base, ck = make_trajectory(tmp, shapes, [1, 2, 3], dtype="BF16", config=TIED)
    args = _cli_args(base, ck, [12, 20])
    env = dict(os.environ, TRITON_INTERPRET="1")
    runs = {"ref": ["--backend", "reference"], "tri": ["--backend", "triton"], "tri_alone": ["--backend", "triton"],
            "tri_streamed": ["--backend", "triton", "--memory-budget", "24M", "--device-memory-budget",
                             str(gpu.device_overhead(3, 24 << 20) + 5300)]}  # "v" (5.6 KB) streams, the embedding (5.1 KB) stays
    for out, extra in runs.items():
        r = subprocess.run([sys.executable, "-m", "relex_kernels", *args, "--out", os.path.join(tmp, out), *extra],
                           env={**env, "RELEX_GROUP_TENSORS": "1" if out == "tri_alone" else "1024"},
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
    reads = {o: json.load(open(os.path.join(tmp, o, "relex_report.json")))["bytes_read"] for o in runs}
    assert reads["tri"] == reads["ref"] == reads["tri_alone"]
    assert reads["tri_streamed"] == reads["ref"] + 4 * 700 * 2  # "v" read twice
    # "tri" ran "v" and "b.bias" as one group: checked on the plan of the same run built here (on the
    # double: planning uses no kernel), not on the subprocess itself, whose report does not list groups
    devicedouble.install(monkeypatch.setattr)
    traj = Trajectory(base, ck)
    monkeypatch.setattr(plan, "GROUP_MAX", 1024)  # as "tri" ran
    st = gpu.make_streamer(traj, get_backend("triton"), default_memory_budget())
    try:
        items = plan.build(traj, st.policy, 2, fitted=False, groupable=st.groupable).items
        monkeypatch.setattr(plan, "GROUP_MAX", 1)  # as "tri_alone" ran
        alone = plan.build(traj, plan.Policy(traj.T, default_memory_budget(), st.policy.device_cap, stage=st.stage),
                           2, fitted=False, groupable=st.groupable).items
    finally:
        gpu.close_streamer(st)
        traj.close()
    assert [[j.name for j in it.jobs] for it in items if it.kind == "group"] == [["v", "b.bias"]]
    assert not [it for it in alone if it.kind == "group"]
    for t in (12, 20):
        ref = os.path.join(tmp, "ref", f"step_{t}")
        assert_same(ref, os.path.join(tmp, "tri", f"step_{t}"), exact=False)
        # same kernels, same chunk contract: streaming or grouping changes no bit
        for other in ("tri_streamed", "tri_alone"):
            assert_same(os.path.join(tmp, "tri", f"step_{t}"), os.path.join(tmp, other, f"step_{t}"), True)


def test_outputs_are_written_while_the_next_tensor_computes(tmp, monkeypatch):
    """combine returns with its outputs still on their way to the maps; the next tensor's Gram
    runs meanwhile, and the journal's records of a tensor (written ranges, done) come only once
    its outputs are in the maps — checked at each record: the bytes are there already."""
    devicedouble.install(monkeypatch.setattr)
    per_tensor(monkeypatch)
    base, ck = _traj(tmp)
    ref = extrapolate(base, ck, [20], os.path.join(tmp, "ref"), backend="triton")
    want = _outputs(ref.outputs[0])
    started = []  # per Gram call: the writes still in flight when it began
    gram, combine, write = gpu.DeviceStreamer.gram, gpu.DeviceStreamer.combine, gpu.DeviceStreamer._write
    gate = threading.Event()

    def slow_write(self, *a):
        gate.wait(0.5)  # held until the next Gram has begun (at most 0.5 s: never a deadlock)
        return write(self, *a)

    def gated_combine(self, *a, **k):
        gate.clear()  # this tensor's writes wait for the next Gram
        return combine(self, *a, **k)

    def watched_gram(self, job, *a, **k):
        started.append(sum(not f.done() for f in self.inflight) + sum(
            not f.done() for fs, _ in self.later for f in fs))
        gate.set()
        return gram(self, job, *a, **k)

    monkeypatch.setattr(gpu.DeviceStreamer, "_write", slow_write)
    monkeypatch.setattr(gpu.DeviceStreamer, "combine", gated_combine)
    monkeypatch.setattr(gpu.DeviceStreamer, "gram", watched_gram)
    checked = _recorded_done(monkeypatch, want)  # a tensor is recorded done with its outputs in the maps
    got = extrapolate(base, ck, [20], os.path.join(tmp, "got"), backend="triton")
    assert_same(ref.outputs[0], got.outputs[0], True)
    assert any(started[1:]), "every Gram waited for the writes of the tensor before it"
    assert checked and all(ok for _, ok in checked)
    assert got.report["device_stages"]["write"] > 0


def test_each_written_range_is_in_the_maps_when_recorded(tmp, monkeypatch):
    """A tensor cut into ranges: each range's record (``on_range``) comes once its outputs are in
    the maps — not when combine returns, which is before the last range's writes landed."""
    devicedouble.install(monkeypatch.setattr)
    n = 3 * GRAM_CHUNK + 77
    base, ck = make_trajectory(tmp, {"x": (n,)}, [1, 2, 3], dtype="BF16")
    traj = Trajectory(base, ck)
    try:
        job = traj.jobs[0]
        alphas = np.array([[0.5, -1.0, 2.0]])
        os.makedirs(os.path.join(tmp, "ref"))
        os.makedirs(os.path.join(tmp, "got"))
        ref = ShardedWriter(os.path.join(tmp, "ref"), [job.spec])
        gpu.Streamer(traj, get_backend("reference"), 64 << 20).combine(job, [(0, n)], True, alphas, [ref])
        want = np.array(ref.view("x", 0, n))
        ref.close()
        devicedouble.late_writes(0.1, monkeypatch.setattr)
        st = gpu.make_streamer(traj, get_backend("triton"), 64 << 20,
                               device_memory_budget=gpu.device_overhead(3, 64 << 20) + (1 << 20))
        out = ShardedWriter(os.path.join(tmp, "got"), [job.spec])
        try:
            ranges = [(0, GRAM_CHUNK), (GRAM_CHUNK, 2 * GRAM_CHUNK + 5), (2 * GRAM_CHUNK + 5, n)]
            seen = []
            st.combine(job, ranges, False, alphas, [out],
                       on_range=lambda b: seen.append((b, np.array_equal(np.array(out.view("x", 0, b)), want[:b]))))
            assert len(seen) < len(ranges), "combine waited for its writes"
            st.drain()
            assert seen == [(b, True) for _, b in ranges]
        finally:
            gpu.close_streamer(st)
            out.close()
    finally:
        traj.close()


@pytest.mark.parametrize("path", ["per-tensor", "groups"])
def test_interrupt_keeps_the_tensors_whose_outputs_landed(tmp, monkeypatch, path):
    """Ctrl-C while outputs are in flight: the writes land and the finished tensors are recorded
    before the partial state is kept, so the resume reads them not again (records batched as
    by default: the interrupt's flush makes them durable). ``per-tensor``: at the third tensor's
    fit, two tensors finished; ``groups``: inside the second group, the first one finished."""
    devicedouble.install(monkeypatch.setattr)
    if path == "groups":
        monkeypatch.setattr(plan, "GROUP_MAX", GROUPED_MAX)
        base, ck = _grouped_traj(tmp)
        at_fit, finished = GROUPED_MAX + 2, GROUPED_MAX
    else:
        per_tensor(monkeypatch)
        base, ck = _traj(tmp)
        at_fit, finished = 3, 2
    from relex_kernels.engine import journal as jmod
    whole = extrapolate(base, ck, [20], os.path.join(tmp, "whole"), backend="triton")
    devicedouble.late_writes(0.1, monkeypatch.setattr)
    hook, fits = jmod.hook, [0]

    def interrupt_at_fit(point):
        if point == "fit":
            fits[0] += 1
            if fits[0] == at_fit:
                raise KeyboardInterrupt
        return hook(point)
    monkeypatch.setattr(jmod, "hook", interrupt_at_fit)
    out = os.path.join(tmp, "out")
    with pytest.raises(KeyboardInterrupt):
        extrapolate(base, ck, [20], out, backend="triton")
    monkeypatch.setattr(jmod, "hook", hook)
    again = extrapolate(base, ck, [20], out, backend="triton")
    assert again.report["resumed_tensors"] >= finished  # their writes were still in flight at the interrupt
    assert again.bytes_read < whole.bytes_read
    assert_same(whole.outputs[0], again.outputs[0], True)


def test_host_tensors_between_device_tensors_with_writes_in_flight(tmp, monkeypatch):
    """F64 tensors (computed on the host, written at once) between device tensors whose writes
    are still in flight: the bytes of the reference engine, every tensor recorded done once."""
    devicedouble.install(monkeypatch.setattr)
    shapes = {"a": (3000,), "h64": (500,), "b": (4000,), "g64": (70,), "c": (2500,)}
    base, ck = make_trajectory(tmp, shapes, STEPS, dtype="BF16", extra_dtypes={"h64": "F64", "g64": "F64"})
    ref = extrapolate(base, ck, [20], os.path.join(tmp, "ref"), backend="reference")
    devicedouble.late_writes(0.05, monkeypatch.setattr)
    done = _recorded_done(monkeypatch, _outputs(ref.outputs[0]))
    got = extrapolate(base, ck, [20], os.path.join(tmp, "got"), backend="triton")
    assert_same(ref.outputs[0], got.outputs[0], True)
    assert sorted(n for n, _ in done) == sorted(shapes)
    assert all(ok for _, ok in done), done


_GRAM_GROUP = gpu.DeviceStreamer.gram_group  # (taken before any test patches it)


def _grouped_run(monkeypatch, group_max, *args, **kw):
    """``extrapolate(*args, **kw)`` with groups of ``group_max`` tensors at most; returns the result
    and the tensors of each group the device ran (its gram_group calls)."""
    monkeypatch.setattr(plan, "GROUP_MAX", group_max)
    groups = []

    def spy(self, jobs, group):
        groups.append([j.name for j in jobs])
        return _GRAM_GROUP(self, jobs, group)
    monkeypatch.setattr(gpu.DeviceStreamer, "gram_group", spy)
    return extrapolate(*args, **kw), groups


@pytest.mark.parametrize("steps,targets", [(STEPS, [20, 40]), ([2, 4, 6], [20])])
def test_device_groups_write_the_bytes_of_the_per_tensor_path(tmp, device_backend, steps, targets, monkeypatch):
    """Small tensors in groups on the device (one upload, one wait for the Grams, one batched
    solve, one download per group) write the bytes and report the fits of the per-tensor path,
    read the same input bytes, and match the reference engine; a host (F64) tensor and a
    streamed one end a group, and predict runs the groups without a Gram. T = 3 with one target:
    a tensor's Gram and weights in the group's stacks at offsets that are no multiple of 16 bytes
    (a kernel specialised on alignment must give the same bits)."""
    name, exact = device_backend
    shapes = {**GROUPED, "h64": (300,), "mid.weight": (17, 9), "big": (4 * GRAM_CHUNK + 77,), "tail.weight": (17, 9)}
    extra = {**GROUPED_EXTRA, "h64": "F64"}
    base, ck = make_trajectory(tmp, shapes, steps, dtype="BF16", extra_dtypes=extra)
    ref = extrapolate(base, ck, targets, os.path.join(tmp, "ref"), backend="reference")
    fit = os.path.join(tmp, "fit.relexfit")
    args = (base, ck, targets)
    small = _small(steps)
    grouped, groups = _grouped_run(monkeypatch, GROUPED_MAX, *args, os.path.join(tmp, "g"), backend=name, **small)
    alone, none = _grouped_run(monkeypatch, 1, *args, os.path.join(tmp, "a"), backend=name, save_fit=fit, **small)
    sizes = [len(g) for g in groups]
    assert none == [] and max(sizes) == GROUPED_MAX and sum(sizes) == len(GROUPED)  # tail.weight: alone
    # h64 ends the last group of GROUPED (else mid.weight would join it), big ends mid.weight's
    names = list(GROUPED)
    assert groups == [names[i:i + GROUPED_MAX] for i in range(0, len(names), GROUPED_MAX)]
    for g, a, r in zip(grouped.outputs, alone.outputs, ref.outputs):
        assert_same(a, g, True)
        assert_same(r, g, exact)
    assert grouped.bytes_read == alone.bytes_read
    assert grouped.report["tensors"] == alone.report["tensors"]
    # predict: the groups' pass 2 only, from the fit the per-tensor run saved
    combined, combine_group = [], gpu.DeviceStreamer.combine_group

    def spy(self, jobs, *a, **k):
        combined.append(len(jobs))
        return combine_group(self, jobs, *a, **k)
    monkeypatch.setattr(gpu.DeviceStreamer, "combine_group", spy)
    monkeypatch.setattr(plan, "GROUP_MAX", GROUPED_MAX)
    pg = predict(fit, [50], os.path.join(tmp, "pg"), backend=name)
    assert combined[:len(sizes)] == sizes  # GROUPED as in extrapolate (then the rest, read once: a group too)
    assert none == []  # (the spy of the per-tensor run: predict's groups ran no Gram)
    monkeypatch.setattr(plan, "GROUP_MAX", 1)
    pa = predict(fit, [50], os.path.join(tmp, "pa"), backend=name)
    assert_same(pa.outputs[0], pg.outputs[0], True)
    assert pg.bytes_read == pa.bytes_read


def test_device_groups_with_late_copies_and_writes(tmp, async_streams, monkeypatch):
    """Groups with copies that land late (asynchronous stand-ins) and writes held on their writer
    threads: the reference engine's bytes, and each tensor recorded done once, with its outputs
    already in the maps."""
    monkeypatch.setattr(plan, "GROUP_MAX", GROUPED_MAX)
    base, ck = _grouped_traj(tmp)
    ref = extrapolate(base, ck, [20], os.path.join(tmp, "ref"), backend="reference")
    want = _outputs(ref.outputs[0])
    devicedouble.late_writes(0.02, monkeypatch.setattr)
    checked = _recorded_done(monkeypatch, want)
    made, empty = [], gpu.DeviceStreamer._device_empty
    monkeypatch.setattr(gpu.DeviceStreamer, "_device_empty",
                        lambda self, numel, dtype, what: (made.append(what), empty(self, numel, dtype, what))[1])
    got = extrapolate(base, ck, [20], os.path.join(tmp, "got"), backend="triton", **SMALL)
    assert_same(ref.outputs[0], got.outputs[0], True)
    # device buffers made once for the run: the groups' aligned outputs fit the first output slots
    assert made.count("an output slot") == 2 and made.count("a group's Grams") == 1, made
    assert sorted(n for n, _ in checked) == sorted(GROUPED)
    assert all(ok for _, ok in checked), [n for n, ok in checked if not ok]
    assert all(s.ops > 0 for s in async_streams) and not any(s.errors for s in async_streams)


def test_an_error_while_draining_on_interrupt_is_said_and_the_threads_stop(capsys):
    """close_streamer(drain=True) (a graceful interrupt): a writer's error met while the outputs in
    flight land is said on stderr, not dropped silently, and the streamer is closed all the same."""
    class Streamer:
        closed = False

        def drain(self):
            raise OSError(28, "No space left on device")

        def close(self):
            self.closed = True
    st = Streamer()
    gpu.close_streamer(st, drain=True)
    assert st.closed
    assert "No space left on device" in capsys.readouterr().err


def test_writer_threads_write_exactly_where_the_tensors_are(tmp, monkeypatch):
    """The writer threads hand each output's bytes to the file writer at that tensor's place and
    nowhere else: a group's tensors side by side, and a tied embedding and head (written together,
    another tensor between them in the file) at their two places, that tensor's bytes untouched."""
    devicedouble.install(monkeypatch.setattr)
    monkeypatch.setattr(plan, "GROUP_MAX", GROUPED_MAX)
    shapes = {"model.embed_tokens.weight": (300, 64), "middle.weight": (400, 64), "lm_head.weight": (300, 64),
              **{f"e{i}.weight": (40, 33) for i in range(8)}}
    base, ck = make_trajectory(tmp, shapes, STEPS, dtype="BF16", config=TIED)
    from relex_kernels.io import writer as wmod
    calls, local = [], threading.local()
    write_pieces, write = wmod.ShardedWriter.write_pieces, gpu.DeviceStreamer._write

    def spy_write_pieces(self, f, pieces):
        pieces = list(pieces)
        local.spans += [(at, at + data.nbytes) for at, data in pieces]
        return write_pieces(self, f, pieces)

    def spy_write(self, pieces, buf, ev, writers, also):
        local.spans = []
        write(self, pieces, buf, ev, writers, also)
        names = [p[0].name for p in pieces] + ([also] if also else [])
        calls.append((names, local.spans))
    monkeypatch.setattr(wmod.ShardedWriter, "write_pieces", spy_write_pieces)
    monkeypatch.setattr(gpu.DeviceStreamer, "_write", spy_write)
    got = extrapolate(base, ck, [20], os.path.join(tmp, "got"), backend="triton")
    ck_out = Checkpoint(got.outputs[0])
    try:
        where = {n: (loc.info.begin, loc.info.begin + loc.info.nbytes) for n, loc in ck_out.tensors.items()}
    finally:
        ck_out.close()
    for names, spans in calls:  # every byte written lies in a tensor written, and covers them all
        assert merged_spans(spans) == merged_spans([where[n] for n in names]), (names, spans)
    tied = [merged_spans(spans) for names, spans in calls if "lm_head.weight" in names]
    assert tied == [[where["model.embed_tokens.weight"], where["lm_head.weight"]]]  # "middle.weight" between
    assert any(len(names) == GROUPED_MAX for names, _ in calls)  # a group's tensors in one writer call


def test_a_read_error_surfaces_once_no_reader_task_writes(tmp, monkeypatch):
    """A reader task that fails is raised by the group's fill only once its other tasks stopped
    writing into the pinned buffer (which then goes back to the pool), and reaches the caller."""
    devicedouble.install(monkeypatch.setattr)
    monkeypatch.setattr(plan, "GROUP_MAX", GROUPED_MAX)
    base, ck = _grouped_traj(tmp)
    from relex_kernels.errors import FormatError
    from relex_kernels.io import reader
    lock, real_read, real_fill = threading.Lock(), reader.MappedFile.read_whole, gpu.DeviceStreamer._fill
    state = {"calls": 0, "writing": 0, "at_raise": []}

    def failing(self, names, outs):
        with lock:
            state["calls"] += 1
            first = state["calls"] == 1
            state["writing"] += not first
        if first:
            raise FormatError("a read that fails")
        time.sleep(0.05)
        real_read(self, names, outs)
        with lock:
            state["writing"] -= 1

    def fill(self, key, arr):
        try:
            return real_fill(self, key, arr)
        except FormatError:
            state["at_raise"].append(state["writing"])
            raise
    monkeypatch.setattr(reader.MappedFile, "read_whole", failing)
    monkeypatch.setattr(gpu.DeviceStreamer, "_fill", fill)
    with pytest.raises(FormatError, match="a read that fails"):
        extrapolate(base, ck, [20], os.path.join(tmp, "got"), backend="triton")
    assert state["calls"] > 1 and state["at_raise"] == [0]  # other tasks ran, and had all finished


@pytest.mark.parametrize("path", ["mixed", "groups"])
def test_killed_while_outputs_are_in_flight_resumes_byte_identical(tmp, path):
    """Killed (SIGKILL) at the journal's points of the device pipeline while writes of outputs
    are still in flight (each delayed on its writer thread, every record made durable at once):
    the rerun resumes from the records and writes the bytes of an uninterrupted run. A record
    made before its outputs landed would be trusted by the rerun and leave them unwritten.
    ``mixed``: streamed, resident and host tensors and one group; ``groups``: small tensors in
    groups of GROUPED_MAX, killed inside the second group and after the first."""
    base, ck = (_grouped_traj if path == "groups" else _traj)(tmp)
    args = _cli_args(base, ck, [20, 40], "--backend", "triton")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELEX_TEST_")}
    env.update(PYTHONPATH=devicedouble.PYTHONPATH, RELEX_TEST_WRITE_DELAY="0.05", RELEX_JOURNAL_SYNC_SECONDS="0",
               RELEX_GROUP_TENSORS=str(GROUPED_MAX))
    points = ("combine:6", "done:4") if path == "groups" else ("combine:2", "done:1", "done:4")

    def run(out, **more):
        return subprocess.run([sys.executable, "-m", "relex_kernels", *args, "--out", out],
                              env={**env, **more}, capture_output=True, text=True, timeout=300)

    # the double's bytes are the reference engine's (test_pipeline_outputs_match_reference_engine)
    extrapolate(base, ck, [20, 40], os.path.join(tmp, "whole"), backend="reference")
    for point in points:
        out = os.path.join(tmp, point.replace(":", "_"))
        r = run(out, RELEX_TEST_KILL=point)
        assert r.returncode == -9, (point, r.returncode, r.stderr[-2000:])
        r = run(out)
        assert r.returncode == 0, (point, r.stderr[-2000:])
        rep = json.load(open(os.path.join(out, "relex_report.json")))
        if point.startswith("done"):
            assert rep["resumed_tensors"] >= int(point[-1]), point
        for t in (20, 40):
            assert_same(os.path.join(tmp, "whole", f"step_{t}"), os.path.join(out, f"step_{t}"), True)


# -- the CUDA kernels against the reference (GPU only) --------------------------------------
@pytest.fixture
def cuda_kernels():
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    from relex_kernels.ops import cuda as cmod
    ok, why = cmod.available()
    if not ok:
        pytest.skip(f"cuda backend: {why}")
    return cmod.device_kernels()


def _data(rng, dtype, T, n):
    b = rng.normal(0, 0.5, n).astype(np.float32)
    hs = [b + 1e-2 * rng.normal(0, 1, n).astype(np.float32) for _ in range(T)]
    return dtypes.from_float32(b, dtype), [dtypes.from_float32(h, dtype) for h in hs]


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32", "F64"])
@pytest.mark.parametrize("T,n", [(1, 1), (3, 70001), (8, 4097), (9, 1000), (17, 3000), (33, 2049), (70, 1500)])
@pytest.mark.parametrize("precision", ["auto", "ieee", "tf32x3"])
@pytest.mark.parametrize("fp16", [False, True])
def test_cuda_gram_matches_reference(cuda_kernels, dtype, T, n, precision, fp16):
    from relex_kernels.ops.cuda import run_gram
    rng = np.random.default_rng(T + n)
    base, hist = _data(rng, dtype, T, n)
    got = np.zeros((T, T))
    if precision == "auto":
        run_gram(cuda_kernels, base, hist, dtype, got, fp16)
    else:
        x = torch.from_numpy(np.stack([base] + hist).view(np.int16) if base.dtype.itemsize == 2
                             else np.stack([base] + hist)).cuda()
        acc = torch.zeros((T, T), dtype=torch.float64, device="cuda")
        part = torch.empty(cuda_kernels.scratch_numel(T, n), dtype=torch.float32, device="cuda")
        cuda_kernels.gram(x, n, T, dtype, acc, part, fp16, precision)
        got = acc.cpu().numpy()
    ref = np.zeros((T, T))
    reference.gram(base, hist, dtype, ref, fp16)
    d = reference.deltas_fp32(base, hist, dtype, fp16).astype(np.float64)
    exact, mag = d @ d.T, np.abs(d) @ np.abs(d).T
    tol = 2 * np.abs(ref - exact).max() + 8 * np.finfo(np.float32).eps * mag.max()
    if precision == "tf32x3" or (precision == "auto" and T > 16):
        tol = max(tol, 4e-6 * mag.max())  # 3xTF32 products: ~2^-21 relative
    assert np.abs(got - exact).max() <= tol
    again = np.zeros((T, T))
    run_gram(cuda_kernels, base, hist, dtype, again, fp16)
    if precision == "auto":
        np.testing.assert_array_equal(got, again)  # deterministic


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32", "F64"])
@pytest.mark.parametrize("T,K,n", [(1, 1, 9), (3, 2, 70001), (8, 3, 4097), (40, 9, 1000)])
@pytest.mark.parametrize("fp16", [False, True])
def test_cuda_combine_bit_exact(cuda_kernels, dtype, T, K, n, fp16):
    from relex_kernels.ops.cuda import run_combine
    rng = np.random.default_rng(T * K + n)
    base, hist = _data(rng, dtype, T, n)
    with np.errstate(all="ignore"):  # NaN, infinities, signed zeros, fp16 overflow and subnormal results
        base[:8] = dtypes.from_float32(np.array([np.nan, np.inf, -np.inf, -0.0, 0.0, 65504.0, 1e-7, -3e38],
                                                np.float32), dtype)
        alphas = rng.normal(0, 3, (K, T)).astype(np.float32)
        ref = [np.zeros(n, dtypes.raw_numpy(dtype)) for _ in range(K)]
        reference.combine(base, hist, alphas, dtype, ref, fp16)
    got = [np.zeros(n, dtypes.raw_numpy(dtype)) for _ in range(K)]
    run_combine(cuda_kernels, base, hist, alphas, dtype, got, fp16)
    for r, g in zip(ref, got):
        np.testing.assert_array_equal(r.view(np.uint8), g.view(np.uint8))


@pytest.mark.parametrize("T,rank", [(2, 1), (16, 2), (100, 1), (300, 2)])
def test_cuda_power_iteration_matches_eigh(cuda_kernels, T, rank):
    from relex_kernels.kernels.triton.eig_ref import eigh_top
    rng = np.random.default_rng(T)
    M = 0.05 * rng.normal(0, 1, (6, T, 50)) + np.linspace(1, 2, T)[None, :, None] * rng.normal(0, 1, (6, 1, 50))
    G = torch.from_numpy(M @ M.transpose(0, 2, 1)).cuda()
    lam, U, it = cuda_kernels.top_eigenpairs(G, rank)
    lam_r, U_r = eigh_top(G, rank)
    assert (torch.abs(lam - lam_r) <= 1e-9 * lam_r[:, :1]).all()
    assert torch.abs(U[:, :, 0] - U_r[:, :, 0]).max().item() <= 1e-7


@pytest.mark.parametrize("mode", ["extrapolate", "predict"])
def test_reader_follows_the_plan_without_restarts(tmp, device_backend, mode, monkeypatch):
    """Read-ahead goes along the run's plan (DeviceStreamer.follow): the reader thread starts once
    and every group the passes ask for is the next one it read, streamed and resident tensors
    alike, with a Gram pass (extrapolate) or without (predict); a group of small tensors is read
    once for both passes (pass 0)."""
    name, _ = device_backend
    base, ck = _traj(tmp)
    fit = os.path.join(tmp, "fit.relexfit")
    if mode == "predict":
        extrapolate(base, ck, [20], os.path.join(tmp, "first"), backend="reference", save_fit=fit)
    starts, taken = [], []
    real_start, real_take = gpu._Reader._start, gpu._Reader.take

    def start(self, key):
        starts.append(key)
        return real_start(self, key)

    def take(self, key, wait=True):
        buf = real_take(self, key, wait)
        if buf is not None:  # (an upload ahead asks without waiting, and may get nothing yet)
            taken.append(key)
        return buf

    monkeypatch.setattr(gpu._Reader, "_start", start)
    monkeypatch.setattr(gpu._Reader, "take", take)
    if mode == "predict":
        predict(fit, [20], os.path.join(tmp, "o"), backend=name, **SMALL)
    else:
        extrapolate(base, ck, [20], os.path.join(tmp, "o"), backend=name, **SMALL)
    assert len(starts) == 1 and len(taken) >= 3
    passes = {k[1] for k in taken}
    assert passes == ({0, 2} if mode == "predict" else {0, 1, 2})
    assert [k[0] for k in taken if k[1] == 0] == [("w.weight", "b.bias", "f32", "f16")]
    assert any(k[0] == "big" and k[1] == 2 for k in taken)  # the streamed tensor is read again


# -- the pipeline's stream and event ordering, with asynchronous stand-ins (tests/fakestreams.py) --

#: (min, max) seconds each fake copy waits before it runs
COPY_DELAYS = (0.0, 0.002)


@pytest.fixture
def async_streams(monkeypatch):
    """The device pipeline on the CPU (reference kernels) with asynchronous copy streams:
    host→device and device→host copies run on worker threads after random delays of up to
    2 ms, so every buffer handed on before its copy is done shows up as wrong bytes."""
    import itertools

    from fakestreams import AsyncStream, EngineThreadStream
    devicedouble.install(monkeypatch.setattr)
    made, seeds = [], itertools.count()

    def host_streams():
        h2d, d2h = (AsyncStream(name, next(seeds), *COPY_DELAYS) for name in ("h2d", "d2h"))
        made.extend([h2d, d2h])
        return h2d, EngineThreadStream(), d2h

    monkeypatch.setattr(gpu.DeviceStreamer, "_host_streams", staticmethod(host_streams))
    yield made
    for s in made:
        s.stop()


@pytest.mark.parametrize("budgets", ["resident", "streamed"])
def test_pipeline_with_asynchronous_copies_matches_reference(tmp, async_streams, budgets, monkeypatch):
    """Bit-identical outputs with copies that land late: the pinned input buffers, stage slots,
    output slots and pinned output buffers are reused only after their events."""
    monkeypatch.setattr(gpu, "READ_PIECE", 1000)
    base, ck = _traj(tmp)
    fo = FitOptions(rank=2)
    fit = os.path.join(tmp, "fit.relexfit")
    kw = SMALL if budgets == "streamed" else {}
    ref = extrapolate(base, ck, [20, 40], os.path.join(tmp, "ref"), fo, backend="reference")
    got = extrapolate(base, ck, [20, 40], os.path.join(tmp, "got"), fo, backend="triton", save_fit=fit, **kw)
    for r, g in zip(ref.outputs, got.outputs):
        assert_same(r, g, True)
    p = predict(fit, [50], os.path.join(tmp, "pred"), backend="triton", **kw)
    pr = predict(fit, [50], os.path.join(tmp, "pred_ref"), backend="reference")
    assert_same(pr.outputs[0], p.outputs[0], True)
    assert all(s.ops > 0 for s in async_streams) and not any(s.errors for s in async_streams)


def _differs_from_reference(tmp, make=_traj, **kw) -> bool:
    from relex_kernels.errors import InputError
    base, ck = make(tmp)
    ref = extrapolate(base, ck, [20], os.path.join(tmp, "ref"), backend="reference")
    try:
        got = extrapolate(base, ck, [20], os.path.join(tmp, "got"), backend="triton", **kw)
    except InputError:  # garbage read as data may overflow the Gram: refused, also a detection
        return True
    a, b = _outputs(ref.outputs[0]), _outputs(got.outputs[0])
    return any(not np.array_equal(a[n].view(np.uint8), b[n].view(np.uint8)) for n in a)


@pytest.mark.parametrize("path", ["per-tensor", "groups"])
@pytest.mark.parametrize("mutation", ["compute-ignores-uploads", "writer-ignores-downloads",
                                      "reader-refills-during-upload"])
def test_asynchronous_stand_ins_catch_a_missing_wait(tmp, async_streams, mutation, path, monkeypatch):
    """The check above can fail: drop one wait from the pipeline and the outputs go wrong. Copies
    wait 5-20 ms here, so the dropped wait loses its race on a loaded machine too. ``groups``:
    small tensors run in groups (several, each one upload and one download)."""
    monkeypatch.setattr(gpu, "READ_PIECE", 1000)
    if path == "groups":
        monkeypatch.setattr(plan, "GROUP_MAX", GROUPED_MAX)
    else:
        per_tensor(monkeypatch)
    monkeypatch.setattr(sys.modules[__name__], "COPY_DELAYS", (0.005, 0.02))
    if mutation == "compute-ignores-uploads":
        from fakestreams import EngineThreadStream
        monkeypatch.setattr(EngineThreadStream, "wait_event", lambda self, ev: None)
    elif mutation == "reader-refills-during-upload":
        real_put = gpu._Pool.put
        monkeypatch.setattr(gpu._Pool, "put", lambda self, item, ev=None: real_put(self, item, None))
    else:
        real = gpu.DeviceStreamer._write
        monkeypatch.setattr(gpu.DeviceStreamer, "_write",
                            lambda self, pieces, buf, ev, writers, also: real(self, pieces, buf, None, writers, also))
    assert _differs_from_reference(tmp, _grouped_traj if path == "groups" else _traj, **SMALL)


def test_read_ahead_of_a_device_resident_tensor_stays_within_the_host_budget(tmp, monkeypatch):
    """On a device, "resident" means the trajectory fits device memory, which can be far larger
    than host RAM: the host read-ahead of the next tensor asks for at most the memory budget."""
    devicedouble.install(monkeypatch.setattr)
    n = 4 * GRAM_BLOCK
    base, ck = make_trajectory(tmp, {"x": (n,)}, [1, 2, 3], dtype="BF16")
    traj = Trajectory(base, ck)
    budget = 16 << 20
    try:
        st = gpu.make_streamer(traj, get_backend("triton"), budget, device_memory_budget=1 << 33)
        job = traj.jobs[0]
        assert st.policy.ranges(job, 1)[0]  # resident on the device
        assert 4 * n * 2 > st.budget  # but its versions exceed the host budget
        asked = []
        for loc in st._locs(job):
            monkeypatch.setattr(loc.file, "prefetch", lambda name, a, b: asked.append(b - a))
        try:
            st.prefetch(job)
        finally:
            gpu.close_streamer(st)
        assert len(asked) == 4 and 0 < sum(asked) * 2 <= st.budget
    finally:
        traj.close()


def test_device_out_of_memory_is_a_clear_error(tmp, monkeypatch):
    """A device allocation that fails names what it was for and what to do, exit status 2."""
    from relex_kernels.errors import DeviceMemoryError
    devicedouble.install(monkeypatch.setattr)
    base, ck = _traj(tmp)
    real_empty = torch.empty

    def empty(*a, device=None, **kw):
        if device is not None and kw.get("dtype") is torch.float32:  # the Gram kernel's scratch
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_empty(*a, device=device, **kw) if device is not None else real_empty(*a, **kw)

    monkeypatch.setattr(torch, "empty", empty)
    with pytest.raises(DeviceMemoryError, match=r"scratch .*--device-memory-budget.*Tried to allocate"):
        extrapolate(base, ck, [20], os.path.join(tmp, "o"), backend="triton")
    assert not os.path.exists(os.path.join(tmp, "o", "step_20"))


def test_report_names_the_gram_precision_that_ran(tmp, monkeypatch):
    """``auto`` resolves per T and per device backend: the report records the resolved one."""
    devicedouble.install(monkeypatch.setattr)
    seen = []

    def precision(self, T, precision):
        seen.append((T, precision))
        return "tf32x3" if T >= 4 else "ieee"

    monkeypatch.setattr(devicedouble.RefKernels, "precision", precision)
    monkeypatch.delenv("RELEX_GRAM_PRECISION", raising=False)
    base, ck = _traj(tmp)
    got = extrapolate(base, ck, [20], os.path.join(tmp, "o"), backend="triton")
    assert got.report["gram_precision"] == "tf32x3" and seen == [(len(STEPS), "auto")]
    host = extrapolate(base, ck, [20], os.path.join(tmp, "h"), backend="reference")
    assert host.report["gram_precision"] == "ieee"


def test_relex_cuda_sync_raises_at_the_launch_that_failed(monkeypatch):
    """RELEX_CUDA_SYNC=1 waits after each launch and names the kernel whose error it caught;
    off (the default), or for a tensor not on a CUDA device, it does nothing."""
    from relex_kernels.errors import BackendError
    from relex_kernels.ops.cuda import sync_after_launch
    calls = []

    class FakeCuda:
        @staticmethod
        def synchronize(device):
            calls.append(device)
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore")

    class FakeTorch:
        cuda = FakeCuda

    dev = torch.device("cuda", 1)
    monkeypatch.delenv("RELEX_CUDA_SYNC", raising=False)
    sync_after_launch(FakeTorch, dev, "CUDA gram")
    monkeypatch.setenv("RELEX_CUDA_SYNC", "1")
    sync_after_launch(FakeTorch, torch.device("cpu"), "Triton gram")
    assert calls == []
    with pytest.raises(BackendError, match=r"the CUDA gram kernel failed on cuda:1: CUDA error: an illegal memory"):
        sync_after_launch(FakeTorch, dev, "CUDA gram")
    assert calls == [dev]


def test_report_times_the_device_pipeline_stages(tmp, device_backend):
    """``device_stages`` in relex_report.json: every stage of the pipeline, the busy ones > 0."""
    name, _ = device_backend
    base, ck = _traj(tmp)
    got = extrapolate(base, ck, [20], os.path.join(tmp, "o"), backend=name, **SMALL)
    st = got.report["device_stages"]
    assert set(st) == set(gpu.STAGES) and all(v >= 0 for v in st.values())
    assert st["read"] > 0 and st["gram"] > 0 and st["combine"] > 0 and st["write"] > 0
    assert "device_stages" not in extrapolate(base, ck, [20], os.path.join(tmp, "h"), backend="reference").report


def test_resident_trajectories_share_one_device_arena(tmp, device_backend, monkeypatch):
    """One device buffer, sized once from the plan, holds every resident trajectory in turn."""
    name, exact = device_backend
    per_tensor(monkeypatch)
    base, ck = _traj(tmp)
    ref = extrapolate(base, ck, [20], os.path.join(tmp, "ref"), backend="reference")
    made = []
    real = gpu.DeviceStreamer._device_empty

    def empty(self, numel, dtype, what):
        made.append(what)
        return real(self, numel, dtype, what)

    taken = []
    real_take = gpu.DeviceStreamer._resident_buffer

    def take(self, nbytes, name):
        taken.append(name)
        return real_take(self, nbytes, name)

    monkeypatch.setattr(gpu.DeviceStreamer, "_device_empty", empty)
    monkeypatch.setattr(gpu.DeviceStreamer, "_resident_buffer", take)
    got = extrapolate(base, ck, [20], os.path.join(tmp, "got"), backend=name)
    assert_same(ref.outputs[0], got.outputs[0], exact)
    assert len(taken) >= 4, taken  # several resident tensors, one after the other
    assert len([w for w in made if w.startswith("the resident trajectories")]) == 1, made


class _SlowGram(devicedouble.RefKernels):
    """Gram kernels that take a while: the reader has the next group ready before the engine waits."""

    def gram(self, *args, **kw):
        time.sleep(0.01)
        super().gram(*args, **kw)


def _count_uploads_ahead(monkeypatch) -> list:
    """Spy: the number of groups each device streamer uploaded ahead and used, appended at its close."""
    used, close = [], gpu.DeviceStreamer.close

    def counting_close(self):
        if not self.closed:
            used.append(self.uploads_ahead)
        close(self)
    monkeypatch.setattr(gpu.DeviceStreamer, "close", counting_close)
    return used


@pytest.mark.parametrize("path", ["per-tensor", "groups"])
def test_the_next_group_is_uploaded_before_the_device_wait_and_used(tmp, async_streams, path, monkeypatch):
    """The next group of the plan goes up while the engine waits for the Grams and solves (the
    copy overlaps them), into the next stage slot; its use waits for the copy: with copies that
    land late, the reference engine's bytes, and most groups were uploaded ahead."""
    devicedouble.install(monkeypatch.setattr, _SlowGram)
    if path == "groups":
        monkeypatch.setattr(plan, "GROUP_MAX", GROUPED_MAX)
        base, ck = _grouped_traj(tmp)
    else:
        per_tensor(monkeypatch)
        base, ck = _traj(tmp)
    # per tensor, nothing resident on the device: every tensor is streamed through the stage slots, twice
    budgets = SMALL if path == "groups" else dict(
        memory_budget=SMALL["memory_budget"], device_memory_budget=gpu.device_overhead(len(STEPS), SMALL["memory_budget"]))
    used = _count_uploads_ahead(monkeypatch)
    ref = extrapolate(base, ck, [20, 40], os.path.join(tmp, "ref"), backend="reference")
    got = extrapolate(base, ck, [20, 40], os.path.join(tmp, "got"), backend="triton", **budgets)
    for r, g in zip(ref.outputs, got.outputs):
        assert_same(r, g, True)
    monkeypatch.setattr(gpu.DeviceStreamer, "_look_ahead", lambda self: None)
    alone = extrapolate(base, ck, [20, 40], os.path.join(tmp, "alone"), backend="triton", **budgets)
    assert got.bytes_read == alone.bytes_read  # (a group uploaded ahead is counted once, where it is used)
    # per tensor: its pass-2 group goes up while its Gram is waited for; in groups: each next group
    # while the one before computes
    want = len(GROUPED) // GROUPED_MAX if path == "groups" else len(got.report["tensors"])
    assert used[0] >= want, (used, want)
    assert all(s.ops > 0 for s in async_streams) and not any(s.errors for s in async_streams)


def test_the_stand_ins_catch_a_group_uploaded_ahead_used_before_its_copy(tmp, async_streams, monkeypatch):
    """The check above can fail: let the compute stream use a group uploaded ahead without waiting for
    its copy (which lands 30-50 ms late here) and the outputs go wrong."""
    devicedouble.install(monkeypatch.setattr, _SlowGram)
    per_tensor(monkeypatch)
    monkeypatch.setattr(sys.modules[__name__], "COPY_DELAYS", (0.03, 0.05))
    from fakestreams import FakeEvent
    ahead, look, uploaded = set(), gpu.DeviceStreamer._look_ahead, gpu.DeviceStreamer._uploaded

    def spied_look(self):
        look(self)
        if self.ahead is not None:
            ahead.add(id(self.ahead[2]))

    def no_wait_if_ahead(self, key, ev, read):  # (a fresh event is complete: no wait)
        uploaded(self, key, FakeEvent() if id(ev) in ahead else ev, read)
    monkeypatch.setattr(gpu.DeviceStreamer, "_look_ahead", spied_look)
    monkeypatch.setattr(gpu.DeviceStreamer, "_uploaded", no_wait_if_ahead)
    assert _differs_from_reference(tmp, memory_budget=SMALL["memory_budget"],
                                   device_memory_budget=gpu.device_overhead(len(STEPS), SMALL["memory_budget"]))
    assert ahead


def test_a_group_uploaded_ahead_and_not_asked_for_is_dropped(tmp, monkeypatch):
    """The engine asks for another group than the one uploaded ahead (out of the plan's order): that
    one is read and uploaded, and the slot of the one ahead is reused in turn."""
    devicedouble.install(monkeypatch.setattr)
    per_tensor(monkeypatch)
    n = 8 * GRAM_CHUNK
    base, ck = make_trajectory(tmp, {"a": (n,), "b": (n,)}, [1, 2, 3], dtype="BF16")
    traj = Trajectory(base, ck)
    st = gpu.make_streamer(traj, get_backend("triton"), 8 << 20, device_memory_budget=gpu.device_overhead(3, 8 << 20))
    try:
        items = plan.build(traj, st.policy, 1, fitted=False, groupable=st.groupable).items
        st.follow(items)
        a, b = (traj.jobs[i] for i in (0, 1))
        ranges = [(0, a.numel)]
        ref = gpu.Streamer(traj, get_backend("reference"), 8 << 20)
        np.testing.assert_array_equal(st.gram(a, ranges, False), ref.gram(a, ranges, False))
        deadline = time.monotonic() + 30
        while st.ahead is None and time.monotonic() < deadline:  # the reader has a's pass-2 group ready
            st._look_ahead()
            time.sleep(0.01)
        assert st.ahead is not None and st.ahead[0][:2] == (a.name, 2)
        G = st.gram(b, ranges, False)  # not a's pass 2, which the plan has next
        assert st.uploads_ahead == 0
        np.testing.assert_array_equal(G, ref.gram(b, ranges, False))
        np.testing.assert_array_equal(st.gram(a, ranges, False), ref.gram(a, ranges, False))
        ref.close()
    finally:
        st.close()


class _FakeReaderOwner:
    """What :class:`gpu._Reader` asks of its streamer: the plan after a key, a timer, the fill of a
    group (here one byte per group: the key's place in the plan; ``fail``: that key's fill raises)."""

    def __init__(self, keys, fail=None):
        self.keys, self.fail, self.fills = keys, fail, []

    def _plan_from(self, key):
        return iter(self.keys[self.keys.index(key):])

    def _timed(self, stage):
        return contextlib.nullcontext()

    def _fill(self, key, arr):
        self.fills.append(key)
        if key == self.fail:
            raise OSError(f"cannot read {key}")
        arr[:] = self.keys.index(key)


def _when_read(reader, n: int) -> None:
    deadline = time.monotonic() + 30
    while reader.q.qsize() < n and time.monotonic() < deadline:
        time.sleep(0.005)


def test_a_take_that_does_not_wait_leaves_what_it_finds_to_the_next_take():
    """take(wait=False) of a group that is not the next one read (or whose read failed) answers None at
    once and keeps the reader and its reads: the next take gets that group, or raises its error,
    without reading it again."""
    import torch
    owner = _FakeReaderOwner(["a", "b", "c"], fail="c")
    pool = gpu._Pool(torch, 3, 16, False)
    rows = ThreadPoolExecutor(1)
    reader = gpu._Reader(owner, pool, rows)
    try:
        assert reader.take("b", wait=False) is None  # no reader yet: none started
        assert reader.thread is None
        a = reader.take("a")
        assert (a[1] == 0).all()
        pool.put(a)
        _when_read(reader, 2)  # b and c's error (then the end of the plan)
        assert reader.take("c", wait=False) is None  # b is next: kept, the reader goes on
        assert reader.thread is not None and owner.fills == ["a", "b", "c"]
        b = reader.take("b")
        assert (b[1] == 1).all()
        pool.put(b)
        assert reader.take("c", wait=False) is None  # its read failed: the error waits for the engine's take
        with pytest.raises(OSError, match="cannot read c"):
            reader.take("c")
        assert owner.fills == ["a", "b", "c"]  # nothing read twice
    finally:
        reader.cancel()
        rows.shutdown()
    assert pool.q.qsize() == 3  # every pinned buffer back in the pool


def _check_slot_ring(monkeypatch) -> list:
    """Spy on the stage-slot ring: a slot is handed out for an upload only once its last user has
    recorded when it is free (the event the h2d stream then waits for) and no upload ahead still
    holds it. The CPU stand-ins run kernels as they are issued, so a slot overwritten under a kernel
    that still reads it cannot show in the bytes here: this checks the bookkeeping the device's
    ordering rests on. Returns the violations (and counts uploads ahead under "ahead")."""
    D, found = gpu.DeviceStreamer, []
    real = {n: getattr(D, n) for n in ("_next_stage_slot", "_upload_staged", "_look_ahead", "_release_slot",
                                        "_download")}

    def state(self):
        if not hasattr(self, "_ring"):
            self._ring = {"user": {}, "ahead": {}}
        return self._ring

    def next_stage_slot(self):
        s = real["_next_stage_slot"](self)
        r = state(self)
        if r["user"].get(s) is not None or r["ahead"].get(s) is not None:
            found.append((s, r["user"].get(s), r["ahead"].get(s)))
        return s

    def upload_staged(self, key, nbytes, read=None):
        r = state(self)
        r["ahead"].clear()  # used or dropped here
        s = real["_upload_staged"](self, key, nbytes, read)
        r["user"][s] = key
        return s

    def look_ahead(self):
        before = self.ahead
        real["_look_ahead"](self)
        if before is None and self.ahead is not None:
            state(self)["ahead"][self.ahead[1]] = self.ahead[0]
            found_ahead.append(self.ahead[0])

    def release_slot(self, s):
        real["_release_slot"](self, s)
        state(self)["user"][s] = None

    def download(self, o, nbytes, s, *args):
        real["_download"](self, o, nbytes, s, *args)
        if s is not None:
            state(self)["user"][s] = None

    found_ahead: list = []
    for name, fn in (("_next_stage_slot", next_stage_slot), ("_upload_staged", upload_staged),
                     ("_look_ahead", look_ahead), ("_release_slot", release_slot), ("_download", download)):
        monkeypatch.setattr(D, name, fn)
    return found, found_ahead


@pytest.mark.parametrize("stages", [gpu.N_STAGE, 1])
def test_no_stage_slot_is_handed_out_while_in_use(tmp, stages, monkeypatch):
    """Per tensor and in groups, streamed and resident, with uploads ahead: every slot handed out was
    released by its last user. With one slot the upload ahead would take the slot of the group in
    use: the check sees it (so it can fail)."""
    devicedouble.install(monkeypatch.setattr, _SlowGram)
    monkeypatch.setattr(gpu, "N_STAGE", stages)
    monkeypatch.setattr(plan, "GROUP_MAX", GROUPED_MAX)
    from relex_kernels.errors import InputError
    bad, ahead = _check_slot_ring(monkeypatch)
    for make, sub in ((_grouped_traj, "g"), (_traj, "t")):
        base, ck = make(os.path.join(tmp, sub))
        try:
            extrapolate(base, ck, [20], os.path.join(tmp, sub, "o"), backend="triton", **SMALL)
        except InputError:  # (one slot: the group in use overwritten, its Gram garbage)
            assert stages < 2
    assert ahead
    if stages >= 2:
        assert bad == []
    else:
        assert bad
