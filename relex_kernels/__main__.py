"""``python -m relex_kernels``: the backends report; with arguments, the ``relex`` command.

``torchrun -m relex_kernels extrapolate ...`` therefore runs the CLI under torchrun.
"""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["backends"]))
