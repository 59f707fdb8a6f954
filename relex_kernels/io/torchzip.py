"""``torch.save`` files (``.pt``, ``.bin``) read without torch and without running their pickle.

A ``torch.save`` file is a zip archive: ``<root>/data.pkl`` (the pickled object, whose
tensors refer to storages by key) and ``<root>/data/<key>`` (each storage's raw bytes,
stored uncompressed and 64-byte aligned). :class:`TorchZipFile` parses the pickle with an
allow-list of the classes a state dict legitimately holds — tensor rebuild functions,
storage types, dtypes, ``torch.Size``, ``OrderedDict``, and the DTensor / device-mesh /
placement classes of FSDP checkpoints (recorded as plain data, never instantiated) — and
refuses anything else with one line naming the file and the class: **no code from a
checkpoint is ever run**. Each tensor then becomes a contiguous byte range of the file
(:class:`~.reader.TensorInfo`), mapped like a safetensors tensor.

A DTensor (FSDP1 with a device mesh, FSDP2) is a :class:`ShardRef`: its local tensor, the
global shape and the placements; :mod:`.fsdp` assembles a verl checkpoint's rank files.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from math import prod

from ..errors import FormatError
from . import dtypes
from .reader import MappedFile, TensorInfo

#: storage class name (``torch.FloatStorage``…) -> safetensors dtype name
STORAGE_DTYPES = {
    "FloatStorage": "F32", "DoubleStorage": "F64", "HalfStorage": "F16", "BFloat16Storage": "BF16",
    "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16", "CharStorage": "I8", "ByteStorage": "U8",
    "BoolStorage": "BOOL",
}
#: ``torch.<dtype>`` globals -> safetensors dtype name
TORCH_DTYPES = {
    "float32": "F32", "float": "F32", "float64": "F64", "double": "F64", "float16": "F16", "half": "F16",
    "bfloat16": "BF16", "int64": "I64", "long": "I64", "int32": "I32", "int": "I32", "int16": "I16",
    "int8": "I8", "uint8": "U8", "bool": "BOOL",
}


@dataclass
class StorageRef:
    key: str
    dtype: str
    numel: int


@dataclass
class TensorRef:
    """A plain tensor: ``size``/``stride`` elements of ``storage`` from ``offset``."""

    storage: StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def dtype(self) -> str:
        return self.storage.dtype

    def contiguous(self) -> bool:
        want, acc = [], 1
        for n in reversed(self.size):
            want.append(acc)
            acc *= n
        return all(s == w for s, w, n in zip(self.stride, reversed(want), self.size) if n > 1)


@dataclass
class Recorded:
    """An allow-listed torch.distributed object, kept as data: its class, constructor args, state."""

    cls: str
    args: tuple = ()
    state: dict = field(default_factory=dict)

    def __setstate__(self, state):  # BUILD
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            state = {**(state[0] or {}), **state[1]}  # (dict, slots dict)
        if isinstance(state, dict):
            self.state.update(state)
        else:
            self.state["_state"] = state


@dataclass
class ShardRef:
    """A DTensor: this rank's ``local`` tensor of a ``shape`` tensor placed by ``placements``."""

    shape: tuple[int, ...]
    dtype: str
    local: TensorRef | None = None
    placements: tuple = ()
    coord: tuple[int, ...] | None = None  # this rank's coordinate on each mesh dimension, when recorded

    def __setstate__(self, state):
        slots = state[1] if isinstance(state, tuple) and len(state) == 2 else state
        if not isinstance(slots, dict):
            raise pickle.UnpicklingError("unexpected DTensor state")
        self.local = slots.get("_local_tensor")
        spec = slots.get("_spec")
        if not isinstance(self.local, TensorRef) or not isinstance(spec, Recorded):
            raise pickle.UnpicklingError("a DTensor without a local tensor and spec")
        self.placements = tuple(_placement(p) for p in spec.state.get("placements", ()))
        mesh = spec.state.get("mesh")
        coord = mesh.state.get("_coordinate_on_dim") if isinstance(mesh, Recorded) else None
        if isinstance(coord, (tuple, list)) and all(isinstance(c, int) for c in coord):
            self.coord = tuple(coord)


def _placement(p) -> tuple:
    """("shard", dim) | ("replicate",) | ("other", class)."""
    if isinstance(p, Recorded):
        name = p.cls.rsplit(".", 1)[-1]
        if name == "Shard":
            dim = p.state.get("dim", p.args[0] if p.args else None)
            return ("shard", int(dim))
        if name == "Replicate":
            return ("replicate",)
        return ("other", name)
    return ("other", type(p).__name__)


def _rebuild_tensor(storage, offset, size, stride, *rest):
    if not isinstance(storage, StorageRef):
        raise pickle.UnpicklingError("a tensor without a storage")
    return TensorRef(storage, int(offset), tuple(int(x) for x in size), tuple(int(x) for x in stride))


def _rebuild_parameter(data, *rest):
    return data


def _rebuild_wrapper_subclass(cls, dtype, size, *rest):
    if cls != "torch.distributed.tensor.DTensor":
        raise pickle.UnpicklingError(f"tensor subclass {cls} is not allowed")
    return ShardRef(tuple(int(x) for x in size), dtype)


#: what ``torch.Tensor`` (the class) is in a pickle: the type a plain tensor is rebuilt as
PLAIN_TENSOR = "torch.Tensor"


def _rebuild_from_type_v2(func, new_type, args, state):
    obj = func(*args)
    if isinstance(obj, ShardRef):
        if state is not None:
            obj.__setstate__(state)
    elif state and not (new_type == PLAIN_TENSOR and _plain_attributes(state)):
        raise pickle.UnpicklingError("state on a plain tensor is not allowed")
    return obj


def _plain_attributes(state) -> bool:
    """Whether ``state`` only sets plain Python attributes on a tensor, which leave its data as it is:
    FSDP1 marks the tensors of a full or NO_SHARD state dict (a one-rank verl run's rank file) with
    ``_has_been_cloned = True``, so torch pickles them with that state."""
    return isinstance(state, dict) and all(isinstance(k, str) and (v is None or isinstance(v, (bool, int, float, str)))
                                           for k, v in state.items())


#: the allow-list: (module, name) -> what the pickle gets instead
_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._utils", "_rebuild_wrapper_subclass"): _rebuild_wrapper_subclass,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): PLAIN_TENSOR,
    ("torch.distributed.tensor", "DTensor"): "torch.distributed.tensor.DTensor",
    ("torch.distributed._tensor.api", "DTensor"): "torch.distributed.tensor.DTensor",
    ("collections", "OrderedDict"): type("OrderedDict", (dict,), {}),  # a dict that takes BUILD state
    ("torch", "device"): lambda *a: str(a[0]) if a else "cpu",
}
_RECORDED = [
    "torch.distributed.tensor._dtensor_spec.DTensorSpec", "torch.distributed.tensor._dtensor_spec.TensorMeta",
    "torch.distributed.tensor._dtensor_spec.ShardOrderEntry",
    "torch.distributed.tensor.placement_types.Shard", "torch.distributed.tensor.placement_types.Replicate",
    "torch.distributed.tensor.placement_types._StridedShard", "torch.distributed.tensor.placement_types.Partial",
    "torch.distributed.device_mesh.DeviceMesh", "torch.distributed._mesh_layout._MeshLayout",
    "torch.distributed._mesh_layout._FlatLayout",
    "torch.distributed._tensor.placement_types.Shard", "torch.distributed._tensor.placement_types.Replicate",
    "torch.distributed._tensor.placement_types.DTensorSpec", "torch.distributed._tensor.placement_types.TensorMeta",
]


#: what every torch pickle this package reads may name: sizes, layouts, dtypes (DCP metadata too)
COMMON_ALLOWED = {
    ("torch", "Size"): lambda *a: tuple(a[0]) if a else (),
    ("torch.serialization", "_get_layout"): lambda name: str(name),
    **{("torch", _n): _d for _n, _d in TORCH_DTYPES.items()},
}


def recorded_class(path: str):
    """A class whose NEWOBJ/BUILD record the data (pickle calls ``cls.__new__(cls, *args)``)."""
    def __new__(cls, *args):
        return Recorded(path, args)
    return type(path.rsplit(".", 1)[-1], (), {"__new__": __new__})


for _p in _RECORDED:
    _ALLOWED[tuple(_p.rsplit(".", 1))] = recorded_class(_p)
for _n, _d in STORAGE_DTYPES.items():
    _ALLOWED[("torch", _n)] = ("storage", _d)
_ALLOWED.update(COMMON_ALLOWED)


class AllowListUnpickler(pickle.Unpickler):
    """An unpickler that can build only what ``allowed`` names ((module, name) -> what it gets
    instead); anything else is refused, so nothing in a checkpoint is run."""

    allowed: dict = {}
    #: what the refusal says is read
    reads = "(nothing in a checkpoint is run)"

    def find_class(self, module, name):
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"class {module}.{name} is not allowed {self.reads}") from None


class _Unpickler(AllowListUnpickler):
    allowed = _ALLOWED
    reads = "(only tensors, storages and FSDP shard descriptions are read; nothing in a checkpoint is run)"

    def __init__(self, fh, path: str):
        super().__init__(fh)
        self.path = path

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        kind = pid[1]
        if not (isinstance(kind, tuple) and kind[0] == "storage"):
            # untyped storages (torch.UntypedStorage) carry their dtype on the tensor: not in state dicts
            raise pickle.UnpicklingError(f"unsupported storage type {kind!r}")
        return StorageRef(str(pid[2]), kind[1], int(pid[4]))


def load_pickle(raw: bytes, path: str):
    """The pickled object with tensors as :class:`TensorRef` / :class:`ShardRef` (allow-list only)."""
    import io
    try:
        return _Unpickler(io.BytesIO(raw), path).load()
    except pickle.UnpicklingError as e:
        raise FormatError(f"{path}: {e}") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, struct.error) as e:
        raise FormatError(f"{path}: damaged pickle in the torch.save archive ({type(e).__name__}: {e})") from None


#: rank-file pickles parsed, by the sha256 of their bytes: the checkpoints of a run repeat each
#: rank's pickle byte for byte (same tensors, storage keys and placements), and one of a few hundred
#: DTensors takes milliseconds to parse — seconds for a hundred checkpoints of a few ranks. The
#: parsed objects are shared: nothing modifies them after parsing. The last used are kept, enough
#: for a checkpoint of 256 ranks (more ranks than that parse every file, as before).
_PICKLES: OrderedDict[str, object] = OrderedDict()
_PICKLES_KEPT = 256


def _parsed_pickle(raw: bytes, sha256: str, path: str):
    """:func:`load_pickle` of ``raw``, or its result for the same bytes parsed before."""
    hit = _PICKLES.get(sha256)
    if hit is None:
        hit = _PICKLES[sha256] = load_pickle(raw, path)
        while len(_PICKLES) > _PICKLES_KEPT:
            _PICKLES.popitem(last=False)
    else:
        _PICKLES.move_to_end(sha256)
    return hit


def flat_tensors(obj, path: str, prefix: str = "") -> dict:
    """``{name: TensorRef | ShardRef}`` of a (possibly nested) state dict; other values are skipped."""
    out = {}
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    for k, v in obj.items():
        if not isinstance(k, str):
            continue
        name = prefix + k
        if isinstance(v, (TensorRef, ShardRef)):
            out[name] = v
        elif isinstance(v, dict):
            out.update(flat_tensors(v, path, name + "."))
    return out


class TorchZipFile(MappedFile):
    """One ``torch.save`` archive: its pickled object (``obj``) and its storages, mapped read-only.

    ``tensors`` holds the plain contiguous tensors (:class:`~.reader.TensorInfo`); DTensors
    are in ``shards`` (their local tensors mapped likewise, under ``name``), for :mod:`.fsdp`.
    """

    def __init__(self, path: str | os.PathLike):
        fd = self._stat_open(path)
        os.close(fd)
        self.metadata = {}
        try:
            with zipfile.ZipFile(self.path) as z:
                infos = z.infolist()
                pkl = [i for i in infos if i.filename.endswith("/data.pkl") or i.filename == "data.pkl"]
                if len(pkl) != 1:
                    raise FormatError(f"{self.path}: not a torch.save archive (no data.pkl)")
                root = pkl[0].filename[:-len("data.pkl")]
                order = z.read(root + "byteorder").decode().strip() if root + "byteorder" in z.namelist() else "little"
                if order != "little":
                    raise FormatError(f"{self.path}: {order}-endian storages are not supported")
                raw = z.read(pkl[0])
                self.header_sha256 = hashlib.sha256(raw).hexdigest()
                self.obj = _parsed_pickle(raw, self.header_sha256, self.path)
                entries = {i.filename[len(root) + 5:]: i for i in infos if i.filename.startswith(root + "data/")}
                self._locate(entries)
        except zipfile.BadZipFile as e:
            raise FormatError(f"{self.path}: not a readable torch.save archive ({e}; truncated?)") from None
        except OSError as e:
            raise FormatError(f"{self.path}: cannot read ({e.strerror or e})") from None

    def _locate(self, entries: dict) -> None:
        """File offsets of the storages the tensors use; TensorInfo per plain tensor and local shard."""
        starts: dict[str, tuple[int, int]] = {}
        fd = os.open(self.path, os.O_RDONLY)
        try:
            def start_of(key: str) -> tuple[int, int]:
                if key not in starts:
                    info = entries.get(key)
                    if info is None:
                        raise FormatError(f"{self.path}: storage {key} is missing from the archive")
                    if info.compress_type != zipfile.ZIP_STORED:
                        raise FormatError(f"{self.path}: storage {key} is compressed; only torch.save's stored "
                                          "archives can be mapped")
                    head = os.pread(fd, 30, info.header_offset)  # (unbuffered: a buffered read fills 8 KB)
                    if len(head) != 30 or head[:4] != b"PK\x03\x04":
                        raise FormatError(f"{self.path}: damaged zip entry for storage {key}")
                    n, m = struct.unpack("<HH", head[26:30])
                    begin = info.header_offset + 30 + n + m
                    if begin + info.file_size > self.size:
                        raise FormatError(f"{self.path}: storage {key} runs past the end of the file (truncated?)")
                    starts[key] = (begin, info.file_size)
                return starts[key]

            self.tensors: dict[str, TensorInfo] = {}
            self.shards: dict[str, ShardRef] = {}
            for name, ref in flat_tensors(self.obj, self.path).items():
                local = ref.local if isinstance(ref, ShardRef) else ref
                if local is None:
                    raise FormatError(f"{self.path}: DTensor {name} has no local tensor")
                self.tensors[name] = self._info(name, local, start_of)
                if isinstance(ref, ShardRef):
                    self.shards[name] = ref
        finally:
            os.close(fd)

    def _info(self, name: str, t: TensorRef, start_of) -> TensorInfo:
        if t.dtype not in dtypes._TABLE:
            raise FormatError(f"{self.path}: tensor {name} has an unknown storage dtype {t.dtype}")
        if not t.contiguous():
            raise FormatError(f"{self.path}: tensor {name} is stored with strides {t.stride} (not contiguous); "
                              "save a contiguous copy")
        isz = dtypes.itemsize(t.dtype)
        begin, nbytes = start_of(t.storage.key)
        n = prod(t.size)
        if t.offset < 0 or (t.offset + n) * isz > nbytes or t.storage.numel * isz > nbytes:
            raise FormatError(f"{self.path}: tensor {name} ({n} elements from {t.offset}) runs past its storage "
                              f"of {nbytes // isz} elements")
        return TensorInfo(name, t.dtype, t.size, begin + t.offset * isz, n * isz)
