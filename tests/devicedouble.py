"""The device pipeline on the CPU: the reference ops standing in for the device kernels.

:class:`RefKernels` has the interface of the Triton/CUDA device kernels
(``ops.triton.device_kernels()``) on CPU torch tensors, computed by ``ops/reference.py``;
:func:`install` makes the ``triton`` backend use it, so ``--backend triton`` runs the whole
device pipeline (engine/gpu.py) on any machine and every byte can be compared with the
reference engine. In-process tests install it with pytest's ``monkeypatch``; processes a
test starts (the ranks of an SPMD run) get it from ``device_double/sitecustomize.py``.
"""

from __future__ import annotations

import os
import time

import torch

from relex_kernels.io import dtypes
from relex_kernels.ops import reference


class RefKernels:
    """The device-kernel interface on CPU torch tensors, computed by ops/reference.py."""

    name = "reference-double"
    device = torch.device("cpu")

    def scratch_numel(self, T, n):
        return 1

    def precision(self, T, precision):
        return "ieee"

    @staticmethod
    def _rows(x, n, dtype):
        return x[:, :n].numpy().view(dtypes.raw_numpy(dtype))

    def gram(self, x, n, T, dtype, acc, part, fp16_deltas=False, precision=None):
        rows = self._rows(x, n, dtype)
        reference.gram(rows[0], list(rows[1:]), dtype, acc.numpy(), fp16_deltas)

    def combine(self, x, n, T, dtype, alphas, out, fp16_deltas=False):
        rows = self._rows(x, n, dtype)
        outs = out[:, :n].numpy().view(dtypes.raw_numpy(dtype))
        reference.combine(rows[0], list(rows[1:]), alphas.numpy(), dtype, list(outs), fp16_deltas)


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: PYTHONPATH of a process a test starts that runs on the double (device_double/sitecustomize.py)
PYTHONPATH = os.pathsep.join([os.path.join(_ROOT, "tests", "device_double"), os.path.join(_ROOT, "tests"), _ROOT])


def install(setattr_=setattr, kernels=RefKernels) -> None:
    """Make ``--backend triton`` run on ``kernels`` (:class:`RefKernels`, or a subclass: a benchmark's
    kernels that do nothing) (``setattr_``: monkeypatch.setattr in a test).

    ``$RELEX_TEST_WRITE_DELAY`` (seconds): each write of outputs into the maps starts that much
    later on its writer thread, so that writes are still in flight when the engine moves on."""
    from relex_kernels.ops import triton as tmod
    setattr_(tmod, "available", lambda: (True, kernels.name))
    setattr_(tmod, "device_kernels", lambda device=None: kernels())
    delay = float(os.environ.get("RELEX_TEST_WRITE_DELAY") or 0)
    if delay > 0:
        late_writes(delay, setattr_)


def late_writes(seconds: float, setattr_=setattr) -> None:
    """Each write of the device pipeline's outputs into the maps starts ``seconds`` later on its
    writer thread (``setattr_``: monkeypatch.setattr in a test)."""
    from relex_kernels.engine import gpu
    write = gpu.DeviceStreamer._write

    def late_write(self, *args):
        time.sleep(seconds)
        return write(self, *args)
    setattr_(gpu.DeviceStreamer, "_write", late_write)
