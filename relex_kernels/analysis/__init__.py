"""Diagnostics before trusting a prediction: ``relex analyze`` and ``relex backtest``.

Both read the run once (:mod:`.extended_gram`: the engine's pass 1 over history ∪
later checkpoints) and compute everything else from the per-tensor Grams
(:mod:`.metrics`), grouped by module type and layer (:mod:`.aggregate`), written as
JSON, Markdown and PNG (:mod:`.report`, :mod:`.figures`).
"""

from .extended_gram import GramPass, TensorGram, extended_grams
from .runner import Result, analyze, backtest

__all__ = ["GramPass", "TensorGram", "extended_grams", "Result", "analyze", "backtest"]
