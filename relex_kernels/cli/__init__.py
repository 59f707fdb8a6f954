"""The ``relex`` command: one module per subcommand, registered in ``COMMANDS``.

Each command module defines ``NAME``, ``HELP`` (one line), ``DESCRIPTION`` (the
``--help`` text), ``add_arguments(parser)`` and ``run(args) -> int``. User errors are
:class:`~relex_kernels.errors.RelexError`: printed on one line, exit status 2, no
traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import signal
import sys
import threading
import warnings

from .. import __version__
from ..errors import RelexError, RelexWarning
from ..io.reader import raise_nofile_limit

COMMANDS = ["extrapolate", "predict", "analyze", "backtest", "synth", "demo", "backends"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="relex",
        description="RELEX: predict far-later RLVR checkpoints from the first few, per tensor, "
                    "by a rank-1 trajectory fit streamed from the checkpoint files.",
        epilog="Run 'relex COMMAND --help' for each command's options. Start with 'relex demo'.")
    p.add_argument("--version", action="version", version=f"relex_kernels {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        mod = importlib.import_module(f".{name}", __name__)
        sp = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.DESCRIPTION,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(sp)
        sp.set_defaults(_run=mod.run)
    return p


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's pre-emption, ``kill``): stop like Ctrl-C, keeping the finished work."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _warning_printer(command: str, default):
    """``warnings.showwarning`` that prints a RelexWarning as one 'relex COMMAND: warning: ...' line."""
    default = getattr(default, "relex_default", default)  # main() run again in one process: no nesting

    def show(message, category, filename, lineno, file=None, line=None):
        if not issubclass(category, RelexWarning):
            return default(message, category, filename, lineno, file, line)
        print(f"relex {command}: warning: {' '.join(str(message).splitlines())}", file=file or sys.stderr)
    show.relex_default = default
    return show


def main(argv: list[str] | None = None) -> int:
    try:  # (Ctrl-C while the command modules import: a line, not an import traceback)
        parser = build_parser()
    except KeyboardInterrupt:
        print("relex: interrupted", file=sys.stderr)
        return 130
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    if argv is None:
        # The relex process itself (the console script, python -m): the objects of the modules
        # imported so far live as long as the process, so the cyclic garbage collector is told
        # to skip them. A run over thousands of tensors makes tens of thousands of objects and
        # set off full collections that walked every module's objects again (~20 ms of a
        # 3072-tensor run). An in-process caller (argv given) keeps its collector as it is.
        gc.freeze()
    # a run maps shards x checkpoints files: allow many descriptors (the reader keeps within any limit)
    raise_nofile_limit()
    # with a file-size limit (ulimit -f), writing past it must be an EFBIG error we report, not a kill
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    # numpy's floating-point warnings (inf - inf in a delta ...) would add lines to the one-line
    # error: non-finite values are the engine's to detect and report
    warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"relex_kernels(\.|$)")
    warnings.showwarning = _warning_printer(args.command, warnings.showwarning)
    # SIGTERM takes the graceful path of Ctrl-C: the finished part is synced and recorded for a resume
    on_main = threading.current_thread() is threading.main_thread()  # (signal handlers live there)
    prev_term = signal.signal(signal.SIGTERM, _on_sigterm) if on_main else None
    try:
        from ..engine.distributed import cli_rank_setup
        cli_rank_setup(args)  # under torchrun / srun: supported commands only; rank 0 alone prints
        return int(args._run(args) or 0)
    except RelexError as e:
        msg = " ".join(str(e).splitlines())  # one line, whatever a file name holds
        print(f"relex {args.command}: error: {msg}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # 'relex backends | head': the reader left; nothing is wrong
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # (Python's own flush at exit would fail again)
        return 0
    except KeyboardInterrupt as e:
        what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        print(f"relex {args.command}: {what}; no output was completed (the same command resumes "
              "the finished part)", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        if on_main:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if prev_term is None else prev_term)


if __name__ == "__main__":
    sys.exit(main())
