"""Finding the checkpoints of a run directory (method §5 layouts) or parsing ``STEP=PATH``."""

from __future__ import annotations

import os
import re
import stat

import warnings

from ..errors import InputError, RelexWarning, UsageError
from .checkpoint import DEEPSPEED, VERL_SUBDIRS, holds_weights, is_deepspeed
from .fsdp import holds_rank_files

#: directory-name patterns, and for each the sub-paths tried in order (verl: its sub-directories,
#: io.checkpoint.VERL_SUBDIRS, then the step directory itself)
_PATTERNS = [
    (re.compile(r"^global_step_(\d+)$"), (*VERL_SUBDIRS, ".")),
    (re.compile(r"^checkpoint-(\d+)$"), (".",)),
    (re.compile(r"^step_(\d+)$"), (".",)),
]
LAYOUT_HELP = ("global_step_N/actor (verl FSDP rank files), global_step_N/actor/huggingface, "
               "global_step_N/huggingface, global_step_N, checkpoint-N, step_N (each may be a DCP directory)")
PREFER = ("shards", "hf")


def discover(run_dir: str, prefer: str = "shards", max_step: int | None = None) -> dict[int, str]:
    """``{step: checkpoint_dir}`` for every recognised checkpoint directly under ``run_dir``.

    ``prefer``: where a verl step holds both FSDP rank files (``actor/``) and an HF export
    (``actor/huggingface/``), ``shards`` (default: the training weights themselves) or ``hf``.
    ``max_step``: directories of later steps are not looked into (a live run may be writing them).
    """
    if prefer not in PREFER:
        raise UsageError(f"--prefer must be one of {', '.join(PREFER)}, got {prefer!r}")
    if not os.path.isdir(run_dir):
        raise InputError(f"run directory {run_dir} does not exist or is not a directory")
    try:
        entries = sorted(os.listdir(run_dir))
    except OSError as e:
        raise InputError(f"cannot list run directory {run_dir} ({e.strerror})") from None
    found: dict[int, str] = {}
    both: list[int] = []
    later: list[int] = []  # steps past max_step, not looked into
    no_hf: list[int] = []  # --prefer hf where a step has only rank files
    for entry in entries:
        full = os.path.join(run_dir, entry)
        if not os.path.isdir(full):
            continue
        for pat, subs in _PATTERNS:
            m = pat.match(entry)
            if not m:
                continue
            step = int(m.group(1))
            if max_step is not None and step > max_step:
                later.append(step)
                break
            cands = [os.path.normpath(os.path.join(full, sub)) for sub in subs]
            have = [c for c in cands if holds_weights(c)]
            if not have:
                if is_deepspeed(full):
                    raise InputError(f"{full} {DEEPSPEED}")
                for c in [full] + cands:  # (not 'holds no weights': the user can fix permissions)
                    try:
                        os.listdir(c)
                    except (FileNotFoundError, NotADirectoryError):
                        continue
                    except OSError as e:
                        raise InputError(f"cannot list checkpoint directory {c} ({e.strerror})") from None
                raise InputError(f"{full} looks like the checkpoint of step {step} but holds no "
                                 f"weights (looked in {', '.join(subs)})")
            shards = [c for c in have if holds_rank_files(c)]
            exports = [c for c in have if c not in shards]
            pick = (shards or exports)[0] if prefer == "shards" else (exports or shards)[0]
            if shards and exports:
                both.append(step)
            elif prefer == "hf" and not exports:
                no_hf.append(step)
            if step in found:
                raise InputError(f"duplicate step {step} in {run_dir}: {found[step]} and {pick}")
            found[step] = pick
    if not found:
        if later:
            raise InputError(f"no checkpoints of step <= {max_step} in {run_dir} (--history-steps {max_step}); "
                             f"its checkpoints start at step {min(later)}")
        ds = [e for e in entries if is_deepspeed(os.path.join(run_dir, e))]
        if ds:
            raise InputError(f"{os.path.join(run_dir, ds[0])} {DEEPSPEED}")
        raise InputError(f"no checkpoints found in {run_dir} (looked for {LAYOUT_HELP})")
    if both:
        which = ("the FSDP rank files of actor/ (the training weights, at training precision); "
                 "--prefer hf reads the huggingface/ exports") if prefer == "shards" else \
            "the huggingface/ exports (--prefer hf); without it, the FSDP rank files of actor/"
        warnings.warn(f"FSDP rank files and a Hugging Face export both at {_steps(both)}: reading {which}",
                      RelexWarning, stacklevel=2)
    if no_hf:
        warnings.warn(f"--prefer hf: no Hugging Face export at {_steps(no_hf)}, only FSDP rank files: "
                      "reading those", RelexWarning, stacklevel=2)
    return found


def _steps(steps: list[int]) -> str:
    """'step 5', 'steps 5..40 (8 of them)': the steps found in directory order, named in number order."""
    s = sorted(steps)
    return f"step {s[0]}" if len(s) == 1 else f"steps {s[0]}..{s[-1]} ({len(s)} of them)"


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


def check_dirs(found: dict[int, str]) -> None:
    """Each checkpoint given as ``--checkpoint STEP=PATH`` that a run will read is a directory: the
    first that is not is named (before 'needs at least 2 checkpoints' would hide it). Called on
    the selected steps only: a later step of a live run may not exist yet."""
    for step, path in sorted(found.items()):
        try:
            st = os.stat(path)
        except OSError as e:
            raise InputError(f"--checkpoint {step}={path}: {e.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise InputError(f"--checkpoint {step}={path}: not a directory")


def select_history(found: dict[int, str], history_steps: int | None) -> dict[int, str]:
    """The checkpoints with 0 < step <= H (all when H is None), sorted by step."""
    bad = [s for s in found if s <= 0]
    if bad:
        raise InputError(f"checkpoint step {bad[0]} is not positive ({found[bad[0]]}); the base is step 0")
    keep = {s: p for s, p in sorted(found.items()) if history_steps is None or s <= history_steps}
    return keep
