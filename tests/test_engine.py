"""The engine end to end on hand-built trajectories, against an explicit SVD computation."""

from __future__ import annotations

import gc
import hashlib
import json
import os
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
from refmath import explicit_relex, load_fp32
from trajgen import make_trajectory

from relex_kernels.engine import extrapolate, predict
from relex_kernels.fit import FitOptions
from relex_kernels.io import Checkpoint
from relex_kernels.io.writer import merged_spans

SHAPES = {"w.weight": (33, 17), "b.bias": (7,), "one": (1,), "big": (4099,)}


def out_fp32(out_dir, name):
    return load_fp32(out_dir, name)


def ulp(x, dtype):
    """One unit in the last place of ``dtype`` at |x| (fp32 arrays)."""
    mant = {"BF16": 7, "F16": 10, "F32": 23}[dtype]
    e = np.floor(np.log2(np.maximum(np.abs(x), 1e-30)))
    return np.exp2(e - mant)


def raw_bytes(out_dir):
    return {f: open(os.path.join(out_dir, f), "rb").read() for f in sorted(os.listdir(out_dir))}


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("opts", [
    dict(),
    dict(rank=2),
    dict(window=4),
    dict(fit="poly", degree=2),
    dict(time_axis="index", step_scale=2.0),
])
def test_engine_matches_explicit_svd(tmp, dtype, opts):
    steps = [2, 4, 6, 8, 10, 12]
    base, ck = make_trajectory(tmp, SHAPES, steps, dtype=dtype, curvature=0.3)
    fo = FitOptions(**opts)
    target = 30
    res = extrapolate(base, ck, [target], os.path.join(tmp, "out"), fo, backend="reference")
    for name in SHAPES:
        got = out_fp32(res.outputs[0], name)
        want = explicit_relex(base, ck, name, target, rank=fo.rank, window=fo.window, degree=fo.poly_degree,
                              time_axis=fo.time_axis, scale=fo.step_scale)
        # the engine rounds once from fp32 sums; allow one ulp of the output dtype plus fp32 noise
        tol = ulp(want, dtype) * 1.01 + 1e-5 * np.abs(want - load_fp32(base, name)).max()
        assert np.all(np.abs(got - want) <= tol), (name, np.abs(got - want).max())


def test_reconstruct_returns_history_checkpoint_when_rank1(tmp):
    # dyadic values: stored fp32 trajectory is exactly rank 1 and linear
    rng = np.random.default_rng(1)
    from relex_kernels.io import write_checkpoint
    th0 = rng.integers(-1000, 1000, 513).astype(np.float32) / 1024
    v = rng.integers(-8, 8, 513).astype(np.float32) / 2**16
    steps = list(range(1, 9))
    base = os.path.join(tmp, "base")
    os.makedirs(base)
    write_checkpoint(base, {"w": ("F32", th0)})
    ck = {}
    for s in steps:
        d = os.path.join(tmp, f"step_{s}")
        os.makedirs(d)
        write_checkpoint(d, {"w": ("F32", th0 + s * v)})
        ck[s] = d
    for mode in ("reconstruct", "fit-reconstruct"):
        res = extrapolate(base, ck, [5], os.path.join(tmp, mode), FitOptions(mode=mode))
        assert res.report["tensors"][0]["explained_variance"] == pytest.approx(1.0, abs=1e-12)
        got = out_fp32(res.outputs[0], "w")
        np.testing.assert_allclose(got, th0 + 5 * v, rtol=0, atol=2 * ulp(np.abs(th0).max(), "F32"))
    res = extrapolate(base, ck, [64], os.path.join(tmp, "x"), FitOptions())
    np.testing.assert_allclose(out_fp32(res.outputs[0], "w"), th0 + 64 * v, rtol=0, atol=1e-5)


def test_index_axis_equals_step_axis_on_contiguous_steps(tmp):
    base, ck = make_trajectory(tmp, SHAPES, range(1, 9))
    a = extrapolate(base, ck, [50], os.path.join(tmp, "a"), FitOptions(time_axis="step"))
    b = extrapolate(base, ck, [50], os.path.join(tmp, "b"), FitOptions(time_axis="index"))
    assert raw_bytes(a.outputs[0]) == raw_bytes(b.outputs[0])


def test_several_targets_equal_separate_runs_and_predict_equals_extrapolate(tmp):
    base, ck = make_trajectory(tmp, SHAPES, range(1, 7))
    fitpath = os.path.join(tmp, "run.fit")
    both = extrapolate(base, ck, [40, 80], os.path.join(tmp, "both"), save_fit=fitpath)
    one = extrapolate(base, ck, [40], os.path.join(tmp, "one"))
    two = extrapolate(base, ck, [80], os.path.join(tmp, "two"))
    assert raw_bytes(both.outputs[0]) == raw_bytes(one.outputs[0])
    assert raw_bytes(both.outputs[1]) == raw_bytes(two.outputs[0])
    pred = predict(fitpath, [80], os.path.join(tmp, "pred"))
    assert raw_bytes(pred.outputs[0]) == raw_bytes(two.outputs[0])
    assert os.path.getsize(fitpath) < 64 * 1024


def test_chunked_equals_resident(tmp, monkeypatch):
    from relex_kernels.engine import plan
    shapes = {"big": (300_001,), "small": (5, 5)}
    base, ck = make_trajectory(tmp, shapes, range(1, 6))
    a = extrapolate(base, ck, [30], os.path.join(tmp, "a"), memory_budget=1 << 34)
    # 300k elements x (6 inputs + 1 output) x 2 B = 4.2 MB: a 1 MB budget forces 5 chunks, read twice
    monkeypatch.setattr(plan, "KERNEL_SCRATCH", 0)
    monkeypatch.setattr(plan, "MIN_BUDGET", 0)
    b = extrapolate(base, ck, [30], os.path.join(tmp, "b"), memory_budget=1 << 20)
    assert raw_bytes(a.outputs[0]) == raw_bytes(b.outputs[0])
    assert b.bytes_read > 1.9 * a.bytes_read - 1000


def test_tied_head_written_equal_to_embedding_and_copies_nonfloat(tmp):
    shapes = {"model.embed_tokens.weight": (50, 8), "lm_head.weight": (50, 8), "model.norm.weight": (8,),
              "pos_ids": (4,)}
    base, ck = make_trajectory(tmp, shapes, range(1, 5), extra_dtypes={"pos_ids": "I64"},
                               config={"model_type": "x", "tie_word_embeddings": True})
    res = extrapolate(base, ck, [20], os.path.join(tmp, "o"))
    o = Checkpoint(res.outputs[0])
    emb = np.array(o.tensors["model.embed_tokens.weight"].file.view("model.embed_tokens.weight"))
    head = np.array(o.tensors["lm_head.weight"].file.view("lm_head.weight"))
    ids = np.array(o.tensors["pos_ids"].file.view("pos_ids"))
    b = Checkpoint(base)
    np.testing.assert_array_equal(emb, head)
    np.testing.assert_array_equal(ids, np.array(b.tensors["pos_ids"].file.view("pos_ids")))
    assert not np.array_equal(emb, np.array(b.tensors["model.embed_tokens.weight"].file.view(
        "model.embed_tokens.weight")))
    assert [r["name"] for r in res.report["tensors"]].count("lm_head.weight") == 0
    assert os.path.isfile(os.path.join(res.outputs[0], "config.json"))


def test_untied_head_is_fitted(tmp):
    shapes = {"model.embed_tokens.weight": (50, 8), "lm_head.weight": (50, 8)}
    base, ck = make_trajectory(tmp, shapes, range(1, 5), config={"tie_word_embeddings": False})
    res = extrapolate(base, ck, [20], os.path.join(tmp, "o"))
    assert {r["name"] for r in res.report["tensors"]} == set(shapes)


def test_fp16_deltas_mode_matches_emulation(tmp):
    base, ck = make_trajectory(tmp, {"w": (1000,)}, range(1, 6))
    res = extrapolate(base, ck, [25], os.path.join(tmp, "o"), FitOptions(fp16_deltas=True))
    th0 = load_fp32(base, "w")
    b16 = th0.astype(np.float16)
    M = np.stack([(load_fp32(ck[s], "w").astype(np.float16) - b16).astype(np.float64) for s in sorted(ck)])
    u = np.linalg.svd(M, full_matrices=False)[0][:, 0]
    t = np.array(sorted(ck), dtype=np.float64)
    w = 1 / 5 + (25 - t.mean()) * (t - t.mean()) / ((t - t.mean()) ** 2).sum()
    want = th0 + ((w @ u) * u) @ M
    got = out_fp32(res.outputs[0], "w")
    assert np.all(np.abs(got - want) <= ulp(want, "BF16") * 1.01)


def test_sharded_inputs_and_outputs_and_verl_layout(tmp):
    from relex_kernels.io.layout import discover
    shapes = {f"layer{i}.weight": (64, 64) for i in range(6)}
    base, ck = make_trajectory(tmp, shapes, range(1, 5), shard_bytes=20000, layout="verl")
    found = discover(os.path.join(tmp, "run"))
    assert found == ck
    res = extrapolate(base, found, [12], os.path.join(tmp, "o"), shard_bytes=20000)
    files = sorted(os.listdir(res.outputs[0]))
    assert "model.safetensors.index.json" in files
    assert sum(f.endswith(".safetensors") for f in files) == 3  # 8 KB tensors, 20 KB shards
    import torch
    from safetensors.torch import load_file
    names = set()
    for f in files:
        if f.endswith(".safetensors"):
            t = load_file(os.path.join(res.outputs[0], f))
            names |= set(t)
            assert all(v.dtype == torch.bfloat16 for v in t.values())
    assert names == set(shapes)


#: issue 10: an MoE-like trajectory of many small tensors in several shards, with a copied
#: tensor and an empty one among them (each ends a group of the grouped passes)
MANY = {f"layers.{i // 50}.experts.{i % 50}.weight": (3 + i % 5, 2 + i % 7) for i in range(300)}
MANY.update({"layers.2.ids": (6,), "layers.4.empty.weight": (0, 4)})


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
def test_many_small_tensors_grouped_equal_per_tensor_and_reference(tmp, monkeypatch, dtype):
    """Grouped passes (plan.GROUP_MAX) write the bytes of the per-tensor path, for any memory
    budget (groups cut by bytes) and thread count, extrapolating and predicting; the reference
    backend agrees within an ulp of the output dtype."""
    from relex_kernels.engine import plan
    from relex_kernels.ops import native
    names = list(MANY)
    shapes = {n: MANY[n] for n in names[:120] + names[-2:] + names[120:-2]}  # file order: ids, empty mid-way
    base, ck = make_trajectory(tmp, shapes, range(1, 7), dtype=dtype, extra_dtypes={"layers.2.ids": "I32"},
                               shard_bytes=4000)
    fit = os.path.join(tmp, "fit.npz")
    kw = dict(opts=FitOptions(rank=2), shard_bytes=5000, backend="cpu")
    a = extrapolate(base, ck, [12, 20], os.path.join(tmp, "a"), save_fit=fit, **kw)
    assert len(os.listdir(a.outputs[0])) > 4  # several output shards
    monkeypatch.setattr(plan, "GROUP_MAX", 1)
    b = extrapolate(base, ck, [12, 20], os.path.join(tmp, "b"), **kw)
    c = predict(fit, [12, 20], os.path.join(tmp, "c"), backend="cpu", shard_bytes=5000)
    monkeypatch.setattr(plan, "GROUP_MAX", 1024)
    d = predict(fit, [12, 20], os.path.join(tmp, "d"), backend="cpu", shard_bytes=5000)
    # a budget of a few KB: groups of a few tensors each
    monkeypatch.setattr(plan, "KERNEL_SCRATCH", 0)
    monkeypatch.setattr(plan, "MIN_BUDGET", 0)
    native.set_num_threads(1)
    try:
        e = extrapolate(base, ck, [12, 20], os.path.join(tmp, "e"), memory_budget=3000, **kw)
    finally:
        native.set_num_threads(None)
    for r in (b, c, d, e):
        for x, y in zip(a.outputs, r.outputs):
            assert raw_bytes(x) == raw_bytes(y)
    assert a.report["tensors"] == b.report["tensors"] == e.report["tensors"]
    assert a.bytes_read == b.bytes_read == e.bytes_read and c.bytes_read == d.bytes_read
    ref = extrapolate(base, ck, [12, 20], os.path.join(tmp, "ref"), FitOptions(rank=2), backend="reference")
    for name in names[:300:7]:
        for x, y in zip(a.outputs, ref.outputs):
            got, want = out_fp32(x, name), out_fp32(y, name)
            tol = ulp(want, dtype) * 1.01 + 1e-5 * np.abs(want - load_fp32(base, name)).max()
            assert np.all(np.abs(got - want) <= tol), name


def _reshard(src: str, dst: str, per_shard: int, reverse: bool) -> str:
    """Checkpoint ``src`` written again into ``dst`` by safetensors' own writer, ``per_shard``
    tensors to a shard (in reverse order with ``reverse``), with an index as transformers writes it."""
    from safetensors.torch import load_file, save_file
    with open(os.path.join(src, "model.safetensors.index.json")) as fh:
        wm = json.load(fh)["weight_map"]
    tensors = {}
    for shard in sorted(set(wm.values())):
        tensors.update(load_file(os.path.join(src, shard)))
    names = list(reversed(wm)) if reverse else list(wm)
    parts = [names[i:i + per_shard] for i in range(0, len(names), per_shard)]
    os.makedirs(dst)
    new_wm = {}
    for i, part in enumerate(parts):
        fn = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        save_file({n: tensors[n] for n in part}, os.path.join(dst, fn), metadata={"format": "pt"})
        new_wm.update(dict.fromkeys(part, fn))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as fh:
        fh.write(json.dumps({"metadata": {"total_size": total}, "weight_map": new_wm}, indent=2, sort_keys=True) + "\n")
    return dst


def test_checkpoints_share_a_layout_and_others_read_the_same_values(tmp):
    """Checkpoints repeating the base's index and headers byte for byte share one layout (built and
    checked once per run); checkpoints stored in other shards and orders each have their own.
    A run reads the same values either way: the outputs are the same bytes, grouped or not, and
    each checkpoint's places through its layout are those found tensor by tensor."""
    from relex_kernels.engine import plan
    names = list(MANY)[:200]
    base, ck = make_trajectory(tmp, {n: MANY[n] for n in names}, range(1, 6), dtype="BF16", shard_bytes=4000)
    moved = dict(ck)
    moved[2] = _reshard(ck[2], os.path.join(tmp, "r2"), 7, reverse=False)
    moved[4] = _reshard(ck[4], os.path.join(tmp, "r4"), 13, reverse=True)
    cks = {s: Checkpoint(d) for s, d in moved.items()}
    b = Checkpoint(base)
    try:
        assert all(cks[s].layout is b.layout for s in (1, 3, 5))
        assert len({id(b.layout), id(cks[2].layout), id(cks[4].layout)}) == 3
        for c in (b, cks[2], cks[4]):  # by file, then offset, as each shard's own header places them
            with open(os.path.join(c.path, "model.safetensors.index.json")) as fh:
                wm = json.load(fh)["weight_map"]
            at = {}
            for shard in set(wm.values()):
                with open(os.path.join(c.path, shard), "rb") as fh:
                    head = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
                at.update({n: e["data_offsets"][0] for n, e in head.items() if n != "__metadata__"})
            assert c.storage_order() == sorted(names, key=lambda n: (wm[n], at[n]))
        want = sorted(names[::3], reverse=True)
        memo = {}
        for c in (b, *cks.values()):
            files, fi, begin = c.places(want, memo)
            by_name = dict(c.tensors.items())  # the same entries, tensor by tensor
            assert [files[i] for i in fi] == [by_name[n].file for n in want] == c.files_of(want, memo)
            assert begin.tolist() == [by_name[n].info.begin for n in want]
            assert len(files) == len(set(map(id, files))) == len({id(by_name[n].file) for n in want})
            for n in want[:5]:  # and the bytes there are the tensor's
                assert np.array_equal(by_name[n].file.view(n), c.tensors[n].file.view(n))
    finally:
        b.close()
        for c in cks.values():
            c.close()
    a = extrapolate(base, ck, [12], os.path.join(tmp, "a"), backend="cpu")
    m = extrapolate(base, moved, [12], os.path.join(tmp, "m"), backend="cpu")
    plan_max = plan.GROUP_MAX
    try:
        plan.GROUP_MAX = 1
        one = extrapolate(base, moved, [12], os.path.join(tmp, "one"), backend="cpu")
    finally:
        plan.GROUP_MAX = plan_max
    assert raw_bytes(a.outputs[0]) == raw_bytes(m.outputs[0]) == raw_bytes(one.outputs[0])
    assert a.report["tensors"] == m.report["tensors"] == one.report["tensors"]


def test_a_checkpoint_differing_from_the_base_is_checked_whatever_layouts_it_shares(tmp):
    """A checkpoint whose tensor has another shape than the base's is refused, also when a
    checkpoint with the base's layout came before it and one with its own layout after it."""
    from safetensors.numpy import save_file

    from relex_kernels.errors import InputError
    shapes = {"a.weight": (4, 3), "b.weight": (5,)}
    dirs = {}
    for s in range(5):
        d = dirs[s] = os.path.join(tmp, f"s{s}")
        os.makedirs(d)
        bad = s in (2, 3)
        save_file({"a.weight": np.full((3, 4) if bad else shapes["a.weight"], s, np.float32),
                   "b.weight": np.full(shapes["b.weight"], s, np.float32)}, os.path.join(d, "model.safetensors"))
    cks = [Checkpoint(dirs[s]) for s in (2, 3)]
    try:
        assert cks[0].layout is cks[1].layout
    finally:
        for c in cks:
            c.close()
    with pytest.raises(InputError, match=r"checkpoint step 2 tensor a\.weight is F32 \[3, 4\] but the base has F32 \[4, 3\]"):
        extrapolate(dirs[0], {s: dirs[s] for s in range(1, 5)}, [10], os.path.join(tmp, "out"), backend="cpu")


def test_groups_stay_within_their_byte_and_file_caps(tmp, monkeypatch):
    """A group's mapped bytes stay under plan.GROUP_BYTES whatever the memory budget (a dense
    model's groups must not hold the whole default budget in RSS), and its input files under
    half the map cache; the output equals one run without grouping."""
    from relex_kernels.engine import executor, plan
    shapes = {n: MANY[n] for n in list(MANY)[:200]}
    base, ck = make_trajectory(tmp, shapes, range(1, 5), shard_bytes=1500)
    seen = []
    real = executor.Executor._group

    def spy(self, item, *a, **k):
        group, streamer = item.jobs, self.st
        files = {id(loc.file) for job in group for loc in streamer._locs(job)}
        seen.append((sum((streamer.traj.T + 2) * j.nbytes for j in group), len(group), len(files)))
        return real(self, item, *a, **k)

    monkeypatch.setattr(executor.Executor, "_group", spy)
    monkeypatch.setattr(plan, "GROUP_BYTES", 4000)
    monkeypatch.setattr(plan, "max_maps", lambda: 16)
    a = extrapolate(base, ck, [9], os.path.join(tmp, "a"), backend="cpu", memory_budget=1 << 30)
    assert seen and max(g for _, g, _ in seen) > 1  # grouping happened
    assert all(b <= 4000 or g == 1 for b, g, _ in seen)
    assert all(f <= 8 or g == 1 for _, g, f in seen)
    monkeypatch.setattr(plan, "GROUP_MAX", 1)
    b = extrapolate(base, ck, [9], os.path.join(tmp, "b"), backend="cpu")
    assert raw_bytes(a.outputs[0]) == raw_bytes(b.outputs[0])


def test_groups_count_their_files_exactly_across_layouts(tmp, monkeypatch):
    """With checkpoints in two layouts (one re-sharded by safetensors' own writer), each group maps
    at most half the map cache of files, and is cut only where its next tensor would bring it past
    that: the files are counted exactly, neither too few (a group too large) nor too many (cut early)."""
    from relex_kernels.engine import executor, plan
    names = list(MANY)[:120]
    base, ck = make_trajectory(tmp, {n: MANY[n] for n in names}, range(1, 5), dtype="F32", shard_bytes=1500)
    ck = dict(ck)
    ck[2] = _reshard(ck[2], os.path.join(tmp, "r2"), 5, reverse=True)
    groups = []
    real = executor.Executor._group

    def spy(self, item, *a, **k):
        groups.append([job.name for job in item.jobs])
        return real(self, item, *a, **k)

    monkeypatch.setattr(executor.Executor, "_group", spy)
    monkeypatch.setattr(plan, "GROUP_BYTES", 1 << 40)
    monkeypatch.setattr(plan, "max_maps", lambda: 24)
    extrapolate(base, ck, [9], os.path.join(tmp, "a"), backend="cpu")
    cks = [Checkpoint(d) for d in [base, *ck.values()]]
    try:
        def files(group):  # the distinct files of every version of the group's tensors
            return len({id(c.tensors[n].file) for c in cks for n in group})
        assert len(groups) > 2
        for g, nxt in zip(groups, groups[1:] + [None]):
            assert files(g) <= 12
            if nxt is not None and names.index(nxt[0]) == names.index(g[-1]) + 1 and len(g) < plan.GROUP_MAX:
                assert files(g + nxt[:1]) > 12, (g, nxt[0])
    finally:
        for c in cks:
            c.close()


def _read_ahead_threads() -> set:
    return {t for t in threading.enumerate() if t.name == "relex-read-ahead"}


def _wait_read_ahead_gone(before: set) -> None:
    """Wait (10 s at most) until no read-ahead thread but those of ``before`` runs."""
    deadline = time.monotonic() + 10
    while _read_ahead_threads() - before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _read_ahead_threads() - before


def _record_asks(monkeypatch, events: list) -> None:
    """Append ("asked", the thread's name) to ``events`` at each read-ahead advice of an input file."""
    from relex_kernels.io import reader
    real = reader.MappedFile._willneed

    def willneed(self, begin, nbytes):
        events.append(("asked", threading.current_thread().name))
        return real(self, begin, nbytes)
    monkeypatch.setattr(reader.MappedFile, "_willneed", willneed)


def test_each_group_is_read_ahead_on_its_own_thread_while_the_work_before_it_computes(tmp, monkeypatch):
    """On a cold cache a group that asks for its bytes only when it opens waits for all of them,
    and asking (posix_fadvise) returns only once the reads are queued. So the executor hands the
    next group's spans to the read-ahead thread before the Gram of the group at hand (only the
    first group asks on the main thread, when it opens), every input byte of every group is
    asked for, and the thread ends with the run."""
    from relex_kernels.engine import plan, streaming
    shapes = {n: MANY[n] for n in list(MANY)[:200]}
    base, ck = make_trajectory(tmp, shapes, range(1, 5), shard_bytes=1500)
    monkeypatch.setattr(plan, "GROUP_BYTES", 4000)
    events = []  # (appended from both threads: the list's order is the order in time)
    St = streaming.Streamer
    real_ahead, real_gram, real_queue, real_spans = St.prefetch_group, St.gram_group, St.read_ahead, St._prefetch_spans

    def prefetch_group(self, jobs):
        events.append(("ahead", jobs[0].name))
        return real_ahead(self, jobs)

    def gram_group(self, jobs, rows):
        events.append(("gram", jobs[0].name))
        return real_gram(self, jobs, rows)

    def read_ahead(self, fn, *args):  # (the spans handed to the thread, recorded as they are handed)
        if fn == self._prefetch_spans:
            events.append(("spans", *args[:3]))
        return real_queue(self, fn, *args)

    def prefetch_spans(fobjs, lo, hi, used):
        if threading.current_thread() is threading.main_thread():
            events.append(("spans", fobjs, lo, hi))
        return real_spans(fobjs, lo, hi, used)

    monkeypatch.setattr(St, "prefetch_group", prefetch_group)
    monkeypatch.setattr(St, "gram_group", gram_group)
    monkeypatch.setattr(St, "read_ahead", read_ahead)
    monkeypatch.setattr(St, "_prefetch_spans", staticmethod(prefetch_spans))
    _record_asks(monkeypatch, events)
    before = _read_ahead_threads()
    extrapolate(base, ck, [9], os.path.join(tmp, "a"), backend="cpu", memory_budget=1 << 30)
    _wait_read_ahead_gone(before)
    grams = [e[1] for e in events if e[0] == "gram"]
    assert len(grams) > 3
    for here, nxt in zip(grams, grams[1:]):
        assert events.index(("ahead", nxt)) < events.index(("gram", here))
    first_gram = events.index(("gram", grams[0]))
    asked = [(i, e[1]) for i, e in enumerate(events) if e[0] == "asked"]
    assert all(who == "relex-read-ahead" for i, who in asked if i > first_gram)
    assert {who for _, who in asked} == {"MainThread", "relex-read-ahead"}
    spans = [(f.path, lo, hi) for e in events if e[0] == "spans" for f, lo, hi in zip(e[1], e[2].tolist(), e[3].tolist())]
    for d in [base, *ck.values()]:  # every byte of every version asked for
        c = Checkpoint(d)
        try:
            for name in shapes:
                loc = c.tensors[name]
                if loc.info.nbytes:
                    assert any(p == loc.file.path and lo <= loc.info.begin and loc.info.begin + loc.info.nbytes <= hi
                               for p, lo, hi in spans), (d, name)
        finally:
            c.close()


def test_the_next_tensor_is_read_ahead_from_the_last_range_of_a_cut_one(tmp, monkeypatch):
    """Behind a tensor cut into ranges, the next tensor is asked for when the cut tensor's last
    range starts (earlier, the cut tensor's own stream could evict it first); every read-ahead
    after the first Gram (the next range, the next tensor) runs on the read-ahead thread."""
    from relex_kernels.engine import plan, streaming
    from relex_kernels.ops.reference import GRAM_CHUNK
    shapes = {"big": (6 * GRAM_CHUNK,), "after": (64, 64), "last": (32, 64)}
    base, ck = make_trajectory(tmp, shapes, range(1, 4), dtype="F32")
    monkeypatch.setattr(plan, "GROUP_MAX", 1)
    monkeypatch.setattr(plan, "KERNEL_SCRATCH", 0)
    monkeypatch.setattr(plan, "MIN_BUDGET", 0)
    events = []
    St = streaming.Streamer
    real_views, real_ahead, real_gram = St.views, St.prefetch_ahead, St.gram

    def views(self, job, a, b):
        events.append(("views", job.name, a, b))
        return real_views(self, job, a, b)

    def prefetch_ahead(self, job):
        events.append(("ahead", job.name))
        return real_ahead(self, job)

    def gram(self, job, *a, **k):
        events.append(("gram", job.name))
        return real_gram(self, job, *a, **k)

    monkeypatch.setattr(St, "views", views)
    monkeypatch.setattr(St, "prefetch_ahead", prefetch_ahead)
    monkeypatch.setattr(St, "gram", gram)
    _record_asks(monkeypatch, events)
    before = _read_ahead_threads()
    budget = 5 * (3 + 1 + 1) * 4 * GRAM_CHUNK // 2  # "big" in ranges of two chunks
    extrapolate(base, ck, [9], os.path.join(tmp, "a"), backend="cpu", memory_budget=budget)
    _wait_read_ahead_gone(before)
    big = [e for e in events if e[:2] == ("views", "big")]
    assert len(big) == 2 * 3  # three ranges, each read in both passes
    ahead = events.index(("ahead", "after"))
    assert [e for e in events[ahead:] if e[:2] == ("views", "big")] == [big[-1]]  # only the last range after it
    assert ("ahead", "last") in events
    asked = [(i, e[1]) for i, e in enumerate(events) if e[0] == "asked"]
    first_gram = events.index(("gram", "big"))
    assert any(i > first_gram for i, _ in asked)
    assert all(who == "relex-read-ahead" for i, who in asked if i > first_gram)


def test_a_gram_only_pass_reads_the_next_tensor_ahead_from_its_last_range(tmp, monkeypatch):
    """The diagnostics pass (gram items, one pass): behind a tensor cut into ranges the next tensor
    is asked for when the cut tensor's last range starts, as behind a fit item's pass 2."""
    from relex_kernels.analysis.extended_gram import extended_grams
    from relex_kernels.engine import plan, streaming
    from relex_kernels.ops.reference import GRAM_CHUNK
    base, ck = make_trajectory(tmp, {"big": (6 * GRAM_CHUNK,), "after": (64, 64)}, range(1, 4), dtype="F32")
    monkeypatch.setattr(plan, "GROUP_MAX", 1)
    monkeypatch.setattr(plan, "KERNEL_SCRATCH", 0)
    monkeypatch.setattr(plan, "MIN_BUDGET", 0)
    events = []
    St = streaming.Streamer
    real_views, real_ahead = St.views, St.prefetch_ahead
    monkeypatch.setattr(St, "views", lambda self, job, a, b: (events.append(("views", job.name, a, b)),
                                                              real_views(self, job, a, b))[1])
    monkeypatch.setattr(St, "prefetch_ahead", lambda self, job: (events.append(("ahead", job.name)),
                                                                 real_ahead(self, job))[1])
    before = _read_ahead_threads()
    extended_grams(base, ck, memory_budget=2 * (3 + 1) * 4 * GRAM_CHUNK, backend="cpu")  # ranges of two chunks
    _wait_read_ahead_gone(before)
    big = [e for e in events if e[:2] == ("views", "big")]
    assert len(big) == 3
    ahead = events.index(("ahead", "after"))
    assert [e for e in events[ahead:] if e[:2] == ("views", "big")] == [big[-1]]


def test_read_ahead_neither_maps_a_file_nor_waits_for_the_maps_lock(tmp):
    """A prefetch asks the kernel through a descriptor of its own: it does not map the file, and the
    read-ahead thread never waits for the lock under which the main thread makes its views."""
    from relex_kernels.io import reader
    base, _ = make_trajectory(tmp, {"w": (64, 32)}, [1])
    c = Checkpoint(base)
    try:
        f = c.tensors["w"].file
        f.unmap()
        done = threading.Event()

        def ask():
            f.prefetch("w")
            f.prefetch_bytes(0, f.size)
            done.set()
        with reader._MAPS.lock:
            threading.Thread(target=ask, daemon=True).start()
            assert done.wait(10)
        assert f._mm is None
    finally:
        c.close()


def test_read_ahead_asks_in_pieces_the_kernel_reads_whole(tmp, monkeypatch):
    """Linux reads at most the disk's readahead limit of the range one WILLNEED advice names and
    drops the rest, so a prefetch asks in pieces of that size (sysfs says it; 128 KiB where it does
    not), one after another over the whole range."""
    from relex_kernels.io import reader
    assert reader.readahead_bytes(os.makedev(0, 54321)) == 128 << 10  # no such block device
    assert reader.readahead_bytes(os.stat(tmp).st_dev) >= 4096
    base, _ = make_trajectory(tmp, {"w": (300, 64)}, [1], dtype="F32")
    gc.collect()  # (the read-ahead thread of a streamer that is gone ends)
    _wait_read_ahead_gone(set())
    c = Checkpoint(base)
    asked = []
    try:
        loc = c.tensors["w"]
        monkeypatch.setattr(reader, "readahead_bytes", lambda dev: 4096)
        monkeypatch.setattr(os, "posix_fadvise", lambda fd, at, n, advice: asked.append((at, n, advice))
                            if advice == os.POSIX_FADV_WILLNEED else None)
        loc.file.prefetch("w", 10, 290 * 64)
    finally:
        monkeypatch.undo()
        c.close()
    assert len(asked) > 4 and all(n <= 4096 and advice == os.POSIX_FADV_WILLNEED for _, n, advice in asked)
    assert asked[0][0] == loc.info.begin + 10 * 4 and sum(n for _, n, _ in asked) == (290 * 64 - 10) * 4
    assert all(a + n == b for (a, n, _), (b, _, _) in zip(asked, asked[1:]))


def _reverse_index(d: str) -> dict:
    """Write checkpoint ``d``'s index with its weight map in reverse order; returns that map."""
    path = os.path.join(d, "model.safetensors.index.json")
    with open(path) as fh:
        index = json.load(fh)
    wm = dict(reversed(list(index["weight_map"].items())))
    with open(path, "w") as fh:
        json.dump({**index, "weight_map": wm}, fh)
    return wm


#: six small tensors, written by the index tests as several shards
SIX_TENSORS = {f"t{i}": ("F32", np.full((2, 3), i, np.float32)) for i in range(6)}


def test_checkpoint_lists_tensors_in_the_index_order(tmp):
    """``Checkpoint.tensors`` of an index checkpoint follows the index's weight map (what a tool
    embedding the reader iterates), whatever order the shards store the tensors in."""
    from relex_kernels.io import write_checkpoint
    d = os.path.join(tmp, "ck")
    os.makedirs(d)
    tensors = SIX_TENSORS
    write_checkpoint(d, tensors, max_shard_bytes=60)  # several shards
    wm = _reverse_index(d)
    assert len(set(wm.values())) > 1
    ck = Checkpoint(d)
    try:
        assert list(ck.tensors) == list(wm)
        assert all(os.path.basename(loc.file.path) == wm[n] for n, loc in ck.tensors.items())
        assert (ck.tensors["t4"].file.view("t4") == 4).all()
    finally:
        ck.close()


def test_the_index_text_is_json_dumps_indented():
    """The output's index is written without json's (slow) indenting encoder: the same bytes."""
    from relex_kernels.io.writer import index_text
    names = ["model.layers.0.mlp.experts.7.up_proj.weight", "quote\"back\\slash", "tab\tnl\nctl\x01",
             "unicode é \u2028 \U0001d11e", ""]
    for wm in ({}, {"a": "m.safetensors"}, {n: f"model-{i:05d}-of-00005.safetensors" for i, n in enumerate(names)}):
        for total in (0, 7, 16 << 40):
            doc = {"metadata": {"total_size": total}, "weight_map": wm}
            assert index_text(total, wm) == json.dumps(doc, indent=2) + "\n"


def test_each_shard_header_is_parsed_once_per_run_however_many_shards(tmp, monkeypatch):
    """The checkpoints of a run repeat their shards' headers: each distinct header is parsed once,
    also with more shards than the 64 headers the cache once held by count (a checkpoint of 80
    shards evicted each header before the next checkpoint asked for it). The cache is bounded by
    its tensor entries, the least recently used going first."""
    from safetensors.numpy import save_file

    from relex_kernels.io import reader
    monkeypatch.setattr(reader, "_HEADERS", type(reader._HEADERS)(reader.HEADER_ENTRIES_KEPT, reader._HEADERS.weight))
    parsed, real = [], reader.parse_header
    monkeypatch.setattr(reader, "parse_header", lambda raw, *a, **k: (parsed.append(raw), real(raw, *a, **k))[1])
    n = 80
    dirs = []
    for k in range(3):
        d = os.path.join(tmp, f"ck{k}")
        os.makedirs(d)
        wm = {}
        for i in range(n):
            fn = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            save_file({f"layers.{i}.w": np.full((2, 2), k, np.float32)}, os.path.join(d, fn))
            wm[f"layers.{i}.w"] = fn
        with open(os.path.join(d, "model.safetensors.index.json"), "w") as fh:
            json.dump({"metadata": {}, "weight_map": wm}, fh)
        dirs.append(d)
    cks = [Checkpoint(d) for d in dirs]
    try:
        assert len(parsed) == n  # the first checkpoint's; the others found them
        assert all(float(cks[k].tensors["layers.7.w"].file.view("layers.7.w")[0]) == k for k in range(3))
    finally:
        for c in cks:
            c.close()
    # bounded by entries (two here, one per header), the least recently used leaving first
    monkeypatch.setattr(reader, "_HEADERS", type(reader._HEADERS)(2, reader._HEADERS.weight))
    keys = []
    for i in (0, 1, 0, 2):  # shard 0 used again before shard 2 comes: shard 1 leaves
        path = os.path.join(dirs[0], f"model-{i + 1:05d}-of-{n:05d}.safetensors")
        with open(path, "rb") as fh:
            raw = fh.read(int.from_bytes(fh.read(8), "little"))
        sha = hashlib.sha256(raw).hexdigest()
        reader._parsed_header(raw, (sha, os.path.getsize(path) - 8 - len(raw), 8 + len(raw)), path)
        keys.append(sha)
    assert [k[0] for k in reader._HEADERS.keys()] == [keys[0], keys[3]] and reader._HEADERS.total == 2


def test_an_index_repeated_across_checkpoints_is_parsed_once(tmp, monkeypatch):
    """The checkpoints of a run repeat their index byte for byte: it is parsed once per run, each
    checkpoint still gets its own shards' entries, and an index with other bytes is parsed anew
    (its own order, its own shards checked)."""
    from relex_kernels.errors import InputError
    from relex_kernels.io import checkpoint, write_checkpoint
    tensors = SIX_TENSORS
    dirs = []
    for k in range(3):
        d = os.path.join(tmp, f"ck{k}")
        os.makedirs(d)
        write_checkpoint(d, {n: (dt, v + k) for n, (dt, v) in tensors.items()}, max_shard_bytes=60)
        dirs.append(d)
    checkpoint._parsed_index.cache_clear()
    parsed, loads = [], json.loads
    # checkpoint's own reference to json only (the shards' headers are parsed elsewhere: not counted)
    monkeypatch.setattr(checkpoint, "json", SimpleNamespace(
        loads=lambda text, *a, **k: (parsed.append("weight_map" in text), loads(text, *a, **k))[1]))
    cks = [Checkpoint(d) for d in dirs]
    try:
        assert sum(parsed) == 1
        for k, ck in enumerate(cks):
            assert list(ck.tensors) == list(tensors)
            assert all(ck.tensors[n].file.path.startswith(dirs[k]) for n in tensors)
            assert (ck.tensors["t4"].file.view("t4") == 4 + k).all()
    finally:
        for ck in cks:
            ck.close()
    wm = _reverse_index(dirs[2])
    parsed.clear()
    ck = Checkpoint(dirs[2])
    try:
        assert sum(parsed) == 1 and list(ck.tensors) == list(wm)
    finally:
        ck.close()
    os.remove(os.path.join(dirs[1], sorted(set(wm.values()))[0]))  # the same index bytes, a shard gone
    with pytest.raises(InputError, match="does not exist"):
        Checkpoint(dirs[1])


def test_merged_spans():
    """Byte ranges sorted and merged where they touch or overlap; empty ones dropped."""
    assert merged_spans([(30, 40), (0, 10), (10, 20), (15, 18), (25, 25), (50, 60), (55, 70)]) == [
        (0, 20), (30, 40), (50, 70)]
    assert merged_spans([]) == [] and merged_spans([(5, 5)]) == []
