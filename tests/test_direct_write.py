"""Outputs written around the page cache (relex_kernels/io/direct.py): the exact bytes at any
offset and length, the page cache really bypassed, errors raised instead of lost, and an engine
run's outputs identical to those written through memory maps."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import time

import numpy as np
import pytest
from relex_kernels.engine import extrapolate
from relex_kernels.errors import OutputError
from relex_kernels.io import direct
from relex_kernels.io.writer import ShardedWriter, TensorSpec
from trajgen import make_trajectory

A = direct.ALIGN


def _direct_or_skip(path: str) -> None:
    with open(path, "wb") as fh:
        fh.write(b"\0" * A)
    fd = direct.open_direct(path)
    if fd is None:
        pytest.skip(f"the file system of {path} refuses O_DIRECT")
    os.close(fd)


def _resident_pages(path: str) -> tuple[int, int]:
    """(pages of ``path`` in the page cache, pages): mincore over a fresh map (touches nothing)."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_READ)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        n = -(-size // mmap.PAGESIZE)
        vec = (ctypes.c_ubyte * n)()
        view = np.frombuffer(mm, dtype=np.uint8)
        if libc.mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(size), vec) != 0:
            pytest.skip(f"mincore: {os.strerror(ctypes.get_errno())}")
        del view
        return sum(v & 1 for v in vec), n
    finally:
        mm.close()


@pytest.mark.parametrize("at", [0, 1, 7, A - 2, A, A + 6, 5 * A + 4094])
@pytest.mark.parametrize("unit", [1, 2, 4])
def test_chunk_cuts_cover_the_range_and_cut_on_blocks(at, unit):
    nbytes, chunk = 9 * A + 3 * unit, 3 * A
    at -= at % unit  # (a tensor starts on a multiple of its element size in a safetensors file)
    cuts = direct.chunk_cuts(at, nbytes, chunk, unit)
    assert cuts[0][0] == 0 and cuts[-1][1] == nbytes
    for (s0, e0), (s1, _) in zip(cuts, cuts[1:]):
        assert e0 == s1, cuts
        assert (at + e0) % A == 0, f"an interior cut off a block edge: {cuts}"
    assert all(0 < e - s <= chunk and s % unit == 0 for s, e in cuts), cuts


@pytest.mark.parametrize("enabled", ["1", "0"])
def test_writes_land_exactly_at_any_offset_and_length(tmp_path, monkeypatch, enabled):
    """Staged and copied writes, aligned or not, small or over many blocks, beside bytes that must
    stay: the file equals the same edits applied to a byte array."""
    monkeypatch.setenv("RELEX_DIRECT_WRITE", enabled)
    path = str(tmp_path / "f.bin")
    rng = np.random.default_rng(0)
    size = 40 * A + 123
    expect = bytearray(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    with open(path, "wb") as fh:
        fh.write(expect)
    fd = os.open(path, os.O_RDWR)
    target = direct.Target(path, fd)
    q = direct.WriteQueue(chunk_bytes=4 * A, depth=3)
    try:
        pieces = [(0, 5), (3, A), (A, 2 * A), (A + 1, 3 * A - 2), (7 * A - 5, 9 * A + 17), (size - 300, 300),
                  (20 * A + 9, 1), (25 * A, 4 * A)]
        for i, (at, n) in enumerate(pieces):
            data = rng.integers(0, 256, n, dtype=np.uint8)
            if i % 2:
                q.write(target, at, data)  # copied through staging, in chunks
            else:
                for s, e in direct.chunk_cuts(at, n, q.chunk_bytes):
                    arr = q.stage(at + s, e - s, np.uint8)
                    arr[...] = data[s:e]
                    q.commit(target, at + s, arr)
            expect[at:at + n] = data.tobytes()
        q.drain()
        probe = direct.open_direct(path)
        if probe is not None:
            os.close(probe)
        assert (target.dfd is not None) == (enabled == "1" and probe is not None)
    finally:
        q.close()
        target.close()
        os.close(fd)
    with open(path, "rb") as fh:
        got = fh.read()
    assert len(got) == size
    bad = [i for i in range(size) if got[i] != expect[i]]
    assert not bad, f"{len(bad)} bytes differ, first at {bad[:5]}"


@pytest.mark.parametrize("at", [0, 3])
def test_direct_writes_leave_the_page_cache_alone(tmp_path, monkeypatch, at):
    """The point of the module: 8 MiB written directly (from a block edge, or from 3 bytes past
    one: staged so that memory and file offsets line up) are not in the page cache afterwards;
    the same through the page cache (RELEX_DIRECT_WRITE=0) are."""
    _direct_or_skip(str(tmp_path / "probe"))
    data = np.arange(8 << 20, dtype=np.uint8)
    resident = {}
    for enabled in ("1", "0"):
        monkeypatch.setenv("RELEX_DIRECT_WRITE", enabled)
        path = str(tmp_path / f"out{enabled}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        os.posix_fallocate(fd, 0, at + data.nbytes)
        target, q = direct.Target(path, fd), direct.WriteQueue()
        try:
            q.write(target, at, data)
            q.drain()
        finally:
            q.close()
            target.close()
            os.fsync(fd)
            os.close(fd)
        resident[enabled] = _resident_pages(path)
        assert np.array_equal(np.fromfile(path, dtype=np.uint8)[at:], data)
    (on, n), (off, _) = resident["1"], resident["0"]
    assert on <= n // 10, f"direct writes left {on} of {n} pages in the page cache"
    assert off >= n // 2, f"the page-cache path left only {off} of {n} pages cached (the check itself is wrong)"


def test_a_failed_write_is_raised_and_nothing_hangs(tmp_path, monkeypatch):
    specs = [TensorSpec("a", "F32", (3 * A,)), TensorSpec("b", "BF16", (5,))]
    w = ShardedWriter(str(tmp_path), specs)

    def fail(self, data, at):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(direct.Target, "write", fail)
    w.write("a", 0, np.ones(3 * A, dtype=np.float32))
    t0 = time.monotonic()
    with pytest.raises(OutputError, match=r"cannot write .*model\.safetensors: Input/output error"):
        w.drain()
    with pytest.raises(OutputError):  # and again: an error is never consumed
        w.close(sync=True)
    assert time.monotonic() - t0 < 30
    assert all(f._fd is None and f._target is None for f in w.files), "a file left open"


def test_a_stage_that_is_never_committed_is_an_error_not_a_hang():
    q = direct.WriteQueue(chunk_bytes=2 * A, depth=2)
    held = [q.stage(0, 16, np.uint8), q.stage(0, 16, np.uint8)]
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="commit"):
        q.stage(0, 16, np.uint8)
    assert time.monotonic() - t0 < 10
    q.discard(held[0])
    q.stage(0, 16, np.uint8)  # the buffer given back is there again


def test_commit_takes_only_staged_arrays():
    q = direct.WriteQueue(chunk_bytes=2 * A, depth=2)
    with pytest.raises(ValueError, match="stage"):
        q.commit(None, 0, np.zeros(8, dtype=np.uint8))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_engine_outputs_equal_those_written_through_maps(tmp_path, monkeypatch, backend):
    """A run written around the page cache (small staging chunks: many chunks per tensor, tensors
    at odd offsets, groups of small ones, a tied head, several shards and targets, an fp32 run
    written as bf16) has the bytes of the same run written through the maps."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file  # (the format's own reader, not ours)
    if backend == "cpu":
        from native_required import native_or_skip_module
        native_or_skip_module()
    monkeypatch.setattr(direct, "CHUNK_BYTES", 3 * A)
    shapes = {"model.embed_tokens.weight": (301, 37), "lm_head.weight": (301, 37), "big": (257, 129),
              "odd": (7, 3), "norm": (37,)}
    for i in range(6):
        shapes[f"layers.{i}.w"] = (33 + i, 29)
    base, ck = make_trajectory(str(tmp_path / "traj"), shapes, steps=range(1, 6), dtype="F32",
                               extra_dtypes={"odd": "BF16"},
                               config={"model_type": "test", "tie_word_embeddings": True})
    outs, targets = {}, [9, 40, 100, 1000]  # (headers of different lengths: the data starts apart)
    for enabled in ("0", "1"):
        monkeypatch.setenv("RELEX_DIRECT_WRITE", enabled)
        out = str(tmp_path / f"out{enabled}")
        extrapolate(base, ck, targets, out, backend=backend, shard_bytes=40_000, out_dtype="bf16",
                    progress=False)
        outs[enabled] = {}
        starts = set()
        for s in targets:
            d = os.path.join(out, f"step_{s}")
            files = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))
            assert len(files) > 1, "the test wants several shards"
            with open(os.path.join(d, files[0]), "rb") as fh:
                starts.add(int.from_bytes(fh.read(8), "little"))
            for f in files:
                for k, v in load_file(os.path.join(d, f)).items():
                    outs[enabled][(s, k)] = (v.dtype, v.contiguous().view(-1).view(torch.uint8).numpy())
        assert len(starts) > 1, "the test wants targets whose data start at different offsets"
    assert outs["0"].keys() == outs["1"].keys()
    for s in targets:  # the tied head is written from the embedding's staged chunks (``also``)
        assert np.array_equal(outs["1"][(s, "lm_head.weight")][1], outs["1"][(s, "model.embed_tokens.weight")][1])
    for key, (dt, raw) in outs["0"].items():
        assert outs["1"][key][0] == dt and np.array_equal(outs["1"][key][1], raw), key


def test_group_staging_runs_are_back_to_back_and_fit_a_buffer(tmp_path):
    """A group's outputs in runs for one staged buffer each: contiguous in one file, at most a
    buffer; an empty tensor rides along; a tensor larger than a buffer alone (lo == hi: the map)."""
    from types import SimpleNamespace

    from relex_kernels.engine.streaming import _staging_runs
    sizes = {"a": 5000, "z": 0, "b": 3000, "huge": 20000, "c": 100, "gap": 64, "d": 100, "e": 8000, "f": 8000}
    specs = [TensorSpec(n, "U8", (k,)) for n, k in sizes.items()]
    w = ShardedWriter(str(tmp_path), specs, max_shard_bytes=40_000)  # "f" in a second file
    w.writes.chunk_bytes = 3 * A
    try:
        names = [n for n in sizes if n != "gap"]  # "gap" is not in the group: c and d are apart
        jobs = [SimpleNamespace(name=n, numel=sizes[n], nbytes=sizes[n]) for n in names]
        runs = _staging_runs(jobs, w)
        got = [([names[i] for i in range(i0, i1)], hi - lo) for i0, i1, lo, hi in runs]
        assert got == [(["a", "z", "b"], 8000), (["huge"], 0), (["c"], 100), (["d", "e"], 8100), (["f"], 8000)], got
        for i0, i1, lo, hi in runs:
            if hi > lo:
                assert w.locate(names[i0])[1] == lo
    finally:
        w.close(sync=False)


def _slow_writes(monkeypatch, seconds=0.3):
    real = direct.Target.write

    def slow(self, data, at):
        time.sleep(seconds)
        return real(self, data, at)
    monkeypatch.setattr(direct.Target, "write", slow)


@pytest.mark.parametrize("how", ["sync", "view"])
def test_sync_and_views_wait_for_the_staged_writes(tmp_path, monkeypatch, how):
    """The journal records a tensor as written only after ``sync``, and the fp16 range check reads
    outputs back through ``view``: both must see every write queued before them, however slow."""
    _slow_writes(monkeypatch)
    n = 3 * A + 7
    w = ShardedWriter(str(tmp_path), [TensorSpec("pad", "U8", (5,)), TensorSpec("x", "U8", (n,))])
    try:
        data = (np.arange(n) % 251 + 1).astype(np.uint8)
        w.write("x", 0, data)
        if how == "sync":
            w.sync()
            f, at = w.locate("x")
            got = np.frombuffer(os.pread(os.open(f.path, os.O_RDONLY), n, at), dtype=np.uint8)
        else:
            got = np.array(w.view("x"))
        assert np.array_equal(got, data)
    finally:
        w.close(sync=False)


def test_a_file_system_that_takes_no_direct_write_gets_the_page_cache(tmp_path, monkeypatch):
    """O_DIRECT opened, then refused at the first write (EINVAL: some FUSE and network mounts): the
    bytes go through the page cache, all of them, and the direct descriptor is given up."""
    path = str(tmp_path / "f")
    _direct_or_skip(path)
    real = direct._pwrite_all
    targets = []

    def refuse(fd, view, at):
        if targets and fd == targets[0]._dfd:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, view, at)
    monkeypatch.setattr(direct, "_pwrite_all", refuse)
    fd = os.open(path, os.O_RDWR)
    os.posix_fallocate(fd, 0, 6 * A)
    t, q = direct.Target(path, fd), direct.WriteQueue()
    targets.append(t)
    data = np.arange(5 * A, dtype=np.uint32).view(np.uint8)[:5 * A]
    try:
        q.write(t, 100, data)
        q.drain()
        assert t.dfd is None
    finally:
        q.close()
        t.close()
        os.close(fd)
    assert np.array_equal(np.fromfile(path, dtype=np.uint8)[100:100 + data.nbytes], data)


def test_pieces_side_by_side_share_staged_buffers(tmp_path):
    """A device group's downloads: pieces in any order, back to back or apart, land exactly, and
    neighbours go out in a few writes, not one per piece."""
    rng = np.random.default_rng(1)
    size = 30 * A
    path = str(tmp_path / "f")
    expect = bytearray(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    with open(path, "wb") as fh:
        fh.write(expect)
    fd = os.open(path, os.O_RDWR)
    t, q = direct.Target(path, fd), direct.WriteQueue(chunk_bytes=8 * A, depth=3)
    commits = []
    real_commit = q.commit
    q.commit = lambda *a, **k: (commits.append(a[1]), real_commit(*a, **k))
    sizes = [100, 33, 4000, 7, 900, 12 * A, 50, 3 * A + 1]
    pieces, at = [], 5
    for i, n in enumerate(sizes):
        pieces.append((at, rng.integers(0, 256, n, dtype=np.uint8)))
        at += n + (64 if i == 4 else 0)  # a gap after the fifth: two runs
    try:
        q.write_pieces(t, [pieces[i] for i in rng.permutation(len(pieces))])
        q.drain()
    finally:
        q.close()
        t.close()
        os.close(fd)
    for at, d in pieces:
        expect[at:at + d.nbytes] = d.tobytes()
    assert open(path, "rb").read() == bytes(expect)
    assert len(commits) < len(pieces), commits


def test_a_committed_buffer_is_never_given_back_twice():
    q = direct.WriteQueue(chunk_bytes=2 * A, depth=2)

    class Sink:
        path = "sink"

        def write(self, data, at):
            pass
    arr = q.stage(0, 16, np.uint8)
    q.commit(Sink(), 0, arr)
    q.discard(arr)  # (an interrupt between a commit and its caller's bookkeeping): ignored
    with pytest.raises(ValueError, match="already"):
        q.commit(Sink(), 0, arr)
    q.drain()
    held = [q.stage(0, 16, np.uint8), q.stage(0, 16, np.uint8)]
    assert held[0].ctypes.data != held[1].ctypes.data, "one buffer handed out twice"
    q.close()


def test_grouped_outputs_land_at_each_targets_own_offsets(tmp_path, monkeypatch):
    """Groups of small tensors staged in runs (and one larger than a staging buffer through the
    map), four targets whose data start at different offsets: the same bytes as tensor by tensor."""
    from native_required import native_or_skip_module
    native_or_skip_module()
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    from relex_kernels.engine import plan, streaming
    monkeypatch.setattr(direct, "CHUNK_BYTES", 3 * A)
    shapes = {"model.embed_tokens.weight": (31, 37), "mid.weight": (150, 64), "norm.weight": (37,)}
    for i in range(6):
        shapes[f"layers.{i}.w"] = (33 + i, 29)
    base, ck = make_trajectory(str(tmp_path / "traj"), shapes, steps=range(1, 6), dtype="BF16")
    runs = []
    real_runs = streaming._staging_runs
    monkeypatch.setattr(streaming, "_staging_runs", lambda jobs, w: runs.append(real_runs(jobs, w)) or runs[-1])
    targets, outs = [9, 40, 10_000_000], {}  # (1, 2 and 8 digits: three header lengths never pad alike)
    for label, group_max in (("grouped", plan.GROUP_MAX), ("alone", 1)):
        monkeypatch.setattr(plan, "GROUP_MAX", group_max)
        out = str(tmp_path / label)
        extrapolate(base, ck, targets, out, backend="cpu")
        starts = set()
        for s in targets:
            p = os.path.join(out, f"step_{s}", "model.safetensors")
            with open(p, "rb") as fh:
                starts.add(int.from_bytes(fh.read(8), "little"))
            for k, v in load_file(p).items():
                outs[(label, s, k)] = v.contiguous().view(-1).view(torch.uint8).numpy()
        assert len(starts) > 1, "the test wants targets whose data start at different offsets"
    flat = [r for rs in runs for r in rs]
    assert any(hi > lo for _, _, lo, hi in flat) and any(hi == lo for _, _, lo, hi in flat), flat
    for (label, s, k), v in outs.items():
        if label == "grouped":
            assert np.array_equal(v, outs[("alone", s, k)]), (s, k)


def test_a_file_of_fp16_outputs_stays_in_the_page_cache(tmp_path):
    """fp16 outputs are read back at once by their range check: their file is written through the
    page cache (and an fp32 file of the same size is not)."""
    _direct_or_skip(str(tmp_path / "probe"))
    resident = {}
    for dt in ("F16", "F32"):
        d = tmp_path / dt
        d.mkdir()
        n = (8 << 20) // (2 if dt == "F16" else 4)
        w = ShardedWriter(str(d), [TensorSpec("x", dt, (n,))])
        try:
            w.write("x", 0, np.ones(n, dtype=np.uint16 if dt == "F16" else np.uint32))
        finally:
            w.close()
        resident[dt] = _resident_pages(str(d / "model.safetensors"))
    assert resident["F16"][0] >= resident["F16"][1] // 2, resident
    assert resident["F32"][0] <= resident["F32"][1] // 10, resident
