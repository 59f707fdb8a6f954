"""What every benchmark records about the machine it ran on, and how it starts a timed process."""

from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    """The processor's model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def ram_bytes() -> int:
    """This machine's physical memory (the engine's own reading of it)."""
    from relex_kernels.engine.plan import physical_ram
    return physical_ram() or 0


def user_env(**extra: str) -> dict[str, str]:
    """The environment of a timed fresh process, as users run one: compiled bytecode cached (some
    machines export PYTHONDONTWRITEBYTECODE, which adds ~0.1 s of compiling to a run), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update(extra)
    return env


def out_stem(path: str) -> str:
    """``--out``'s argparse type: a results path without extension whose folder is created now, so a
    benchmark that runs for minutes cannot fail at its last line on a missing folder."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        import argparse
        raise argparse.ArgumentTypeError(f"cannot create the results folder {folder}: {exc}") from exc
    return path


#: the line after which a results file's hand-written notes (history, analyses) begin
NOTES_MARK = "<!-- notes: kept when the script rewrites what is above -->"


def write_results_md(path, lines: list[str]) -> None:
    """Write a benchmark's generated ``lines`` to ``path`` and keep the notes after
    :data:`NOTES_MARK` that the file already had (a rerun replaces the figures, not the history)."""
    from pathlib import Path

    path = Path(path)
    old = path.read_text() if path.exists() else ""
    notes = old[old.index(NOTES_MARK):] if NOTES_MARK in old else NOTES_MARK + "\n"
    path.write_text("\n".join(lines).rstrip("\n") + "\n\n" + notes)
