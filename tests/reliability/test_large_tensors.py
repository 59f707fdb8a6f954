"""Tensors of more than 2^31 elements: no index computation overflows.

Sparse files keep this cheap: a safetensors file whose data region is a hole costs a
few KB of disk, and untouched anonymous memory reads as the shared zero page. Values
are placed only near both ends (sentinels), so a wrong offset anywhere shows.

CI: the reader and writer on >4 GB sparse files (offsets past 2^32), the engine's
range planning and journal positions, and the native Gram over one range of
2^31 + 2^16 + 5 elements. Slow (``RELEX_SLOW=1``): native combine over such a range,
and ``relex extrapolate`` end to end on a sparse 2^31 + 2^16 + 3 element bf16 trajectory.
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
from relhelp import relex

from relex_kernels.io import Checkpoint, SafetensorsFile, ShardedWriter, TensorSpec, dtypes
from relex_kernels.io.writer import plan_shards

BIG = 2**31 + 2**16 + 3  # elements: past int32, not a multiple of any chunk or block
HUGE = 3 * (2**30 + 7)  # a 2-D tensor of 3.2e9 elements


def sparse_safetensors(path, tensors, values=None):
    """Write a header and a hole of the right size; ``values`` = {name: {element: raw value}}."""
    obj, pos = {"__metadata__": {"format": "pt"}}, 0
    for name, (dt, shape) in tensors.items():
        n = int(np.prod(shape, dtype=object)) * dtypes.itemsize(dt)
        obj[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(obj).encode()
    raw += b" " * (-len(raw) % 8)
    start = 8 + len(raw)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.truncate(start + pos)
        for name, vals in (values or {}).items():
            dt = tensors[name][0]
            isz = dtypes.itemsize(dt)
            for i, v in vals.items():
                fh.seek(start + obj[name]["data_offsets"][0] + i * isz)
                fh.write(np.array([v], dtype=dtypes.raw_numpy(dt)).tobytes())
    return start


def test_reader_on_sparse_file_beyond_4GB(tmp_path):
    p = str(tmp_path / "model.safetensors")
    tensors = {"big": ("U8", (BIG,)), "huge": ("BF16", (3, 2**30 + 7)), "tail": ("F32", (4,))}
    vals = {"big": {0: 7, BIG - 1: 9, 2**31 + 5: 11}, "huge": {HUGE - 1: 0x3F80, 2**31: 0x4000},
            "tail": {0: 1.5, 3: -2.0}}
    sparse_safetensors(p, tensors, vals)
    assert os.path.getsize(p) > 2**32 + 2**31
    f = SafetensorsFile(p)
    try:
        assert f.tensors["big"].numel == BIG and f.tensors["huge"].numel == HUGE
        assert f.tensors["tail"].begin > 2**32 + 2**31
        assert f.view("big", 0, 1)[0] == 7 and f.view("big", BIG - 1)[0] == 9
        assert f.view("big", 2**31 + 5, 2**31 + 6)[0] == 11
        assert f.view("huge", HUGE - 1)[0] == 0x3F80 and f.view("huge", 2**31, 2**31 + 1)[0] == 0x4000
        assert f.view("huge", 2**31 + 1, 2**31 + 9).tolist() == [0] * 8
        assert f.view("tail").tolist() == [1.5, 0.0, 0.0, -2.0]
        for name in ("big", "huge"):  # page advice with offsets past 2^32
            f.prefetch(name, 2**31, 2**31 + 4096)
            f.release(name, 2**31, f.tensors[name].numel)
        with pytest.raises(IndexError):
            f.view("big", BIG - 1, BIG + 1)
    finally:
        f.close()
    ck = Checkpoint(str(tmp_path))
    assert ck.nbytes == BIG + 2 * HUGE + 16
    ck.close()


def test_writer_beyond_4GB_sparse(tmp_path, monkeypatch):
    # space reservation replaced by a hole so the test costs no disk; offsets are the same
    monkeypatch.setattr(os, "posix_fallocate", lambda fd, off, n: os.ftruncate(fd, off + n))
    specs = [TensorSpec("a", "F32", (3,)), TensorSpec("big", "BF16", (BIG,)), TensorSpec("huge", "F16", (3, 2**30 + 7)),
             TensorSpec("z", "F32", (2,))]
    assert specs[2].nbytes == 2 * HUGE
    assert [[s.name for s in g] for g in plan_shards(specs, 5 * 1000**3)] == [["a", "big"], ["huge"], ["z"]]
    d = str(tmp_path / "out")
    os.mkdir(d)
    for reuse in (False, True):  # created, then reopened as a resumed run does
        w = ShardedWriter(d, specs, 5 * 1000**3, reuse=reuse)
        w.view("a")[...] = [1, 2, 3]
        w.view("big", BIG - 2, BIG)[...] = [0x3F80, 0x4000]
        w.view("big", 2**31, 2**31 + 1)[...] = [0x4040]
        w.release("big", 2**31, BIG)
        w.view("huge", HUGE - 1, HUGE)[...] = [np.float16(3.0).view(np.uint16)]
        w.view("z")[...] = [4, 5]
        w.close()
    ck = Checkpoint(d)
    try:
        v = lambda n, a, b: ck.tensors[n].file.view(n, a, b).tolist()  # noqa: E731
        assert v("big", BIG - 2, BIG) == [0x3F80, 0x4000] and v("big", 2**31, 2**31 + 1) == [0x4040]
        assert v("big", 2**31 - 1, 2**31) == [0]
        assert v("huge", HUGE - 1, HUGE) == [np.float16(3.0).view(np.uint16)]
        assert v("a", 0, 3) == [1, 2, 3] and v("z", 0, 2) == [4, 5]
        assert ck.tensors["huge"].info.begin > 0 and ck.tensors["z"].file.path.endswith("00003.safetensors")
    finally:
        ck.close()


def journal_state():
    from relex_kernels.engine.plan import NO_JOURNAL
    return NO_JOURNAL


class _Traj:
    def __init__(self, T):
        self.T = T


@pytest.mark.parametrize("dtype,n", [("BF16", BIG), ("F32", 2**33 + 7), ("F16", HUGE)])
@pytest.mark.parametrize("budget", [1 << 20, 3 << 30, 1 << 40])
def test_range_planning_beyond_int32(dtype, n, budget):
    from relex_kernels.engine.plan import Policy, fit_item, ranges_from
    from relex_kernels.engine.streaming import GRAM_BLOCK, Streamer
    from relex_kernels.engine.trajectory import Job
    from relex_kernels.ops import get_backend
    from relex_kernels.ops.reference import GRAM_CHUNK
    job = Job("t", dtype, (n,), "fit")
    assert job.nbytes == n * dtypes.itemsize(dtype)
    s = Streamer(_Traj(75), get_backend("reference"), budget)
    resident, ranges = s.policy.ranges(job, 2)
    assert (resident, ranges) == Policy(75, budget).ranges(job, 2)
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(type(a) is int and type(b) is int for a, b in ranges)
    assert all(b0 == a1 for (_, b0), (a1, _) in zip(ranges, ranges[1:]))
    for a, b in ranges[:-1]:
        assert b % GRAM_CHUNK == 0 and (b % GRAM_BLOCK == 0 or GRAM_BLOCK % (b - a) == 0)
    assert resident == (len(ranges) == 1)
    item = fit_item(job, s.policy, 2, False, journal_state(), None)
    assert item.read_bytes(75) == 76 * job.nbytes * (1 if resident else 2)
    mid = ranges[len(ranges) // 2][0] + GRAM_CHUNK if len(ranges) > 1 else 2**31 + GRAM_CHUNK
    rest = ranges_from(ranges, mid)
    assert rest[0][0] == mid and rest[-1][1] == n and sum(b - a for a, b in rest) == n - mid


def test_journal_positions_beyond_int32(tmp_path):
    from relex_kernels.engine.journal import Journal
    j = Journal.create(str(tmp_path / "j"), "k")
    j.record_gram("t", 2**33 + 2**23, np.eye(3))
    j.record_written("t", 2**40 + 1)
    j.close()
    r = Journal.load(str(tmp_path / "j"), "k")
    assert r.grams["t"][0] == 2**33 + 2**23 and r.written["t"] == 2**40 + 1


def _native():
    try:
        from relex_kernels.ops import native
        return native if native.available()[0] else None
    except Exception:
        return None


def _sentinel_inputs(n, T):
    """base and T history arrays of n bf16 elements, zero (untouched pages) but near both ends."""
    base = np.zeros(n, np.uint16)
    hist = [np.zeros(n, np.uint16) for _ in range(T)]
    where = [0, 1, 2**31 - 1, 2**31, 2**31 + 1, n - 2, n - 1]
    x = np.float32(1.0).view(np.uint32) >> 16
    for k, i in enumerate(where):
        base[i] = x
        for s, h in enumerate(hist, 1):
            h[i] = (np.float32(1.0 + s * (k + 1) / 64).view(np.uint32) >> 16)
    return base, hist, where


@pytest.mark.skipif(_native() is None, reason="the native cpu backend is not built")
def test_native_gram_single_range_beyond_int32():
    native = _native()
    T = 2
    base, hist, where = _sentinel_inputs(BIG, T)
    acc = np.zeros((T, T))
    native.gram(base, hist, "BF16", acc)
    d = np.array([[s * (k + 1) / 64 for k in range(len(where))] for s in range(1, T + 1)])
    np.testing.assert_array_equal(acc, d @ d.T)  # dyadic: exact in any summation order


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_combine_single_range_beyond_int32(backend):
    from relex_kernels.ops import get_backend
    if backend == "cpu" and _native() is None:
        pytest.skip("the native cpu backend is not built")
    ops = get_backend(backend)
    base, hist, where = _sentinel_inputs(BIG, 2)
    out = np.zeros(BIG, np.uint16)
    ops.combine(base, hist, np.array([[2.0, 4.0]], np.float32), "BF16", [out])
    for k, i in enumerate(where):
        want = np.float32(1.0 + 10 * (k + 1) / 64)
        assert dtypes.to_float32(out[i:i + 1], "BF16")[0] == want, (i, out[i])
    assert not out[3:2**31 - 1].any() and not out[2**31 + 2:BIG - 2].any()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_extrapolate_end_to_end_beyond_int32(tmp_path, backend):
    """A sparse bf16 trajectory of one 2^31 + 2^16 + 3 element tensor through the CLI."""
    if backend == "cpu" and _native() is None:
        pytest.skip("the native cpu backend is not built")
    base = tmp_path / "base"
    base.mkdir()
    where = [0, 5, 2**31 - 1, 2**31, 2**31 + 60000, BIG - 1]
    tensors = {"w": ("BF16", (BIG,)), "n": ("F32", (3,))}

    def raw(x):
        return int(np.float32(x).view(np.uint32) >> 16)

    sparse_safetensors(str(base / "model.safetensors"), tensors,
                       {"w": {i: raw(1.0) for i in where}, "n": {0: 1.0}})
    ck = {}
    for s in (1, 2):
        d = tmp_path / "run" / f"step_{s}"
        d.mkdir(parents=True)
        sparse_safetensors(str(d / "model.safetensors"), tensors,
                           {"w": {i: raw(1.0 + s * (k + 1) / 64) for k, i in enumerate(where)},
                            "n": {0: 1.0 + s / 8}})
        ck[s] = d
    out = tmp_path / "out"
    r = relex("extrapolate", "--base", base, "--checkpoints", tmp_path / "run", "--target-step", 10, "--out", out,
              "-q", "--backend", backend, "--memory-budget", "2G", timeout=1800)
    assert r.returncode == 0, r.stderr
    f = SafetensorsFile(str(out / "step_10" / "model.safetensors"))
    try:
        for k, i in enumerate(where):
            got = dtypes.to_float32(f.view("w", i, i + 1), "BF16")[0]
            assert got == np.float32(1.0 + 10 * (k + 1) / 64), (i, got)
        for a in (7, 2**31 - 4096, 2**31 + 1, 2**31 + 50000, BIG - 4096):
            assert not f.view("w", a, a + 2048).any(), a
        assert f.view("n", 0, 1)[0] == np.float32(1.0 + 10 / 8)
    finally:
        f.close()

