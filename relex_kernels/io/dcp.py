"""``torch.distributed.checkpoint`` (DCP) directories read in place: ``.metadata`` + ``__R_N.distcp``.

DCP's default writer (``FileSystemWriter``, what accelerate's sharded FSDP saves, torchtitan
and NeMo-RL write) stores each chunk of each tensor — one per rank for a sharded tensor,
``Shard(0)`` row blocks for FSDP — as a complete ``torch.save`` archive at
``[offset, offset + length)`` of a ``.distcp`` file; ``.metadata`` (a pickle) gives every
tensor's global shape and dtype and where its chunks are. Both pickles are read with
allow-lists (nothing from a checkpoint runs); each chunk's storage is mapped straight from
the ``.distcp`` file, and a tensor's chunks become one tensor (:mod:`.assembled`).

Tensor names are the state dict's flattened keys: ``model.<name>`` when the model was saved
under a ``"model"`` key (accelerate), unprefixed (torchtitan). :meth:`DcpTensors.aligned`
strips such a prefix to match the base's names; non-model states (optimizer, scheduler,
dataloader …) and non-tensor items are ignored.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import struct
import zipfile
from math import prod

from ..errors import FormatError, InputError
from . import dtypes
from .assembled import AssembledTensors
from .reader import MappedFile, TensorInfo
from .torchzip import COMMON_ALLOWED, AllowListUnpickler, Recorded, TensorRef, load_pickle, recorded_class

METADATA = ".metadata"
#: top-level keys of training states that are not model weights
NON_MODEL = ("optimizer", "optim", "optimizers", "lr_scheduler", "lr_schedulers", "scheduler", "dataloader",
             "train_state", "rng", "extra_state")
MAX_METADATA = 1 << 30


def is_dcp(path: str) -> bool:
    return os.path.isfile(os.path.join(path, METADATA))


class _Index:
    """``MetadataIndex``: a dict key, hashed by identity (only iterated here)."""

    def __new__(cls, *args):  # pickle's NEWOBJ calls __new__ only
        obj = object.__new__(cls)
        obj.args, obj.state = args, {}
        return obj

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.state.update(state)

    @property
    def fqn(self):
        return self.state.get("fqn", self.args[0] if self.args else None)


_M = "torch.distributed.checkpoint.metadata."
_ALLOWED = {(_M.rstrip("."), n): recorded_class(_M + n) for n in
            ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
             "TensorProperties", "StorageMeta")}
_ALLOWED[(_M.rstrip("."), "MetadataIndex")] = type("MetadataIndex", (_Index,), {})
_ALLOWED[(_M.rstrip("."), "_MEM_FORMAT_ENCODING")] = lambda v=0: v
_ALLOWED[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = recorded_class(
    "torch.distributed.checkpoint.filesystem._StorageInfo")
for _mod in ("pathlib", "pathlib._local"):
    for _cls in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"):
        _ALLOWED[(_mod, _cls)] = lambda *parts: "/".join(map(str, parts))
_ALLOWED.update(COMMON_ALLOWED)


class _MetaUnpickler(AllowListUnpickler):
    allowed = _ALLOWED
    reads = "in DCP metadata (nothing in a checkpoint is run)"


def _state(x, key, default=None):
    return x.state.get(key, default) if isinstance(x, Recorded) else default


class _Window(io.RawIOBase):
    """Bytes ``[offset, offset + length)`` of an open file, as a seekable file of its own."""

    def __init__(self, fh, offset: int, length: int):
        self.fh, self.offset, self.length, self.pos = fh, offset, length, 0

    def seekable(self):
        return True

    def readable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, pos, whence=0):
        self.pos = {0: pos, 1: self.pos + pos, 2: self.length + pos}[whence]
        return self.pos

    def readinto(self, b):
        n = max(0, min(len(b), self.length - self.pos))
        self.fh.seek(self.offset + self.pos)
        data = self.fh.read(n)
        b[:len(data)] = data
        self.pos += len(data)
        return len(data)


class DcpFile(MappedFile):
    """One ``.distcp`` file: its chunks (``tensors``: chunk key -> :class:`TensorInfo`), mapped."""

    def __init__(self, path: str):
        fd = self._stat_open(path)
        os.close(fd)
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata = {}
        self._digest = hashlib.sha256()
        self.header_sha256 = ""

    def add_chunk(self, key: str, offset: int, length: int, fh) -> TensorInfo:
        """Locate the storage of the ``torch.save`` archive at ``[offset, offset + length)``."""
        if offset < 0 or length <= 0 or offset + length > self.size:
            raise FormatError(f"{self.path}: chunk {key} at [{offset}, {offset + length}) runs past the end of the "
                              f"{self.size}-byte file (truncated?)")
        win = _Window(fh, offset, length)
        try:
            with zipfile.ZipFile(io.BufferedReader(win)) as z:
                pkl = [i for i in z.infolist() if i.filename.endswith("data.pkl")]
                if len(pkl) != 1:
                    raise FormatError(f"{self.path}: chunk {key} is not a torch.save archive")
                root = pkl[0].filename[:-len("data.pkl")]
                raw = z.read(pkl[0])
                self._digest.update(raw)
                self.header_sha256 = self._digest.hexdigest()
                t = load_pickle(raw, self.path)
                if not isinstance(t, TensorRef):
                    raise FormatError(f"{self.path}: chunk {key} holds a {type(t).__name__}, not a tensor")
                info = z.getinfo(f"{root}data/{t.storage.key}")
        except zipfile.BadZipFile as e:
            raise FormatError(f"{self.path}: chunk {key} is damaged ({e})") from None
        except KeyError:
            raise FormatError(f"{self.path}: chunk {key} lacks its storage") from None
        if info.compress_type != zipfile.ZIP_STORED:
            raise FormatError(f"{self.path}: chunk {key} is compressed; only stored chunks can be mapped")
        fh.seek(offset + info.header_offset)
        head = fh.read(30)
        if len(head) != 30 or head[:4] != b"PK\x03\x04":
            raise FormatError(f"{self.path}: chunk {key} has a damaged zip entry")
        n, m = struct.unpack("<HH", head[26:30])
        begin = offset + info.header_offset + 30 + n + m
        if not t.contiguous():
            raise FormatError(f"{self.path}: chunk {key} is stored with strides {t.stride}; save contiguous tensors")
        isz = dtypes.itemsize(t.dtype)
        count = prod(t.size)
        if (t.offset + count) * isz > info.file_size or begin + info.file_size > offset + length:
            raise FormatError(f"{self.path}: chunk {key} runs past its storage")
        ti = TensorInfo(key, t.dtype, t.size, begin + t.offset * isz, count * isz)
        self.tensors[key] = ti
        return ti


class DcpTensors(AssembledTensors):
    """The model tensors of one DCP checkpoint directory, each assembled from its chunks."""

    def __init__(self, path: str, label: str):
        self.path = path
        meta_path = os.path.join(path, METADATA)
        try:
            size = os.path.getsize(meta_path)
            if size > MAX_METADATA:
                raise FormatError(f"{meta_path}: {size} bytes is too large for DCP metadata")
            with open(meta_path, "rb") as fh:
                raw = fh.read()
        except OSError as e:
            raise FormatError(f"{meta_path}: cannot read ({e.strerror or e})") from None
        try:
            md = _MetaUnpickler(io.BytesIO(raw)).load()
        except pickle.UnpicklingError as e:
            raise FormatError(f"{meta_path}: {e}") from None
        except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, struct.error) as e:
            raise FormatError(f"{meta_path}: damaged DCP metadata ({type(e).__name__}: {e})") from None
        sd_meta, storage = _state(md, "state_dict_metadata"), _state(md, "storage_data")
        if not isinstance(sd_meta, dict) or not isinstance(storage, dict):
            raise FormatError(f"{meta_path}: not DCP metadata (no state_dict_metadata / storage_data)")
        self.files: list[DcpFile] = []
        self.tensors: dict[str, TensorInfo] = {}
        self.segments = {}
        try:
            self._open(label, sd_meta, storage)
        except BaseException:
            self.close()
            raise

    def _open(self, label: str, sd_meta: dict, storage: dict) -> None:
        by_file: dict[str, DcpFile] = {}
        chunks: dict[str, list] = {}
        pending: dict[str, list] = {}  # chunk file -> its chunks, in the order the metadata lists them
        for idx, info in storage.items():
            fqn = getattr(idx, "fqn", None)
            meta = sd_meta.get(fqn)
            if not isinstance(meta, Recorded) or not meta.cls.endswith("TensorStorageMetadata"):
                continue  # non-tensor items (pickled objects) are not read
            if fqn.split(".", 1)[0] in NON_MODEL:
                continue
            if _state(info, "transform_descriptors"):
                raise InputError(f"{label}: tensor {fqn} is stored with transforms "
                                 f"{_state(info, 'transform_descriptors')} (compressed); relex maps raw chunks")
            rel = str(_state(info, "relative_path", ""))
            if os.path.basename(rel) != rel or not rel:
                raise FormatError(f"{self.path}: chunk file name {rel!r} is not a plain file name")
            p = os.path.join(self.path, rel)
            if not os.path.isfile(p):
                raise InputError(f"{label}: chunk file {p} of tensor {fqn} is missing")
            if rel not in by_file:
                by_file[rel] = DcpFile(p)
                self.files.append(by_file[rel])
            offsets = tuple(idx.state.get("offset") or ())
            cs = chunks.setdefault(fqn, [])
            # located below, one open per chunk file: (tensor, position in its list, offsets, byte range)
            pending.setdefault(rel, []).append((fqn, len(cs), offsets, int(_state(info, "offset", -1)),
                                                int(_state(info, "length", -1))))
            cs.append(None)
        for rel, todo in pending.items():
            f = by_file[rel]
            with open(f.path, "rb") as fh:
                for fqn, i, offsets, off, length in todo:
                    chunks[fqn][i] = (offsets, f, f.add_chunk(f"{fqn}@{list(offsets)}", off, length, fh))
        for fqn, cs in chunks.items():
            self._assemble(label, fqn, sd_meta[fqn], cs)

    def _assemble(self, label: str, fqn: str, meta: Recorded, cs: list) -> None:
        shape = tuple(_state(meta, "size", ()))
        props = _state(meta, "properties")
        pstate = props.state.get("_state") if isinstance(props, Recorded) else None
        dt = pstate[0] if isinstance(pstate, tuple) and pstate else _state(props, "dtype")
        if dt not in dtypes._TABLE:
            raise InputError(f"{label}: tensor {fqn} has dtype {dt!r}, which relex does not read")
        row = prod(shape[1:]) if shape else 1
        segs, at = [], 0
        for offsets, f, ti in sorted(cs, key=lambda c: c[0]):
            if ti.dtype != dt:
                raise InputError(f"{label}: tensor {fqn} chunk {ti.name} is {ti.dtype}, the metadata says {dt}")
            o = offsets[0] if offsets else 0
            full_rows = tuple(ti.shape[1:]) == tuple(shape[1:]) and all(x == 0 for x in offsets[1:])
            if not shape:
                full_rows = ti.shape in ((), (1,))
            if not full_rows or o != at:
                raise InputError(f"{label}: tensor {fqn} has chunk {ti.name} of shape {list(ti.shape)}; relex reads "
                                 f"tensors stored whole or in row blocks (Shard(0)) of {list(shape)}")
            n_rows = ti.shape[0] if shape else 1
            if n_rows:
                segs.append((o * row, (o + n_rows) * row, f, ti.name))
            at = o + n_rows
        if at != (shape[0] if shape else 1):
            raise InputError(f"{label}: the chunks of tensor {fqn} cover {at} of its {shape[0] if shape else 1} rows")
        self.tensors[fqn] = TensorInfo(fqn, dt, shape, -1, prod(shape) * dtypes.itemsize(dt))
        self.segments[fqn] = segs

    def aligned(self, names) -> dict[str, str]:
        """``{base name: this checkpoint's name}``: the prefix (``""``, ``model.``, ``app.model.``…)
        under which the most of ``names`` are found here."""
        names = set(names)
        best, best_n = "", -1
        for p in ("", "model.", "app.model.", "app.", "module."):
            n = sum(1 for k in self.tensors if k.startswith(p) and k[len(p):] in names)
            if n > best_n:
                best, best_n = p, n
        return {k[len(best):]: k for k in self.tensors if k.startswith(best)}
