"""A base checkpoint plus history checkpoints, checked against each other and planned into jobs.

A *job* is one output tensor and what to do for it: ``fit`` (gram + combine), ``copy``
(non-float tensors, copied from the base) or ``tied`` (a tied output head, written
equal to the predicted embedding — method §4).
"""

from __future__ import annotations

import json
import operator
import os
import warnings
from dataclasses import dataclass, field
from math import prod

from ..errors import InputError, RelexWarning
from ..io import Checkpoint, dtypes
from ..io.checkpoint import align_names, config_dir
from ..io.writer import TensorSpec
from . import heads

EMBED_NAMES = ("model.embed_tokens.weight", "transformer.wte.weight", "model.embed_in.weight")
HEAD_NAMES = ("lm_head.weight", "embed_out.weight")


@dataclass(frozen=True)
class Job:
    """One tensor of the output. ``dtype``: what the kernels compute on — the stored dtype, or for
    a tensor whose versions differ (fp32 masters, bf16 base) the widest of them, every version
    read into it exactly (``mixed``); ``out``: the output's dtype when it is not ``dtype``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    kind: str  # "fit" | "copy" | "tied"
    source: str | None = None  # for "tied": the embedding it equals
    out: str | None = None
    mixed: bool = False

    @property
    def out_dtype(self) -> str:
        return self.out or self.dtype

    @property
    def on_host(self) -> bool:
        """Computed on the host whatever the backend: in fp64 (F64), or from versions / to an output
        in another dtype (the device kernels take one storage dtype in and out)."""
        return self.dtype == "F64" or self.mixed or self.out_dtype != self.dtype

    # computed once, plain attributes: asked for per tensor at every step of a run (thousands of
    # tensors in a MoE model; a functools.cached_property takes a lock at each first access)
    numel: int = field(init=False, repr=False, compare=False)
    nbytes: int = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        numel = prod(self.shape)
        object.__setattr__(self, "numel", numel)
        object.__setattr__(self, "nbytes", numel * dtypes.itemsize(self.dtype))

    @property
    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, self.out_dtype, self.shape)


#: widening order of the fitted dtypes: a mixed tensor is computed in the widest of its versions'
_WIDTH = {"BF16": 0, "F16": 0, "F32": 1, "F64": 2}
OUT_DTYPES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}


def compute_dtype(stored: set[str]) -> str:
    """The dtype a tensor stored in ``stored`` dtypes is computed in: the widest; fp16 with bf16 -> fp32."""
    if len(stored) == 1:
        return next(iter(stored))
    top = max(stored, key=_WIDTH.__getitem__)
    return "F32" if _WIDTH[top] == 0 else top


def read_config(base_dir: str) -> dict:
    p = os.path.join(base_dir, "config.json")
    if not os.path.isfile(p):
        return {}
    try:
        with open(p) as fh:
            cfg = json.load(fh)
    except (OSError, ValueError) as e:
        raise InputError(f"{p}: cannot read the model config ({e})") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{p}: the model config is not a JSON object")
    return cfg


def _head_names(base: Checkpoint) -> tuple[str | None, str | None]:
    """(head, embedding) names the base stores, None for one it lacks."""
    return (next((n for n in HEAD_NAMES if n in base.tensors), None),
            next((n for n in EMBED_NAMES if n in base.tensors), None))


def ties_head(base: Checkpoint, config: dict) -> bool:
    """Whether the model's output head is tied to its embedding: the config's ``tie_word_embeddings``;
    without it, transformers' default for the model type, and only if the base stores no head or
    one equal to the embedding byte for byte (a distinct head is never overwritten)."""
    tie = heads.declared_tie(config)
    if tie is not None:
        return tie
    if not heads.default_tie(config):
        return False
    head, emb = _head_names(base)
    return head is None or (emb is not None and heads.same_bytes(base, head, emb))


def tied_head(base: Checkpoint, tie: bool) -> tuple[str, str] | None:
    """(head, embedding) when the base stores a head tied to its embedding (``tie``: :func:`ties_head`), else None."""
    if not tie:
        return None
    head, emb = _head_names(base)
    if emb and head and base.tensors[emb].info.shape == base.tensors[head].info.shape:
        return head, emb
    return None


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def warn_base_in_history(base: Checkpoint, ckpts: list[Checkpoint]) -> None:
    """A :class:`RelexWarning` when the base is also a history checkpoint (same directory or same files,
    through links too): that step's delta is zero, which drags the fit towards the base."""
    mine = {_identity(p) for p in [base.path] + [f.path for f in base.files]} - {None}
    for ck in ckpts:
        if mine & {_identity(p) for p in [ck.path] + [f.path for f in ck.files]}:
            warnings.warn(f"the base {base.path} is also history checkpoint step {ck.step}: its delta is zero and "
                          "bends the fit; give as --base the model the run started from (step 0)", RelexWarning,
                          stacklevel=2)


class Trajectory:
    """The opened inputs of a run. ``steps`` ascending; ``ckpts[i]`` is the checkpoint of ``steps[i]``."""

    def __init__(self, base_dir: str, checkpoints: dict[int, str], out_dtype: str | None = None):
        """``out_dtype``: the fitted tensors' output dtype (``BF16``, ``F16``, ``F32``); None: the base's."""
        self.base_dir = os.path.abspath(base_dir)
        self.out_dtype = out_dtype
        self.steps = sorted(checkpoints)
        self.base: Checkpoint | None = None
        self.ckpts: list[Checkpoint] = []
        try:
            self.base = Checkpoint(base_dir)
            for s in self.steps:
                self.ckpts.append(Checkpoint(checkpoints[s], step=s))
            align_names(self.base, self.ckpts)  # DCP: the model's names, without the state dict's prefix
            warn_base_in_history(self.base, self.ckpts)
            self.config_dir = config_dir(self.base_dir)  # (verl's actor/: its huggingface/)
            self.config = read_config(self.config_dir)
            from .output import side_files
            side_files(self.config_dir, check=True)  # unreadable config/tokenizer files: fail before any work
            tie = ties_head(self.base, self.config)
            self.tied = tied_head(self.base, tie)
            # a tied model's checkpoints may store the head or not (exports differ): either is accepted
            self.ignored = set(HEAD_NAMES) - set(self.base.tensors) if tie else set()
            self.jobs = self._plan()
        except BaseException:
            self.close()
            raise

    @property
    def T(self) -> int:
        return len(self.steps)

    def _plan(self) -> list[Job]:
        base = self.base
        head = self.tied[0] if self.tied else None
        # output order = the base's storage order (file, then offset): sequential reads
        names = base.storage_order()
        infos = base.infos()
        fp8 = [f"{n} ({infos[n].dtype})" for n in names if infos[n].dtype in dtypes.FP8]
        if fp8:  # copying the values while extrapolating their scales would write an inconsistent model
            more = f" and {len(fp8) - 5} more" if len(fp8) > 5 else ""
            raise InputError(f"FP8 checkpoints are not supported: the base {base.path} holds "
                             f"{', '.join(fp8[:5])}{more}; their values mean something only with their scales, "
                             "and extrapolating the scales alone would write an inconsistent model: dequantise "
                             "the checkpoints (to bf16) first")
        jobs = []
        for n in names:
            info = infos[n]
            if n == head:
                jobs.append(Job(n, info.dtype, info.shape, "tied", source=self.tied[1]))
            elif dtypes.is_fitted(info.dtype):
                jobs.append(Job(n, info.dtype, info.shape, "fit"))
            else:
                jobs.append(Job(n, info.dtype, info.shape, "copy"))
        fitted = [(job, infos[job.name]) for job in jobs if job.kind == "fit"]
        stored = {job.name: {job.dtype} for job, _ in fitted}
        fitted_names = [job.name for job, _ in fitted]
        fitted_infos = [info for _, info in fitted]
        known = base.tensors.keys() | self.ignored
        # layouts whose checkpoints passed the checks below (the same layout, the same entries):
        # the usual run repeats the base's index and headers byte for byte in every checkpoint
        checked = {base.layout} - {None}
        for ck in self.ckpts:
            if ck.layout in checked:
                continue
            # at C speed: every tensor there, with the base's header entries (a header repeated
            # across checkpoints shares them); else tensor by tensor, below
            locs = list(map(ck.tensors.get, fitted_names))
            same = None not in locs and all(map(operator.is_, map(operator.itemgetter(1), locs), fitted_infos))
            for job, want in ([] if same else fitted):
                loc = ck.tensors.get(job.name)
                if loc is None:
                    raise InputError(f"checkpoint step {ck.step} lacks tensor {job.name} ({ck.path})")
                # (a header repeated across checkpoints shares its entries: the same object, nothing to compare)
                if loc.info is want:
                    continue
                if loc.info.shape != job.shape or not dtypes.is_fitted(loc.info.dtype):
                    raise InputError(f"checkpoint step {ck.step} tensor {job.name} is {loc.info.dtype} "
                                     f"{list(loc.info.shape)} but the base has {job.dtype} {list(job.shape)} "
                                     f"({loc.file.path})")
                stored[job.name].add(loc.info.dtype)
            extra = sorted(ck.tensors.keys() - known)
            if extra:
                raise InputError(f"checkpoint step {ck.step} has tensor {extra[0]} that the base does not "
                                 f"({ck.tensors[extra[0]].file.path})")
            if ck.layout is not None:
                checked.add(ck.layout)
        # versions in several float dtypes (fp32 masters beside a bf16 base): computed in the widest,
        # each read exactly from its own values; written in the base's dtype or --out-dtype
        out = []
        for job in jobs:
            if job.kind == "fit":
                comp = compute_dtype(stored[job.name])
                want = self.out_dtype or job.dtype
                out_dtype, mixed = (want if want != comp else None), len(stored[job.name]) > 1
                if (comp, out_dtype, mixed) != (job.dtype, None, False):  # (else kept: thousands in a MoE model)
                    job = Job(job.name, comp, job.shape, "fit", out=out_dtype, mixed=mixed)
            elif job.kind == "tied" and self.out_dtype and self.out_dtype != job.dtype:
                job = Job(job.name, job.dtype, job.shape, "tied", source=job.source, out=self.out_dtype)
            out.append(job)
        return out

    def input_dirs(self) -> list[str]:
        return [self.base.path] + [ck.path for ck in self.ckpts]

    def fingerprint(self) -> dict:
        return {"base": self.base.fingerprint(),
                "checkpoints": {str(ck.step): ck.fingerprint() for ck in self.ckpts}}

    def close(self) -> None:
        if self.base is not None:
            self.base.close()
        for ck in self.ckpts:
            ck.close()
