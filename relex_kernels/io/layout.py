"""Finding the checkpoints of a run directory (method §5 layouts) or parsing ``STEP=PATH``."""

from __future__ import annotations

import os
import re

from ..errors import InputError, UsageError
from .checkpoint import INDEX_NAME

#: directory-name patterns, and for each the sub-paths tried in order
_PATTERNS = [
    (re.compile(r"^global_step_(\d+)$"), ("actor/huggingface", "huggingface", ".")),
    (re.compile(r"^checkpoint-(\d+)$"), (".",)),
    (re.compile(r"^step_(\d+)$"), (".",)),
]
LAYOUT_HELP = ("global_step_N/actor/huggingface, global_step_N/huggingface, global_step_N, "
               "checkpoint-N, step_N")


def holds_weights(path: str) -> bool:
    try:
        names = os.listdir(path)
    except OSError:
        return False
    return INDEX_NAME in names or any(n.endswith(".safetensors") for n in names)


def discover(run_dir: str) -> dict[int, str]:
    """``{step: checkpoint_dir}`` for every recognised checkpoint directly under ``run_dir``."""
    if not os.path.isdir(run_dir):
        raise InputError(f"run directory {run_dir} does not exist or is not a directory")
    found: dict[int, str] = {}
    for entry in sorted(os.listdir(run_dir)):
        full = os.path.join(run_dir, entry)
        if not os.path.isdir(full):
            continue
        for pat, subs in _PATTERNS:
            m = pat.match(entry)
            if not m:
                continue
            step = int(m.group(1))
            for sub in subs:
                cand = os.path.normpath(os.path.join(full, sub))
                if holds_weights(cand):
                    if step in found:
                        raise InputError(f"duplicate step {step} in {run_dir}: {found[step]} and {cand}")
                    found[step] = cand
                    break
            else:
                raise InputError(f"{full} looks like the checkpoint of step {step} but holds no "
                                 f"safetensors weights (looked in {', '.join(subs)})")
    if not found:
        raise InputError(f"no checkpoints found in {run_dir} (looked for {LAYOUT_HELP})")
    return found


def parse_explicit(items: list[str]) -> dict[int, str]:
    """``["40=/path", ...]`` -> ``{40: "/path"}``; duplicate steps are an error."""
    out: dict[int, str] = {}
    for item in items:
        step, sep, path = item.partition("=")
        if not sep or not step.strip().lstrip("-").isdigit() or not path:
            raise UsageError(f"--checkpoint expects STEP=PATH, got {item!r}")
        s = int(step)
        if s in out:
            raise InputError(f"duplicate step {s}: {out[s]} and {path}")
        out[s] = path
    return out


def select_history(found: dict[int, str], history_steps: int | None) -> dict[int, str]:
    """The checkpoints with 0 < step <= H (all when H is None), sorted by step."""
    bad = [s for s in found if s <= 0]
    if bad:
        raise InputError(f"checkpoint step {bad[0]} is not positive ({found[bad[0]]}); the base is step 0")
    keep = {s: p for s, p in sorted(found.items()) if history_steps is None or s <= history_steps}
    return keep
