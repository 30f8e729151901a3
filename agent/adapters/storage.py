"""Atomic writes for every file the vehicle depends on.

Temp file in the same directory, fsync, ``os.replace``, fsync of the directory: a kill at
any line leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

from agent.errors import UsageError, VotaError

__all__ = ["writable_dir", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "fsync_dir", "InstanceLock", "StorageError",
           "storage_fault", "free_bytes", "best_effort", "Deferred"]

log = logging.getLogger(__name__)

STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG})


class StorageError(OSError):
    """The vehicle's own storage cannot take a write (full, read-only, failing): a condition to
    report and wait out, never a reason for a thread to die."""


def storage_fault(exc: BaseException) -> str | None:
    """What is wrong with the storage, when ``exc`` says the disk is full, read-only or failing."""
    if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
        return f"{os.strerror(exc.errno)}" + (f" ({exc.filename})" if exc.filename else "")
    text = str(exc).lower()
    if type(exc).__module__ == "sqlite3" and ("full" in text or "disk i/o" in text or "readonly" in text):
        return f"database: {exc}"
    return None


def best_effort(write: Callable[[], object], what: str) -> str | None:
    """Evidence (a trace, a result, a status) written if the storage takes it; a storage fault
    is logged and returned, not raised (what the vehicle depends on is never written this way)."""
    try:
        write()
        return None
    except OSError as exc:
        fault = storage_fault(exc)
        if fault is None:
            raise
        log.error("%s not written: %s", what, fault)
        return fault


class Deferred:
    """Small files a peer reads (an install's status, its summary) that the storage could not
    take when they were written: kept here, newest per path, and written by ``flush`` once it
    can (call it before they are read)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[Path, bytes] = {}

    def write_json(self, path: str | os.PathLike[str], obj: Any, what: str) -> None:
        data = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
        with self._lock:
            self._pending.pop(Path(path), None)
        if best_effort(lambda: atomic_write_bytes(path, data), what) is not None:
            with self._lock:
                self._pending[Path(path)] = data

    def pending(self, path: str | os.PathLike[str]) -> bytes | None:
        """What ``path`` holds once it is written, while it waits."""
        with self._lock:
            return self._pending.get(Path(path))

    def flush(self) -> int:
        """Write what is pending; how many are still pending."""
        with self._lock:
            pending = list(self._pending.items())
        for path, data in pending:
            try:
                atomic_write_bytes(path, data)
            except OSError:
                break  # the storage still fails: the rest waits too
            with self._lock:
                if self._pending.get(path) is data:
                    del self._pending[path]
        with self._lock:
            return len(self._pending)


def free_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes free for an unprivileged writer on the file system of ``path`` (its nearest existing parent)."""
    target = Path(path)
    while not target.exists() and target.parent != target:
        target = target.parent
    st = os.statvfs(target)
    return st.f_bavail * st.f_frsize


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(target.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


class InstanceLock:
    """One process per state directory: an exclusive ``flock`` on ``<directory>/.lock``, held
    until ``release`` or the process ends (a kill -9 releases it too: the kernel drops it)."""

    def __init__(self, directory: str | os.PathLike[str], what: str) -> None:
        self.path, self.what = Path(directory) / ".lock", what
        self._fd: int | None = None

    def acquire(self) -> "InstanceLock":
        import fcntl

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise VotaError(f"{self.path}: cannot create the lock file ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise VotaError(f"{self.path.parent}: another {self.what} runs on this directory (pid {holder})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def writable_dir(path: str | Path, option: str) -> Path:
    """A directory a command writes into, created if missing: checked before anything else is
    done (a bus talked to, a process started), a UsageError naming ``option`` when it cannot be."""
    target = Path(path)
    try:
        target.mkdir(parents=True, exist_ok=True)
        probe = target / f".vota-write-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"{option} {target}: not a writable directory ({exc.strerror or exc})") from None
    return target
