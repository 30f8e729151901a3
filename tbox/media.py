"""Removable media read as hostile input.

Whatever is on a stick (or mounted at ``tbox.media_dir``) may be a FIFO that never ends a read,
a link to ``/dev/zero``, a sparse file of gigabytes, a package far larger than the campaign
signs. Every file is opened without blocking and without following a symbolic link (unless
``tbox.media_follow_links``), must be a regular file, and is read only up to what it may be: the
campaign envelope up to its limit, a package exactly its signed size, refused before a byte is
copied when its size differs. ``MediaWatcher`` looks at the mount point in a thread of its own (a
slow stick never holds up the campaign worker) and reads a campaign again only when something on
the media changed: a stick refused once is not read every second.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import threading
from pathlib import Path
from typing import Any, Callable

from agent.errors import UsageError

__all__ = ["open_regular", "read_bounded", "copy_exact", "MediaWatcher", "MediaRefused"]

log = logging.getLogger(__name__)

CHUNK = 1 << 20


class MediaRefused(UsageError):
    """A file on the media that is not read: not a regular file, a link, too large, the wrong size."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: Path, follow_links: bool = False) -> tuple[int, os.stat_result]:
    """An open descriptor on ``path`` and its stat; MediaRefused unless it is a regular file (no
    link followed unless ``follow_links``); never blocks on a FIFO."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_links else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow_links:
            raise MediaRefused(f"{path}: a symbolic link (not followed on removable media)") from None
        raise MediaRefused(f"{path}: cannot read ({exc.strerror})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise MediaRefused(f"{path}: {_kind(st.st_mode)}, not a file")
    return fd, st


def read_bounded(path: Path, limit: int, follow_links: bool = False) -> bytes:
    """The whole of a regular file of at most ``limit`` bytes (MediaRefused otherwise)."""
    fd, st = open_regular(path, follow_links)
    try:
        if st.st_size > limit:
            raise MediaRefused(f"{path}: {st.st_size} bytes, more than the {limit} it may have")
        data = os.read(fd, limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise MediaRefused(f"{path}: grew beyond the {limit} bytes it may have while it was read")
    return data


def check_directory(path: Path, follow_links: bool = False) -> None:
    """A directory on the media that is read (``packages/``): a real one, not a link elsewhere."""
    try:
        st = os.stat(path, follow_symlinks=follow_links)
    except OSError as exc:
        raise MediaRefused(f"{path}: cannot read ({exc.strerror})") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MediaRefused(f"{path}: " + ("a symbolic link (not followed on removable media)"
                                          if stat.S_ISLNK(st.st_mode) else f"{_kind(st.st_mode)}, not a directory"))


def copy_exact(source: Path, dest: Path, size: int, follow_links: bool = False,
               beat: Callable[[], None] = lambda: None) -> str:
    """Copy a package of exactly ``size`` bytes off the media into ``dest`` (synced, renamed into
    place); its SHA-256. MediaRefused before anything is copied when its size differs; nothing
    is left behind when the copy fails."""
    fd, st = open_regular(source, follow_links)
    tmp = dest.with_name(dest.name + ".copy")
    try:
        if st.st_size != size:
            raise MediaRefused(f"{source}: {st.st_size} bytes on the media, the campaign signs {size}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with os.fdopen(os.dup(fd), "rb") as src, open(tmp, "wb") as out:
            left = size
            while left:
                chunk = src.read(min(CHUNK, left))
                if not chunk:
                    raise MediaRefused(f"{source}: shorter than its {size} bytes when read")
                digest.update(chunk)
                out.write(chunk)
                left -= len(chunk)
                beat()
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
        return digest.hexdigest()
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)


def _print(path: Path) -> tuple[Any, ...] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class MediaWatcher:
    """Looks at ``media`` every ``interval`` seconds in its own thread; ``look(media)`` is called
    when what is there changed since the last look (the campaign file, the packages directory or
    any file in it, up to ``max_entries`` of them)."""

    def __init__(self, media: Path, campaign_file: str, packages: str, look: Callable[[Path], None],
                 stop: threading.Event, interval: float = 1.0, beat: Callable[[], None] = lambda: None,
                 max_entries: int = 256) -> None:
        self.media, self.campaign_file, self.packages, self.look = media, campaign_file, packages, look
        self.stop, self.interval, self.beat, self.max_entries = stop, interval, beat, max_entries
        self._last: tuple[Any, ...] | None = None
        self.thread = threading.Thread(target=self._run, name="media", daemon=True)

    def fingerprint(self) -> tuple[Any, ...]:
        entries: list[Any] = []
        try:
            with os.scandir(self.media / self.packages) as it:
                for n, entry in enumerate(it):
                    if n >= self.max_entries:
                        break
                    entries.append((entry.name, _print(Path(entry.path))))
        except OSError:
            pass
        return _print(self.media / self.campaign_file), _print(self.media / self.packages), tuple(sorted(entries))

    def tick(self) -> bool:
        """Look once if anything changed; True when ``look`` was called."""
        now = self.fingerprint()
        if now == self._last:
            return False
        self._last = now
        if now[0] is None:
            return False  # nothing mounted, or no campaign on it
        self.look(self.media)
        return True

    def _run(self) -> None:
        while not self.stop.is_set():
            self.beat()
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - whatever a stick holds, the watcher goes on
                log.exception("looking at the media at %s failed", self.media)
            self.stop.wait(self.interval)
