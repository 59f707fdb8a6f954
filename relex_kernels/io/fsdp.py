"""verl FSDP actor checkpoints read in place: ``model_world_size_{W}_rank_{R}.pt``, no merge step.

verl saves, per rank, ``torch.save(model.state_dict())`` of the FSDP model: DTensors whose
local tensors are that rank's row block (``Shard(0)``: rank k holds rows
``[k·c, k·c + len_k)``, ``c = ceil(N / W)``, the last ranks shorter or empty), its slice of a
later dimension (``Shard(d)``, verl's FSDP2 placement when only that dimension divides by W)
or a full copy (``Replicate``), in the training precision (fp32 master weights by default).
On an HSDP mesh (``(Replicate, Shard)``) the first replica's ranks hold every shard. A tensor split
over W rank files is one tensor here: :class:`ShardedTensors` serves element ranges of it,
zero-copy when the range lies in one rank's block and gathered into a new array when it
spans two (a few chunks per tensor), so the engine's Gram is that of the gathered tensor,
bit for bit.
"""

from __future__ import annotations

import json
import os
import re
from math import prod

import numpy as np

from ..errors import FormatError, InputError
from . import dtypes
from .assembled import AssembledTensors
from .reader import TensorInfo
from .torchzip import ShardRef, TorchZipFile

RANK_FILE = re.compile(r"^model_world_size_(\d+)_rank_(\d+)\.pt$")


def rank_files(path: str) -> dict[int, tuple[int, str]]:
    """``{rank: (world size, file)}`` of the verl model rank files in directory ``path``."""
    out = {}
    try:
        names = os.listdir(path)
    except OSError:
        return {}
    for n in names:
        m = RANK_FILE.match(n)
        if m:
            out[int(m.group(2))] = (int(m.group(1)), os.path.join(path, n))
    return out


def holds_rank_files(path: str) -> bool:
    return bool(rank_files(path))


class ShardedTensors(AssembledTensors):
    """The tensors of one verl FSDP checkpoint directory, each assembled from its rank files."""

    def __init__(self, path: str, label: str):
        self.path = path
        found = rank_files(path)
        worlds = {w for w, _ in found.values()}
        if len(worlds) != 1:
            raise InputError(f"{label}: {path} holds rank files of several world sizes {sorted(worlds)}")
        W = worlds.pop()
        missing = sorted(set(range(W)) - set(found))
        if missing or len(found) != W:
            raise InputError(f"{label}: {path} lacks the model rank file(s) of rank {missing or sorted(found)} "
                             f"(world size {W}: model_world_size_{W}_rank_0.pt .. rank_{W - 1}.pt)")
        cfg = os.path.join(path, "fsdp_config.json")
        if os.path.isfile(cfg):
            try:
                with open(cfg) as fh:
                    cw = json.load(fh).get("world_size")
            except (OSError, ValueError, AttributeError) as e:
                raise FormatError(f"{cfg}: cannot read ({e})") from None
            if cw is not None and cw != W:
                raise InputError(f"{label}: {cfg} says world_size {cw} but the rank files are of world size {W}")
        self.world = W
        self.files: list[TorchZipFile] = []
        try:
            for r in range(W):
                self.files.append(TorchZipFile(found[r][1]))
            self.tensors: dict[str, TensorInfo] = {}
            self.segments: dict[str, list[tuple[int, int, TorchZipFile, str]]] = {}
            self.columns: dict[str, tuple] = {}  # tensors sharded along a later dimension
            self._assemble(label)
        except BaseException:
            self.close()
            raise

    def _assemble(self, label: str) -> None:
        first = self.files[0]
        names = list(first.tensors)
        for f in self.files[1:]:
            if list(f.tensors) != names:
                extra = sorted(set(f.tensors) ^ set(names))
                raise InputError(f"{label}: rank files disagree on the tensors ({f.path} vs {first.path}: "
                                 f"{extra[:3]})")
        for name in names:
            refs = [f.shards.get(name) for f in self.files]
            infos = [f.tensors[name] for f in self.files]
            dt = infos[0].dtype
            if any(i.dtype != dt for i in infos):
                raise InputError(f"{label}: tensor {name} has different dtypes across rank files "
                                 f"({sorted({i.dtype for i in infos})})")
            if refs[0] is None:  # a plain tensor: every rank holds it whole
                self.tensors[name] = TensorInfo(name, dt, infos[0].shape, -1, infos[0].nbytes)
                self.segments[name] = [(0, prod(infos[0].shape), self.files[0], name)]
                continue
            self._sharded(label, name, refs, infos)

    def _column_sharded(self, label: str, name: str, shape: tuple, dt: str, dim: int,
                        infos: list[TensorInfo], files: list[TorchZipFile]) -> None:
        """``Shard(dim)``, dim > 0 (verl's FSDP2 picks it when only a later dimension divides by W):
        rank k holds the slices ``[k·c, k·c + len_k)`` of dimension ``dim``; a flat element range
        is gathered from every rank (:meth:`view`), in pieces the engine bounds."""
        if not 0 < dim < len(shape):
            raise InputError(f"{label}: tensor {name} is sharded along dim {dim} of a {len(shape)}-d tensor")
        W, D = len(files), shape[dim]
        c = -(-D // W)
        parts = []
        for k, info in enumerate(infos):
            n_k = max(0, min(c, D - k * c))
            want = (*shape[:dim], n_k, *shape[dim + 1:])
            if info.shape != want:
                raise InputError(f"{label}: tensor {name} rank {k} holds shape {info.shape}; Shard({dim}) of {shape} "
                                 f"over {W} ranks gives {want} ({files[k].path})")
            if n_k:
                parts.append((k * c, n_k, files[k]))
        outer, inner = prod(shape[:dim]), prod(shape[dim + 1:])
        n = prod(shape)
        self.columns[name] = (outer, D, inner, parts)
        self.tensors[name] = TensorInfo(name, dt, shape, -1, n * dtypes.itemsize(dt))
        self.segments[name] = [(0, n, None, name)]  # one piece: the engine copies it in bounded pieces

    def _rows(self, name: str, a: int, b: int):
        outer, D, inner, parts = self.columns[name]
        o0, o1 = a // (D * inner), -(-b // (D * inner))
        return o0, o1, outer, D, inner, parts

    def view(self, name: str, start: int = 0, stop: int | None = None, scratch=None) -> np.ndarray:
        if name not in self.columns:
            return super().view(name, start, stop, scratch)
        t = self.tensors[name]
        stop = t.numel if stop is None else stop
        if not 0 <= start <= stop <= t.numel:
            raise IndexError(f"{self.path}: elements [{start}, {stop}) outside tensor {name!r} of {t.numel}")
        o0, o1, _, D, inner, parts = self._rows(name, start, stop)
        block = np.empty((o1 - o0, D, inner), dtype=dtypes.raw_numpy(t.dtype))
        for j0, n_k, f in parts:
            local = f.view(name, o0 * n_k * inner, o1 * n_k * inner).reshape(o1 - o0, n_k, inner)
            block[:, j0:j0 + n_k, :] = local
        lo = o0 * D * inner
        return block.reshape(-1)[start - lo:stop - lo]

    def _local_ranges(self, name: str, a: int, b: int):
        if name not in self.columns:
            yield from super()._local_ranges(name, a, b)
            return
        o0, o1, _, _, inner, parts = self._rows(name, a, b)  # whole outer rows of every rank's slice
        for _, n_k, f in parts:
            yield f, name, o0 * n_k * inner, o1 * n_k * inner

    def _sharded(self, label: str, name: str, refs: list[ShardRef | None], infos: list[TensorInfo]) -> None:
        r0 = refs[0]
        if any(r is None or r.shape != r0.shape or r.placements != r0.placements for r in refs):
            raise InputError(f"{label}: tensor {name} is described differently by the rank files "
                             "(global shape or placements differ)")
        shape, dt = r0.shape, infos[0].dtype
        n = prod(shape)
        places = [p for p in r0.placements if p != ("replicate",)]
        if not places:  # replicated: rank 0's copy
            if infos[0].shape != shape:
                raise InputError(f"{label}: replicated tensor {name} has local shape {infos[0].shape}, not {shape}")
            self.tensors[name] = TensorInfo(name, dt, shape, -1, n * dtypes.itemsize(dt))
            self.segments[name] = [(0, n, self.files[0], name)]
            return
        files = self.files
        if len(r0.placements) == 2 and r0.placements[0] == ("replicate",) and places[0][0] == "shard":
            # HSDP (verl's ("ddp", "fsdp") mesh): the ranks of the first replica hold every shard
            if any(r.coord is None or len(r.coord) != 2 for r in refs):
                raise InputError(f"{label}: tensor {name} is on a 2-D mesh whose rank coordinates are not recorded; "
                                 "merge this checkpoint with verl's model merger first")
            first = sorted((r.coord[1], k) for k, r in enumerate(refs) if r.coord[0] == 0)
            if [c for c, _ in first] != list(range(len(first))):
                raise InputError(f"{label}: tensor {name}: the first replica's ranks do not cover its shards")
            infos = [infos[k] for _, k in first]
            files = [self.files[k] for _, k in first]
        elif len(r0.placements) != 1 or places[0][0] != "shard":
            raise InputError(f"{label}: tensor {name} has placements {r0.placements}; relex reads FSDP meshes "
                             "(Shard or Replicate, and HSDP's (Replicate, Shard)); merge this checkpoint with "
                             "verl's model merger first")
        dim = places[0][1]
        if dim != 0:
            return self._column_sharded(label, name, shape, dt, dim, infos, files)
        W = len(files)
        N = shape[0]
        row = prod(shape[1:])
        c = -(-N // W)
        segs = []
        for k, info in enumerate(infos):
            rows = max(0, min(c, N - k * c))
            if info.shape != (rows, *shape[1:]):
                raise InputError(f"{label}: tensor {name} rank {k} holds shape {info.shape}; Shard(0) of {shape} "
                                 f"over {W} ranks gives {(rows, *shape[1:])} ({files[k].path})")
            if rows:
                segs.append((k * c * row, (k * c + rows) * row, files[k], name))
        self.tensors[name] = TensorInfo(name, dt, shape, -1, n * dtypes.itemsize(dt))
        self.segments[name] = segs


