"""Directories a command makes for its output, and removes again when it fails; files written
whole or not at all."""

from __future__ import annotations

import os
import tempfile


def write_text_atomic(path: str, text: str, sync: bool = False) -> None:
    """Write ``text`` to ``path`` through a temporary file beside it and a rename, so a reader
    sees the old file or the whole new one (``sync``: on disk before the rename). On any failure,
    an interrupt too, the temporary file is removed and the error raised as it came."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            if sync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
