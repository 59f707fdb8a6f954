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
from collections.abc import Mapping
from functools import lru_cache
from itertools import repeat
from operator import attrgetter, itemgetter
from types import MappingProxyType
from typing import NamedTuple

import numpy as np

from ..errors import FormatError, InputError
from .dcp import DcpTensors, is_dcp
from .fsdp import ShardedTensors, holds_rank_files
from .memo import BoundedCache
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


class Located(NamedTuple):
    file: SafetensorsFile  # or ShardedTensors: anything with view / release / prefetch by element range
    info: TensorInfo


class Layout:
    """Where each tensor of a safetensors checkpoint lies, whatever directory holds its files:
    ``entries`` maps each name to (the number of its file in the checkpoint's ``files``, its
    :class:`TensorInfo`), in the order the index (or the single file's header) lists them.

    The checkpoints of a run repeat their index and their files' headers byte for byte, and
    then share one layout (``_LAYOUTS``): the tables of a MoE model (thousands of tensors in
    every checkpoint) are built and checked once per run, and the engine compares checkpoints
    and finds a group's bytes in each by layout, not tensor by tensor. Never modified."""

    def __init__(self, entries: dict[str, tuple[int, TensorInfo]]):
        self.entries = entries
        #: name -> TensorInfo, read-only (shared by every checkpoint of the layout, kept across runs)
        self.infos = MappingProxyType(dict(zip(entries, map(itemgetter(1), entries.values()))))
        self._order: list[str] | None = None

    def storage_order(self) -> list[str]:
        """The names by file number, then offset: the order the bytes lie in."""
        if self._order is None:
            e = self.entries
            self._order = sorted(e, key=lambda n: (e[n][0], e[n][1].begin))
        return self._order

    def places(self, names: list[str]) -> tuple[list[int], np.ndarray, np.ndarray]:
        """For ``names``: the numbers of the files they use (distinct, in the order met), each
        name's index into that list, and each name's first byte."""
        ents = list(map(self.entries.__getitem__, names))
        k = len(ents)
        num = np.fromiter(map(itemgetter(0), ents), np.int64, k)
        begin = np.fromiter(map(attrgetter("begin"), map(itemgetter(1), ents)), np.int64, k)
        used, first = np.unique(num, return_index=True)
        used = used[np.argsort(first, kind="stable")]
        lut = np.zeros(int(used.max()) + 1 if k else 0, dtype=np.int64)
        lut[used] = np.arange(len(used))
        return used.tolist(), lut[num], begin


class LaidOut(Mapping):
    """``Checkpoint.tensors`` of a checkpoint with a :class:`Layout` (shared) and its own ``files``:
    each :class:`Located` is made when asked for."""

    __slots__ = ("layout", "files", "_entries")

    def __init__(self, layout: Layout, files: list):
        self.layout, self.files, self._entries = layout, files, layout.entries

    def __getitem__(self, name: str) -> Located:
        num, info = self._entries[name]
        return Located(self.files[num], info)

    def get(self, name, default=None):
        e = self._entries.get(name)
        return default if e is None else Located(self.files[e[0]], e[1])

    def __contains__(self, name) -> bool:
        return name in self._entries

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self):
        return self._entries.keys()  # (a dict's keys view: set operations at C speed)


#: layouts by the bytes that determine them (the index, each file's header key): a run's checkpoints share one
_LAYOUTS = BoundedCache(8)


def _read_index(index: str) -> bytes:
    try:
        with open(index, "rb") as fh:
            return fh.read()
    except OSError as e:
        raise FormatError(f"{index}: cannot read the index ({e})") from None


def _index_of(index: str, raw: bytes) -> tuple[dict[str, str], list[str]]:
    try:
        return _parsed_index(raw)
    except ValueError as e:
        raise FormatError(f"{index}: {e}") from None


def read_weight_map(index: str) -> tuple[dict[str, str], list[str]]:
    """The index's ``weight_map`` (tensor name -> shard file name; shared, never modified) and its
    shard names, sorted; FormatError for an index that does not parse or names no plain files."""
    return _index_of(index, _read_index(index))


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
        #: name -> Located: a read-only :class:`LaidOut` for safetensors checkpoints, a dict for rank files and DCP
        self.tensors: Mapping[str, Located] = {}
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
        self.tensors = LaidOut(_LAYOUTS.get(("single", f.header_key), lambda: Layout(
            dict(zip(f.tensors, zip(repeat(0), f.tensors.values()))))), self.files)

    def _open_index(self, index: str) -> None:
        raw = _read_index(index)
        wm, names = _index_of(index, raw)
        shards: dict[str, SafetensorsFile] = {}
        for shard in names:
            p = os.path.join(self.path, shard)
            if not os.path.isfile(p):
                raise InputError(f"{index}: names shard {shard} which does not exist")
            shards[shard] = SafetensorsFile(p)
            self.files.append(shards[shard])

        def build() -> Layout:
            # Every tensor of each shard mapped to that shard, and as many tensors held as mapped:
            # the index and the shards agree. Checked with C-level set and map operations: a MoE
            # index maps tens of thousands of tensors.
            if (any(set(map(wm.get, f.tensors)) - {s} for s, f in shards.items())
                    or sum(len(f.tensors) for f in shards.values()) != len(wm)):
                self._index_mismatch(index, wm, shards)
            # in the index's order: each entry's file number (``files`` is in ``names`` order) and
            # its info from its shard's own header dict
            number = {s: i for i, s in enumerate(names)}
            infos = map(dict.__getitem__, map({s: f.tensors for s, f in shards.items()}.__getitem__, wm.values()), wm)
            return Layout(dict(zip(wm, zip(map(number.__getitem__, wm.values()), infos))))

        # (the same index bytes and headers: the same tensors in the same places, checked when first met)
        self.tensors = LaidOut(_LAYOUTS.get((raw, tuple(f.header_key for f in self.files)), build), self.files)

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
    def layout(self) -> Layout | None:
        """The :class:`Layout` of a safetensors checkpoint (shared with every checkpoint of the same
        index and headers); None for rank files and DCP."""
        return getattr(self.tensors, "layout", None)

    def infos(self) -> Mapping[str, TensorInfo]:
        """Each tensor's :class:`TensorInfo`, by name."""
        lay = self.layout
        return lay.infos if lay is not None else {n: loc.info for n, loc in self.tensors.items()}

    def storage_order(self) -> list[str]:
        """The tensor names in the order their bytes lie: by file (as ``files`` lists them), then
        offset; a source that is not one of the files (rank files, DCP) first, in its own order."""
        lay = self.layout
        if lay is not None:
            return list(lay.storage_order())
        order = {f.path: i for i, f in enumerate(self.files)}
        t = self.tensors
        return sorted(t, key=lambda n: (order.get(t[n].file.path, -1), t[n].info.begin))

    def files_of(self, names: list[str], memo: dict | None = None) -> list:
        """The file (or source) holding each of ``names`` (``memo``: as for :meth:`places`)."""
        files, fi, _ = self.places(names, memo)
        return list(map(files.__getitem__, fi.tolist()))

    def places(self, names: list[str], memo: dict | None = None) -> tuple[list, np.ndarray, np.ndarray]:
        """For ``names``: the files (or sources) they use, distinct, in the order met; each name's
        index into that list (int64); each name's first byte in its file (int64). ``memo``: shared by
        the calls for one list of names over the checkpoints of a run, whose shared layouts are then
        looked into once."""
        lay = self.layout
        if lay is None:
            locs = list(map(self.tensors.__getitem__, names))
            owners = list(map(itemgetter(0), locs))
            files = list(dict.fromkeys(owners))
            k = len(owners)
            fi = np.fromiter(map({f: i for i, f in enumerate(files)}.__getitem__, owners), np.int64, k)
            return files, fi, np.fromiter(map(attrgetter("begin"), map(itemgetter(1), locs)), np.int64, k)
        key = ("places", lay)
        got = memo.get(key) if memo is not None else None
        if got is None:
            got = lay.places(names)
            if memo is not None:
                memo[key] = got
        used, fi, begin = got
        return list(map(self.files.__getitem__, used)), fi, begin

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for info in self.infos().values())

    def close(self) -> None:
        for f in self.files:
            f.close()
