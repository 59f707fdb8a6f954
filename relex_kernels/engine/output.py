"""Output directories that are either complete or absent.

Each target ``OUT_DIR/step_<S>`` is written into a private ``.step_<S>.partial-*``
directory beside it and renamed into place only when every file is written and
synced, so a crash never leaves a half-written output that looks complete. A lock
file keeps two runs from writing the same ``OUT_DIR``; partial directories of a run
that died are removed by the next one (it holds the lock, so they are stale).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import tempfile

from ..errors import OutputError
from ..io.writer import DEFAULT_SHARD_BYTES, ShardedWriter, TensorSpec

LOCK_NAME = ".relex.lock"
#: weight files of other formats are never copied next to predicted safetensors
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf", ".npz")
_SKIP_NAMES = {"model.safetensors.index.json", "pytorch_model.bin.index.json"}


def _inside(path: str, parent: str) -> bool:
    path, parent = os.path.realpath(path), os.path.realpath(parent)
    return path == parent or path.startswith(parent.rstrip(os.sep) + os.sep)


def side_files(base_dir: str) -> list[str]:
    """config.json, generation_config.json, tokenizer files …: every small non-weight file of the base."""
    out = []
    for name in sorted(os.listdir(base_dir)):
        p = os.path.join(base_dir, name)
        if (os.path.isfile(p) and name not in _SKIP_NAMES and not name.startswith(".")
                and not name.endswith(_WEIGHT_SUFFIXES)):
            out.append(p)
    return out


def target_dir_name(step: int) -> str:
    return f"step_{step}"


class OutputSet:
    """The K target directories of one run, from reservation to commit (or abort)."""

    def __init__(self, out_dir: str, targets: list[int], input_dirs: list[str], overwrite: bool):
        self.out_dir = os.path.abspath(out_dir)
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
        try:
            os.makedirs(self.out_dir, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot create output directory {self.out_dir}: {e.strerror}") from None
        self._lock_fd = self._lock()
        self.partials: dict[int, str] = {}
        self.writers: list[ShardedWriter] = []
        try:
            self._clean_stale()
            for t in self.targets:
                final = self.final(t)
                if os.path.exists(final) and not overwrite:
                    raise OutputError(f"{final} already exists; pass --overwrite to replace it")
            for t in self.targets:
                self.partials[t] = tempfile.mkdtemp(prefix=f".{target_dir_name(t)}.partial-", dir=self.out_dir)
        except BaseException:
            self.abort()
            raise

    def final(self, t: int) -> str:
        return os.path.join(self.out_dir, target_dir_name(t))

    def _lock(self) -> int:
        path = os.path.join(self.out_dir, LOCK_NAME)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputError(f"cannot create the lock {path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise OutputError(f"another relex run is writing to {self.out_dir} (lock {path} is held)") from None
            raise OutputError(f"cannot lock {path}: {e.strerror}") from None
        return fd

    def _clean_stale(self) -> None:
        for name in os.listdir(self.out_dir):
            if ".partial-" in name and name.startswith("."):
                shutil.rmtree(os.path.join(self.out_dir, name), ignore_errors=True)

    def open_writers(self, specs: list[TensorSpec], shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[ShardedWriter]:
        try:
            for t in self.targets:
                self.writers.append(ShardedWriter(self.partials[t], specs, shard_bytes,
                                                  metadata={"relex_target_step": str(t)}))
        except OSError as e:
            raise OutputError(f"cannot create the output files in {self.out_dir}: {e.strerror or e}") from None
        return self.writers

    def commit(self, base_dir: str, report: dict | None = None) -> list[str]:
        """Close the writers, copy the base's side files, and rename every target into place."""
        try:
            for w in self.writers:
                w.close(sync=True)
            for t in self.targets:
                for src in side_files(base_dir):
                    shutil.copy2(src, os.path.join(self.partials[t], os.path.basename(src)))
            if report is not None:
                _write_json_atomic(os.path.join(self.out_dir, "relex_report.json"), report)
        except OSError as e:
            self.abort()
            raise OutputError(f"writing the output in {self.out_dir} failed: {e.strerror or e}") from None
        done = []
        for t in self.targets:
            final = self.final(t)
            if os.path.exists(final):
                trash = tempfile.mkdtemp(prefix=f".{target_dir_name(t)}.old-", dir=self.out_dir)
                os.rename(final, os.path.join(trash, "old"))
                os.rename(self.partials[t], final)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.rename(self.partials[t], final)
            done.append(final)
        self.partials = {}
        _fsync_dir(self.out_dir)
        self._unlock()
        return done

    def abort(self) -> None:
        for w in self.writers:
            w.close(sync=False)
        self.writers = []
        for p in self.partials.values():
            shutil.rmtree(p, ignore_errors=True)
        self.partials = {}
        self._unlock()

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=1)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
