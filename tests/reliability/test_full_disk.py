"""A full disk, two ways: a file-size limit (RLIMIT_FSIZE, any user) and a small tmpfs (root).

Limits are swept so that space runs out at different points: the journal, the
reserved output files, journal records mid-run, the side files, the report, the fit
file. Every run must either succeed with the exact output of an unconstrained run, or
fail with exit 2 and one line naming the output and the OS error, leaving no file
behind (the tmpfs is empty again) and its inputs untouched.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess

import pytest
from relhelp import cli_env, digest, output_bytes, relex, small_run, step_dirs

SHAPES = {"a.weight": (96, 128), "b.weight": (64, 64), "c.bias": (300,), "ids": (16,)}
TARGETS = (30, 45)
ERRORS = ("File too large", "No space left on device")


def command(t, out, fit=None):
    args = ["extrapolate", "--base", t["base"], "--checkpoints", t["run"], "--out", out, "-q",
            "--shard-size", "20K"]
    for s in TARGETS:
        args += ["--target-step", s]
    if fit:
        args += ["--save-fit", fit]
    return args


@pytest.fixture(scope="module")
def traj(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("disk"))
    base, run, ck = small_run(root, shapes=SHAPES, steps=range(1, 6), extra_dtypes={"ids": "I64"})
    with open(os.path.join(base, "tokenizer.json"), "w") as fh:  # a side file worth a few pages
        fh.write("{" + ", ".join(f'"tok{i}": {i}' for i in range(3000)) + "}")
    t = {"root": root, "base": base, "run": run}
    ref = os.path.join(root, "ref")
    r = relex(*command(t, ref, os.path.join(root, "ref.fit")))
    assert r.returncode == 0, r.stderr
    t["ref"] = {s: output_bytes(os.path.join(ref, f"step_{s}")) for s in TARGETS}
    t["fit"] = open(os.path.join(root, "ref.fit"), "rb").read()
    t["inputs"] = digest(base, run)
    t["largest_file"] = max(len(b) for o in t["ref"].values() for b in o.values())
    t["total"] = sum(len(b) for o in t["ref"].values() for b in o.values())
    return t


def check(t, r, out, fit, seen):
    """Success with the exact output, or a clean failure; returns the error line (or "ok")."""
    assert digest(t["base"], t["run"]) == t["inputs"]
    if r.returncode == 0:
        assert step_dirs(out) == [f"step_{s}" for s in sorted(TARGETS)]
        for s in TARGETS:
            assert output_bytes(os.path.join(out, f"step_{s}")) == t["ref"][s]
        assert open(fit, "rb").read() == t["fit"]
        seen.add("ok")
        return "ok"
    err = r.stderr.strip()
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(err.splitlines()) == 1, r.stderr
    assert any(e in err for e in ERRORS), err
    assert out in err or fit in err, err
    assert not os.path.exists(out) or set(os.listdir(out)) <= {".relex.lock"}, os.listdir(out)
    d = os.path.dirname(fit)
    assert not [f for f in os.listdir(d) if f != os.path.basename(out)], os.listdir(d)  # no temporaries
    seen.add(" ".join(err.split(": error: ")[1].split(" ")[:3]))
    return err


def _fsize_limit(n):
    def pre():
        resource.setrlimit(resource.RLIMIT_FSIZE, (n, n))
    return pre


def _run_fsize(t, tmp_path, limits):
    seen = set()
    for i, n in enumerate(limits):
        d = tmp_path / f"l{i}"
        d.mkdir()
        out, fit = str(d / "out"), str(d / "run.fit")
        r = relex(*command(t, out, fit), preexec_fn=_fsize_limit(n))
        check(t, r, out, fit, seen)
        shutil.rmtree(d)
    return seen


def test_file_size_limit(traj, tmp_path):
    """ulimit -f: EFBIG (the CLI ignores SIGXFSZ) at the journal, the outputs, the fit; and success."""
    big = traj["largest_file"]
    seen = _run_fsize(traj, tmp_path, [50, 2000, big - 1, big + len(traj["fit"]) + 100000])
    print(sorted(seen))
    assert "ok" in seen and len(seen) >= 3, seen


@pytest.mark.slow
def test_file_size_limit_sweep(traj, tmp_path):
    seen = _run_fsize(traj, tmp_path, list(range(0, traj["largest_file"] + 4096, 1024)) + [1 << 30])
    print(sorted(seen))
    assert "ok" in seen and len(seen) >= 3, seen


# -- a real full filesystem -----------------------------------------------------------------------
@pytest.fixture
def tmpfs(tmp_path):
    mnt = str(tmp_path / "mnt")
    os.mkdir(mnt)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", mnt], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()}); the RLIMIT_FSIZE test covers EFBIG")

    def resize(nbytes):
        subprocess.run(["mount", "-o", f"remount,size={max(nbytes, 4096)}", mnt], check=True)

    yield mnt, resize
    subprocess.run(["umount", "-l", mnt])


def _run_tmpfs(t, mnt, resize, sizes):
    seen = set()
    for n in sizes:
        resize(n)
        out, fit = os.path.join(mnt, "out"), os.path.join(mnt, "run.fit")
        r = relex(*command(t, out, fit), env=cli_env())
        check(t, r, out, fit, seen)
        if r.returncode != 0:
            assert os.listdir(mnt) in ([], ["out"]), os.listdir(mnt)
            used = os.statvfs(mnt)
            assert used.f_bfree >= used.f_blocks - 2, "blocks still in use after a failed run"
        shutil.rmtree(out, ignore_errors=True)
        if os.path.exists(fit):
            os.unlink(fit)
    return seen


def test_full_tmpfs(traj, tmpfs):
    mnt, resize = tmpfs
    total = traj["total"]
    seen = _run_tmpfs(traj, mnt, resize, [4096, 48 * 1024, total // 2, total + 256 * 1024])
    print(sorted(seen))
    assert "ok" in seen and len(seen) >= 2, seen


@pytest.mark.slow
def test_full_tmpfs_sweep(traj, tmpfs):
    """Every 4 KiB from empty to enough: ENOSPC at every point of the run that allocates."""
    mnt, resize = tmpfs
    seen = _run_tmpfs(traj, mnt, resize, list(range(4096, traj["total"] + 128 * 1024, 4096)))
    print(sorted(seen))
    assert "ok" in seen and len(seen) >= 3, seen
