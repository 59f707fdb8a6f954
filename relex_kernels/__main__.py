"""``python -m relex_kernels``: the backends report; with arguments, the ``relex`` command.

``torchrun -m relex_kernels extrapolate ...`` therefore runs the CLI under torchrun.
"""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(None if sys.argv[1:] else ["backends"]))  # (None: the process's own command line)
