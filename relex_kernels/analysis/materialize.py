"""``--materialize S``: write one RELEX prediction with the engine and measure it after rounding.

The Gram gives every method's error before the prediction is rounded to the storage
dtype; this writes the real output (``relex extrapolate``'s code path) and compares
it with the true checkpoint element by element, in bounded memory.
"""

from __future__ import annotations

import numpy as np

from ..engine import extrapolate
from ..fit import FitOptions
from ..io import Checkpoint, dtypes
from ..io.checkpoint import align_names

#: elements compared per slice (a few tens of MB of fp64 temporaries)
_SLICE = 1 << 22


def compare(pred_dir: str, truth_dir: str, base_dir: str, names: list[str]) -> dict[str, np.ndarray]:
    """Per tensor: ``(‖Δ̂‖², ⟨Δ̂, Δ⟩, ‖Δ‖², ‖Δ̂ − Δ‖²)`` in fp64, Δ̂ = pred − base, Δ = truth − base."""
    cks = [Checkpoint(d) for d in (pred_dir, truth_dir, base_dir)]
    try:
        align_names(cks[2], cks[:2])  # a DCP truth or base: under the prediction's names
        out = {}
        for name in names:
            locs = [ck.tensors[name] for ck in cks]
            n = locs[0].info.numel
            acc = np.zeros(4)
            for a in range(0, n, _SLICE):
                b = min(n, a + _SLICE)
                p, t, z = (dtypes.to_float32(loc.file.view(name, a, b), loc.info.dtype).astype(np.float64)
                           for loc in locs)
                dp, dd = p - z, t - z
                acc += [dp @ dp, dp @ dd, dd @ dd, ((dp - dd) ** 2).sum()]
                for loc in locs:
                    loc.file.release(name, a, b)
            out[name] = acc
        return out
    finally:
        for ck in cks:
            ck.close()


def materialize(base: str, history: dict[int, str], truth_dir: str, step: int, out_dir: str,
                opts: FitOptions, names: list[str], *, memory_budget=None, backend=None, overwrite=False,
                progress=False) -> tuple[str, dict[str, np.ndarray]]:
    """Write the RELEX prediction of ``step`` into ``out_dir/step_<S>``; (its path, :func:`compare`)."""
    res = extrapolate(base, history, [step], out_dir, opts, memory_budget=memory_budget, backend=backend,
                      overwrite=overwrite, progress=progress)
    return res.outputs[0], compare(res.outputs[0], truth_dir, base, names)
