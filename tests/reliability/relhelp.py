"""Shared helpers of the reliability suite: the real CLI in a subprocess, digests, safetensors surgery."""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import stat
import struct
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TESTS = os.path.join(ROOT, "tests")
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

from trajgen import make_trajectory  # noqa: E402

#: the standard small trajectory: two fitted tensors and one copied (non-float) tensor
SHAPES = {"a.weight": (16, 8), "b.bias": (8,), "ids": (4,)}
EXTRA_DTYPES = {"ids": "I64"}
TARGET = 20


# -- running the CLI ------------------------------------------------------------------
def cli_env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.pop("RELEX_TEST_KILL", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def relex(*args, env: dict | None = None, preexec_fn=None, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m relex_kernels ARGS`` as a user runs it (a hang is a test failure, not a stuck CI)."""
    return subprocess.run([sys.executable, "-m", "relex_kernels", *map(str, args)], capture_output=True,
                          text=True, env=env or cli_env(), preexec_fn=preexec_fn, timeout=timeout, cwd=ROOT)


def relex_bg(*args, env: dict | None = None, preexec_fn=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "relex_kernels", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env or cli_env(), preexec_fn=preexec_fn,
                            cwd=ROOT)


def drop_dac_caps() -> None:
    """preexec_fn for root: drop CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH so file modes bind again."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


# -- digests ---------------------------------------------------------------------------
def digest(*paths: str) -> dict[str, str]:
    """Every file under ``paths`` (or the file itself) -> content hash; other entries -> their type."""
    out = {}

    def one(p):
        st = os.lstat(p)
        if stat.S_ISREG(st.st_mode):
            h = hashlib.sha256()
            mode = st.st_mode
            if not mode & stat.S_IRUSR:
                os.chmod(p, mode | stat.S_IRUSR)
            try:
                with open(p, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        h.update(block)
            finally:
                os.chmod(p, stat.S_IMODE(mode))
            return f"file:{h.hexdigest()}:{stat.S_IMODE(mode):o}"
        if stat.S_ISLNK(st.st_mode):
            return f"link:{os.readlink(p)}"
        if stat.S_ISDIR(st.st_mode):
            return "dir"
        return f"special:{stat.S_IFMT(st.st_mode):o}"

    for top in paths:
        if not os.path.lexists(top):
            out[top] = "absent"
            continue
        out[top] = one(top)
        if os.path.isdir(top) and not os.path.islink(top):
            for d, dirs, files in os.walk(top):
                for n in dirs + files:
                    p = os.path.join(d, n)
                    out[p] = one(p)
    return out


def output_bytes(step_dir: str) -> dict[str, bytes]:
    """{file name: bytes} of one output checkpoint directory."""
    return {f: open(os.path.join(step_dir, f), "rb").read() for f in sorted(os.listdir(step_dir))}


def step_dirs(out_dir: str) -> list[str]:
    return sorted(n for n in os.listdir(out_dir) if n.startswith("step_")) if os.path.isdir(out_dir) else []


# -- failures users see -----------------------------------------------------------------
def assert_clean_failure(r: subprocess.CompletedProcess, out_dir: str, needles, before: dict, inputs,
                         out_before: set | None = None) -> str:
    """Non-zero exit, one line naming what is wrong, no traceback, nothing left behind, inputs intact."""
    err = r.stderr.strip()
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    assert len(err.splitlines()) == 1, err
    assert err.startswith("relex ") and ": error: " in err, err
    for n in needles:
        assert str(n) in err, (n, err)
    if os.path.isdir(out_dir):
        left = set(os.listdir(out_dir)) - (out_before or set())
        assert left <= {".relex.lock"}, left
    else:
        assert out_before is None, "a pre-existing output directory was removed"
    assert digest(*inputs) == before, "an input changed"
    return err


# -- trajectories ------------------------------------------------------------------------
def small_run(root: str, shapes=None, steps=range(1, 5), **kw):
    """base + run/step_N; returns (base_dir, run_dir, {step: dir})."""
    os.makedirs(root, exist_ok=True)
    kw.setdefault("extra_dtypes", EXTRA_DTYPES if shapes is None else None)
    base, ck = make_trajectory(root, shapes or SHAPES, steps, **kw)
    return base, os.path.join(root, "run"), ck


# -- safetensors surgery -------------------------------------------------------------------
def read_st(path: str) -> tuple[dict, bytes]:
    """(header object, data buffer) of a safetensors file."""
    with open(path, "rb") as fh:
        raw = fh.read()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_st(path: str, header, data: bytes, pad: bool = True) -> None:
    """Write a header (object, or raw bytes taken as is) and a data buffer."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw + data)


def edit_header(path: str, fn) -> None:
    h, data = read_st(path)
    fn(h)
    write_st(path, h, data)


def tensor_file(ck_dir: str, name: str) -> str:
    """The file of a checkpoint directory that holds ``name``."""
    idx = os.path.join(ck_dir, "model.safetensors.index.json")
    if os.path.exists(idx):
        return os.path.join(ck_dir, json.load(open(idx))["weight_map"][name])
    return os.path.join(ck_dir, "model.safetensors")


def set_values(path: str, name: str, fn) -> None:
    """Change the raw values of tensor ``name`` in place (same size, same header): ``fn(raw numpy array)``."""
    from relex_kernels.io import dtypes
    h, data = read_st(path)
    e = h[name]
    b, end = e["data_offsets"]
    a = np.frombuffer(data[b:end], dtype=dtypes.raw_numpy(e["dtype"])).copy()
    fn(a)
    with open(path, "r+b") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        fh.seek(8 + n + b)
        fh.write(a.tobytes())


def rewrite_tensors(ck_dir: str, fn) -> None:
    """Rewrite a single-file checkpoint through ``fn({name: (dtype, array)})`` (may add/drop/alter)."""
    from relex_kernels.io import Checkpoint, write_checkpoint
    ck = Checkpoint(ck_dir)
    t = {n: (loc.info.dtype, np.array(loc.file.view(n)).reshape(loc.info.shape)) for n, loc in ck.tensors.items()}
    ck.close()
    fn(t)
    for f in os.listdir(ck_dir):
        if f.endswith(".safetensors") or f.endswith(".index.json"):
            os.unlink(os.path.join(ck_dir, f))
    write_checkpoint(ck_dir, t)
