"""A checkpoint directory: one ``model.safetensors``, an index plus its shards, or verl FSDP rank files.

:class:`Checkpoint` maps every tensor name to the file that holds it — a
:class:`SafetensorsFile` (after checking that the index and the shards agree, method §5),
for a verl FSDP actor directory (``model_world_size_{W}_rank_{R}.pt``) the
:class:`~.fsdp.ShardedTensors` that assembles each tensor from its rank files, or for a
``torch.distributed.checkpoint`` directory (``.metadata``) the :class:`~.dcp.DcpTensors`.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from itertools import repeat
from typing import NamedTuple

from ..errors import FormatError, InputError
from .dcp import DcpTensors, is_dcp
from .fsdp import ShardedTensors, holds_rank_files
from .reader import SafetensorsFile, TensorInfo

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

#: what relex says of a DeepSpeed directory, given as a checkpoint or met in a run directory
DEEPSPEED = ("is a DeepSpeed ZeRO checkpoint (*_model_states.pt / ZeRO partitions), which relex does not read: "
             "export Hugging Face weights first (DeepSpeed's zero_to_fp32.py, or save_pretrained from the "
             "trainer) and point relex at them")


def is_deepspeed(path: str, names: list[str] | None = None) -> bool:
    """A DeepSpeed checkpoint directory (ZeRO partitions / model states), not weights relex reads;
    ``names``: its listing, when the caller has it."""
    if names is None:
        try:
            names = os.listdir(path)
        except OSError:
            return False
    return any(n.endswith("_model_states.pt") or (n.startswith("zero_") and n.endswith("optim_states.pt"))
               for n in names)


class Located(NamedTuple):  # a tuple: a MoE checkpoint holds tens of thousands, made at every open
    file: SafetensorsFile  # or ShardedTensors: anything with view / release / prefetch by element range
    info: TensorInfo


def read_weight_map(index: str) -> tuple[dict[str, str], list[str]]:
    """The index's ``weight_map`` (tensor name -> shard file name; shared, never modified) and its
    shard names, sorted; FormatError for an index that does not parse or names no plain files."""
    try:
        with open(index, "rb") as fh:
            raw = fh.read()
    except OSError as e:
        raise FormatError(f"{index}: cannot read the index ({e})") from None
    try:
        return _parsed_index(raw)
    except ValueError as e:
        raise FormatError(f"{index}: {e}") from None


#: by the index's bytes: the checkpoints of a run repeat their index byte for byte, and a MoE
#: index of thousands of entries takes a millisecond to parse and check
@lru_cache(maxsize=8)
def _parsed_index(raw: bytes) -> tuple[dict[str, str], list[str]]:
    """:func:`read_weight_map` of the index bytes ``raw``; ValueError saying what is wrong."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except ValueError as e:  # (UnicodeDecodeError is one)
        raise ValueError(f"cannot read the index ({e})") from None
    wm = obj.get("weight_map") if isinstance(obj, dict) else None
    # (JSON's keys are strings; the values' types are collected at C speed: thousands of them)
    if not isinstance(wm, dict) or not set(map(type, wm.values())) <= {str}:
        raise ValueError("no 'weight_map' object mapping tensor names to shard files")
    names = sorted(set(wm.values()))
    for shard in names:
        if os.path.basename(shard) != shard or shard in (".", ".."):
            raise ValueError(f"shard name {shard!r} is not a plain file name")
    return wm, names


def _hub_hint(path: str) -> str:
    """For a missing path shaped like a Hugging Face Hub id (``org/name``): relex reads local files only."""
    parts = path.split("/")
    if len(parts) == 2 and all(parts) and not path.startswith(".") and not os.path.exists(parts[0]):
        return (f" (relex reads local directories and downloads nothing: fetch a Hub model first, e.g. "
                f"'huggingface-cli download {path} --local-dir {parts[1]}')")
    return ""


def config_dir(path: str) -> str:
    """Where the model's config.json and tokenizer files are for the checkpoint at ``path``: the
    directory itself, or for verl's ``actor/`` (rank files, no config) its ``huggingface/``
    subdirectory, where verl saves them beside the rank files."""
    hf = os.path.join(path, "huggingface")
    if (not os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(os.path.join(hf, "config.json"))
            and holds_rank_files(path)):
        return hf
    return path


def align_names(base: "Checkpoint", others: list["Checkpoint"]) -> None:
    """Read every checkpoint under the base's tensor names, the base's being the model's own: a DCP
    base takes those of the first of ``others`` stored otherwise, else its state dict's wrapper is
    dropped (:meth:`Checkpoint.unwrap`); then each DCP checkpoint of ``others`` takes the base's."""
    if base.is_dcp:  # (an earlier checkpoint of the run as the base)
        ref = next((ck for ck in others if not ck.is_dcp), None)
        if ref is not None:
            base.align(ref.tensors)
        else:
            base.unwrap()
    for ck in others:
        ck.align(base.tensors)


def holds_weights(path: str) -> bool:
    """Whether directory ``path`` holds a checkpoint of a format :class:`Checkpoint` reads."""
    try:
        names = os.listdir(path)
    except OSError:
        return False
    return (INDEX_NAME in names or any(n.endswith(".safetensors") for n in names)
            or holds_rank_files(path) or is_dcp(path))


#: where a verl ``global_step_N`` holds a checkpoint, in the order discovery tries them: the FSDP rank
#: files of actor/ (the training weights, fp32 by default), then the Hugging Face exports
VERL_SUBDIRS = ("actor", "actor/huggingface", "huggingface")


def _inner_checkpoints(path: str) -> str:
    """A hint naming the checkpoint directories inside ``path`` (a verl ``global_step_N`` holds its
    weights in ``actor/`` and ``actor/huggingface/``), for an error about ``path`` itself."""
    inner = [sub for sub in VERL_SUBDIRS if holds_weights(os.path.join(path, sub))]
    return f"; its checkpoint is in {' or '.join(os.path.join(path, s) for s in inner)}" if inner else ""


class Checkpoint:
    """All tensors of one checkpoint directory, located but not read."""

    def __init__(self, path: str | os.PathLike, step: int | None = None):
        self.path = os.path.abspath(os.fspath(path))
        self.step = step
        if not os.path.isdir(self.path):
            raise InputError(f"{self._label()}: {self.path} is not a directory" + _hub_hint(os.fspath(path)))
        self.files: list[SafetensorsFile] = []
        self.tensors: dict[str, Located] = {}
        index = os.path.join(self.path, INDEX_NAME)
        self.format = "safetensors"
        try:
            if os.path.isfile(index):
                self._open_index(index)
            elif holds_rank_files(self.path):
                self._open_fsdp()
            elif is_dcp(self.path):
                self._open_dcp()
            else:
                self._open_single()
        except BaseException:
            self.close()
            raise

    def _label(self) -> str:
        return "base checkpoint" if self.step is None else f"checkpoint step {self.step}"

    def _open_fsdp(self) -> None:
        st = ShardedTensors(self.path, self._label())
        self.format = f"verl-fsdp (world size {st.world})"
        self.files.extend(st.files)
        for name, info in st.tensors.items():
            self.tensors[name] = Located(st, info)

    def _open_dcp(self) -> None:
        st = DcpTensors(self.path, self._label())
        self.format = "torch.distributed.checkpoint"
        self._dcp = st
        self.files.extend(st.files)
        for name, info in st.tensors.items():
            self.tensors[name] = Located(st, info)

    def align(self, names) -> None:
        """Read a DCP checkpoint's tensors under ``names`` (the base's), dropping the prefix its state
        dict nested them under (``model.`` for accelerate); other formats store the names as they are."""
        st = getattr(self, "_dcp", None)
        if st is None:
            return
        st.alias = st.aligned(names)
        self.tensors = {b: Located(st, st.tensors[s]) for b, s in st.alias.items()}

    @property
    def is_dcp(self) -> bool:
        return getattr(self, "_dcp", None) is not None

    def unwrap(self) -> None:
        """A DCP base beside no checkpoint of another format to take names from: its tensors under
        the model's own names, without the ``model.`` accelerate nests a state dict under. The
        wrapper is recognised by every name under it being a causal LM's (``model.*``, ``lm_head.*``);
        a DCP of a bare state dict (``model.layers.*`` …) keeps its names."""
        names = list(self._dcp.tensors)
        inner = [n[len("model."):] for n in names if n.startswith("model.")]
        if names and len(inner) == len(names) and all(n.startswith(("model.", "lm_head.")) for n in inner):
            self.align(inner)

    def _open_single(self) -> None:
        single = os.path.join(self.path, SINGLE_NAME)
        if not os.path.isfile(single):
            try:
                names = os.listdir(self.path)
            except OSError as e:
                raise InputError(f"{self._label()}: cannot list {self.path} ({e.strerror})") from None
            cands = sorted(f for f in names if f.endswith(".safetensors"))
            if len(cands) != 1:
                if is_deepspeed(self.path, names):
                    raise InputError(f"{self._label()}: {self.path} {DEEPSPEED}")
                raise InputError(f"{self._label()}: {self.path} has no {SINGLE_NAME} or {INDEX_NAME}"
                                 + (f" (found {len(cands)} .safetensors files and no index)" if cands else "")
                                 + _inner_checkpoints(self.path))
            single = os.path.join(self.path, cands[0])
        f = SafetensorsFile(single)
        self.files.append(f)
        for name, info in f.tensors.items():
            self.tensors[name] = Located(f, info)

    def _open_index(self, index: str) -> None:
        wm, names = read_weight_map(index)
        shards: dict[str, SafetensorsFile] = {}
        for shard in names:
            p = os.path.join(self.path, shard)
            if not os.path.isfile(p):
                raise InputError(f"{index}: names shard {shard} which does not exist")
            shards[shard] = SafetensorsFile(p)
            self.files.append(shards[shard])
        # Every tensor of each shard mapped to that shard, and as many tensors held as mapped: the
        # index and the shards agree. Checked with C-level set and map operations, and the
        # entries made the same way (``tuple.__new__`` makes a Located without a Python call):
        # a MoE index maps tens of thousands of tensors, in every checkpoint of the run.
        if (any(set(map(wm.get, f.tensors)) - {s} for s, f in shards.items())
                or sum(len(f.tensors) for f in shards.values()) != len(wm)):
            self._index_mismatch(index, wm, shards)
        # in the index's order, as the index lists them: each entry's info from its shard's own
        # header dict (no merged dict of every tensor: tens of thousands of inserts per checkpoint)
        infos = map(dict.__getitem__, map({s: f.tensors for s, f in shards.items()}.__getitem__, wm.values()), wm)
        self.tensors.update(zip(wm, map(tuple.__new__, repeat(Located),
                                        zip(map(shards.__getitem__, wm.values()), infos))))

    @staticmethod
    def _index_mismatch(index: str, wm: dict, shards: dict) -> None:
        """Raise the error naming the first tensor where ``wm`` and the shards disagree."""
        for name, shard in wm.items():
            if name not in shards[shard].tensors:
                raise InputError(f"{index}: tensor {name!r} is mapped to {shard}, which does not hold it")
        for shard, f in shards.items():
            extra = sorted(n for n in f.tensors if wm.get(n) != shard)
            if extra:
                raise InputError(f"{f.path}: holds tensor {extra[0]!r} that the index does not map to it")

    def fingerprint(self) -> list[dict]:
        """What a saved fit remembers of these files, to refuse files that changed."""
        return [{"path": f.path, "size": f.size, "mtime_ns": f.mtime_ns, "header_sha256": f.header_sha256}
                for f in self.files]

    @property
    def nbytes(self) -> int:
        return sum(loc.info.nbytes for loc in self.tensors.values())

    def close(self) -> None:
        for f in self.files:
            f.close()
