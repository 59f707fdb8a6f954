"""Runs over thousands of input files under a low descriptor limit, and graceful interrupts
(Ctrl-C, SIGTERM) that keep the finished work although output records are batched."""

from __future__ import annotations

import json
import os
import signal

import pytest
from relhelp import cli_env, relex, relex_bg, step_dirs
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
    assert sum(r["kind"] == "done" for r in records) == 3, records
    rep = assert_finished(traj, out, relex(*command(traj, out), env=cli_env(**batched)))
    assert rep["resumed_tensors"] == 3
    assert rep["bytes_read"] < traj["ref_report"]["bytes_read"], "finished work was read again"
