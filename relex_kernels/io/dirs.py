"""Directories a command makes for its output, and removes again when it fails."""

from __future__ import annotations

import os


def make_dirs(path: str) -> list[str]:
    """``os.makedirs(path, exist_ok=True)``; returns the directories it created (innermost first: what
    :func:`remove_empty` takes away again). One that fails half way removes what it made, then raises."""
    made = missing_dirs(path)
    try:
        os.makedirs(path, exist_ok=True)
    except BaseException:
        remove_empty(made)
        raise
    return made


def missing_dirs(path: str) -> list[str]:
    """The directories ``os.makedirs(path)`` would create, innermost first."""
    out = []
    path = os.path.abspath(path)
    while not os.path.lexists(path):
        out.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return out


def remove_empty(dirs: list[str]) -> None:
    """Remove ``dirs`` (innermost first) while they are empty: what a failed command made, and
    nothing that something else has put files in meanwhile."""
    for d in dirs:
        try:
            os.rmdir(d)
        except OSError:
            return
