"""Where a synthetic run's checkpoints go, and the parsing of ``--steps`` / ``--shard-size``.

Layouts (method §5), relative to the run directory:

=============  ===========================================
``verl``       ``global_step_N/actor/huggingface/``
``verl-hf``    ``global_step_N/huggingface/``
``verl-flat``  ``global_step_N/``
``hf``         ``checkpoint-N/`` (HF Trainer)
``step``       ``step_N/`` (hub-branch downloads)
``verl-fsdp``  ``global_step_N/actor/``: verl's FSDP2 rank files (:mod:`.torch_writers`)
``verl-fsdp1`` ``global_step_N/actor/``: verl's FSDP1 rank files (``strategy: fsdp``, its default)
``dcp``        ``step_N/``: ``torch.distributed.checkpoint`` directories (:mod:`.torch_writers`)
=============  ===========================================

verl layouts also get ``latest_checkpointed_iteration.txt`` in the run directory and
``hf`` a minimal ``trainer_state.json`` in each checkpoint, as those trainers write.
"""

from __future__ import annotations

import re

from ..errors import UsageError

LAYOUTS = {
    "verl": "global_step_{step}/actor/huggingface",
    "verl-hf": "global_step_{step}/huggingface",
    "verl-flat": "global_step_{step}",
    "hf": "checkpoint-{step}",
    "step": "step_{step}",
    "verl-fsdp": "global_step_{step}/actor",
    "verl-fsdp1": "global_step_{step}/actor",
    "dcp": "step_{step}",
}
#: layouts written by torch's own writers from a staged safetensors copy (need torch)
#: and the format :func:`.torch_writers.save_many` writes for each
TORCH_FORMATS = {"verl-fsdp": "verl", "verl-fsdp1": "verl1", "dcp": "dcp"}
TORCH_LAYOUTS = tuple(TORCH_FORMATS)

#: Far-later "ground truth" checkpoints (``truth_steps``) go to OUT/truth/<this>.
TRUTH_LAYOUT = "step_{step}"


def checkpoint_relpath(layout: str, step: int) -> str:
    if layout not in LAYOUTS:
        raise UsageError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    return LAYOUTS[layout].format(step=step)


def parse_steps(text: str) -> list[int]:
    """``"1-16"``, ``"5,10,20"``, ``"10-80:10"`` (stride) or mixtures ``"1-4,8,16"`` -> sorted steps."""
    out: set[int] = set()
    for part in str(text).replace(" ", "").split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+)(?::(\d+))?)?", part)
        if not m:
            raise UsageError(f"cannot read step list {text!r}: {part!r} is not N, A-B or A-B:STRIDE")
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) else a
        stride = int(m.group(3)) if m.group(3) else 1
        if b < a or stride < 1:
            raise UsageError(f"step range {part!r} is empty")
        out.update(range(a, b + 1, stride))
    return check_steps(out)


def check_steps(steps) -> list[int]:
    try:
        s = sorted({int(x) for x in steps})
    except (TypeError, ValueError):
        raise UsageError(f"steps must be integers, got {steps!r}") from None
    if not s:
        raise UsageError("no steps given")
    if s[0] < 1:
        raise UsageError(f"steps must be >= 1 (step 0 is the base checkpoint), got {s[0]}")
    return s


def every_steps(every: int, num: int) -> list[int]:
    if every < 1 or num < 1:
        raise UsageError("--every and --num must be >= 1")
    return [every * (k + 1) for k in range(num)]
