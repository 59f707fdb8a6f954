"""Synthetic RLVR trajectories with real Qwen2 / Qwen3 checkpoint files (``relex synth``).

There is no model hub here, so tests, benchmarks and the demo generate their runs::

    from relex_kernels.synth import synthesize
    run = synthesize("/tmp/run", arch="qwen3", size="tiny", steps=range(1, 9), seed=0)
    run.base_dir            # OUT/base                 (step 0, a loadable HF model dir)
    run.checkpoints[8]      # OUT/run/global_step_8/actor/huggingface
    run.config              # config.json as a dict
    run.mean(name, 160)     # noise-free fp32 truth at any step (np.float32, tensor shape)

``synthesize(out_dir, arch="qwen3", size="tiny", steps=range(1, 9), seed=0, layout="verl",
noise=1e-4, drift=3e-4, curvature=0.0, curvature_dir="orth", spread=0.5, dtype="BF16",
shard_bytes=None, tie=None, store_tied_head=False, truth_steps=(), overwrite=False,
quiet=True, threads=None) -> SynthRun``

- ``arch``: ``qwen2`` (q/k/v biases) or ``qwen3`` (q_norm / k_norm); ``size``: ``tiny``
  (~0.36M params), ``small`` (~16M), ``220m`` (Qwen3 hidden 1024 x 12 layers, vocab
  32000: the benchmark shape), ``0.6b`` (Qwen3-0.6B), ``1.5b`` (Qwen2.5-Math-1.5B). All
  tied by default; ``tie=False`` adds ``lm_head.weight``; ``store_tied_head=True`` stores
  a tied head anyway (equal to the embedding).
- ``steps``: the saved steps (>= 1; step 0 is the base). ``truth_steps``: far-later
  steps of the same trajectory (walk included) written to ``OUT/truth/step_N`` — the
  ground truth an extrapolation is scored against.
- ``drift`` / ``noise``: per-step relative magnitudes (rms of the per-step drift and
  std of a random-walk increment, as fractions of the tensor's rms), varied per tensor
  by a log-normal factor ``exp(spread·N(0,1))`` and by kind (norms 0.3x, embeddings
  0.5x). ``curvature`` κ adds κ·t² times the drift, along an independent direction
  (``curvature_dir="orth"``) or along the drift (``"along"``). See :mod:`.trajectory`.
- ``dtype``: storage, ``BF16`` (round-to-nearest-even from the fp32 master, as
  training saves), ``F16`` or ``F32``. ``noise=0`` is the exact mode: θ(t) − θ₀ is
  exactly t·u in fp32 (for every t up to ``info["exact_up_to_step"]``, 20x the last
  step), so with ``dtype="F32"`` and ``curvature=0`` the stored trajectory is exactly
  rank 1 and linear, and ``mean(name, 20 * T)`` is the exact far-later truth.
- ``layout``: ``verl`` / ``verl-hf`` / ``verl-flat`` / ``hf`` / ``step`` (see
  :mod:`.layouts`); ``shard_bytes``: shard the safetensors at that size (default one
  file up to 5 GB).
- Output: ``OUT/base/``, ``OUT/run/<layout dirs>/``, ``OUT/truth/step_N/``, and
  ``OUT/synth.json`` (all parameters, relative paths, per-tensor scales). Every
  checkpoint directory has ``config.json``, ``generation_config.json`` and tokenizer
  files, loadable by ``transformers`` offline. Refuses a non-empty ``out_dir`` unless
  ``overwrite`` (which replaces only an earlier synth output).

:class:`SynthRun` (``SynthRun.load(out_dir)`` reopens one) has ``out_dir``,
``base_dir``, ``run_dir``, ``checkpoints``, ``truth``, ``config``, ``info``
(synth.json), ``steps``, ``plans()``, ``master(name, step)`` (fp32 values before
rounding at step 0 or a generated step) and ``mean(name, step)``.

Deterministic given ``seed`` (independent of ``threads``). The generator streams —
memory is a few MB of chunk buffers plus one 64 MB window of dirty pages — and needs
numpy and tqdm only.
"""

from .configs import ARCHS, SIZES, ModelShape
from .generate import STORAGE_DTYPES, SynthRun, synthesize
from .layouts import LAYOUTS, parse_steps
from .trajectory import TrajectoryParams

__all__ = ["synthesize", "SynthRun", "ARCHS", "SIZES", "LAYOUTS", "STORAGE_DTYPES", "ModelShape",
           "TrajectoryParams", "parse_steps"]
