"""``relex demo``, the README's first command, on a tiny model."""

from __future__ import annotations

import os
import re

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
