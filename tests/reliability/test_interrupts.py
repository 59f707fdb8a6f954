"""Interrupted runs, through the real CLI: killed anywhere, the same command finishes the job.

A run is SIGKILLed at exact points of pass 1 and pass 2 (the ``RELEX_TEST_KILL`` hook of
``relex_kernels.engine.journal``) and at random times; then the same command runs
again. Required: the output is byte-identical to an uninterrupted run, finished work
is reused (``resumed_tensors`` in the report, fewer bytes read), no partial output is
ever visible as ``OUT_DIR/step_*``, and a journal that no longer matches the inputs or
options is discarded, never trusted. Also: the lock refuses a second run aimed at the
same output, and Ctrl-C keeps the finished part for a resume.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time

import numpy as np
import pytest
from relhelp import cli_env, digest, output_bytes, relex, relex_bg, set_values, small_run, step_dirs, tensor_file

TARGETS = (30, 45)
SHAPES = {"model.embed_tokens.weight": (64, 16), "lm_head.weight": (64, 16), "big": (1_200_001,),
          "layer.weight": (32, 32), "ids": (4,)}


def command(t, out, *extra):
    args = ["extrapolate", "--base", t["base"], "--checkpoints", t["run"], "--out", out, "-q",
            "--memory-budget", "1M", "--shard-size", "1M", "--backend", "reference"]
    for s in TARGETS:
        args += ["--target-step", s]
    return args + list(extra)


def build(root):
    base, run, ck = small_run(root, shapes=SHAPES, steps=range(1, 6), extra_dtypes={"ids": "I64"},
                              config={"model_type": "test", "tie_word_embeddings": True})
    return {"root": root, "base": base, "run": run, "ck": ck}


@pytest.fixture(scope="module")
def traj(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("interrupts"))
    t = build(root)
    ref = os.path.join(root, "ref")
    r = relex(*command(t, ref))
    assert r.returncode == 0, r.stderr
    t["ref"] = {s: output_bytes(os.path.join(ref, f"step_{s}")) for s in TARGETS}
    t["ref_report"] = json.load(open(os.path.join(ref, "relex_report.json")))
    t["inputs"] = digest(t["base"], t["run"])
    return t


def assert_never_partial(t, out):
    """Whatever is visible as OUT_DIR/step_* is complete: identical to the uninterrupted output."""
    for d in step_dirs(out):
        s = int(d.split("_")[1])
        assert output_bytes(os.path.join(out, d)) == t["ref"][s], f"{d} visible but not complete"


def assert_finished(t, out, r):
    assert r.returncode == 0, r.stderr
    assert step_dirs(out) == [f"step_{s}" for s in sorted(TARGETS)]
    for s in TARGETS:
        assert output_bytes(os.path.join(out, f"step_{s}")) == t["ref"][s], f"step_{s} differs"
    assert not os.path.exists(os.path.join(out, ".relex.partial"))
    assert digest(t["base"], t["run"]) == t["inputs"]
    return json.load(open(os.path.join(out, "relex_report.json")))


def kill_at(t, out, point, *extra):
    r = relex(*command(t, out, *extra), env=cli_env(RELEX_TEST_KILL=point))
    assert r.returncode == -signal.SIGKILL, (point, r.returncode, r.stderr)
    assert_never_partial(t, out)
    return r


#: one or more exact points of every phase (CI); the slow test enumerates all of them. Jobs in
#: file order: embedding (fit; the tied head is written with it), big (chunked: 2 ranges per
#: pass), layer.weight (fit), ids (copy). With each: whether the resumed run must read less.
POINTS = {
    "start:1": False,  # writers created, nothing computed
    "gram:1": False,  # embedding Gram done, its fit not yet recorded
    "fit:1": False,  # embedding fit recorded: no Gram again, but a resident tensor is read once anyway
    "gram:2": True,  # first range of big's Gram: the partial sum is reused
    "gram:3": True,  # big's Gram complete, fit not recorded: the partial sum of range 1 is reused
    "combine:2": True,  # big's first output range written: pass 2 restarts at range 2
    "combine:3": True,  # inside big's pass 2, last range written but tensor not marked done
    "done:1": True,
    "fit:3": True,
    "done:2": True,
    "done:4": True,  # every tensor done, nothing committed
    "commit:1": False,  # all synced, commit recorded: the rerun only renames
    "rename:1": False,  # one target renamed into place, the other not yet
    "moved:1": False,  # all renamed, report moved beside them, state not yet removed
}


@pytest.mark.parametrize("point", list(POINTS))
def test_killed_run_resumes_byte_identical(traj, tmp_path, point):
    out = str(tmp_path / "out")
    kill_at(traj, out, point)
    rep = assert_finished(traj, out, relex(*command(traj, out)))
    kind, _ = point.split(":")
    if kind == "done":
        assert rep["resumed_tensors"] >= 1
    if POINTS[point]:
        assert rep["bytes_read"] < traj["ref_report"]["bytes_read"], "finished work was read again"


def test_batched_output_records_lose_work_not_bytes(traj, tmp_path):
    """With output records batched (the default: every 10 s), a kill loses the unsynced
    records' work, and the resumed run still writes identical bytes."""
    out = str(tmp_path / "out")
    r = relex(*command(traj, out), env=cli_env(RELEX_TEST_KILL="done:4", RELEX_JOURNAL_SYNC_SECONDS="3600"))
    assert r.returncode == -signal.SIGKILL, r.stderr
    journal = open(os.path.join(out, ".relex.partial", "journal.jsonl")).read()
    assert '"kind":"fit"' in journal and '"kind":"done"' not in journal
    rep = assert_finished(traj, out, relex(*command(traj, out), env=cli_env(RELEX_JOURNAL_SYNC_SECONDS="3600")))
    assert rep["resumed_tensors"] == 0


def test_killed_twice_then_resumed_with_another_memory_budget(traj, tmp_path):
    out = str(tmp_path / "out")
    kill_at(traj, out, "combine:1")
    kill_at(traj, out, "done:3")
    # a budget that keeps every tensor resident: other ranges, same Gram bit for bit
    rep = assert_finished(traj, out, relex(*command(traj, out, "--memory-budget", "4G")))
    assert rep["resumed_tensors"] >= 3


def test_no_resume_starts_afresh(traj, tmp_path):
    out = str(tmp_path / "out")
    kill_at(traj, out, "done:4")
    rep = assert_finished(traj, out, relex(*command(traj, out, "--no-resume")))
    assert rep["resumed_tensors"] == 0


def test_journal_of_other_options_is_discarded(traj, tmp_path):
    out = str(tmp_path / "out")
    kill_at(traj, out, "done:4", "--rank", "2")  # another fit: its journal must not be reused
    rep = assert_finished(traj, out, relex(*command(traj, out)))
    assert rep["resumed_tensors"] == 0


def test_journal_of_changed_inputs_is_discarded(tmp_path):
    """Inputs edited between the kill and the rerun: the rerun equals a fresh run on the new inputs."""
    t = build(str(tmp_path / "t"))
    out = str(tmp_path / "out")
    r = relex(*command(t, out), env=cli_env(RELEX_TEST_KILL="done:4"))
    assert r.returncode == -signal.SIGKILL
    p = tensor_file(t["ck"][2], "layer.weight")
    set_values(p, "layer.weight", lambda a: a.__setitem__(slice(0, 50), a[:50] ^ 3))
    r = relex(*command(t, out))
    assert r.returncode == 0, r.stderr
    fresh = str(tmp_path / "fresh")
    assert relex(*command(t, fresh)).returncode == 0
    for s in TARGETS:
        assert output_bytes(os.path.join(out, f"step_{s}")) == output_bytes(os.path.join(fresh, f"step_{s}"))
    assert json.load(open(os.path.join(out, "relex_report.json")))["resumed_tensors"] == 0


def test_damaged_journal_tail_is_ignored(traj, tmp_path):
    out = str(tmp_path / "out")
    kill_at(traj, out, "done:3")
    j = os.path.join(out, ".relex.partial", "journal.jsonl")
    with open(j, "ab") as fh:
        fh.write(b'{"kind":"done","name":"lay')  # a record torn by the kill
    assert_finished(traj, out, relex(*command(traj, out)))
    kill_at(traj, out + "2", "done:3")
    lines = open(out + "2/.relex.partial/journal.jsonl", "rb").read().split(b"\n")
    lines[3] = b'{"kind":"written","name":'  # a damaged record in the middle: trust nothing after it
    open(out + "2/.relex.partial/journal.jsonl", "wb").write(b"\n".join(lines))
    assert_finished(traj, out + "2", relex(*command(traj, out + "2")))


def test_torn_tail_then_killed_again(traj, tmp_path):
    """A resumed run appends after the last good record, not after a torn one."""
    out = str(tmp_path / "out")
    kill_at(traj, out, "done:1")
    j = os.path.join(out, ".relex.partial", "journal.jsonl")
    with open(j, "ab") as fh:
        fh.write(b'{"kind":"fit","name":"big","u":"AAAA')
    kill_at(traj, out, "done:2")  # the resumed run finishes big and layer.weight, and dies
    records = [json.loads(line) for line in open(j, "rb").read().splitlines()]  # every line whole
    assert [r["name"] for r in records if r["kind"] == "done"] == ["model.embed_tokens.weight", "big",
                                                                  "layer.weight"]
    rep = assert_finished(traj, out, relex(*command(traj, out)))
    assert rep["resumed_tensors"] == 3


def test_refusal_keeps_the_resumable_state(traj, tmp_path):
    """'already exists' (someone else made OUT_DIR/step_30 meanwhile) must not throw away finished work."""
    out = str(tmp_path / "out")
    kill_at(traj, out, "done:2")
    os.mkdir(os.path.join(out, "step_30"))
    r = relex(*command(traj, out))
    assert r.returncode == 2 and "already exists" in r.stderr, r.stderr
    os.rmdir(os.path.join(out, "step_30"))
    rep = assert_finished(traj, out, relex(*command(traj, out)))
    assert rep["resumed_tensors"] == 2


def test_partial_state_never_looks_complete(traj, tmp_path):
    """Killed in pass 2: nothing under OUT_DIR but the hidden state loads as a checkpoint."""
    out = str(tmp_path / "out")
    kill_at(traj, out, "combine:2")
    assert step_dirs(out) == []
    assert not os.path.exists(os.path.join(out, "relex_report.json"))
    assert sorted(os.listdir(out)) == [".relex.lock", ".relex.partial"]


def _wait_stopped(pid, timeout=60):
    t0 = time.time()
    while time.time() - t0 < timeout:
        with open(f"/proc/{pid}/stat") as fh:
            if fh.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        time.sleep(0.02)
    raise AssertionError("the run never reached the stop point")


def test_second_run_on_same_output_is_refused(traj, tmp_path):
    out = str(tmp_path / "out")
    a = relex_bg(*command(traj, out), env=cli_env(RELEX_TEST_KILL="done:2:STOP"))
    try:
        _wait_stopped(a.pid)
        state = digest(out)
        for extra in ([], ["--overwrite"], ["--no-resume"]):
            b = relex(*command(traj, out, *extra))
            err = b.stderr.strip()
            assert b.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, b.stderr
            assert "another relex run is writing to" in err and out in err, err
            assert digest(out) == state, "the refused run touched the running run's files"
    finally:
        os.kill(a.pid, signal.SIGCONT)
        a.communicate(timeout=120)
    assert_finished(traj, out, a)


def test_ctrl_c_keeps_finished_work_for_a_resume(traj, tmp_path):
    out = str(tmp_path / "out")
    a = relex_bg(*command(traj, out), env=cli_env(RELEX_TEST_KILL="done:3:STOP"))
    _wait_stopped(a.pid)
    os.kill(a.pid, signal.SIGINT)
    os.kill(a.pid, signal.SIGCONT)
    _, err = a.communicate(timeout=120)
    assert a.returncode == 130, err
    assert len(err.strip().splitlines()) == 1 and "interrupted" in err and "Traceback" not in err, err
    assert step_dirs(out) == [] and os.path.isdir(os.path.join(out, ".relex.partial"))
    rep = assert_finished(traj, out, relex(*command(traj, out)))
    assert rep["resumed_tensors"] >= 3


def _timed_kills(traj, tmp_path, n, seed):
    rng = random.Random(seed)
    t0 = time.time()
    assert relex(*command(traj, str(tmp_path / "timing"))).returncode == 0
    full = time.time() - t0
    finished = 0
    for i in range(n):
        out = str(tmp_path / f"out{i}")
        for _ in range(3):  # up to three kills in a row before the run may finish
            p = relex_bg(*command(traj, out))
            time.sleep(rng.uniform(0.0, full))
            p.send_signal(signal.SIGKILL)
            p.communicate()
            assert_never_partial(traj, out)
            if p.returncode == 0:
                break
        if len(step_dirs(out)) == len(TARGETS) and not os.path.exists(os.path.join(out, ".relex.partial")):
            finished += 1
            continue  # the kill came after the run had finished (checked complete above)
        assert_finished(traj, out, relex(*command(traj, out)))
        finished += 1
    return finished


def test_random_timed_kills(traj, tmp_path):
    assert _timed_kills(traj, tmp_path, 2, seed=1) == 2


@pytest.mark.slow
def test_random_timed_kills_long(traj, tmp_path):
    assert _timed_kills(traj, tmp_path, 25, seed=int(os.environ.get("RELEX_SEED", "7"))) == 25


@pytest.mark.slow
def test_every_kill_point(traj, tmp_path):
    """Every place the hook can stop a run, enumerated until the run outlives the point."""
    tried = 0
    for kind in ("start", "gram", "fit", "combine", "done", "commit", "rename", "moved"):
        for n in range(1, 100):
            out = str(tmp_path / f"{kind}{n}")
            r = relex(*command(traj, out), env=cli_env(RELEX_TEST_KILL=f"{kind}:{n}"))
            if r.returncode == 0:  # past the last such point
                shutil.rmtree(out)
                break
            assert r.returncode == -signal.SIGKILL, r.stderr
            assert_never_partial(traj, out)
            assert_finished(traj, out, relex(*command(traj, out)))
            tried += 1
            shutil.rmtree(out)
    print(f"kill points tried: {tried}")
    # start 1, gram 4 (big has 2 ranges), fit 3, combine 4, done 4, commit 1, rename 2, moved 1
    assert tried >= 20


def test_resume_at_gram_block_boundary(tmp_path):
    """A tensor of more than one GRAM_BLOCK (2^23 elements): the Gram resumes from a block boundary."""
    from relex_kernels.engine.streaming import GRAM_BLOCK
    n = GRAM_BLOCK + 2**20 + 3
    base, run, _ = small_run(str(tmp_path / "t"), shapes={"big": (n,)}, steps=[1, 2], noise=1e-2)
    args = ["extrapolate", "--base", base, "--checkpoints", run, "--target-step", 9, "-q", "--memory-budget", "1M"]
    ref = str(tmp_path / "ref")
    assert relex(*args, "--out", ref).returncode == 0
    out = str(tmp_path / "out")
    # 2 inputs + 1 base + 1 output x 2 B = 8 B/element at the 16 MB floor: ranges of 2^21, 4 per block;
    # the 4th Gram record is the block boundary 2^23, where the block sum has joined the total
    r = relex(*args, "--out", out, env=cli_env(RELEX_TEST_KILL="gram:4"))
    assert r.returncode == -signal.SIGKILL
    lines = open(os.path.join(out, ".relex.partial", "journal.jsonl")).read().splitlines()
    assert json.loads(lines[-1])["upto"] == GRAM_BLOCK
    r = relex(*args, "--out", out)
    assert r.returncode == 0, r.stderr
    assert output_bytes(os.path.join(out, "step_9")) == output_bytes(os.path.join(ref, "step_9"))
    rep = json.load(open(os.path.join(out, "relex_report.json")))
    assert rep["bytes_read"] < json.load(open(os.path.join(ref, "relex_report.json")))["bytes_read"]


def test_group_fit_records_load_bit_for_bit(tmp_path):
    """A group's fits go into the journal as one ``fits`` record (arrays stacked), a group of mixed
    ranks as ``fit`` records: both load back as the same bits, so a resumed run skips their Grams."""
    from relex_kernels.engine.journal import Journal
    from relex_kernels.fit import Components
    rng = np.random.default_rng(0)

    def comp(r, T=7):
        sv = np.sort(rng.random(T))[::-1].copy()
        return Components(u=rng.normal(size=(T, r)), s=sv[:r].copy(), singular_values=sv,
                          explained_variance=float(rng.random()))

    same = {f"a{i}": comp(1) for i in range(50)}
    mixed = {f"b{i}": comp(1 + i % 2) for i in range(5)}
    j = Journal.create(str(tmp_path / "j"), "k")
    j.record_fits(list(same), list(same.values()))
    j.record_fits(list(mixed), list(mixed.values()))
    j.close()
    text = open(tmp_path / "j").read()
    assert text.count('"kind":"fits"') == 1 and text.count('"kind":"fit"') == 5
    loaded = Journal.load(str(tmp_path / "j"), "k").fits
    assert list(loaded) == list(same) + list(mixed)
    for name, c in {**same, **mixed}.items():
        d = loaded[name]
        for a, b in [(c.u, d.u), (c.s, d.s), (c.singular_values, d.singular_values)]:
            assert a.shape == b.shape and a.tobytes() == b.tobytes(), name
        assert c.explained_variance == d.explained_variance


def test_killed_inside_tensor_groups_resumes_byte_identical(tmp_path):
    """Many small tensors on the cpu backend run in groups (issue 10), which pass each journal
    point once per tensor: killed at any of them, the resumed run (tensors of a group with a fit
    record take the per-tensor path) writes the uninterrupted bytes and reuses finished groups."""
    root = str(tmp_path)
    shapes = {}
    for k in range(4):  # four groups of 20, each ended by a copied tensor
        shapes.update({f"layers.{k}.experts.{i}.weight": (4, 3 + i % 5) for i in range(20)})
        shapes[f"layers.{k}.ids"] = (3,)
    base, run, _ = small_run(root, shapes=shapes, steps=range(1, 6),
                             extra_dtypes={f"layers.{k}.ids": "I64" for k in range(4)})

    def cmd(out):
        return ["extrapolate", "--base", base, "--checkpoints", run, "--out", out, "-q", "--shard-size", "2K",
                "--backend", "cpu", "--target-step", "30"]

    ref = os.path.join(root, "ref")
    assert relex(*cmd(ref)).returncode == 0
    want = output_bytes(os.path.join(ref, "step_30"))
    for point, reused in (("gram:30", 20), ("fit:30", 20), ("combine:30", 20), ("done:30", 40)):
        out = os.path.join(root, point.replace(":", "_"))
        r = relex(*cmd(out), env=cli_env(RELEX_TEST_KILL=point, RELEX_JOURNAL_SYNC_SECONDS="0"))
        assert r.returncode == -signal.SIGKILL, (point, r.stderr)
        r = relex(*cmd(out))
        assert r.returncode == 0, r.stderr
        assert output_bytes(os.path.join(out, "step_30")) == want, point
        assert json.load(open(os.path.join(out, "relex_report.json")))["resumed_tensors"] >= reused, point
