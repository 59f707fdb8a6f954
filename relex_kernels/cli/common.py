"""Options shared by the commands that write checkpoints."""

from __future__ import annotations

import argparse

from ..engine.plan import default_memory_budget, parse_positive_size
from ..io.writer import DEFAULT_SHARD_BYTES
from ..ops import BACKENDS


def add_output_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output and resources")
    g.add_argument("--out", required=True, metavar="OUT_DIR",
                   help="directory that receives one ready-to-load checkpoint per target, as OUT_DIR/step_<S>/")
    g.add_argument("--overwrite", action="store_true", help="replace existing OUT_DIR/step_<S> directories")
    g.add_argument("--no-resume", dest="resume", action="store_false",
                   help="start afresh even if OUT_DIR holds the finished part of an interrupted run of this "
                        "same command (by default it is reused: see tests/reliability/README.md)")
    g.add_argument("--memory-budget", type=parse_positive_size, default=None, metavar="SIZE",
                   help="bound on mapped input/output pages (e.g. 2G, 512M; default: 1 GiB or a quarter of RAM if less, "
                        f"{default_memory_budget() / 2**30:.1f} GiB here). Tensors whose whole trajectory fits "
                        "are read once; larger ones are chunked and read twice")
    g.add_argument("--shard-size", type=parse_positive_size, default=DEFAULT_SHARD_BYTES, metavar="SIZE",
                   help="largest output shard (default 5GB, the hub's convention)")
    g.add_argument("--device-memory-budget", type=parse_positive_size, default=None, metavar="SIZE",
                   help="bound on GPU memory of the triton/cuda backends (default: 90%% of the free memory). "
                        "Tensors whose whole trajectory fits are read once; larger ones stream through it twice")
    g.add_argument("--backend", choices=BACKENDS, default=None,
                   help="compute backend (default: $RELEX_BACKEND or auto = fastest available; "
                        "see 'python -m relex_kernels')")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary")


def add_target_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target-step", type=int, action="append", required=True, metavar="S", dest="targets",
                   help="step to predict; repeat for several targets (they cost one pass together)")
