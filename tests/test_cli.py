"""The ``relex`` command as users run it: options, messages, exit codes, nothing left behind."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from trajgen import make_trajectory

from relex_kernels.io import dtypes, write_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def relex(*args, check=False):
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-m", "relex_kernels", *map(str, args)], capture_output=True, text=True,
                       env=env)
    if check:
        assert r.returncode == 0, r.stderr
    return r


@pytest.fixture
def run(tmp):
    base, ck = make_trajectory(tmp, {"a.weight": (16, 8), "b": (5,)}, range(1, 7), layout="verl")
    return tmp, base, os.path.join(tmp, "run")


def assert_clean_failure(r, out, *words):
    assert r.returncode != 0
    err = r.stderr.strip()
    assert "Traceback" not in r.stderr, r.stderr
    assert len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, (w, err)
    if os.path.isdir(out):  # at most the lock of a directory that existed before
        assert set(os.listdir(out)) <= {".relex.lock"}, os.listdir(out)


def test_help_explains_every_command():
    r = relex("--help", check=True)
    for cmd in ("extrapolate", "predict", "synth", "demo", "backends"):
        assert cmd in r.stdout
    r = relex("extrapolate", "--help", check=True)
    for opt in ("--history-steps", "--target-step", "--rank", "--window", "--time-axis", "--fp16-deltas",
                "--memory-budget", "--save-fit", "--overwrite", "--mode", "--step-scale"):
        assert opt in r.stdout


def test_backends_report():
    r = relex(check=True)
    assert "reference" in r.stdout and "auto picks:" in r.stdout


def test_extrapolate_cli_writes_output_and_report(run):
    tmp, base, rundir = run
    out = os.path.join(tmp, "out")
    r = relex("extrapolate", "--base", base, "--checkpoints", rundir, "--history-steps", 4, "--target-step", 40,
              "--target-step", 60, "--out", out, "--save-fit", os.path.join(tmp, "f.fit"), check=True)
    assert "explained variance of rank 1 over 2 tensors" in r.stdout
    assert os.path.isfile(os.path.join(out, "step_40", "model.safetensors"))
    assert os.path.isfile(os.path.join(out, "step_60", "config.json"))
    assert os.path.isfile(os.path.join(out, "relex_report.json"))
    # history-steps 4 keeps 4 of the 6 checkpoints
    import json
    rep = json.load(open(os.path.join(out, "relex_report.json")))
    assert rep["history_steps"] == [1, 2, 3, 4]
    r = relex("predict", "--fit", os.path.join(tmp, "f.fit"), "--target-step", 80, "--out", out, check=True)
    assert os.path.isdir(os.path.join(out, "step_80"))
    # the report now describes the predict run: one warning line says the earlier one is replaced
    warn = r.stderr.strip().splitlines()
    assert len(warn) == 1 and "the earlier run's report, on step_40, step_60 (kept), is replaced" in warn[0], warn
    assert list(json.load(open(os.path.join(out, "relex_report.json")))["outputs"]) == ["80"]
    # refuses to overwrite, then replaces with --overwrite
    r = relex("extrapolate", "--base", base, "--checkpoints", rundir, "--target-step", 40, "--out", out)
    assert r.returncode == 2 and "already exists" in r.stderr and "--overwrite" in r.stderr
    r = relex("extrapolate", "--base", base, "--checkpoints", rundir, "--target-step", 40, "--out", out,
              "--overwrite", check=True)
    assert "report, on step_80 (kept), is replaced" in r.stderr  # (the predict run's; step_40 is replaced itself)


def _ck(d, tensors):
    os.makedirs(d)
    write_checkpoint(d, tensors)


def test_input_errors_name_tensor_step_and_file(run):
    tmp, base, rundir = run
    out = os.path.join(tmp, "out")
    ok = lambda s: os.path.join(rundir, f"global_step_{s}", "actor", "huggingface")  # noqa: E731
    a = np.zeros((16, 8), np.float32)
    bad = os.path.join(tmp, "bad")
    # a checkpoint lacking a tensor
    _ck(os.path.join(bad, "missing"), {"a.weight": ("BF16", dtypes.from_float32(a, "BF16"))})
    r = relex("extrapolate", "--base", base, "--checkpoint", f"1={ok(1)}", "--checkpoint",
              f"2={os.path.join(bad, 'missing')}", "--target-step", 9, "--out", out)
    assert_clean_failure(r, out, "step 2", "lacks tensor b", "missing")
    # a float tensor turned integer (another float dtype is read: fp32 masters beside a bf16 base)
    _ck(os.path.join(bad, "dtype"), {"a.weight": ("I32", a.astype(np.int32)), "b": ("BF16", np.zeros(5, np.uint16))})
    r = relex("extrapolate", "--base", base, "--checkpoint", f"1={ok(1)}", "--checkpoint",
              f"3={os.path.join(bad, 'dtype')}", "--target-step", 9, "--out", out)
    assert_clean_failure(r, out, "step 3", "a.weight", "I32", "BF16")
    # a shape that changes
    _ck(os.path.join(bad, "shape"), {"a.weight": ("BF16", np.zeros((8, 16), np.uint16)),
                                     "b": ("BF16", np.zeros(5, np.uint16))})
    r = relex("extrapolate", "--base", base, "--checkpoint", f"1={ok(1)}", "--checkpoint",
              f"3={os.path.join(bad, 'shape')}", "--target-step", 9, "--out", out)
    assert_clean_failure(r, out, "step 3", "a.weight", "[8, 16]")
    # NaN in a checkpoint
    nan = dtypes.from_float32(np.full((16, 8), np.nan, np.float32), "BF16")
    _ck(os.path.join(bad, "nan"), {"a.weight": ("BF16", nan), "b": ("BF16", np.zeros(5, np.uint16))})
    r = relex("extrapolate", "--base", base, "--checkpoint", f"1={ok(1)}", "--checkpoint",
              f"4={os.path.join(bad, 'nan')}", "--target-step", 9, "--out", out)
    assert_clean_failure(r, out, "step 4", "a.weight", "NaN/Inf")
    # duplicate steps
    r = relex("extrapolate", "--base", base, "--checkpoint", f"1={ok(1)}", "--checkpoint", f"1={ok(2)}",
              "--target-step", 9, "--out", out)
    assert_clean_failure(r, out, "duplicate step 1")
    # fewer than two history checkpoints
    r = relex("extrapolate", "--base", base, "--checkpoints", rundir, "--history-steps", 1, "--target-step", 9,
              "--out", out)
    assert_clean_failure(r, out, "at least 2 history checkpoints")
    # a target that makes no sense for the mode
    r = relex("extrapolate", "--base", base, "--checkpoints", rundir, "--target-step", 3, "--out", out)
    assert_clean_failure(r, out, "not after the last history step")
    r = relex("extrapolate", "--base", base, "--checkpoints", rundir, "--mode", "reconstruct", "--target-step", 99,
              "--out", out)
    assert_clean_failure(r, out, "not one of the history steps")
    # rank beyond the history
    r = relex("extrapolate", "--base", base, "--checkpoints", rundir, "--rank", 9, "--target-step", 90, "--out", out)
    assert_clean_failure(r, out, "--rank")
    # an output inside an input
    r = relex("extrapolate", "--base", base, "--checkpoints", rundir, "--target-step", 90, "--out",
              os.path.join(rundir, "pred"))
    assert_clean_failure(r, os.path.join(rundir, "pred"), "inside input")
    assert not os.path.exists(os.path.join(rundir, "pred"))
    # an empty run directory
    os.makedirs(os.path.join(tmp, "empty"))
    r = relex("extrapolate", "--base", base, "--checkpoints", os.path.join(tmp, "empty"), "--target-step", 9,
              "--out", out)
    assert_clean_failure(r, out, "no checkpoints found")
    # a bad memory budget
    r = relex("extrapolate", "--base", base, "--checkpoints", rundir, "--target-step", 90, "--out", out,
              "--memory-budget", "lots")
    assert r.returncode == 2 and "cannot read size" in r.stderr


def test_a_new_users_slips_get_one_line_answers_that_name_the_fix(run):
    """Slips a first run makes (found by trying the tool as a new user): each gets one line that
    names what is wrong, and nothing that runs regardless without a word."""
    tmp, base, rundir = run
    out = os.path.join(tmp, "out")
    common = ("extrapolate", "--base", base, "--checkpoints", rundir, "--target-step", 90)
    # a history that keeps no checkpoint: not 'no checkpoints found' in a directory that has six
    r = relex(*common, "--history-steps", 0, "--out", out)
    assert_clean_failure(r, out, "no checkpoints of step <= 0", "start at step 1")
    # a --checkpoint path that does not exist: named, before 'needs at least 2 checkpoints'
    r = relex("extrapolate", "--base", base, "--checkpoint", f"5={os.path.join(tmp, 'nope')}", "--target-step", 9,
              "--out", out)
    assert_clean_failure(r, out, "nope: No such file or directory")
    # ... but a later step that is not read (a live run) need not exist yet
    live = [x for s in (1, 2) for x in ("--checkpoint", f"{s}={rundir}/global_step_{s}/actor/huggingface")]
    r = relex("extrapolate", "--base", base, *live, "--checkpoint", f"9={os.path.join(tmp, 'nope')}",
              "--history-steps", 2, "--target-step", 40, "--out", os.path.join(tmp, "live"), "-q", check=True)
    # a value that is wrong whether or not it applies is still an error
    r = relex(*common, "--out", out, "--step-scale", "-1")
    assert_clean_failure(r, out, "--step-scale must be positive")
    # a verl step directory given whole: its weights are one level down, and the error says where
    whole = [x for s in (1, 2) for x in ("--checkpoint", f"{s}={rundir}/global_step_{s}")]
    r = relex("extrapolate", "--base", base, *whole, "--target-step", 9, "--out", out)
    assert_clean_failure(r, out, "its checkpoint is in", os.path.join("global_step_1", "actor", "huggingface"))
    # sizes of zero bytes are refused, not silently replaced by the default
    for opt in ("--memory-budget", "--shard-size", "--device-memory-budget"):
        r = relex(*common, "--out", out, opt, "0")
        assert r.returncode == 2 and "at least one byte" in r.stderr and opt in r.stderr, r.stderr
    # options that change nothing here, and a budget past RAM: warnings, and the report records what ran
    r = relex(*common, "--out", out, "-q", "--degree", 3, "--step-scale", 2, "--memory-budget", "64T", check=True)
    warn = r.stderr.strip().splitlines()
    assert len(warn) == 3 and all(w.startswith("relex extrapolate: warning: ") for w in warn), warn
    assert "--degree applies only with --fit poly" in warn[0]
    assert "--step-scale applies only with --time-axis index" in warn[1]
    assert "more than this machine's RAM" in warn[2]
    import json
    opts = json.load(open(os.path.join(out, "relex_report.json")))["options"]
    assert opts["degree"] == 2 and opts["step_scale"] == 1.0
    # given where they apply, no warning
    r = relex(*common, "--out", out, "-q", "--overwrite", "--fit", "poly", "--degree", 3, "--time-axis", "index",
              "--step-scale", 2, check=True)
    assert r.stderr == ""
    out = os.path.join(tmp, "out2")
    # a file that is not a fit, for 'relex predict'
    with open(os.path.join(tmp, "notes.json"), "w") as fh:
        fh.write('{"steps": [1, 2, 3]}')
    r = relex("predict", "--fit", os.path.join(tmp, "notes.json"), "--target-step", 90, "--out", out)
    assert_clean_failure(r, out, "not a relex fit file", "--save-fit")
    # a Hub id given as --base: relex downloads nothing, and says how to fetch it
    r = subprocess.run([sys.executable, "-m", "relex_kernels", *common[:2], "Qwen/Qwen3-0.6B", *map(str, common[3:]),
                        "--out", out], capture_output=True, text=True, cwd=tmp, env=dict(os.environ, PYTHONPATH=ROOT))
    assert_clean_failure(r, out, "downloads nothing", "huggingface-cli download Qwen/Qwen3-0.6B")
    assert relex("--version", check=True).stdout.startswith("relex_kernels ")


def test_a_resumed_run_says_so(run):
    tmp, base, rundir = run
    out = os.path.join(tmp, "out")
    cmd = ("extrapolate", "--base", base, "--checkpoints", rundir, "--target-step", 90, "--out", out,
           "--backend", "reference")
    env = dict(os.environ, PYTHONPATH=ROOT, RELEX_TEST_KILL="done:1", RELEX_JOURNAL_SYNC_SECONDS="0")
    r = subprocess.run([sys.executable, "-m", "relex_kernels", *map(str, cmd)], capture_output=True, text=True, env=env)
    assert r.returncode != 0
    r = relex(*cmd, check=True)
    assert "resumed an interrupted run of this command: 1 tensors were already done" in r.stdout, r.stdout
    r = relex(*cmd, "--overwrite", check=True)
    assert "resumed an interrupted run" not in r.stdout


def test_run_directory_problems_are_named(tmp, monkeypatch):
    """An unreadable checkpoint directory is 'cannot list (Permission denied)', not 'holds no weights'
    (root reads any directory: the refusal is simulated); --prefer hf where a step has only rank
    files warns that the rank files are read."""
    import warnings

    from relex_kernels.errors import InputError, RelexWarning
    from relex_kernels.io import layout

    rd = os.path.join(tmp, "run")
    for s in (1, 2):
        os.makedirs(os.path.join(rd, f"global_step_{s}", "actor"))
        open(os.path.join(rd, f"global_step_{s}", "actor", "model_world_size_1_rank_0.pt"), "wb").close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sorted(layout.discover(rd)) == [1, 2]
    with pytest.warns(RelexWarning, match=r"--prefer hf: no Hugging Face export at steps 1\.\.2 \(2 of them\)"):
        assert sorted(layout.discover(rd, prefer="hf")) == [1, 2]
    # (named in number order: global_step_10 lists before global_step_2)
    os.makedirs(os.path.join(rd, "global_step_10", "actor"))
    open(os.path.join(rd, "global_step_10", "actor", "model_world_size_1_rank_0.pt"), "wb").close()
    with pytest.warns(RelexWarning, match=r"at steps 1\.\.10 \(3 of them\)"):
        layout.discover(rd, prefer="hf")
    locked = os.path.join(rd, "global_step_2")
    listdir = os.listdir

    def refuse(path="."):
        if os.path.abspath(path).startswith(locked):
            raise PermissionError(13, "Permission denied", path)
        return listdir(path)
    monkeypatch.setattr(os, "listdir", refuse)
    with pytest.raises(InputError, match=r"cannot list checkpoint directory .*global_step_2 \(Permission denied\)"):
        layout.discover(rd)
    locked = os.path.join(rd, "global_step_1", "actor")  # one level down: the actor/ of a readable step
    with pytest.raises(InputError, match=r"cannot list checkpoint directory .*global_step_1/actor \(Permission"):
        layout.discover(rd)


def test_a_budget_past_the_memory_there_is_warns(tmp, monkeypatch):
    """Against the machine's RAM or the container's limit where that is less (cgroup v2 'max' is
    no limit), for all the ranks of a node together."""
    import warnings

    from relex_kernels.engine import plan
    from relex_kernels.errors import RelexWarning

    limit = os.path.join(tmp, "memory.max")
    monkeypatch.setattr(plan, "CGROUP_MEMORY_LIMITS", (limit,))
    monkeypatch.setattr(plan, "physical_ram", lambda: 16 << 30)
    with open(limit, "w") as fh:
        fh.write("max\n")
    assert plan.usable_memory() == (16 << 30, "this machine's RAM")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan.resolve_budget(8 << 30)  # fits
    with pytest.warns(RelexWarning, match=r"2 ranks x 10.0 GiB\) is more than this machine's RAM \(16.0 GiB"):
        plan.resolve_budget(10 << 30, ranks=2)
    with open(limit, "w") as fh:
        fh.write(str(4 << 30))
    assert plan.usable_memory() == (4 << 30, "this container's memory limit")
    with pytest.warns(RelexWarning, match=r"\(8.0 GiB\) is more than this container's memory limit \(4.0 GiB"):
        plan.resolve_budget(8 << 30)


def test_a_finished_command_run_again_is_already_complete(run):
    """A requeued job: the same command after it finished exits 0 without recomputing; other
    options, a damaged output or --save-fit still need --overwrite."""
    import json
    tmp, base, rundir = run
    out = os.path.join(tmp, "out")
    cmd = ("extrapolate", "--base", base, "--checkpoints", rundir, "--target-step", 40, "--target-step", 60,
           "--out", out, "--shard-size", "200")  # (sharded: an index and its files)
    relex(*cmd, check=True)
    step = os.path.join(out, "step_40")
    assert os.path.isfile(os.path.join(step, "model.safetensors.index.json"))
    stamp = {f: os.stat(os.path.join(step, f)).st_mtime_ns for f in os.listdir(step)}
    r = relex(*cmd, check=True)
    assert r.stdout.startswith("already complete: ") and os.path.join(out, "step_60") in r.stdout, r.stdout
    assert {f: os.stat(os.path.join(step, f)).st_mtime_ns for f in os.listdir(step)} == stamp  # nothing written
    assert json.load(open(os.path.join(out, "relex_report.json")))["run_key"]
    # other options: not this run's outputs
    r = relex(*cmd, "--rank", 2)
    assert_clean_failure(r, os.path.join(tmp, "elsewhere"), "already exists", "--overwrite")
    # a fit to save needs the run itself
    r = relex(*cmd, "--save-fit", os.path.join(tmp, "f.fit"))
    assert_clean_failure(r, os.path.join(tmp, "elsewhere"), "already exists")
    # a weight file gone: not whole, so not taken as done
    shard = sorted(f for f in os.listdir(step) if f.endswith(".safetensors"))[-1]
    os.unlink(os.path.join(step, shard))
    r = relex(*cmd)
    assert_clean_failure(r, os.path.join(tmp, "elsewhere"), "step_40 already exists")
    r = relex(*cmd, "--overwrite", check=True)
    assert "already complete" not in r.stdout and os.path.isfile(os.path.join(step, shard))
    # another command killed while renaming its step_40 into place: step_40 is no longer this
    # command's output, whatever report is left, so the rerun must not take it as complete
    other = ["extrapolate", "--base", base, "--checkpoints", rundir, "--target-step", 40, "--out", out,
             "--shard-size", "200", "--rank", 2, "--overwrite"]
    env = dict(os.environ, PYTHONPATH=ROOT, RELEX_TEST_KILL="rename:1")
    k = subprocess.run([sys.executable, "-m", "relex_kernels", *map(str, other)], env=env, capture_output=True,
                       text=True)
    assert k.returncode != 0 and not os.path.exists(os.path.join(out, "relex_report.json")), k.stderr
    r = relex(*cmd)
    assert r.returncode == 2 and "already complete" not in r.stdout and "already exists" in r.stderr, r.stdout


def test_output_piped_into_a_reader_that_leaves_is_no_error():
    """'relex backends | head -1': the reader closes the pipe; no BrokenPipeError traceback."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.Popen([sys.executable, "-m", "relex_kernels", "backends"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env)
    p.stdout.close()  # the reader is gone before the first line
    err = p.stderr.read().decode()
    assert p.wait() == 0 and "Traceback" not in err, err


def test_a_failed_run_removes_the_parents_it_made_for_its_output(run):
    tmp, base, rundir = run
    ok = os.path.join(rundir, "global_step_1", "actor", "huggingface")
    nan = dtypes.from_float32(np.full((16, 8), np.nan, np.float32), "BF16")
    _ck(os.path.join(tmp, "nan"), {"a.weight": ("BF16", nan), "b": ("BF16", np.zeros(5, np.uint16))})
    out = os.path.join(tmp, "new", "deeper", "out")  # found bad only once the run has begun
    r = relex("extrapolate", "--base", base, "--checkpoint", f"1={ok}", "--checkpoint", f"4={os.path.join(tmp, 'nan')}",
              "--target-step", 9, "--out", out)
    assert_clean_failure(r, out, "NaN/Inf")
    assert not os.path.exists(os.path.join(tmp, "new"))


def test_the_relex_process_freezes_its_module_objects_and_an_in_process_caller_keeps_its_collector():
    """The ``relex`` process (its own command line) moves the objects of its imported modules out of
    the cyclic collector's reach (gc.freeze: a run over thousands of tensors set off full collections
    that walked them all); ``main([...])`` called in another program leaves that program's collector
    as it is."""
    code = ("import gc, sys\n"
            "from relex_kernels.cli import main\n"
            "sys.argv = ['relex'] + sys.argv[1:]\n"
            "rc = main(None if sys.argv[1:] != ['in-process'] else ['backends'])\n"
            "print(rc, gc.get_freeze_count() > 0, gc.isenabled())\n")
    own = subprocess.run([sys.executable, "-c", code, "backends"], capture_output=True, text=True)
    caller = subprocess.run([sys.executable, "-c", code, "in-process"], capture_output=True, text=True)
    assert own.stdout.splitlines()[-1] == "0 True True", own.stderr
    assert caller.stdout.splitlines()[-1] == "0 False True", caller.stderr
