"""The ``triton`` backend: the Triton kernels of :mod:`relex_kernels.kernels.triton`.

On a GPU, whole runs go through the overlapped pipeline of
:mod:`relex_kernels.engine.gpu`; the functions with the reference's signature below
(numpy arrays in and out) serve embedding and tests. With ``TRITON_INTERPRET=1`` the
same kernels run on the CPU under Triton's interpreter — slow, for tests on tiny
shapes only, and never chosen by ``auto``.
"""

from __future__ import annotations

import os

from ..io import dtypes
from .cuda import device_arch, gram_precision, run_combine, run_gram, sync_after_launch, torch_cuda_status


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (read when the kernels are imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available() -> tuple[bool, str]:
    try:
        import torch
    except ImportError:
        return False, "needs torch (pip install torch)"
    try:
        import triton
    except ImportError:
        return False, "triton is not installed (pip install triton; it needs a CUDA build of torch to run)"
    if interpreting():
        return True, f"Triton {triton.__version__} interpreter on the CPU (TRITON_INTERPRET=1: tests only, slow)"
    ok, why = torch_cuda_status()
    if not ok:
        return False, f"{why} (Triton {triton.__version__} needs a GPU; TRITON_INTERPRET=1 runs it on the CPU)"
    return True, f"Triton {triton.__version__} on {torch.cuda.get_device_name()}"


def supports(dtype: str) -> bool:
    return dtype in dtypes.FITTED


def identity() -> str:
    """``triton-<version>/<arch or interpreter>/gram-<precision>``: Triton compiles its own code per device."""
    import triton
    return f"triton-{triton.__version__}/{'interpreter' if interpreting() else device_arch()}/gram-{gram_precision()}"


class TritonKernels:
    """The device ops of :mod:`relex_kernels.engine.gpu` on the Triton kernels.

    Same interface as :class:`relex_kernels.ops.cuda.CudaKernels`. The device is the
    current CUDA device, or the CPU under ``TRITON_INTERPRET=1``.
    """

    name = "triton"

    def __init__(self, device=None):
        import torch

        from ..kernels.triton import combine, eig, gram
        self._torch = torch
        self._gram, self._combine, self._eig = gram, combine, eig
        if device is None:
            device = "cpu" if interpreting() else torch.device("cuda", torch.cuda.current_device())
        self.device = torch.device(device)

    def scratch_numel(self, T: int, n: int) -> int:
        return self._gram.partials_numel(T, n)

    def precision(self, T: int, precision: str | None) -> str:
        return self._gram.resolve_precision(T, precision)

    def gram(self, x, n: int, T: int, dtype: str, acc, part, fp16_deltas: bool = False,
             precision: str | None = None) -> None:
        """``acc`` (T x T float64) ``+=`` the Gram of block ``x`` (chunk contract); ``part``: fp32 scratch."""
        self._gram.gram_block(x, n, T, dtypes.DTYPE_CODES[dtype], acc, part, fp16_deltas, precision)
        sync_after_launch(self._torch, self.device, "Triton gram")

    def combine(self, x, n: int, T: int, dtype: str, alphas, out, fp16_deltas: bool = False) -> None:
        """``out[k, :n]`` = the weighted sums of block ``x`` with ``alphas`` (K, T) float32."""
        self._combine.combine_block(x, n, T, dtypes.DTYPE_CODES[dtype], alphas, out, fp16_deltas)
        sync_after_launch(self._torch, self.device, "Triton combine")

    def top_eigenpairs(self, G, rank: int = 1, v0=None, tol: float = 1e-10, max_iter: int = 500,
                       max_rate: float = 0.9):
        """Batched power iteration with eigh fallback (``kernels.triton.eig.top_eigenpairs``)."""
        return self._eig.top_eigenpairs(G, rank, v0, tol, max_iter, max_rate)


def device_kernels(device=None) -> TritonKernels:
    return TritonKernels(device)


def gram(base, hist, dtype, acc, fp16_deltas=False) -> None:
    run_gram(device_kernels(), base, hist, dtype, acc, fp16_deltas)


def combine(base, hist, alphas, dtype, outs, fp16_deltas=False) -> None:
    run_combine(device_kernels(), base, hist, alphas, dtype, outs, fp16_deltas)
