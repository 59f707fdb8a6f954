"""Output directories that are either complete or absent.

Each target ``OUT_DIR/step_<S>`` is written into ``OUT_DIR/.relex.partial/step_<S>``
and renamed into place only when every file is written and synced, so a crash never
leaves a half-written output that looks complete. A lock file keeps two runs from
writing the same ``OUT_DIR``. The state directory also holds the run's journal
(:mod:`.journal`): a run that died is resumed by the next run with the same key, and
any other leftover state is removed (the new run holds the lock, so it is stale).
An error (bad input, full disk) removes the state; only a kill or an interrupt
(Ctrl-C) leaves it for a resume.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
import warnings

from ..errors import FormatError, InputError, OutputError, RelexWarning
from ..io.checkpoint import INDEX_NAME, SINGLE_NAME, read_weight_map
from ..io.dirs import make_dirs, remove_empty, write_text_atomic
from ..io.writer import DEFAULT_SHARD_BYTES, ShardedWriter, TensorSpec
from . import journal as journal_mod
from . import report as report_mod
from .journal import Journal

LOCK_NAME = ".relex.lock"
STATE_NAME = ".relex.partial"
REPORT_NAME = "relex_report.json"
#: weight files of other formats are never copied next to predicted safetensors
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf", ".npz", ".distcp")
#: nor the index of the base's weights, nor verl's record of its FSDP settings (rank files' bookkeeping)
_SKIP_NAMES = {"model.safetensors.index.json", "pytorch_model.bin.index.json", "fsdp_config.json"}


def _inside(path: str, parent: str) -> bool:
    path, parent = os.path.realpath(path), os.path.realpath(parent)
    return path == parent or path.startswith(parent.rstrip(os.sep) + os.sep)


def side_files(base_dir: str, check: bool = False) -> list[str]:
    """config.json, generation_config.json, tokenizer files …: every small non-weight file of the base.

    ``check``: also open each one, so that an unreadable one is an error before any work.
    """
    out = []
    try:
        names = sorted(os.listdir(base_dir))
    except OSError as e:
        raise InputError(f"base checkpoint: cannot list {base_dir} for its config and tokenizer files "
                         f"({e.strerror})") from None
    for name in names:
        p = os.path.join(base_dir, name)
        if (os.path.isfile(p) and name not in _SKIP_NAMES and not name.startswith(".")
                and not name.endswith(_WEIGHT_SUFFIXES)):
            if check:
                try:
                    with open(p, "rb"):
                        pass
                except OSError as e:
                    raise InputError(f"base checkpoint: cannot read {p} ({e.strerror}); it is copied "
                                     "into every output") from None
            out.append(p)
    return out


def target_dir_name(step: int) -> str:
    return f"step_{step}"


class OutputSet:
    """The K target directories of one run, from reservation to commit (or abort)."""

    def __init__(self, out_dir: str, targets: list[int], input_dirs: list[str], overwrite: bool,
                 key: str = "", resume: bool = True, reuse_complete: bool = False):
        """``reuse_complete``: when every target is already in place, written by a run with this
        ``key`` (its report says so), take them as this run's instead of refusing to overwrite them:
        :attr:`complete` is then that run's report, and nothing is locked or written."""
        self.out_dir = os.path.abspath(out_dir)
        self.state_dir = os.path.join(self.out_dir, STATE_NAME)
        self.targets = list(targets)
        for d in input_dirs:
            if _inside(self.out_dir, d):
                raise OutputError(f"output {self.out_dir} lies inside input {d}; choose a directory "
                                  "outside the base and run directories")
        for d in input_dirs:
            for t in self.targets:
                if _inside(d, os.path.join(self.out_dir, target_dir_name(t))):
                    raise OutputError(f"output {os.path.join(self.out_dir, target_dir_name(t))} would "
                                      f"replace input {d}")
        try:  # a failed run removes what it created (parents too)
            self._created = make_dirs(self.out_dir)
        except OSError as e:
            raise OutputError(f"cannot create output directory {self.out_dir}: {e.strerror}") from None
        self._lock_fd = self._lock()
        self.key = key
        self.partials: dict[int, str] = {}
        self.writers: list[ShardedWriter] = []
        self.journal: Journal | None = None
        self.complete: dict | None = None
        self.prior_report = load_report(os.path.join(self.out_dir, REPORT_NAME))  # (the run there before)
        try:
            self._clean_stale()
            if resume:
                self.journal = self._resumable()
            if self.journal is None:
                shutil.rmtree(self.state_dir, ignore_errors=True)
            if reuse_complete and self.journal is None and not overwrite:
                self.complete = self._finished_before()
                if self.complete is not None:  # (a rerun of a finished command: a requeued job)
                    self._unlock()
                    return
            if self.journal is None or not self.journal.committed:
                for t in self.targets:
                    final = self.final(t)
                    if os.path.exists(final) and not overwrite:
                        self.abort(keep=True)
                        raise OutputError(f"{final} already exists; pass --overwrite (overwrite=True) to replace it")
            if self.journal is None:
                self._fresh_state()
            else:
                self.partials = {t: self._partial(t) for t in self.targets}
        except OSError as e:
            self.abort()
            raise OutputError(f"cannot prepare the output in {self.out_dir}: {e.strerror or e}") from None
        except BaseException:
            if self._lock_fd is not None:  # not given up already (keeping a resumable state)
                self.abort()
            raise

    def _finished_before(self) -> dict | None:
        """The report of an earlier run with this key whose outputs are all in place, else None."""
        rep = self.prior_report
        if (rep is None or not self.key or rep.get("run_key") != self.key or not self.has_targets(rep)
                or not all(_whole_checkpoint(self.final(t)) for t in self.targets)):
            return None
        return rep

    def has_targets(self, rep: dict) -> bool:
        """Whether report ``rep`` is of a run with this run's targets."""
        outputs = rep.get("outputs")
        return isinstance(outputs, dict) and sorted(outputs) == sorted(str(t) for t in self.targets)

    def final(self, t: int) -> str:
        return os.path.join(self.out_dir, target_dir_name(t))

    def _partial(self, t: int) -> str:
        return os.path.join(self.state_dir, target_dir_name(t))

    def _resumable(self) -> Journal | None:
        """The journal of an interrupted run with this key whose partial outputs are all there."""
        j = Journal.load(os.path.join(self.state_dir, journal_mod.JOURNAL_NAME), self.key)
        if j is None:
            return None
        if j.committed:  # some targets may already be renamed into place
            ok = all(os.path.isdir(self._partial(t)) or os.path.isdir(self.final(t)) for t in self.targets)
        else:
            ok = all(os.path.isdir(self._partial(t)) for t in self.targets)
        return j if ok else None

    def _fresh_state(self) -> None:
        shutil.rmtree(self.state_dir, ignore_errors=True)
        os.mkdir(self.state_dir)
        for t in self.targets:
            self.partials[t] = self._partial(t)
            os.mkdir(self.partials[t])
        self.journal = Journal.create(os.path.join(self.state_dir, journal_mod.JOURNAL_NAME), self.key)

    def _lock(self) -> int:
        path = os.path.join(self.out_dir, LOCK_NAME)
        for _ in range(100):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # OUT_DIR removed by a failing run a moment ago
                try:
                    os.makedirs(self.out_dir, exist_ok=True)
                except OSError as e:
                    raise OutputError(f"cannot create output directory {self.out_dir}: {e.strerror}") from None
                continue
            except OSError as e:
                raise OutputError(f"cannot create the lock {path}: {e.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise OutputError(f"another relex run is writing to {self.out_dir} (lock {path} is "
                                      "held)") from None
                raise OutputError(f"cannot lock {path}: {e.strerror}") from None
            # a failed run that created OUT_DIR unlinks the lock before letting go of it: a lock
            # taken on that unlinked file is no lock, so take the one now at the path instead
            try:
                st = os.stat(path)
                if (st.st_dev, st.st_ino) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino):
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)
        raise OutputError(f"cannot lock {path}: it keeps being removed")

    def _clean_stale(self) -> None:
        """Partial and replaced directories of runs that died (we hold the lock: nobody else uses them)."""
        for name in os.listdir(self.out_dir):
            if name.startswith(".") and (".partial-" in name or ".old-" in name):
                shutil.rmtree(os.path.join(self.out_dir, name), ignore_errors=True)

    def open_writers(self, specs: list[TensorSpec], shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[ShardedWriter]:
        """One writer per target; a resumed run reopens its files (and starts afresh if they differ)."""
        if self.journal.resumed:
            try:
                return self._writers(specs, shard_bytes, reuse=True)
            except OSError:
                for w in self.writers:
                    w.close(sync=False)
                self.writers = []
                self.journal.close()
                self.partials = {}
                try:
                    self._fresh_state()
                except OSError as e:
                    raise OutputError(f"cannot prepare the output in {self.out_dir}: {e.strerror or e}") from None
        try:
            return self._writers(specs, shard_bytes, reuse=False)
        except OSError as e:
            raise OutputError(f"cannot create the output files in {self.out_dir}: {e.strerror or e}") from None

    def _writers(self, specs, shard_bytes, reuse: bool) -> list[ShardedWriter]:
        for t in self.targets:
            self.writers.append(ShardedWriter(self.partials[t], specs, shard_bytes,
                                              metadata={"relex_target_step": str(t)}, reuse=reuse))
        writers = list(self.writers)
        self.journal.sync_outputs = lambda: [w.sync() for w in writers]
        return self.writers

    def commit(self, config_dir: str, report: dict | None = None, before_commit=None) -> list[str]:
        """Close the writers, copy the side files of ``config_dir`` (the base's config, tokenizer …), and
        rename every target into place.

        ``before_commit()`` runs once everything else is written, just before the point of
        no return (the ``commit`` journal record): a companion file such as a saved fit.
        """
        try:
            for w in self.writers:
                w.close(sync=True)
            for t in self.targets:
                for src in side_files(config_dir):
                    shutil.copy2(src, os.path.join(self.partials[t], os.path.basename(src)))
            if report is not None:  # moved beside the outputs with them, by finish_commit
                write_text_atomic(os.path.join(self.state_dir, REPORT_NAME), _json_text(report) + "\n", sync=True)
            self.writers = []
            if before_commit is not None:
                before_commit()
            self.journal.record_commit()
            journal_mod.hook("commit")
        except OSError as e:
            self.abort()
            what = f" ({e.filename})" if e.filename else ""
            raise OutputError(f"writing the output in {self.out_dir} failed: {e.strerror or e}{what}") from None
        return self.finish_commit()

    def _warn_replaced_report(self) -> None:
        """A RelexWarning when this run's report replaces that of an earlier run whose outputs stay
        (``relex predict`` of a new target into the OUT_DIR of ``relex extrapolate``)."""
        try:
            old = (self.prior_report or {}).get("outputs", {})
            kept = sorted(int(t) for t in old if int(t) not in self.targets and os.path.isdir(self.final(int(t))))
        except (ValueError, TypeError, AttributeError):
            return  # no earlier report (or not one of ours): nothing to say
        if kept:
            warnings.warn(f"{os.path.join(self.out_dir, REPORT_NAME)} now describes this run; the earlier run's "
                          f"report, on {', '.join(target_dir_name(t) for t in kept)} (kept), is replaced: give "
                          "each run its own --out to keep both", RelexWarning, stacklevel=2)

    def finish_commit(self) -> list[str]:
        """Rename every complete target into place (also finishes the commit of a run killed during it)."""
        done = []
        try:
            # The report in OUT_DIR names the run whose outputs are there (a rerun of that run takes
            # them as its own): it goes before any target of this run is renamed in, and this run's
            # comes after the last, so that a kill in between leaves no report, never a wrong one.
            new_report = os.path.exists(os.path.join(self.state_dir, REPORT_NAME))
            if new_report:
                self._warn_replaced_report()
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.out_dir, REPORT_NAME))
            for t in self.targets:
                final, part = self.final(t), self._partial(t)
                if os.path.isdir(part):
                    if os.path.exists(final):
                        trash = tempfile.mkdtemp(prefix=f".{target_dir_name(t)}.old-", dir=self.out_dir)
                        os.rename(final, os.path.join(trash, "old"))
                        os.rename(part, final)
                        shutil.rmtree(trash, ignore_errors=True)
                    else:
                        os.rename(part, final)
                    journal_mod.hook("rename")
                done.append(final)
            if new_report:
                os.replace(os.path.join(self.state_dir, REPORT_NAME), os.path.join(self.out_dir, REPORT_NAME))
            _fsync_dir(self.out_dir)
            journal_mod.hook("moved")
        except OSError as e:
            self.abort()  # keeps the committed state: the next run finishes the renames
            raise OutputError(f"moving the finished output into {self.out_dir} failed: {e.strerror or e}; "
                              "run the same command again to finish") from None
        self.partials = {}
        self.journal.close()
        shutil.rmtree(self.state_dir, ignore_errors=True)
        self._unlock()
        return done

    def abort(self, keep: bool = False) -> None:
        """Give up: remove every partial output, or with ``keep`` leave them for a resume (Ctrl-C).

        ``keep`` first syncs the outputs and writes the journal's waiting output records, so
        a graceful interrupt loses no finished tensor (only a kill loses the batched ones).
        """
        if keep and self.journal is not None and not self.journal.committed:
            try:
                self.journal.flush()
            except OutputError:
                pass  # the records only save work: without them the next run redoes it
        for w in self.writers:
            w.close(sync=False)
        self.writers = []
        if self.journal is not None:
            self.journal.close()
        committed = self.journal is not None and self.journal.committed
        if not (keep and self.journal is not None) and not committed:
            shutil.rmtree(self.state_dir, ignore_errors=True)
            if self._created and self._lock_fd is not None:
                with contextlib.suppress(OSError):  # leave no trace: the lock (held while it goes), the directories
                    os.unlink(os.path.join(self.out_dir, LOCK_NAME))
                remove_empty(self._created)
        self.partials = {}
        self._unlock()

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def load_report(path: str) -> dict | None:
    """A run's report (JSON object) at ``path``; None when it is missing or not one."""
    try:
        with open(path) as fh:
            rep = json.load(fh)
    except (OSError, ValueError):
        return None
    return rep if isinstance(rep, dict) else None


def _whole_checkpoint(d: str) -> bool:
    """Whether output directory ``d`` holds every weight file its index names (or its one file),
    none of them empty: what a rerun checks before taking an earlier run's output as its own."""
    def there(name: str) -> bool:
        try:
            return os.path.getsize(os.path.join(d, name)) > 0
        except OSError:
            return False
    if not os.path.lexists(os.path.join(d, INDEX_NAME)):
        return there(SINGLE_NAME)
    try:
        _, shards = read_weight_map(os.path.join(d, INDEX_NAME))
    except FormatError:
        return False
    return bool(shards) and all(map(there, shards))


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _json_text(obj) -> str:
    """``obj`` as JSON indented by 1, but a top-level ``tensors`` list (the report's entries:
    thousands in a MoE model, where Python's indenting encoder took a quarter of a second)
    holds one compact line per entry, from the native float text or the C encoder."""
    tensors = obj.get("tensors") if isinstance(obj, dict) else None
    if not isinstance(tensors, list) or not tensors:
        return json.dumps(obj, indent=1)
    mark = f"relex-tensors-{os.getpid()}-{id(tensors)}"
    text = json.dumps({**obj, "tensors": mark}, indent=1)
    lines = report_mod.entry_lines(tensors) or journal_mod.encode_each(json.dumps, tensors, "name", ", ")
    return text.replace(json.dumps(mark), "[\n  " + ",\n  ".join(lines) + "\n ]", 1)
