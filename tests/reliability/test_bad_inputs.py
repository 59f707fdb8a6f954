"""A corpus of bad inputs, each through the real CLI in a subprocess.

Every case builds a small valid trajectory, breaks one thing, runs ``relex extrapolate``
(or ``relex predict``) and requires: exit status 2, exactly one line on stderr that
names the file (and tensor and step where relevant), no traceback, no output left
behind (OUT_DIR absent or unchanged but for the lock file) and every input
byte-identical afterwards. ``CASES`` is the list of kinds (its length is the count
reported in README.md).
"""

from __future__ import annotations

import json
import os
import shutil
import struct

import numpy as np
import pytest
from relhelp import (TARGET, assert_clean_failure, cli_env, digest, drop_dac_caps, edit_header, read_st, relex,
                     rewrite_tensors, set_values, small_run, tensor_file, write_st)

CASES = {}


def case(name):
    def deco(fn):
        CASES[name] = fn
        return fn
    return deco


class Ctx:
    """One case's world: a fresh trajectory and the command that runs on it."""

    def __init__(self, root: str, sharded: bool = False, big: bool = False):
        self.root = root
        kw = {"shard_bytes": 200} if sharded else {}
        shapes = None
        if big:  # one tensor too large for the 16 MB floor of the memory budget: chunked passes
            shapes = {"big": (1_200_001,), "b.bias": (8,)}
        self.base, self.run, self.ck = small_run(root, shapes=shapes, **kw)
        self.out = os.path.join(root, "out")
        self.inputs = [self.base, self.run]
        self.args = None  # None: the default extrapolate command
        self.extra = []
        self.env = None
        self.preexec = None
        self.out_before = None

    def file(self, step, name="a.weight"):
        d = self.base if step == 0 else self.ck[step]
        return tensor_file(d, name)

    def command(self):
        if self.args is not None:
            return self.args
        return ["extrapolate", "--base", self.base, "--checkpoints", self.run, "--target-step", TARGET,
                "--out", self.out, "-q", *self.extra]

    def make_fit(self):
        from relex_kernels.engine import extrapolate
        fit = os.path.join(self.root, "run.fit")
        extrapolate(self.base, self.ck, [TARGET], os.path.join(self.root, "fitout"), save_fit=fit)
        shutil.rmtree(os.path.join(self.root, "fitout"))
        self.inputs.append(fit)
        self.args = ["predict", "--fit", fit, "--target-step", 2 * TARGET, "--out", self.out, "-q"]
        return fit


# -- the safetensors container ---------------------------------------------------------------
@case("truncated_shard")
def _(c):
    p = c.file(2)
    os.truncate(p, os.path.getsize(p) - 7)
    return [p, "truncated"]


@case("header_length_beyond_file")
def _(c):
    p = c.file(3)
    with open(p, "r+b") as fh:
        fh.write(struct.pack("<Q", os.path.getsize(p)))
    return [p, "runs past the end"]


@case("header_length_over_100MB")
def _(c):
    p = c.file(0)
    with open(p, "r+b") as fh:
        fh.write(struct.pack("<Q", 1 << 40))
    return [p, "100 MB"]


@case("file_shorter_than_length_field")
def _(c):
    p = c.file(2)
    os.truncate(p, 5)
    return [p, "too short"]


@case("empty_file")
def _(c):
    p = c.file(1)
    os.truncate(p, 0)
    return [p]


@case("header_not_json")
def _(c):
    p = c.file(2)
    _, data = read_st(p)
    write_st(p, b'{"a.weight": {"dtype": "BF16", ', data)
    return [p, "not valid JSON"]


@case("header_not_utf8")
def _(c):
    p = c.file(2)
    _, data = read_st(p)
    write_st(p, b'{"\xff\xfe": 1}', data)
    return [p, "not valid JSON"]


@case("header_not_an_object")
def _(c):
    p = c.file(4)
    _, data = read_st(p)
    write_st(p, b"[1, 2, 3]", data)
    return [p, "not a JSON object"]


@case("header_duplicate_key")
def _(c):
    p = c.file(2)
    h, data = read_st(p)
    raw = json.dumps(h)
    ent = json.dumps(h["b.bias"])
    raw = raw[:-1] + f', "b.bias": {ent}}}'
    write_st(p, raw.encode(), data)
    return [p, "duplicate key"]


@case("tensor_entry_not_an_object")
def _(c):
    edit_header(c.file(3), lambda h: h.__setitem__("b.bias", [1, 2]))
    return [c.file(3), "b.bias"]


@case("offsets_outside_data")
def _(c):
    p = c.file(2)

    def f(h):
        b, e = h["b.bias"]["data_offsets"]
        n = max(v["data_offsets"][1] for k, v in h.items() if k != "__metadata__")
        h["b.bias"]["data_offsets"] = [n - (e - b) + 2, n + 2]
    edit_header(p, f)
    return [p, "b.bias", "outside the data buffer"]


@case("offsets_overlap")
def _(c):
    p = c.file(2)

    def f(h):
        a0 = h["a.weight"]["data_offsets"][0]
        b, e = h["b.bias"]["data_offsets"]
        h["b.bias"]["data_offsets"] = [a0 + 4, a0 + 4 + (e - b)]
    edit_header(p, f)
    return [p, "overlap"]


@case("offsets_not_integers")
def _(c):
    edit_header(c.file(1), lambda h: h["b.bias"].__setitem__("data_offsets", [0.0, 16.0]))
    return [c.file(1), "b.bias", "data_offsets"]


@case("size_disagrees_with_shape")
def _(c):
    edit_header(c.file(3), lambda h: h["a.weight"].__setitem__("shape", [16, 9]))
    return [c.file(3), "a.weight", "needs"]


@case("negative_dimension")
def _(c):
    edit_header(c.file(3), lambda h: h["a.weight"].__setitem__("shape", [-16, -8]))
    return [c.file(3), "a.weight", "shape"]


@case("unknown_dtype")
def _(c):
    edit_header(c.file(2), lambda h: h["a.weight"].__setitem__("dtype", "Q8_K"))
    return [c.file(2), "a.weight", "unknown dtype"]


@case("metadata_not_strings")
def _(c):
    edit_header(c.file(0), lambda h: h.__setitem__("__metadata__", {"format": 1}))
    return [c.file(0), "__metadata__"]


# -- sharded checkpoints ------------------------------------------------------------------------
def _index(c, step):
    return os.path.join(c.ck[step], "model.safetensors.index.json")


@case("index_names_missing_shard")
def _(c):
    p = c.file(2, "b.bias")
    os.unlink(p)
    return [_index(c, 2), os.path.basename(p), "does not exist"]


@case("index_maps_tensor_to_wrong_shard")
def _(c):
    idx = _index(c, 3)
    obj = json.load(open(idx))
    wm = obj["weight_map"]
    wm["a.weight"], wm["b.bias"] = wm["b.bias"], wm["a.weight"]
    json.dump(obj, open(idx, "w"))
    return [idx, "a.weight", "does not hold it"]


@case("shard_tensor_missing_from_index")
def _(c):
    idx = _index(c, 2)
    obj = json.load(open(idx))
    shard = obj["weight_map"].pop("ids")
    json.dump(obj, open(idx, "w"))
    return [os.path.join(c.ck[2], shard), "ids", "index does not map"]


@case("index_not_json")
def _(c):
    with open(_index(c, 4), "w") as fh:
        fh.write('{"weight_map": ')
    return [_index(c, 4), "cannot read the index"]


@case("index_without_weight_map")
def _(c):
    with open(_index(c, 1), "w") as fh:
        json.dump({"metadata": {}}, fh)
    return [_index(c, 1), "weight_map"]


@case("index_shard_path_escapes")
def _(c):
    idx = _index(c, 2)
    obj = json.load(open(idx))
    obj["weight_map"]["a.weight"] = "../../base/" + obj["weight_map"]["a.weight"]
    json.dump(obj, open(idx, "w"))
    return [idx, "not a plain file name"]


# -- a trajectory that does not fit together --------------------------------------------------------
@case("checkpoint_missing_tensor")
def _(c):
    rewrite_tensors(c.ck[3], lambda t: t.pop("a.weight"))
    return ["checkpoint step 3", "a.weight", c.ck[3]]


@case("checkpoint_extra_tensor")
def _(c):
    rewrite_tensors(c.ck[2], lambda t: t.__setitem__("extra.weight", ("BF16", np.zeros(3, np.uint16))))
    return ["checkpoint step 2", "extra.weight", c.ck[2]]


@case("shape_changes_between_checkpoints")
def _(c):
    def f(t):
        dt, a = t["a.weight"]
        t["a.weight"] = (dt, a.reshape(8, 16))
    rewrite_tensors(c.ck[4], f)
    return ["checkpoint step 4", "a.weight", "[8, 16]", c.ck[4]]


@case("dtype_changes_between_checkpoints")
def _(c):
    # (another float dtype is fine: fp32 masters beside a bf16 base are computed in fp32)
    def f(t):
        t["a.weight"] = ("I32", np.zeros((16, 8), np.int32))
    rewrite_tensors(c.ck[4], f)
    return ["checkpoint step 4", "a.weight", "I32", c.ck[4]]


@case("nan_in_checkpoint")
def _(c):
    p = c.file(3)
    set_values(p, "a.weight", lambda a: a.__setitem__(17, 0x7FC0))  # bf16 quiet NaN
    return ["checkpoint step 3", "a.weight", "NaN/Inf", p]


@case("inf_in_base")
def _(c):
    p = c.file(0, "b.bias")
    set_values(p, "b.bias", lambda a: a.__setitem__(3, 0x7F80))  # bf16 +inf
    return ["base checkpoint", "b.bias", "NaN/Inf", p]


@case("inf_everywhere_reference_backend")
def _(c):
    # inf - inf: numpy's RuntimeWarning must not add lines to the one-line message
    for s in [0, 1, 2, 3, 4]:
        set_values(c.file(s, "b.bias"), "b.bias", lambda a: a.__setitem__(2, 0x7F80))
    c.extra = ["--backend", "reference"]
    return ["b.bias", "NaN/Inf", c.file(0, "b.bias")]


@case("nan_in_chunked_tensor")
def _(c):
    p = c.file(2, "big")
    set_values(p, "big", lambda a: a.__setitem__(1_100_000, 0xFFC0))
    c.extra = ["--memory-budget", "1M"]  # chunked: the error comes mid-pass, after outputs were created
    return ["checkpoint step 2", "big", "NaN/Inf", p]


@case("deltas_overflow_fp32")
def _(c):
    # finite bf16 values whose deltas' squares overflow the fp32 Gram
    p = c.file(2, "b.bias")
    set_values(p, "b.bias", lambda a: a.__setitem__(0, 0x7F00))  # ~1.7e38
    return ["b.bias", "checkpoint step 2", p, "overflow"]


@case("f16_prediction_overflows")
def _(c):
    # valid fp16 checkpoints near the top of the fp16 range: step 20 lies past 65504
    from relex_kernels.io import write_checkpoint
    shutil.rmtree(c.run)
    os.unlink(c.file(0))
    th0 = np.full(8, 40000, np.float16)
    write_checkpoint(c.base, {"w.f16": ("F16", th0)})
    for s in (1, 2, 3):
        d = os.path.join(c.run, f"step_{s}")
        os.makedirs(d)
        write_checkpoint(d, {"w.f16": ("F16", (th0.astype(np.float32) + 2000 * s).astype(np.float16))})
    return ["w.f16", "step 20", "F16 range"]


# -- trajectory layout ---------------------------------------------------------------------------
@case("duplicate_steps_in_run_dir")
def _(c):
    shutil.copytree(c.ck[2], os.path.join(c.run, "checkpoint-2"))
    return ["duplicate step 2", c.ck[2], os.path.join(c.run, "checkpoint-2")]


@case("duplicate_steps_explicit")
def _(c):
    c.args = ["extrapolate", "--base", c.base, "--checkpoint", f"1={c.ck[1]}", "--checkpoint", f"2={c.ck[2]}",
              "--checkpoint", f"2={c.ck[3]}", "--target-step", TARGET, "--out", c.out]
    return ["duplicate step 2", c.ck[3]]


@case("fewer_than_two_history_checkpoints")
def _(c):
    c.extra = ["--history-steps", "1"]
    return [c.run, "at least 2 history checkpoints", "step <= 1"]


@case("single_checkpoint_in_run_dir")
def _(c):
    for s in (2, 3, 4):
        shutil.rmtree(c.ck[s])
    return [c.run, "at least 2 history checkpoints"]


@case("empty_run_dir")
def _(c):
    for s in c.ck:
        shutil.rmtree(c.ck[s])
    return [c.run, "no checkpoints found"]


@case("run_dir_missing")
def _(c):
    c.args = ["extrapolate", "--base", c.base, "--checkpoints", c.run + "-nope", "--target-step", TARGET,
              "--out", c.out]
    return [c.run + "-nope", "does not exist"]


@case("base_dir_missing")
def _(c):
    c.args = ["extrapolate", "--base", c.base + "-nope", "--checkpoints", c.run, "--target-step", TARGET,
              "--out", c.out]
    return [c.base + "-nope", "not a directory"]


@case("base_without_weights")
def _(c):
    os.unlink(c.file(0))
    return [c.base, "has no model.safetensors"]


@case("step_dir_without_weights")
def _(c):
    os.makedirs(os.path.join(c.run, "step_5"))
    return [os.path.join(c.run, "step_5"), "holds no weights"]


@case("step_zero_in_run_dir")
def _(c):
    shutil.copytree(c.ck[1], os.path.join(c.run, "step_0"))
    return ["step 0", "not positive", os.path.join(c.run, "step_0")]


@case("config_not_json")
def _(c):
    p = os.path.join(c.base, "config.json")
    with open(p, "w") as fh:
        fh.write("{oops")
    return [p, "model config"]


@case("target_not_after_history")
def _(c):
    c.args = ["extrapolate", "--base", c.base, "--checkpoints", c.run, "--target-step", 3, "--out", c.out]
    return ["target step 3", "last history step 4"]


# -- unreadable files ------------------------------------------------------------------------------
@case("fifo_in_place_of_shard")
def _(c):
    p = c.file(2)
    os.unlink(p)
    os.mkfifo(p)
    return [p, "not a regular file"]


@case("directory_in_place_of_shard")
def _(c):
    p = c.file(3)
    os.unlink(p)
    os.mkdir(p)
    return [p, "not a regular file"]


@case("permission_denied")
def _(c):
    p = c.file(2)
    os.chmod(p, 0)
    if os.geteuid() == 0:  # root reads anything: drop the capabilities that let it
        c.preexec = drop_dac_caps
    return [p, "Permission denied"]


@case("base_dir_unreadable")
def _(c):
    os.chmod(c.base, 0o311)  # may be entered, not listed
    if os.geteuid() == 0:
        c.preexec = drop_dac_caps
    return [c.base, "Permission denied"]


@case("checkpoint_dir_unreadable")
def _(c):
    os.chmod(c.ck[2], 0)
    if os.geteuid() == 0:
        c.preexec = drop_dac_caps
    c.args = ["extrapolate", "--base", c.base, "--checkpoint", f"1={c.ck[1]}", "--checkpoint", f"2={c.ck[2]}",
              "--target-step", TARGET, "--out", c.out]
    return [c.ck[2], "Permission denied"]


@case("side_file_unreadable")
def _(c):
    p = os.path.join(c.base, "config.json")
    os.chmod(p, 0)
    if os.geteuid() == 0:
        c.preexec = drop_dac_caps
    return [p, "Permission denied"]


@case("tokenizer_file_unreadable")
def _(c):
    p = os.path.join(c.base, "tokenizer.json")
    with open(p, "w") as fh:
        fh.write("{}")
    os.chmod(p, 0)
    if os.geteuid() == 0:
        c.preexec = drop_dac_caps
    return [p, "Permission denied"]


@case("dangling_symlink_shard")
def _(c):
    p = c.file(4)
    os.unlink(p)
    os.symlink(os.path.join(c.root, "nowhere.safetensors"), p)
    return [p]


# -- outputs aimed at the wrong place ------------------------------------------------------------------
@case("output_inside_base")
def _(c):
    c.out = os.path.join(c.base, "pred")
    return [c.out, "inside input", c.base]


@case("output_inside_run_dir")
def _(c):
    c.out = os.path.join(c.run, "pred")
    return [c.out, "inside input", c.run]


@case("output_would_replace_input")
def _(c):
    os.makedirs(c.out)
    c.out_before = set(os.listdir(c.out))
    dst = os.path.join(c.out, f"step_{TARGET}")
    shutil.copytree(c.ck[4], dst)
    c.out_before = {f"step_{TARGET}"}
    c.inputs.append(dst)
    c.args = ["extrapolate", "--base", c.base, "--checkpoint", f"1={c.ck[1]}", "--checkpoint", f"2={dst}",
              "--target-step", TARGET, "--out", c.out, "--overwrite"]
    return [dst, "would replace input"]


@case("output_is_a_file")
def _(c):
    with open(c.out, "w") as fh:
        fh.write("x")
    c.inputs.append(c.out)
    c.out = os.path.join(c.out, "sub")  # parent is a regular file
    return [c.out, "cannot create output directory"]


@case("output_exists")
def _(c):
    os.makedirs(os.path.join(c.out, f"step_{TARGET}"))
    c.out_before = {f"step_{TARGET}"}
    return [os.path.join(c.out, f"step_{TARGET}"), "already exists", "--overwrite"]


@case("save_fit_inside_input")
def _(c):
    p = os.path.join(c.base, "model.safetensors")
    c.extra = ["--save-fit", p]
    return [p, "inside an input"]


@case("save_fit_dir_missing")
def _(c):
    p = os.path.join(c.root, "nope", "x.fit")
    c.extra = ["--save-fit", p]
    return [p, "does not exist"]


# -- fit files (relex predict) ---------------------------------------------------------------------------
@case("fit_missing")
def _(c):
    fit = c.make_fit()
    os.unlink(fit)
    c.inputs.remove(fit)
    return [fit, "cannot open"]


@case("fit_truncated")
def _(c):
    fit = c.make_fit()
    os.truncate(fit, os.path.getsize(fit) - 100)
    return [fit]


@case("fit_header_garbled")
def _(c):
    fit = c.make_fit()
    with open(fit, "r+b") as fh:
        fh.seek(8)
        fh.write(b"\x00garbage")
    return [fit, "not valid JSON"]


@case("fit_is_a_checkpoint")
def _(c):
    fit = c.make_fit()
    shutil.copy(c.file(1), fit)
    return [fit, "not a relex fit file"]


@case("fit_metadata_not_json")
def _(c):
    fit = c.make_fit()
    edit_header(fit, lambda h: h["__metadata__"].__setitem__("relex_fit", "{"))
    return [fit, "not valid JSON"]


@case("fit_option_of_wrong_type")
def _(c):
    fit = c.make_fit()

    def f(h):
        doc = json.loads(h["__metadata__"]["relex_fit"])
        doc["options"]["rank"] = "one"
        h["__metadata__"]["relex_fit"] = json.dumps(doc)
    edit_header(fit, f)
    return [fit, "corrupted"]


@case("fit_steps_inconsistent")
def _(c):
    fit = c.make_fit()

    def f(h):
        doc = json.loads(h["__metadata__"]["relex_fit"])
        doc["checkpoints"].pop("3")
        h["__metadata__"]["relex_fit"] = json.dumps(doc)
    edit_header(fit, f)
    return [fit, "corrupted"]


@case("fit_values_corrupted")
def _(c):
    fit = c.make_fit()
    set_values(fit, "a.weight::u", lambda a: a.__setitem__(slice(None), a * 3))
    return [fit, "a.weight", "corrupted"]


@case("fit_unknown_version")
def _(c):
    fit = c.make_fit()

    def f(h):
        doc = json.loads(h["__metadata__"]["relex_fit"])
        doc["version"] = 99
        h["__metadata__"]["relex_fit"] = json.dumps(doc)
    edit_header(fit, f)
    return [fit, "unsupported fit version"]


@case("fit_inputs_changed")
def _(c):
    fit = c.make_fit()
    p = c.file(2)
    set_values(p, "a.weight", lambda a: a.__setitem__(0, a[0] ^ 1))  # same size and header, new mtime
    return [fit, p, "does not match", "mtime_ns changed"]


@case("fit_inputs_removed")
def _(c):
    fit = c.make_fit()
    shutil.rmtree(c.ck[3])
    return [fit, c.ck[3], "not a directory"]


@case("fit_is_a_directory")
def _(c):
    fit = c.make_fit()
    os.unlink(fit)
    os.mkdir(fit)
    return [fit, "not a regular file"]


@case("fit_tensor_list_differs")
def _(c):
    fit = c.make_fit()

    def f(h):
        doc = json.loads(h["__metadata__"]["relex_fit"])
        doc["fitted"].remove("b.bias")
        h["__metadata__"]["relex_fit"] = json.dumps(doc)
    edit_header(fit, f)
    return [fit, "same tensors"]


# -- environment and backend ----------------------------------------------------------------------
@case("backend_unknown_in_environment")
def _(c):
    c.env = cli_env(RELEX_BACKEND="nope")
    return ["unknown backend 'nope'"]


@case("backend_unavailable")
def _(c):
    c.extra = ["--backend", "cuda"]
    return ["backend 'cuda' is not available"]


@case("num_threads_not_a_number")
def _(c):
    c.env = cli_env(RELEX_NUM_THREADS="many")
    c.extra = ["--backend", "cpu"]
    return ["RELEX_NUM_THREADS", "many"]


#: known problems in code owned elsewhere, reported to its owner; xfail until fixed
KNOWN: dict[str, str] = {}

SHARDED = {"index_names_missing_shard", "index_maps_tensor_to_wrong_shard", "shard_tensor_missing_from_index",
           "index_not_json", "index_without_weight_map", "index_shard_path_escapes"}
BIG = {"nan_in_chunked_tensor"}


def _native_available():
    try:
        from relex_kernels.ops import native
        return native.available()[0] if hasattr(native, "available") else False
    except Exception:
        return False


def _params():
    for k in CASES:
        marks = []
        if k in KNOWN:
            marks.append(pytest.mark.xfail(reason=KNOWN[k], strict=False))
        if k == "num_threads_not_a_number" and not _native_available():
            marks.append(pytest.mark.skip(reason="the native cpu backend is not built"))
        yield pytest.param(k, marks=marks)


@pytest.mark.parametrize("kind", _params())
def test_bad_input(tmp_path, kind):
    c = Ctx(str(tmp_path), sharded=kind in SHARDED, big=kind in BIG)
    needles = CASES[kind](c)
    before = digest(*c.inputs)
    r = relex(*c.command(), env=c.env or cli_env(), preexec_fn=c.preexec, timeout=60)
    assert_clean_failure(r, c.out, needles, before, c.inputs, c.out_before)


def test_corpus_is_large_enough():
    assert len(CASES) >= 20
