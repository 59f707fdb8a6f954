"""verl FSDP actor checkpoints (rank files written by FSDP2 over gloo, saved as verl saves them)
read in place: outputs bit-identical to the same trajectory stored as safetensors, and bad
inputs refused with one line, nothing run, nothing left."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")
fsdpgen = pytest.importorskip("fsdpgen")

from relex_kernels import extrapolate  # noqa: E402
from relex_kernels.errors import FormatError, InputError  # noqa: E402
from relex_kernels.io.checkpoint import Checkpoint  # noqa: E402
from relex_kernels.io.torchzip import TorchZipFile  # noqa: E402

STEPS = [10, 20, 30]
WORLD = {10: 3, 20: 2, 30: 1}  # rank counts may differ between saves (1: one rank, whole tensors)
SHAPES = {"model.embed_tokens.weight": (50, 16), "model.layers.0.mlp.up_proj.weight": (37, 16),
          "model.layers.0.input_layernorm.weight": (16,), "model.norm.weight": (16,)}
CONFIG = {"model_type": "qwen2", "tie_word_embeddings": True}


def _values(seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    th0 = {n: torch.randn(s, generator=g) * 0.5 for n, s in SHAPES.items()}
    v = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    out = [th0]
    for s in STEPS:
        out.append({n: th0[n] + 1e-3 * s * v[n] + 1e-5 * torch.randn(SHAPES[n], generator=g) for n in SHAPES})
    return out


def _hf_dir(d: str, sd: dict) -> str:
    os.makedirs(d, exist_ok=True)
    safetensors_torch.save_file({k: t.contiguous() for k, t in sd.items()}, os.path.join(d, "model.safetensors"))
    with open(os.path.join(d, "config.json"), "w") as fh:
        json.dump(CONFIG, fh)
    return d


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """base (fp32 safetensors), a verl run dir of FSDP rank files, and the same steps as safetensors."""
    root = str(tmp_path_factory.mktemp("verl"))
    vals = _values(0)
    base = _hf_dir(os.path.join(root, "base"), vals[0])
    hf = {s: _hf_dir(os.path.join(root, "hf", f"step_{s}"), vals[i + 1]) for i, s in enumerate(STEPS)}
    for i, s in enumerate(STEPS):
        actor = os.path.join(root, "run", f"global_step_{s}", "actor")
        fsdpgen.save_fsdp(actor, vals[i + 1], WORLD[s])
        os.makedirs(os.path.join(actor, "huggingface"))
        with open(os.path.join(actor, "huggingface", "config.json"), "w") as fh:
            json.dump(CONFIG, fh)  # verl's default save_contents: config and tokenizer, no weights
    return root, base, hf, vals


def _bytes(out_dir: str) -> dict[str, bytes]:
    ck = Checkpoint(out_dir)
    try:
        return {n: bytes(np.asarray(loc.file.view(n)).view(np.uint8)) for n, loc in ck.tensors.items()}
    finally:
        ck.close()


def test_rank_files_equal_the_gathered_tensors(run):
    root, _, _, vals = run
    for i, s in enumerate(STEPS):
        ck = Checkpoint(os.path.join(root, "run", f"global_step_{s}", "actor"), step=s)
        try:
            assert ck.format == f"verl-fsdp (world size {WORLD[s]})"
            # verl's FSDP2 placement: Shard(1) when only dim 1 divides by W (37 x 16 over 2 ranks)
            sharded_cols = set(ck.tensors["model.norm.weight"].file.columns)
            assert sharded_cols == ({"model.layers.0.mlp.up_proj.weight"} if WORLD[s] == 2 else set()), sharded_cols
            for n, shape in SHAPES.items():
                loc = ck.tensors[n]
                assert loc.info.shape == shape and loc.info.dtype == "F32"
                n_el = int(np.prod(shape))
                for a, b in [(0, n_el), (3, min(n_el, 40)), (n_el // 3 - 1, n_el // 3 + 2)]:  # across blocks too
                    want = vals[i + 1][n].reshape(-1).numpy()[a:b]
                    assert np.array_equal(loc.file.view(n, a, b), want), (n, a, b)
                    got = np.empty(b - a, dtype=want.dtype)  # the device reader's preadv path
                    loc.file.read_into(n, a, b, got)
                    assert np.array_equal(got, want), (n, a, b)
        finally:
            ck.close()


def test_extrapolate_from_a_verl_run_equals_safetensors_inputs(run, tmp_path):
    """`relex extrapolate --checkpoints RUN` over rank files: the bytes of the same run as safetensors."""
    root, base, hf, _ = run
    ref = extrapolate(base, hf, [60, 90], str(tmp_path / "ref"))
    out = str(tmp_path / "verl")
    r = subprocess.run([sys.executable, "-m", "relex_kernels", "extrapolate", "--base", base, "--checkpoints",
                        os.path.join(root, "run"), "--target-step", "60", "--target-step", "90", "--out", out, "-q"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for t, o in zip([60, 90], ref.outputs):
        assert _bytes(os.path.join(out, f"step_{t}")) == _bytes(o)


def test_device_pipeline_reads_rank_files_in_place(run, tmp_path, monkeypatch):
    """The device reader fills its staging buffers from rank files (row blocks by ``preadv``, the
    ``Shard(1)`` tensor's columns gathered from the maps), the small tensors in a group: the bytes
    of the safetensors run, grouped or alone. The device kernels are the reference ops on the CPU
    (tests/devicedouble.py)."""
    import devicedouble
    from test_gpu import SMALL, _grouped_run

    from relex_kernels.io.layout import discover
    devicedouble.install(monkeypatch.setattr)
    root, base, hf, _ = run
    ref = extrapolate(base, hf, [60], str(tmp_path / "ref"), backend="reference")  # the stand-in's sums
    groups = {}
    for group_max in (1024, 1):
        got, groups[group_max] = _grouped_run(monkeypatch, group_max, base, discover(os.path.join(root, "run")), [60],
                                              str(tmp_path / f"got{group_max}"), backend="triton", **SMALL)
        assert _bytes(got.outputs[0]) == _bytes(ref.outputs[0])
    assert groups[1] == []
    assert [sorted(g) for g in groups[1024]] == [sorted(SHAPES)]  # one group (no head to tie: the base has none)


def test_shards_preferred_over_an_export_and_prefer_hf(run, tmp_path):
    """A step with rank files and a safetensors export: the rank files by default (one warning
    line says so), the export with --prefer hf."""
    root, base, hf, vals = run
    rd = str(tmp_path / "run")
    shutil.copytree(os.path.join(root, "run"), rd)
    for i, s in enumerate(STEPS):  # an export that differs from the shards (bf16, as an HF export is)
        export = {n: t.to(torch.bfloat16).float() for n, t in vals[i + 1].items()}
        _hf_dir(os.path.join(rd, f"global_step_{s}", "actor", "huggingface"), export)
    cmd = [sys.executable, "-m", "relex_kernels", "extrapolate", "--base", base, "--checkpoints", rd,
           "--target-step", "60", "-q"]
    a = subprocess.run(cmd + ["--out", str(tmp_path / "a")], capture_output=True, text=True)
    b = subprocess.run(cmd + ["--out", str(tmp_path / "b"), "--prefer", "hf"], capture_output=True, text=True)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert "FSDP rank files of actor/" in a.stderr and len(a.stderr.strip().splitlines()) == 1
    ref = extrapolate(base, hf, [60], str(tmp_path / "ref"))
    assert _bytes(str(tmp_path / "a" / "step_60")) == _bytes(ref.outputs[0])
    assert _bytes(str(tmp_path / "b" / "step_60")) != _bytes(ref.outputs[0])


def test_a_live_run_is_read_up_to_the_history(run, tmp_path):
    """A later step still being written (config, no weights) is not opened with --history-steps."""
    root, base, hf, _ = run
    rd = str(tmp_path / "run")
    shutil.copytree(os.path.join(root, "run"), rd)
    os.makedirs(os.path.join(rd, "global_step_40", "actor", "huggingface"))
    with open(os.path.join(rd, "global_step_40", "actor", "huggingface", "config.json"), "w") as fh:
        fh.write("{}")
    with open(os.path.join(rd, "global_step_40", "actor", "model_world_size_3_rank_0.pt"), "wb") as fh:
        fh.write(b"PK")  # half written
    cmd = [sys.executable, "-m", "relex_kernels", "extrapolate", "--base", base, "--checkpoints", rd,
           "--target-step", "60", "-q", "--out"]
    ok = subprocess.run(cmd + [str(tmp_path / "a"), "--history-steps", "30"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(cmd + [str(tmp_path / "b")], capture_output=True, text=True)
    assert bad.returncode == 2 and "global_step_40" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def _actor(run, tmp_path, step=10) -> str:
    root = run[0]
    d = str(tmp_path / "actor")
    shutil.copytree(os.path.join(root, "run", f"global_step_{step}", "actor"), d)
    return d


def _zip_with_pickle(path: str, payload: bytes) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/byteorder", "little")


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


@pytest.mark.parametrize("kind", ["missing rank", "config world size", "truncated", "hostile pickle",
                                  "tensor state not plain", "dtype differs", "shapes do not tile",
                                  "not a state dict", "deepspeed"])
def test_bad_fsdp_inputs_are_refused_with_one_line(run, tmp_path, kind):
    root, base, hf, _ = run
    d = _actor(run, tmp_path)
    marker = str(tmp_path / "pwned")
    expect = InputError
    if kind == "missing rank":
        os.unlink(os.path.join(d, "model_world_size_3_rank_1.pt"))
        words = "rank [1]"
    elif kind == "config world size":
        with open(os.path.join(d, "fsdp_config.json"), "w") as fh:
            json.dump({"FSDP_version": 2, "world_size": 4}, fh)
        words = "world_size 4"
    elif kind == "truncated":
        p = os.path.join(d, "model_world_size_3_rank_2.pt")
        with open(p, "r+b") as fh:
            fh.truncate(os.path.getsize(p) // 2)
        expect, words = FormatError, "rank_2.pt"
    elif kind == "hostile pickle":
        _Evil.marker = marker
        _zip_with_pickle(os.path.join(d, "model_world_size_3_rank_0.pt"), pickle.dumps({"w": _Evil()}, protocol=2))
        expect, words = FormatError, "is not allowed"
    elif kind == "tensor state not plain":  # plain attributes (FSDP1's `_has_been_cloned`) are read; not more
        t = torch.zeros(3)
        t.extra = [1, 2]
        torch.save({"w": t}, os.path.join(d, "model_world_size_3_rank_0.pt"))
        expect, words = FormatError, "state on a plain tensor is not allowed"
    elif kind == "dtype differs":
        vals = _values(0)[1]
        fsdpgen.save_fsdp(str(tmp_path / "half"), {n: t.half() for n, t in vals.items()}, 3)
        shutil.copy(str(tmp_path / "half" / "model_world_size_3_rank_1.pt"), d)
        words = "different dtypes"
    elif kind == "shapes do not tile":
        vals = _values(0)[1]
        vals["model.layers.0.mlp.up_proj.weight"] = torch.zeros(38, 16)
        fsdpgen.save_fsdp(str(tmp_path / "other"), vals, 3)
        shutil.copy(str(tmp_path / "other" / "model_world_size_3_rank_2.pt"), d)
        words = "described differently"
    elif kind == "not a state dict":
        torch.save([torch.zeros(3)], os.path.join(d, "model_world_size_3_rank_0.pt"))
        expect, words = FormatError, "not a state dict"
    else:  # a DeepSpeed directory given as a checkpoint
        shutil.rmtree(d)
        os.makedirs(d)
        torch.save({}, os.path.join(d, "mp_rank_00_model_states.pt"))
        words = "DeepSpeed"
    before = {p: os.path.getmtime(os.path.join(d, p)) for p in os.listdir(d)}
    with pytest.raises(expect, match=None) as e:
        extrapolate(base, {10: d, 20: hf[20], 30: hf[30]}, [60], str(tmp_path / "out"))
    assert words in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not os.path.exists(marker)  # nothing from the checkpoint ran
    assert not os.path.exists(tmp_path / "out" / "step_60")
    assert {p: os.path.getmtime(os.path.join(d, p)) for p in os.listdir(d)} == before  # inputs unchanged
    r = subprocess.run([sys.executable, "-m", "relex_kernels", "extrapolate", "--base", base, "--checkpoint",
                        f"10={d}", "--checkpoint", f"20={hf[20]}", "--target-step", "60", "--out",
                        str(tmp_path / "cli")], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not os.path.exists(marker)


def test_a_plain_torch_save_state_dict_is_mapped_not_loaded(tmp_path):
    """pytorch_model.bin-style files: tensors mapped from the archive, torch.load never called."""
    sd = {"a": torch.randn(5, 3), "b": torch.arange(4, dtype=torch.int64), "c": torch.randn(7).to(torch.bfloat16)}
    p = str(tmp_path / "m.pt")
    torch.save(sd, p)
    f = TorchZipFile(p)
    try:
        for n, t in sd.items():
            raw = np.asarray(f.view(n))
            want = t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
            assert np.array_equal(raw.view(want.dtype).reshape(t.shape), want), n
    finally:
        f.close()


def test_fp32_masters_with_a_bf16_base(run, tmp_path):
    """The verl case: fp32 rank files, the bf16 model the run started from. Deltas are taken in
    fp32 from each side's own values: the run equals the same trajectory with the base widened
    to fp32 (bit for bit with --out-dtype fp32; rounded to nearest even by default, bf16 like the
    base), and an explicit fp64 SVD reference built from the torch values."""
    from relex_kernels.io import dtypes
    root, _, hf, vals = run
    base16 = {n: t.to(torch.bfloat16) for n, t in vals[0].items()}
    base = _hf_dir(str(tmp_path / "base_bf16"), base16)
    wide = _hf_dir(str(tmp_path / "base_wide"), {n: t.float() for n, t in base16.items()})
    ckpts = {s: os.path.join(root, "run", f"global_step_{s}", "actor") for s in STEPS}
    a = extrapolate(base, ckpts, [60], str(tmp_path / "a"))
    b = extrapolate(base, ckpts, [60], str(tmp_path / "b"), out_dtype="fp32")
    c = extrapolate(wide, hf, [60], str(tmp_path / "c"))
    assert a.report["out_dtype"] == "base" and b.report["out_dtype"] == "fp32"
    A, B, C = _bytes(a.outputs[0]), _bytes(b.outputs[0]), _bytes(c.outputs[0])
    assert B == C
    for n in SHAPES:
        f32 = np.frombuffer(C[n], np.float32)
        assert A[n] == dtypes.from_float32(f32, "BF16").tobytes(), n
        # explicit reference: fp64 deltas of the torch values, SVD, a line through the coefficients
        th0 = base16[n].double().reshape(-1).numpy()
        M = np.stack([vals[i + 1][n].double().reshape(-1).numpy() - th0 for i in range(len(STEPS))])
        U, S, Vh = np.linalg.svd(M, full_matrices=False)
        coef = U[:, 0] * S[0]
        want = th0 + np.polyval(np.polyfit(STEPS, coef, 1), 60) * Vh[0]
        got = f32.astype(np.float64)
        assert np.abs(got - want).max() <= 1e-5 * (np.abs(want).max() + 1), n
    with open(os.path.join(a.outputs[0], "model.safetensors"), "rb") as fh:
        head = fh.read(8 + int.from_bytes(fh.read(8), "little"))
    assert b'"BF16"' in head and b'"F32"' not in head


def test_dcp_checkpoints_equal_safetensors_inputs(run, tmp_path):
    """torch.distributed.checkpoint directories — FSDP2-sharded over 2 gloo ranks, and one process
    saving a plain state dict — under accelerate's "model." prefix, with optimizer state and a
    step beside the weights: read in place, the bytes of the same run as safetensors."""
    import warnings
    _, base, hf, vals = run
    ck = {10: fsdpgen.save_fsdp(str(tmp_path / "dcp10"), vals[1], 2, fmt="dcp")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns that it saves in a single process
        for i, s in enumerate(STEPS[1:], 2):
            ck[s] = fsdpgen.save_dcp_single(str(tmp_path / f"dcp{s}"), vals[i])
    c = Checkpoint(ck[10], step=10)
    try:
        assert c.format == "torch.distributed.checkpoint"
        assert all(k.startswith("model.") for k in c.tensors)  # as stored, before alignment
        for n, loc in c.tensors.items():  # preadv from the .distcp chunks: the mapped bytes
            k = loc.info.numel
            got = np.empty(k, dtype=np.asarray(loc.file.view(n, 0, 1)).dtype)
            loc.file.read_into(n, 0, k, got)
            assert np.array_equal(got, loc.file.view(n)), n
    finally:
        c.close()
    ref = extrapolate(base, hf, [60], str(tmp_path / "ref"))
    got = extrapolate(base, ck, [60], str(tmp_path / "got"))
    assert _bytes(got.outputs[0]) == _bytes(ref.outputs[0])


def test_an_earlier_checkpoint_in_rank_files_or_dcp_as_the_base(run, tmp_path):
    """--base an earlier checkpoint of the run, as verl's rank files or as DCP (accelerate's "model."
    prefix): the bytes of the same base as safetensors, under the model's own names, and an output
    transformers loads (verl's huggingface/ config copied; no fsdp_config.json, no .distcp chunk)."""
    import warnings
    root, _, hf, vals = run
    actor = {s: os.path.join(root, "run", f"global_step_{s}", "actor") for s in STEPS}
    ref = extrapolate(hf[10], {20: hf[20], 30: hf[30]}, [60], str(tmp_path / "ref")).outputs[0]
    dcp10 = fsdpgen.save_fsdp(str(tmp_path / "dcp10"), vals[1], 2, fmt="dcp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns that it saves in a single process
        dcp = {s: fsdpgen.save_dcp_single(str(tmp_path / f"dcp{s}"), vals[i]) for i, s in enumerate(STEPS[1:], 2)}
    bare = shutil.copytree(actor[10], str(tmp_path / "bare_actor"), ignore=shutil.ignore_patterns("huggingface"))
    for name, base, hist in [("rank files", actor[10], {20: actor[20], 30: actor[30]}),
                             ("rank files, no huggingface/", bare, {20: actor[20], 30: actor[30]}),
                             ("dcp beside safetensors", dcp10, {20: hf[20], 30: hf[30]}),
                             ("dcp beside dcp", dcp10, dcp)]:
        got = extrapolate(base, hist, [60], str(tmp_path / "".join(c for c in name if c.isalnum()))).outputs[0]
        assert _bytes(got) == _bytes(ref), name
        files = sorted(os.listdir(got))
        if name == "rank files":
            assert files == ["config.json", "model.safetensors"], files
            with open(os.path.join(got, "config.json")) as fh:
                assert json.load(fh) == CONFIG
        else:  # (no config to copy there)
            assert files == ["model.safetensors"], files
    # backtest's --materialize measures a prediction against a DCP truth over a DCP base by name
    from relex_kernels.analysis.materialize import compare
    names = list(SHAPES)
    want = compare(ref, hf[30], hf[10], names)
    assert {n: v.tolist() for n, v in compare(got, dcp[30], dcp10, names).items()} == \
        {n: v.tolist() for n, v in want.items()}


def test_accelerate_fsdp1_dcp_checkpoints_equal_safetensors_inputs(run, tmp_path):
    """accelerate's default FSDP (FSDP1, no device mesh) with `SHARDED_STATE_DICT`:
    `torch.distributed.checkpoint` of ShardedTensors, row blocks over 3 ranks, uneven — written by
    FSDP1 itself: read in place, the bytes of the same run as safetensors. (FSDP1 with a device mesh
    saves DTensors, as the FSDP2 DCP test's; its CPU writer aborted in gloo in 2 of 8 suite runs.)"""
    _, base, hf, vals = run
    dirs = fsdpgen.save_accelerate_fsdp1([(str(tmp_path / f"a{s}"), vals[i + 1]) for i, s in enumerate(STEPS)], 3)
    ck = dict(zip(STEPS, dirs))
    c = Checkpoint(ck[10], step=10)
    try:
        assert c.format == "torch.distributed.checkpoint"
        assert len([f for f in os.listdir(ck[10]) if f.endswith(".distcp")]) == 3
    finally:
        c.close()
    ref = extrapolate(base, hf, [60], str(tmp_path / "ref"))
    got = extrapolate(base, ck, [60], str(tmp_path / "got"))
    assert _bytes(got.outputs[0]) == _bytes(ref.outputs[0])


@pytest.mark.parametrize("kind", ["damaged metadata", "chunk past its file", "missing chunk file", "hostile metadata"])
def test_bad_dcp_inputs_are_refused_with_one_line(run, tmp_path, kind):
    import warnings
    _, base, hf, vals = run
    d = str(tmp_path / "dcp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fsdpgen.save_dcp_single(d, vals[1])
    marker = str(tmp_path / "pwned")
    if kind == "damaged metadata":
        with open(os.path.join(d, ".metadata"), "r+b") as fh:
            fh.truncate(100)
        expect, words = FormatError, ".metadata"
    elif kind == "chunk past its file":
        p = os.path.join(d, "__0_0.distcp")
        with open(p, "r+b") as fh:
            fh.truncate(os.path.getsize(p) // 3)  # (the optimizer's chunks at the end are never read)
        expect, words = FormatError, "past the end"
    elif kind == "missing chunk file":
        os.unlink(os.path.join(d, "__0_0.distcp"))
        expect, words = InputError, "missing"
    else:
        _Evil.marker = marker
        with open(os.path.join(d, ".metadata"), "wb") as fh:
            pickle.dump(_Evil(), fh, protocol=2)
        expect, words = FormatError, "is not allowed"
    with pytest.raises(expect) as e:
        extrapolate(base, {10: d, 20: hf[20], 30: hf[30]}, [60], str(tmp_path / "out"))
    assert words in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not os.path.exists(marker) and not os.path.exists(tmp_path / "out" / "step_60")
    r = subprocess.run([sys.executable, "-m", "relex_kernels", "extrapolate", "--base", base, "--checkpoint",
                        f"10={d}", "--checkpoint", f"20={hf[20]}", "--target-step", "60", "--out",
                        str(tmp_path / "cli")], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and words in r.stderr, r.stderr
    assert not os.path.exists(marker)


def test_rank_boundaries_inside_chunks_keep_the_bits(tmp_path, monkeypatch):
    """A tensor of several Gram chunks whose rank blocks end mid-chunk (the native kernels take a
    range in pieces, each chunk across two rank files gathered), its bf16 base widened in small
    copy pieces (COPY_BYTES shrunk), its outputs staged in pieces that start inside rank blocks,
    and under a budget that cuts it into ranges: the bytes of the same trajectory as
    safetensors, fp32 and with a bf16 base."""
    from relex_kernels.engine import plan, streaming
    g = torch.Generator().manual_seed(9)
    shape = (700, 512)  # 358400 elements: 5.5 chunks; W=3 -> blocks of 234 rows end inside chunks 1 and 3
    th0 = torch.randn(shape, generator=g)
    v = torch.randn(shape, generator=g)
    steps = [1, 2, 3]
    vals = [{"w": th0 + 1e-2 * s * v + 1e-4 * torch.randn(shape, generator=g)} for s in steps]
    hf = {s: _hf_dir(str(tmp_path / f"hf{s}"), vals[i]) for i, s in enumerate(steps)}
    # steps 1 and 2 in one process group of 3 ranks (one start of the ranks): step 1 from its
    # values, step 2 from a safetensors directory each rank reads, removed once written
    src = shutil.copytree(hf[2], str(tmp_path / "src2"))
    fs = dict(zip(steps[:2], fsdpgen.save_many([(str(tmp_path / "fs1"), vals[0]), (str(tmp_path / "fs2"), src)], 3,
                                               remove_sources=True)))
    assert not os.path.exists(src) and not [f for f in os.listdir(tmp_path) if f.startswith(".relex-values-")]
    # step 3 over 7 ranks: row blocks of 100 rows (51200 elements), smaller than a chunk, two
    # boundaries in chunk 3, every chunk but the last shared by two rank files
    fs[3] = fsdpgen.save_many([(str(tmp_path / "fs3"), vals[2])], 7)[0]
    # written by one process group, each rank's pickle is the same bytes in steps 1 and 2: parsed
    # once (the runs below read them through these cached parses: their bytes are checked)
    from relex_kernels.io import torchzip
    parsed, load = [], torchzip.load_pickle
    monkeypatch.setattr(torchzip, "_PICKLES", torchzip.OrderedDict())

    def counted(raw, path):
        parsed.append(path)
        return load(raw, path)
    monkeypatch.setattr(torchzip, "load_pickle", counted)
    for s in steps[:2]:
        Checkpoint(fs[s], step=s).close()
    assert len(parsed) == 3
    base32 = _hf_dir(str(tmp_path / "b32"), {"w": th0})
    base16 = _hf_dir(str(tmp_path / "b16"), {"w": th0.to(torch.bfloat16)})
    wide = _hf_dir(str(tmp_path / "bw"), {"w": th0.to(torch.bfloat16).float()})
    monkeypatch.setattr(streaming, "COPY_BYTES", 1)  # one chunk per kernel call where copies are needed
    # outputs staged in 64 KB pieces: the weighted sums' writes start inside the rank files' pieces
    from relex_kernels.io import direct
    monkeypatch.setattr(direct, "CHUNK_BYTES", 64 << 10)
    ref = extrapolate(base32, hf, [9], str(tmp_path / "ref"))
    got = extrapolate(base32, fs, [9], str(tmp_path / "got"))
    assert _bytes(got.outputs[0]) == _bytes(ref.outputs[0])
    ref16 = extrapolate(wide, hf, [9], str(tmp_path / "ref16"), out_dtype="fp32")
    monkeypatch.setattr(plan, "KERNEL_SCRATCH", 0)
    monkeypatch.setattr(plan, "MIN_BUDGET", 0)
    got16 = extrapolate(base16, fs, [9], str(tmp_path / "got16"), out_dtype="fp32", memory_budget=3 << 20)
    assert _bytes(got16.outputs[0]) == _bytes(ref16.outputs[0])
    # 8 MiB, fp32 base: the tensor is read whole (one range, 5 chunks shared by two rank files of
    # step 3), but an eighth of the budget holds one gathered chunk of the 3 assembled versions
    gathered, grow = [], streaming.Streamer._gather_buffer
    monkeypatch.setattr(streaming.Streamer, "_gather_buffer", lambda st, i, nbytes: gathered.append(nbytes) or
                        grow(st, i, nbytes))
    got8 = extrapolate(base32, fs, [9], str(tmp_path / "got8"), memory_budget=8 << 20)
    assert _bytes(got8.outputs[0]) == _bytes(ref.outputs[0])
    assert gathered and max(gathered) == streaming.GRAM_CHUNK * 4


def test_a_killed_run_over_rank_files_resumes_to_the_same_bytes(run, tmp_path):
    root, base, hf, _ = run
    cmd = [sys.executable, "-m", "relex_kernels", "extrapolate", "--base", base, "--checkpoints",
           os.path.join(root, "run"), "--target-step", "60", "-q", "--out", str(tmp_path / "o")]
    env = dict(os.environ, RELEX_TEST_KILL="done:2", RELEX_GROUP_TENSORS="1", RELEX_JOURNAL_SYNC_SECONDS="0")
    killed = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert killed.returncode == -9, killed.stderr
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    with open(tmp_path / "o" / "relex_report.json") as fh:
        assert json.load(fh)["resumed_tensors"] >= 1
    ref = extrapolate(base, hf, [60], str(tmp_path / "ref"))
    assert _bytes(str(tmp_path / "o" / "step_60")) == _bytes(ref.outputs[0])


@pytest.mark.parametrize("layout,world", [("verl-fsdp", 2), ("verl-fsdp1", 3), ("dcp", 1)])
def test_relex_synth_writes_trainer_layouts_with_torch(tmp_path, layout, world):
    """`relex synth --layout verl-fsdp|verl-fsdp1|dcp` (torch's own writers; fp32 masters beside a bf16 base):
    the checkpoints hold the values of the same synthetic run written as fp32 safetensors, and
    `relex extrapolate --checkpoints` reads the run."""
    from relex_kernels.synth import synthesize
    kw = dict(size="tiny", steps=range(1, 4), seed=3)
    ref = synthesize(str(tmp_path / "ref"), layout="step", dtype="F32", **kw)
    got = synthesize(str(tmp_path / "got"), layout=layout, dtype="BF16", master_dtype="F32", world_size=world, **kw)
    assert got.info["master_dtype"] == "F32"
    for s in got.steps:
        a, b = Checkpoint(got.checkpoints[s], step=s), Checkpoint(ref.checkpoints[s], step=s)
        try:
            a.align(b.tensors)
            assert a.tensors.keys() == b.tensors.keys()
            for n in b.tensors:
                assert np.array_equal(a.tensors[n].file.view(n), b.tensors[n].file.view(n)), (s, n)
        finally:
            a.close()
            b.close()
    # the base as the run started from it: the fp32 masters rounded to bf16 (torch's rounding the reference)
    base, ref_base = Checkpoint(got.base_dir), Checkpoint(ref.base_dir)
    try:
        assert base.tensors.keys() == ref_base.tensors.keys()
        for n, loc in base.tensors.items():
            assert loc.info.dtype == "BF16" and loc.info.shape == ref_base.tensors[n].info.shape, n
            want = torch.from_numpy(np.array(ref_base.tensors[n].file.view(n))).to(torch.bfloat16).view(torch.int16)
            assert np.array_equal(np.asarray(loc.file.view(n)).view(np.int16), want.numpy()), n
    finally:
        base.close()
        ref_base.close()
    r = subprocess.run([sys.executable, "-m", "relex_kernels", "extrapolate", "--base", got.base_dir, "--checkpoints",
                        got.run_dir, "--target-step", "12", "--out", str(tmp_path / "o"), "-q"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_analyze_compare_export_shows_both_explained_variances(run, tmp_path):
    """`relex analyze --compare-export` on a verl run with rank files and bf16 exports: both
    analyses and a side-by-side table; the export's rounding lowers the rank-1 share."""
    root, base, _, vals = run
    rd = str(tmp_path / "run")
    shutil.copytree(os.path.join(root, "run"), rd)
    for i, s in enumerate(STEPS):
        export = {n: t.to(torch.bfloat16).float() for n, t in vals[i + 1].items()}
        _hf_dir(os.path.join(rd, f"global_step_{s}", "actor", "huggingface"), export)
    out = str(tmp_path / "rep")
    r = subprocess.run([sys.executable, "-m", "relex_kernels", "analyze", rd, "--base", base, "--compare-export",
                        "--out", out, "--no-figures"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with open(os.path.join(out, "compare.json")) as fh:
        doc = json.load(fh)
    assert doc["steps"] == STEPS and len(doc["tensors"]) == len(SHAPES)
    assert all(t["dtype_shards"] == "F32" and t["ev1_export"] is not None for t in doc["tensors"])
    s, e = doc["summary_ev1"]["shards"], doc["summary_ev1"]["export"]
    assert s["mean"] > e["mean"], (s, e)
    assert os.path.isfile(os.path.join(out, "shards", "report.json")) and os.path.isfile(os.path.join(out, "compare.md"))
    assert "rank files" in r.stdout and "export" in r.stdout


@pytest.mark.parametrize("world,replicas", [(3, 1), (4, 2), (1, 1)])
def test_fsdp1_rank_files_equal_safetensors_inputs(run, tmp_path, world, replicas):
    """verl's default strategy, FSDP1 (`FullyShardedDataParallel` over the device mesh, decoder layers
    as units, `SHARDED_STATE_DICT`; HSDP: `HYBRID_SHARD`): its rank files are DTensor row blocks,
    cut as `torch.chunk` cuts (uneven: 50 and 37 rows over 3 or 2 shards), and the run equals its
    safetensors copy byte for byte. On one rank (a one-GPU verl run) FSDP1 runs NO_SHARD and saves
    whole tensors, each pickled with FSDP1's `_has_been_cloned` attribute."""
    _, base, hf, vals = run
    dirs = fsdpgen.save_many([(str(tmp_path / f"s{s}"), vals[i + 1]) for i, s in enumerate(STEPS)], world, "verl1",
                             replicas=replicas)
    ck = dict(zip(STEPS, dirs))
    with open(os.path.join(ck[10], "fsdp_config.json")) as fh:
        assert json.load(fh) == {"FSDP_version": 1, "world_size": world}
    with zipfile.ZipFile(os.path.join(ck[10], f"model_world_size_{world}_rank_0.pt")) as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    assert (b"DTensor" in pkl and b"Shard" in pkl) if world > 1 else (b"_has_been_cloned" in pkl)
    c = Checkpoint(ck[10], step=10)
    try:
        assert c.format == f"verl-fsdp (world size {world})"
        # row blocks everywhere: FSDP1 has no Shard(1) (FSDP2's verl rule cuts 37 x 16 over 2 by columns)
        assert not set(c.tensors["model.norm.weight"].file.columns)
        for n in SHAPES:
            assert np.array_equal(c.tensors[n].file.view(n), vals[1][n].reshape(-1).numpy()), n
    finally:
        c.close()
    ref = extrapolate(base, hf, [60], str(tmp_path / "ref"))
    got = extrapolate(base, ck, [60], str(tmp_path / "got"))
    assert _bytes(got.outputs[0]) == _bytes(ref.outputs[0])


def test_hsdp_rank_files_read_from_the_first_replica(run, tmp_path):
    """verl with fsdp_size < world: a (2, 2) ("ddp", "fsdp") mesh, placements (Replicate, Shard):
    the first replica's ranks hold every shard; the run equals its safetensors copy."""
    from relex_kernels.synth.torch_writers import save_verl_fsdp
    _, base, hf, vals = run
    ck = {10: save_verl_fsdp(str(tmp_path / "hsdp"), vals[1], 4, replicas=2), 20: hf[20], 30: hf[30]}
    c = Checkpoint(ck[10], step=10)
    try:
        f = c.tensors["model.norm.weight"].file
        assert c.format == "verl-fsdp (world size 4)"
        for n in SHAPES:
            assert np.array_equal(c.tensors[n].file.view(n), vals[1][n].reshape(-1).numpy()), n
        assert {seg[2].path for segs in f.segments.values() for seg in segs if seg[2] is not None} <= \
            {os.path.join(ck[10], f"model_world_size_4_rank_{r}.pt") for r in (0, 1)}
    finally:
        c.close()
    ref = extrapolate(base, hf, [60], str(tmp_path / "ref"))
    got = extrapolate(base, ck, [60], str(tmp_path / "got"))
    assert _bytes(got.outputs[0]) == _bytes(ref.outputs[0])


def test_many_rank_files_under_a_low_descriptor_limit(run, tmp_path, monkeypatch):
    """12 rank files for one step, the run under `ulimit -n 40` (hard): the map cache keeps the
    descriptors bounded for rank files as for safetensors shards; the bytes are unchanged."""
    _, base, hf, vals = run
    ck = {10: fsdpgen.save_fsdp(str(tmp_path / "w12"), vals[1], 12), 20: hf[20], 30: hf[30]}
    out = str(tmp_path / "o")
    cmd = (f"ulimit -n 40 && {sys.executable} -m relex_kernels extrapolate --base {base} --checkpoint 10={ck[10]} "
           f"--checkpoint 20={hf[20]} --checkpoint 30={hf[30]} --target-step 60 -q --out {out}")
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ref = extrapolate(base, hf, [60], str(tmp_path / "ref"))
    assert _bytes(os.path.join(out, "step_60")) == _bytes(ref.outputs[0])
    # and with fewer maps allowed than there are rank files: maps evicted and remapped as the run goes
    from relex_kernels.io import reader
    monkeypatch.setattr(reader, "max_maps", lambda: 4)
    small = extrapolate(base, ck, [60], str(tmp_path / "small"))
    assert _bytes(small.outputs[0]) == _bytes(ref.outputs[0])


@pytest.mark.parametrize("world,replicas", [(3, 1), (4, 2)])
def test_meta_sharded_rank_files_equal_sharding_full_tensors(tmp_path, world, replicas):
    """The product's writer builds the module on the meta device and copies each rank's part in
    (a rank holds its shard only), builds anew when the tensors change and refills it otherwise;
    its rank files hold the same storages, byte for byte (FSDP2's
    zero padding included), as ranks that build the whole module and let `fully_shard` cut it.
    Shapes: uneven row blocks, a Shard(1) placement, one row over more ranks than rows, bf16."""
    g = torch.Generator().manual_seed(5)
    vals = {"a.w": torch.randn(37, 16, generator=g), "a.cols": torch.randn(7, 6, generator=g),
            "b.row": torch.randn(1, 9, generator=g), "b.norm": torch.randn(5, generator=g),
            "c.h": torch.randn(11, 4, generator=g).to(torch.bfloat16)}
    # three checkpoints in one group: the second has other tensors (a new module), the third
    # refills the module the second built
    first = {**{n: v * 2 for n, v in vals.items()}, "z.extra": torch.randn(6, 3, generator=g)}
    second = {n: v * 3 for n, v in vals.items()}
    *_, got = fsdpgen.save_many([(str(tmp_path / "first"), first), (str(tmp_path / "second"), second),
                                 (str(tmp_path / "got"), vals)], world, replicas=replicas)
    ref = fsdpgen.save_reference_fsdp(str(tmp_path / "ref"), vals, world, replicas=replicas)
    for d, want in (("first", first), ("second", second)):
        c = Checkpoint(str(tmp_path / d))
        try:
            assert list(c.tensors) == list(want)
            assert all(torch.equal(torch.from_numpy(np.array(c.tensors[n].file.view(n))).view(v.dtype).reshape(v.shape),
                                   v) for n, v in want.items()), d
        finally:
            c.close()
    n_storages = 0
    for r in range(world):
        name = f"model_world_size_{world}_rank_{r}"
        with zipfile.ZipFile(os.path.join(got, name + ".pt")) as a, \
                zipfile.ZipFile(os.path.join(ref, name + ".pt")) as b:
            assert a.namelist() == b.namelist()
            for entry in a.namelist():
                # the pickle names a per-process DeviceMesh hash, and torch.save a per-call id: not content
                if not entry.endswith(("data.pkl", "serialization_id")):
                    assert a.read(entry) == b.read(entry), (r, entry)
                    n_storages += entry.startswith(f"{name}/data/")
    assert n_storages >= world * len(vals)
    shutil.copy(os.path.join(got, "fsdp_config.json"), ref)
    ca, cb = Checkpoint(got), Checkpoint(ref)
    try:
        assert list(ca.tensors) == list(cb.tensors) == list(vals)
        for n, v in vals.items():
            want = v.reshape(-1).view(torch.int16 if v.dtype == torch.bfloat16 else torch.int32).numpy()
            assert ca.tensors[n].info.shape == cb.tensors[n].info.shape == tuple(v.shape)
            assert np.array_equal(np.asarray(ca.tensors[n].file.view(n)).view(want.dtype), want), n
            assert np.array_equal(np.asarray(cb.tensors[n].file.view(n)).view(want.dtype), want), n
    finally:
        ca.close()
        cb.close()


def test_mapped_values_view_the_files_in_place(tmp_path):
    """The ranks read a staged checkpoint through views of its maps, not copies: each tensor's data
    lies in a mapping of the checkpoint's file (/proc/self/maps), which keeps a rank's memory to its shard."""
    from relex_kernels.synth.torch_writers import mapped_values
    vals = _values(1)[0]
    d = _hf_dir(str(tmp_path / "ck"), vals)
    with mapped_values(d) as got:
        assert got.keys() == vals.keys()
        with open("/proc/self/maps") as fh:
            maps = [(int(lo, 16), int(hi, 16), line.split()[-1]) for line in fh
                    for lo, hi in [line.split()[0].split("-")]]
        for n, t in got.items():
            assert torch.equal(t, vals[n]), n
            where = [path for lo, hi, path in maps if lo <= t.data_ptr() < hi]
            assert where == [os.path.join(d, "model.safetensors")], (n, where)
