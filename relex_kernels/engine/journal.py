"""Resumable runs: a journal of the work a run has finished, kept beside its partial outputs.

While a run is in progress ``OUT_DIR/.relex.partial/`` holds

* ``step_<S>/``: the output directory of each target, written in place;
* ``journal.jsonl``: one JSON record per line, appended as work completes.

A run killed at any point (SIGKILL, OOM killer, pre-emption, power loss) leaves this
state behind; the same command run again finds it, checks that its ``key`` (a hash
of everything the outputs depend on: input fingerprints, options, targets, the kernel
that sums the Gram, shard size, tensor list, package version) is its own, and continues: finished
tensors are skipped, a tensor whose pass 1 finished is not read for its Gram again,
and chunked tensors restart from their last finished range. Anything that does not
match (another key, a torn record, files of another layout) is discarded and the run
starts afresh, so a stale journal can cost time but never change a byte.

Record order is what makes this safe: a ``written`` or ``done`` record is appended
only after the output ranges it covers were written and synced (records wait and go
out together every ``RELEX_JOURNAL_SYNC_SECONDS``, 10 s by default, after one sync of
the outputs), so losing the tail of the journal only loses work, never claims work
that is not on disk. A graceful interrupt (Ctrl-C, SIGTERM) writes the waiting records
before it exits (:meth:`Journal.flush`); only a kill loses them. Partial
outputs stay inside the hidden state directory and are renamed into
``OUT_DIR/step_<S>`` only when complete (``commit`` record first, so an interruption
between the renames of several targets is finished by the next run).

Records::

    {"kind": "header", "version": 1, "key": "<sha256>"}
    {"kind": "gram", "name": N, "upto": E, "T": T, "acc": "<b64 fp64 T*T>"}   Gram over elements [0, E) of a chunked tensor
    {"kind": "fit", "name": N, "u": "<b64>", "u_shape": [T, r], "sv": "<b64>", "ev": X}   pass 1 of N finished
    {"kind": "fits", "names": [N...], "u": "<b64 k*T*r>", "u_shape": [k, T, r], "sv": "<b64 k*T>", "ev": [X...]}
                                                 pass 1 of a group of k tensors finished (one record)
    {"kind": "written", "name": N, "upto": E}    outputs of elements [0, E) of N written and synced
    {"kind": "done", "name": N}                  every output of N written and synced
    {"kind": "commit"}                           all outputs complete and synced; renames began

Test hook: ``RELEX_TEST_KILL=POINT:N[:SIG]`` makes the process send itself SIGKILL (or
SIG, e.g. ``STOP``) the N-th time it passes POINT (``start``, ``gram``, ``fit``,
``combine``, ``done``, ``commit``, ``rename``, ``moved``); the reliability tests use it to
interrupt runs at exact places.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import time

import numpy as np

from .._version import __version__
from ..errors import OutputError
from ..fit import Components

VERSION = 1
JOURNAL_NAME = "journal.jsonl"


def sync_seconds() -> float:
    """How often output records are made durable (``RELEX_JOURNAL_SYNC_SECONDS``, default 10)."""
    try:
        return float(os.environ.get("RELEX_JOURNAL_SYNC_SECONDS", "10"))
    except ValueError:
        return 10.0


# -- test hook ---------------------------------------------------------------------
def _parse_kill(text: str | None) -> tuple[str, int, int] | None:
    if not text:
        return None
    point, n, sig = (text.split(":") + ["", ""])[:3]
    try:
        return point, max(1, int(n or 1)), int(getattr(signal, f"SIG{sig or 'KILL'}"))
    except (ValueError, AttributeError):
        return None


_KILL = _parse_kill(os.environ.get("RELEX_TEST_KILL"))
_PASSED: dict[str, int] = {}


def hook(point: str) -> None:
    """Kill this process (SIGKILL, no cleanup) the N-th time ``point`` is passed, if asked to."""
    if _KILL is None or _KILL[0] != point:
        return
    _PASSED[point] = _PASSED.get(point, 0) + 1
    if _PASSED[point] == _KILL[1]:
        os.kill(os.getpid(), _KILL[2])


# -- key -----------------------------------------------------------------------------
def run_key(fingerprint, options: dict, targets: list[int], kernel: str, shard_bytes: int, jobs,
            extra: dict | None = None, *, solver: str) -> str:
    """Hash of everything the bytes of the outputs depend on; ``kernel``: :attr:`~..ops.Backend.identity`
    (a run resumed on another SIMD path, Gram precision or device would mix two kernels' Grams);
    ``solver``: :func:`~..fit.eigen_solver` (the fits' last bits)."""
    doc = {
        "version": VERSION, "package": __version__, "inputs": fingerprint, "options": options,
        "targets": list(targets), "kernel": kernel, "solver": solver, "shard_bytes": int(shard_bytes),
        "jobs": [[j.name, j.dtype, list(j.shape), j.kind, j.out_dtype] for j in jobs], "extra": extra or {},
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype="<f8").tobytes()).decode()


def _unb64(s: str, shape) -> np.ndarray:
    a = np.frombuffer(base64.b64decode(s, validate=True), dtype="<f8").astype(np.float64)
    return a.reshape(shape)


#: one encoder for every record (json.dumps with separators builds a new one per call: thousands of
#: records in a MoE run)
_ENCODER = json.JSONEncoder(separators=(",", ":"))


def encode_each(encode, objs: list[dict], first_key: str, sep: str) -> list[str]:
    """``[encode(o) for o in objs]`` for flat dicts whose first key is ``first_key``, from one call
    of ``encode`` (compact, item separator ``sep``) on the whole list: one C-encoder pass instead
    of thousands of Python calls.

    The list's text is cut where an object ends and the next begins: ``}``, ``sep``,
    ``{"first_key"``. That cannot occur inside a string (its quote would be escaped), and compact
    JSON holds no raw newline; a nested dict with the same first key would add cuts, so the
    cut is taken only when every object starts with that key and it yields exactly one text
    per object (else one call per object).
    """
    if len(objs) < 2 or not all(next(iter(o), None) == first_key for o in objs):
        return [encode(o) for o in objs]
    head = "{" + json.dumps(first_key)
    parts = encode(objs)[1:-1].replace("}" + sep + head, "}\n" + head).split("\n")
    return parts if len(parts) == len(objs) else [encode(o) for o in objs]


class Journal:
    """Append-only record of finished work; the parsed state is in the attributes."""

    def __init__(self, path: str, key: str):
        self.path = path
        self.key = key
        self.fits: dict[str, Components] = {}
        self.grams: dict[str, tuple[int, np.ndarray]] = {}
        self.written: dict[str, int] = {}
        self.done: set[str] = set()
        self.committed = False
        self.resumed = False
        self._fh = None
        self._pending: list[dict] = []
        self._last_sync = time.monotonic()
        #: makes every output byte written so far durable; set by the output set
        self.sync_outputs = None

    # -- reading --------------------------------------------------------------------
    @classmethod
    def load(cls, path: str, key: str) -> Journal | None:
        """The journal at ``path`` if it is this run's (same key), else None."""
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError:
            return None
        lines = data.split(b"\n")
        lines.pop()  # the tail after the last newline is a torn record (or empty)
        if not lines:
            return None
        try:
            head = json.loads(lines[0])
        except ValueError:
            return None
        if not isinstance(head, dict) or head.get("kind") != "header" or head.get("version") != VERSION \
                or head.get("key") != key:
            return None
        j = cls(path, key)
        good = len(lines[0]) + 1  # bytes of the records we trust
        for line in lines[1:]:
            try:
                j._apply(json.loads(line))
            except (ValueError, TypeError, KeyError, AttributeError):
                break  # a damaged record: trust nothing after it
            good += len(line) + 1
        if good != len(data):  # cut the torn or damaged tail, so that new records follow good ones
            try:
                os.truncate(path, good)
            except OSError:
                return None
        j.resumed = True
        return j

    def _apply(self, r: dict) -> None:
        kind = r["kind"]
        if kind == "gram":
            T = int(r["T"])
            self.grams[r["name"]] = (int(r["upto"]), _unb64(r["acc"], (T, T)))
        elif kind == "fit":
            u = _unb64(r["u"], tuple(r["u_shape"]))
            sv = _unb64(r["sv"], (u.shape[0],))
            self.fits[r["name"]] = Components(u=u, s=sv[:u.shape[1]].copy(), singular_values=sv,
                                              explained_variance=float(r["ev"]))
        elif kind == "fits":
            names = r["names"]
            k, T, rk = (int(x) for x in r["u_shape"])
            if len(names) != k or len(r["ev"]) != k:
                raise ValueError("fits")
            us, svs = _unb64(r["u"], (k, T, rk)), _unb64(r["sv"], (k, T))
            # all or nothing: a damaged record must not leave half its fits applied
            fits = [(name, Components(u=u, s=sv[:rk].copy(), singular_values=sv, explained_variance=float(ev)))
                    for name, u, sv, ev in zip(names, us, svs, r["ev"])]
            self.fits.update(fits)
        elif kind == "written":
            self.written[r["name"]] = int(r["upto"])
        elif kind == "done":
            self.done.add(r["name"])
        elif kind == "commit":
            self.committed = True
        else:
            raise ValueError(kind)

    # -- writing --------------------------------------------------------------------
    @classmethod
    def create(cls, path: str, key: str) -> Journal:
        j = cls(path, key)
        j._append({"kind": "header", "version": VERSION, "key": key}, sync=True)
        return j

    def _append(self, rec: dict | list[dict], sync: bool = False) -> None:
        """Append a record, or several in one write (a kill leaves whole records and at most one torn)."""
        recs = rec if isinstance(rec, list) else [rec]
        line = "".join(r + "\n" for r in encode_each(_ENCODER.encode, recs, "kind", ",")).encode()
        try:
            if self._fh is None:
                self._fh = open(self.path, "ab", buffering=0)
            self._fh.write(line)  # one write: a kill leaves a whole record or a torn tail
            if sync:
                os.fsync(self._fh.fileno())
        except OSError as e:
            raise OutputError(f"cannot write the run journal {self.path}: {e.strerror or e}") from None

    def record_gram(self, name: str, upto: int, acc: np.ndarray) -> None:
        self._append({"kind": "gram", "name": name, "upto": int(upto), "T": int(acc.shape[0]), "acc": _b64(acc)})

    def record_fits(self, names: list[str], comps: list[Components]) -> None:
        """The fits of a group of tensors, in one write: one ``fits`` record with the arrays stacked
        when every tensor keeps as many components (the usual), else a ``fit`` record each."""
        self.fits.update(zip(names, comps))
        if len(comps) > 1 and len({c.u.shape for c in comps}) == 1:
            self._append({"kind": "fits", "names": list(names), "u": _b64(np.stack([c.u for c in comps])),
                          "u_shape": [len(comps), *comps[0].u.shape],
                          "sv": _b64(np.stack([c.singular_values for c in comps])),
                          "ev": [c.explained_variance for c in comps]})
            return
        self._append([{"kind": "fit", "name": name, "u": _b64(comp.u), "u_shape": list(comp.u.shape),
                       "sv": _b64(comp.singular_values), "ev": comp.explained_variance}
                      for name, comp in zip(names, comps)])

    # Output records claim bytes on disk, so they are appended only after the outputs are
    # synced. Syncing after every tensor would make the run wait for the disk each time;
    # instead they wait in ``_pending`` and go out together every SYNC_SECONDS, after one
    # ``sync_outputs()`` (set by the output set): a kill loses at most that much work.
    def record_written(self, name: str, upto: int) -> None:
        self._pending.append({"kind": "written", "name": name, "upto": int(upto)})
        self._flush_pending()

    def record_done(self, *names: str) -> None:
        self.done.update(names)
        self._pending.extend({"kind": "done", "name": name} for name in names)
        self._flush_pending()

    def _flush_pending(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self._pending or (not force and now - self._last_sync < sync_seconds()):
            return
        if self.sync_outputs is not None:
            try:
                self.sync_outputs()
            except OSError as e:
                raise OutputError(f"cannot sync the outputs beside {self.path}: {e.strerror or e}") from None
        recs, self._pending = self._pending, []
        self._append(recs)
        self._last_sync = time.monotonic()

    def flush(self) -> None:
        """Sync the outputs and write every waiting output record now (a graceful interrupt:
        Ctrl-C, SIGTERM), so the next run reuses all the work finished so far."""
        self._flush_pending(force=True)
        if self._fh is not None:
            try:
                os.fsync(self._fh.fileno())
            except OSError as e:
                raise OutputError(f"cannot write the run journal {self.path}: {e.strerror or e}") from None

    def record_commit(self) -> None:
        """All outputs are complete and synced (closed): the pending records, then the commit."""
        self.sync_outputs = None
        self._flush_pending(force=True)
        self.committed = True
        self._append({"kind": "commit"}, sync=True)

    def close(self) -> None:
        if self._fh is not None:
            try:
                self._fh.close()
            except OSError:
                pass
            self._fh = None
