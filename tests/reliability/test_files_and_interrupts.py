"""Runs over thousands of input files under a low descriptor limit, and graceful interrupts
(Ctrl-C, SIGTERM) that keep the finished work although output records are batched."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal

import pytest
from relhelp import cli_env, output_bytes, relex, relex_bg, small_run, step_dirs, tensor_file
from test_interrupts import _wait_stopped, assert_finished, command, traj  # noqa: F401  (traj: a fixture)


# -- graceful interrupts ----------------------------------------------------------------
@pytest.mark.parametrize("sig, rc, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_interrupt_records_the_batched_finished_work(traj, tmp_path, sig, rc, word):  # noqa: F811
    """Output records wait up to RELEX_JOURNAL_SYNC_SECONDS; an interrupt syncs the outputs and
    writes them before exiting, so the rerun reuses every finished tensor."""
    out = str(tmp_path / "out")
    batched = {"RELEX_JOURNAL_SYNC_SECONDS": "3600"}  # production batching: nothing recorded by the clock
    a = relex_bg(*command(traj, out), env=cli_env(RELEX_TEST_KILL="done:3:STOP", **batched))
    _wait_stopped(a.pid)  # three tensors written (embedding + tied head, big, layer.weight), records pending
    os.kill(a.pid, sig)
    os.kill(a.pid, signal.SIGCONT)
    _, err = a.communicate(timeout=120)
    assert a.returncode == rc, err
    assert len(err.strip().splitlines()) == 1 and word in err and "Traceback" not in err, err
    assert step_dirs(out) == [] and os.path.isdir(os.path.join(out, ".relex.partial"))
    records = [json.loads(x) for x in open(os.path.join(out, ".relex.partial", "journal.jsonl"))]
    done = [r["name"] for r in records if r["kind"] == "done"]
    # (three, or one more where a BLAS or OpenMP thread took the signal and the main thread, which
    # alone runs Python's handler, finished the small tensor at hand before it saw it)
    assert done[:3] == ["model.embed_tokens.weight", "big", "layer.weight"] and len(done) <= 4, records
    rep = assert_finished(traj, out, relex(*command(traj, out), env=cli_env(**batched)))
    assert rep["resumed_tensors"] == len(done), "a tensor recorded as done was computed again"
    assert rep["bytes_read"] < traj["ref_report"]["bytes_read"], "finished work was read again"


# -- thousands of input files, few descriptors ---------------------------------------------
N_TENSORS = 600  # one 8-byte shard each: 5 checkpoints (base + 4) x 600 = 3000 input files
MANY_STEPS = range(1, 5)


@pytest.fixture(scope="module")
def many_files(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("manyfiles"))
    shapes = {f"layers.{i}.weight": (4,) for i in range(N_TENSORS)}
    from relex_kernels.io import writer
    with pytest.MonkeyPatch.context() as mp:  # test inputs need no fsync (3000 of them take seconds)
        mp.setattr(writer._OutFile, "sync", lambda self: None)
        mp.setattr(os, "fsync", lambda fd: None)
        base, run, _ = small_run(root, shapes=shapes, steps=MANY_STEPS, shard_bytes=1, noise=1e-2)
    n_files = sum(f.endswith(".safetensors") for d in (base, run) for _, _, fs in os.walk(d) for f in fs)
    assert n_files >= 3000
    args = ["extrapolate", "--base", base, "--checkpoints", run, "--target-step", 9, "-q"]
    ref = os.path.join(root, "ref")
    env = cli_env(RELEX_JOURNAL_SYNC_SECONDS="3600")  # one output sync per run, not one per tensor
    r = relex(*args, "--out", ref, env=env)
    assert r.returncode == 0, r.stderr
    return {"root": root, "args": args, "env": env, "ref": output_bytes(os.path.join(ref, "step_9"))}


def _nofile(soft, hard=None):
    def set_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, resource.getrlimit(resource.RLIMIT_NOFILE)[1]
                                                    if hard is None else hard))
    return set_limit


@pytest.mark.parametrize("hard", [None, 256], ids=["soft-256", "soft-and-hard-256"])
def test_thousands_of_input_files_under_a_low_descriptor_limit(many_files, tmp_path, hard):
    """3000 input files, 256 descriptors: the CLI raises the soft limit toward the hard one, and
    keeps only the files it is reading mapped (with the hard limit at 256 too, that alone must do)."""
    out = str(tmp_path / "out")
    r = relex(*many_files["args"], "--out", out, env=many_files["env"], preexec_fn=_nofile(256, hard))
    assert r.returncode == 0, r.stderr
    assert output_bytes(os.path.join(out, "step_9")) == many_files["ref"]


def test_the_cli_raises_the_soft_descriptor_limit(traj, tmp_path):  # noqa: F811
    out = str(tmp_path / "out")
    a = relex_bg(*command(traj, out), env=cli_env(RELEX_TEST_KILL="start:1:STOP"), preexec_fn=_nofile(256))
    try:
        _wait_stopped(a.pid)
        soft, hard = resource.prlimit(a.pid, resource.RLIMIT_NOFILE)
        assert soft > 256 and soft == min(hard, 1 << 16), (soft, hard)
    finally:
        os.kill(a.pid, signal.SIGCONT)
        a.communicate(timeout=120)
    assert_finished(traj, out, a)


def test_an_input_replaced_while_unmapped_is_an_error(tmp_path):
    """Files are mapped lazily and unmapped when idle; one swapped meanwhile is refused on reopen."""
    from relex_kernels.errors import FormatError
    from relex_kernels.io import SafetensorsFile
    base, _, _ = small_run(str(tmp_path / "t"))
    p = tensor_file(base, "a.weight")
    f = SafetensorsFile(p)
    try:
        first = f.view("a.weight").copy()
        f.unmap()
        assert (f.view("a.weight") == first).all()  # reopened: the same file
        f.unmap()
        out = first.copy()
        out[:] = 0
        f.read_into("a.weight", 0, first.size, out)  # the device reader's preadv path
        assert (out == first).all()
        with pytest.raises(ValueError, match="contiguous"):
            f.read_into("a.weight", 0, first.size, out[:-1])
        with pytest.raises(IndexError):
            f.read_into("a.weight", 0, first.size + 1, out)
        shutil.copy(p, p + ".new")  # identical bytes, another inode
        os.replace(p + ".new", p)
        with pytest.raises(FormatError, match="changed"):
            f.view("a.weight")
        with pytest.raises(FormatError, match="changed"):
            f.read_into("a.weight", 0, first.size, out)
    finally:
        f.close()


def test_read_whole_fills_each_tensor_with_its_bytes(tmp_path, monkeypatch):
    """The device reader's groups: whole tensors, asked in any order, each get their own bytes,
    with runs of adjacent tensors read by one preadv (more buffers than a call takes, short
    reads continued); a file that ends early is an error naming a tensor, one cut short since it
    was opened an error saying it changed."""
    import numpy as np
    from safetensors.numpy import save_file

    from relex_kernels.errors import FormatError
    from relex_kernels.io import SafetensorsFile, reader
    rng = np.random.default_rng(0)
    kinds = (np.float32, np.float16, np.int64)
    arrays = {f"t{i}": rng.normal(size=i * 13 + 1).astype(kinds[i % 3]) for i in range(40)}
    arrays["empty"] = np.zeros(0, np.float32)
    path = str(tmp_path / "m.safetensors")
    save_file(arrays, path)
    names = list(rng.permutation(list(arrays)))
    real = os.preadv

    def counted(limit=None):
        """os.preadv recording the buffers of each call; ``limit``: at most that many bytes a call."""
        calls = []

        def preadv(fd, bufs, at):
            calls.append(len(bufs))
            if limit is None:
                return real(fd, bufs, at)
            head, left = [], limit
            for b in bufs:
                head.append(b[:left])
                left -= len(head[-1])
                if not left:
                    break
            return real(fd, head, at)
        return preadv, calls

    with SafetensorsFile(path) as f:
        for iov_max, limit in ((1024, None), (3, 1000)):
            preadv, calls = counted(limit)
            monkeypatch.setattr(reader, "_IOV_MAX", iov_max)
            monkeypatch.setattr(os, "preadv", preadv)
            outs = [np.full(arrays[n].shape, 7, arrays[n].dtype) for n in names]
            f.read_whole(names, outs)
            for n, o in zip(names, outs):
                assert o.tobytes() == arrays[n].tobytes(), n
            if limit is None:  # the tensors lie back to back: one call for all (the empty one has no buffer)
                assert calls == [len(arrays) - 1]
            else:
                assert max(calls) == 3 and len(calls) > 40
        monkeypatch.setattr(os, "preadv", real)
        with pytest.raises(ValueError, match="contiguous"):
            f.read_whole(["t5"], [np.empty(arrays["t5"].size + 1, arrays["t5"].dtype)])
        monkeypatch.setattr(os, "preadv", lambda fd, bufs, at: real(fd, bufs, at) if at < 500 else 0)
        with pytest.raises(FormatError, match="ends inside tensor 't"):
            f.read_whole(names, [np.empty_like(arrays[n]) for n in names])
        # the error names the tensor the file ends in, not another of the same run
        cut = sorted((t for t in f.tensors.values() if t.nbytes), key=lambda t: t.begin)[5]
        stop = cut.begin + cut.nbytes // 2

        def ends_in_cut(fd, bufs, at):
            head, left = [], stop - at
            for b in bufs:
                if left <= 0:
                    break
                head.append(b[:left])
                left -= len(head[-1])
            return real(fd, head, at) if head else 0
        monkeypatch.setattr(os, "preadv", ends_in_cut)
        with pytest.raises(FormatError, match=f"ends inside tensor '{cut.name}'"):
            f.read_whole(names, [np.empty_like(arrays[n]) for n in names])
        monkeypatch.setattr(os, "preadv", real)
        os.truncate(path, os.path.getsize(path) - 8)
        with pytest.raises(FormatError, match="changed"):
            f.read_whole(names, [np.empty_like(arrays[n]) for n in names])


def test_map_cache_under_concurrent_readers(tmp_path, monkeypatch):
    """The device pipeline's reader threads view many files at once: with room for 4 maps, every
    view reads its own file's bytes, and a map is never unmapped under a live view."""
    import threading

    import numpy as np

    from relex_kernels.io import SafetensorsFile, reader, write_checkpoint
    monkeypatch.setattr(reader, "max_maps", lambda: 4)
    files = []
    for i in range(40):
        d = tmp_path / f"c{i}"
        d.mkdir()
        write_checkpoint(str(d), {"x": ("F32", np.full(1000, i, np.float32))})
        files.append(SafetensorsFile(str(d / "model.safetensors")))
    errors = []

    def work(seed):
        rng = np.random.default_rng(seed)
        try:
            held = []
            for _ in range(300):
                i = int(rng.integers(len(files)))
                v = files[i].view("x", 10, 900)
                held = (held + [(i, v)])[-3:]  # a few views alive while others are mapped and evicted
                for j, w in held:
                    assert (w == j).all()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for f in files:
        f.close()
    assert not errors, errors[0]
    assert not any(id(f) in reader._MAPS.files for f in files)  # closed: unmapped, forgotten
