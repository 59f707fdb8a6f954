"""The ``cuda`` backend: hand-written CUDA kernels (csrc/cuda) through ``relex_kernels._C_cuda``.

The compiled module takes raw device pointers, sizes and dtype codes (no torch C++
ABI); torch provides device memory, pinned buffers and streams. Whole runs go through
the overlapped pipeline of :mod:`relex_kernels.engine.gpu`; the functions below with
the reference's signature (numpy arrays in and out) serve embedding and tests.

This module also holds the device helpers the Triton backend shares (torch storage
dtypes, host -> device blocks, why no GPU is usable).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import numpy as np

from ..errors import ArgumentError, BackendError
from ..io import dtypes
from .reference import GRAM_CHUNK

#: Gram precision names -> codes of csrc/cuda/ops.h (-1: auto)
PRECISION_CODES = {"auto": -1, "ieee": 0, "tf32x3": 1, "tf32": 2}
#: elements per device group of the numpy-level ops (bounds their device memory)
OP_GROUP = 64 * GRAM_CHUNK


def gram_precision() -> str:
    """The Gram precision asked for: ``$RELEX_GRAM_PRECISION``, else auto (the kernels resolve it per T)."""
    return os.environ.get("RELEX_GRAM_PRECISION") or "auto"


def sync_after_launch(torch, device, what: str) -> None:
    """``RELEX_CUDA_SYNC=1``: wait for each kernel launch and raise its error at the launch that
    caused it, naming the kernel (a CUDA error otherwise surfaces at some later call). Slow: for
    debugging and first runs on a new device only."""
    if device.type != "cuda" or os.environ.get("RELEX_CUDA_SYNC", "0") in ("", "0"):
        return
    try:
        torch.cuda.synchronize(device)
    except RuntimeError as e:
        raise BackendError(f"the {what} kernel failed on {device}: {str(e).splitlines()[0]}") from None


def device_arch() -> str:
    """``sm_XY`` of the current CUDA device (``cpu`` without one)."""
    import torch
    if not torch.cuda.is_available():
        return "cpu"
    major, minor = torch.cuda.get_device_capability()
    return f"sm_{major}{minor}"


def gpu_present() -> bool:
    """A cheap look for an NVIDIA GPU that imports nothing (used by ``auto``)."""
    if os.path.isdir("/proc/driver/nvidia/gpus") and os.listdir("/proc/driver/nvidia/gpus"):
        return True
    return os.path.exists("/dev/nvidia0")


def torch_cuda_status() -> tuple[bool, str]:
    """(usable, reason): whether torch can allocate on a CUDA device here."""
    try:
        import torch
    except ImportError:
        return False, "needs torch (pip install torch) for device memory and streams"
    if torch.version.cuda is None:
        return False, f"no GPU: torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return False, f"no GPU: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device"
    return True, f"torch {torch.__version__}, CUDA {torch.version.cuda}"


def storage_torch_dtype(dtype: str):
    """The torch dtype the kernels take a storage dtype as (2-byte types as int16 bits)."""
    import torch
    return {"F32": torch.float32, "F64": torch.float64, "F16": torch.int16, "BF16": torch.int16}[dtype]


def host_block(base: np.ndarray, hist: Sequence[np.ndarray], a: int, b: int):
    """(T+1, b-a) torch CPU tensor of elements [a, b) of base and history (2-byte as int16)."""
    import torch
    rows = np.stack([base[a:b]] + [h[a:b] for h in hist])
    if rows.dtype.itemsize == 2:
        rows = rows.view(np.int16)
    return torch.from_numpy(rows)


def op_groups(n: int, group: int = OP_GROUP):
    """Chunk-aligned element groups of a range: the Gram contract holds across them."""
    return [(a, min(n, a + group)) for a in range(0, n, group)]


@functools.lru_cache(maxsize=1)
def _module():
    from .. import _C_cuda  # noqa: F401  (built by setup.py when nvcc is found)
    return _C_cuda


def available() -> tuple[bool, str]:
    try:
        mod = _module()
    except ImportError as e:
        hint = ("not built: relex_kernels._C_cuda is missing; build it on a machine with nvcc with "
                "RELEX_FORCE_CUDA=1 pip install -e . (or python csrc/cuda/build_cuda.py --inplace)")
        return False, hint if "_C_cuda" in str(e) else f"relex_kernels._C_cuda does not load: {e}"
    count, err = mod.device_count()
    if count == 0:
        try:
            drv = mod.driver_version()
        except RuntimeError:
            drv = 0
        why = "no NVIDIA driver" if drv == 0 else (err or "no CUDA device")
        return False, f"no GPU: built for {mod.archs}, but {why}"
    ok, why = torch_cuda_status()
    if not ok:
        return False, why
    import torch
    dev = torch.cuda.current_device()
    name, major, minor = mod.device_name(dev)
    archs = [a.strip() for a in mod.archs.replace(",", ";").split(";") if a.strip()]
    cc = major * 10 + minor
    runnable = [a for a in archs if a.startswith("sm_") and a[3:].isdigit()
                and int(a[3:]) // 10 == major and int(a[3:]) <= cc]
    if archs and not runnable and not any(a.startswith("compute_") for a in archs):
        return False, (f"built for {mod.archs}, which cannot run on {name} (sm_{cc}); rebuild with "
                       f"TORCH_CUDA_ARCH_LIST={major}.{minor}")
    return True, f"CUDA kernels ({mod.archs}) on {name} (sm_{cc})"


def supports(dtype: str) -> bool:
    return dtype in dtypes.FITTED


def identity() -> str:
    """``cuda/<arch>/gram-<precision>``: the Gram's products and sums depend on both."""
    return f"cuda/{device_arch()}/gram-{gram_precision()}"


class CudaKernels:
    """The device ops of :mod:`relex_kernels.engine.gpu` on the CUDA kernels.

    Tensors are torch CUDA tensors; every call enqueues on torch's current stream and
    returns without synchronising. Blocks ``x`` are (T+1, >= n) with unit column
    stride, 2-byte dtypes as int16 (see :func:`storage_torch_dtype`).
    """

    name = "cuda"

    def __init__(self, device=None):
        import torch
        self._torch = torch
        self._m = _module()
        self.device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)

    def _stream(self) -> int:
        return self._torch.cuda.current_stream(self.device).cuda_stream

    def scratch_numel(self, T: int, n: int) -> int:
        return int(self._m.gram_partials_numel(T, n))

    def precision(self, T: int, precision: str | None) -> str:
        code = self._m.resolve_precision(T, PRECISION_CODES[precision or "auto"])
        return {v: k for k, v in PRECISION_CODES.items()}[code]

    def gram(self, x, n: int, T: int, dtype: str, acc, part, fp16_deltas: bool = False,
             precision: str | None = None) -> None:
        """``acc`` (T x T float64) ``+=`` the Gram of block ``x`` (chunk contract); ``part``: fp32 scratch."""
        if not (x.stride(1) == 1 and acc.is_contiguous() and part.numel() >= self.scratch_numel(T, n)):
            raise ArgumentError("gram: x needs unit column stride, acc must be contiguous, part must hold "
                                f"scratch_numel(T, n) = {self.scratch_numel(T, n)} floats")
        self._m.gram(x.data_ptr(), x.stride(0), n, T, dtypes.DTYPE_CODES[dtype], bool(fp16_deltas), acc.data_ptr(),
                     part.data_ptr(), PRECISION_CODES[precision or "auto"], self._stream())
        sync_after_launch(self._torch, self.device, "CUDA gram")

    def combine(self, x, n: int, T: int, dtype: str, alphas, out, fp16_deltas: bool = False) -> None:
        """``out[k, :n]`` = the weighted sums of block ``x`` with ``alphas`` (K, T) float32."""
        K = alphas.shape[0]
        if not (x.stride(1) == 1 and out.stride(1) == 1 and alphas.is_contiguous() and out.shape[0] == K):
            raise ArgumentError(f"combine: x and out need unit column stride, alphas must be contiguous, out must "
                                f"have K = {K} rows")
        self._m.combine(x.data_ptr(), x.stride(0), n, T, dtypes.DTYPE_CODES[dtype], bool(fp16_deltas),
                        alphas.data_ptr(), K, out.data_ptr(), out.stride(0), self._stream())
        sync_after_launch(self._torch, self.device, "CUDA combine")

    def top_eigenpairs(self, G, rank: int = 1, v0=None, tol: float = 1e-10, max_iter: int = 500,
                       max_rate: float = 0.9):
        """Batched power iteration; same contract as ``kernels.triton.eig.top_eigenpairs``."""
        from ..kernels.triton.eig_ref import all_eigh, check_batch, finish, power_starts
        torch = self._torch
        check_batch(G, rank)
        B, T, _ = G.shape
        if B == 0 or T > 1024:
            return all_eigh(G, rank)
        G = G.contiguous()
        v0 = power_starts(v0, B, rank, T, G.device)
        work = torch.empty_like(G)
        lam = torch.empty((B, rank), dtype=torch.float64, device=G.device)
        U = torch.empty((B, rank, T), dtype=torch.float64, device=G.device)
        st = torch.empty((B, rank), dtype=torch.int32, device=G.device)
        self._m.power_iteration(G.data_ptr(), v0.data_ptr(), work.data_ptr(), lam.data_ptr(), U.data_ptr(),
                                st.data_ptr(), B, T, rank, max_iter, tol, max_rate, self._stream())
        sync_after_launch(torch, self.device, "CUDA power iteration")
        return finish(G, lam, U, st, rank)


def device_kernels(device=None) -> CudaKernels:
    return CudaKernels(device)


# -- the op contract on host arrays (ops/reference.py signatures) ----------------------
def run_gram(kern, base: np.ndarray, hist: Sequence[np.ndarray], dtype: str, acc: np.ndarray,
              fp16_deltas: bool = False) -> None:
    """Host-array ``gram`` through any device kernels (copies in and out; for tests and embedding)."""
    import torch
    T, n = len(hist), base.shape[0]
    acc_d = torch.from_numpy(np.ascontiguousarray(acc)).to(kern.device)
    part = torch.empty(kern.scratch_numel(T, min(n, OP_GROUP)), dtype=torch.float32, device=kern.device)
    for a, b in op_groups(n):
        x = host_block(base, hist, a, b).to(kern.device)
        kern.gram(x, b - a, T, dtype, acc_d, part, fp16_deltas, gram_precision())
    acc[...] = acc_d.cpu().numpy()


def run_combine(kern, base: np.ndarray, hist: Sequence[np.ndarray], alphas: np.ndarray, dtype: str,
                outs: Sequence[np.ndarray], fp16_deltas: bool = False) -> None:
    """Host-array ``combine`` through any device kernels."""
    import torch
    T, n = len(hist), base.shape[0]
    a_d = torch.from_numpy(np.ascontiguousarray(alphas, dtype=np.float32)).to(kern.device)
    tdt = storage_torch_dtype(dtype)
    for a, b in op_groups(n):
        x = host_block(base, hist, a, b).to(kern.device)
        out = torch.empty((len(outs), b - a), dtype=tdt, device=kern.device)
        kern.combine(x, b - a, T, dtype, a_d, out, fp16_deltas)
        host = out.cpu().numpy()
        for k, o in enumerate(outs):
            o[a:b] = host[k].view(o.dtype)


def gram(base, hist, dtype, acc, fp16_deltas=False) -> None:
    run_gram(device_kernels(), base, hist, dtype, acc, fp16_deltas)


def combine(base, hist, alphas, dtype, outs, fp16_deltas=False) -> None:
    run_combine(device_kernels(), base, hist, alphas, dtype, outs, fp16_deltas)
