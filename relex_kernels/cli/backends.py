"""``relex backends``: which compute backends this installation can use, and why not."""

from __future__ import annotations

from ..ops import resolve_backend
from ..ops import availability

NAME = "backends"
HELP = "list the compute backends and why any is unavailable"
DESCRIPTION = "List the compute backends (reference, cpu, triton, cuda) and which 'auto' picks."


def add_arguments(p) -> None:
    pass


def report() -> str:
    lines = []
    for name, (ok, why) in availability().items():
        lines.append(f"  {name:<10} {'yes' if ok else 'no ':<4} {why}")
    lines.append(f"auto picks: {resolve_backend('auto').name}")
    return "backends:\n" + "\n".join(lines)


def run(args) -> int:
    print(report())
    return 0
