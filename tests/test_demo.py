"""``relex demo``, the README's first command, on a tiny model."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from test_cli import relex


def test_demo_runs_and_beats_keeping_the_last_checkpoint(tmp):
    # tiny tensors are dominated by bf16 rounding at the default drift: a stronger drift, as in a real run
    r = relex("demo", "--dir", tmp, "--size", "tiny", "--drift", "1e-3", "--steps", 8, "--target-step", 80,
              check=True)
    m = re.search(r"RELEX ([0-9.]+), keeping step 8 ([0-9.]+)", r.stdout)
    assert m, r.stdout
    assert float(m.group(1)) < float(m.group(2))
    out = os.path.join(tmp, "predicted", "step_80")
    assert out in r.stdout
    assert os.path.isfile(os.path.join(out, "model.safetensors"))
    assert os.path.isfile(os.path.join(out, "config.json"))


def test_demo_in_a_temporary_directory_says_where_its_files_stay(tmp):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), TMPDIR=tmp)
    r = subprocess.run([sys.executable, "-m", "relex_kernels", "demo", "--size", "tiny", "--steps", "4",
                        "--target-step", "40"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    (root,) = os.listdir(tmp)
    m = re.search(r"the demo's files \((\d+) MB\) stay in (\S+) to look at: rm -rf (\S+)", r.stdout)
    assert m, r.stdout
    assert m.group(2) == m.group(3) == os.path.join(tmp, root)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(m.group(2)) for f in fs)
    assert int(m.group(1)) == round(size / 1e6)
    r = subprocess.run([sys.executable, "-m", "relex_kernels", "demo", "--size", "tiny", "--steps", "4",
                        "--target-step", "40", "--clean"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "stay in" not in r.stdout and os.listdir(tmp) == [root]
