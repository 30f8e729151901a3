"""Package download over HTTP: byte-range resume, size and SHA-256 enforced as it arrives.

The package grows in ``<dest>.part``; only a complete, verified package is renamed to
``dest``. A server that sends more than the declared size is cut off; an interrupted
download resumes with ``Range: bytes=N-`` from what is already on disk.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from agent.adapters.storage import fsync_dir
from agent.errors import TryLater, VotaError

__all__ = ["DownloadError", "DownloadInterrupted", "download", "DownloadInfo"]

CHUNK = 64 * 1024


class DownloadError(VotaError):
    """The package cannot be had as declared (404, wrong content): final, with ``reason``
    ``too_large`` or ``digest_mismatch`` when the content is not what was declared."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        self.reason = reason
        super().__init__(message)


class DownloadInterrupted(DownloadError, TryLater):
    """The network or the server failed on the way: the download resumes later."""


@dataclass
class DownloadInfo:
    resumed_from: int
    downloaded: int


def _partial_digest(part: Path, size: int) -> tuple[int, "hashlib._Hash"]:
    digest = hashlib.sha256()
    have = part.stat().st_size if part.exists() else 0
    if have > size:  # more than the package can hold: start again
        part.unlink()
        have = 0
    if have:
        with open(part, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return have, digest


def download(
    url: str,
    dest: str | Path,
    size: int,
    sha256: str,
    *,
    progress: Callable[[int, int], None] | None = None,
    timeout: float = 30.0,
    should_stop: Callable[[], bool] | None = None,
    min_rate: float = 0.0,
    rate_window_s: float = 60.0,
    max_time_s: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    ca: str | None = None,
) -> DownloadInfo:
    """Download ``url`` to ``dest``, resuming ``<dest>.part``. Slow retrieval is cut off: a
    transfer below ``min_rate`` bytes/s over any ``rate_window_s``, or one attempt longer than
    ``max_time_s``, is interrupted (what arrived stays for the next attempt's range request).
    ``https``: the server's certificate is checked against ``ca`` (the system's CAs without it);
    the declared SHA-256 stays the authority over what is taken."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    if dest.exists():
        return DownloadInfo(size, 0)  # already downloaded and verified
    have, digest = _partial_digest(part, size)
    resumed_from = have
    if have < size:
        with _open(url, part, have, timeout, _tls(ca)) as response:
            if have and response.status != 206:
                have, digest, resumed_from = 0, hashlib.sha256(), 0  # no range support: whole file again
            limits = _Limits(should_stop, min_rate, rate_window_s, max_time_s, clock)
            have = _receive(url, response, part, have, size, digest, limits, progress)
        if have < size:
            raise DownloadInterrupted(f"{url}: connection closed at byte {have} of {size}")
    if digest.hexdigest() != sha256:
        part.unlink(missing_ok=True)
        raise DownloadError(f"{url}: SHA-256 {digest.hexdigest()} does not match the declared {sha256}", "digest_mismatch")
    os.replace(part, dest)
    fsync_dir(dest.parent)
    return DownloadInfo(resumed_from, size - resumed_from)


def _tls(ca: str | None) -> ssl.SSLContext | None:
    if ca is None:
        return None
    try:
        return ssl.create_default_context(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise DownloadError(f"the package CA {ca} cannot be used ({exc})") from None


def _open(url: str, part: Path, have: int, timeout: float, context: ssl.SSLContext | None) -> Any:
    """The HTTP response for the rest of the file from byte ``have`` (a range request)."""
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        return urllib.request.urlopen(request, timeout=timeout, context=context)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the server says there is nothing after `have`
            part.unlink(missing_ok=True)
            raise DownloadInterrupted(f"{url}: server refused the range from byte {have}; starting over") from None
        if exc.code >= 500:
            raise DownloadInterrupted(f"{url}: HTTP {exc.code} {exc.reason}") from None
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise DownloadInterrupted(f"{url}: {getattr(exc, 'reason', exc)}") from None


@dataclass(frozen=True)
class _Limits:
    should_stop: Callable[[], bool] | None
    min_rate: float
    rate_window_s: float
    max_time_s: float | None
    clock: Callable[[], float]


def _receive(url: str, response: Any, part: Path, have: int, size: int, digest: Any, limits: _Limits,
             progress: Callable[[int, int], None] | None) -> int:
    """What arrives, appended to ``part`` (synced whatever happens) and hashed; the bytes held now."""
    started = window_at = limits.clock()
    window_have = have
    with open(part, "ab" if have else "wb") as out:
        try:
            while True:
                if limits.should_stop is not None and limits.should_stop():
                    raise DownloadInterrupted(f"{url}: stopped")
                now = limits.clock()
                if limits.max_time_s is not None and now - started > limits.max_time_s:
                    raise DownloadInterrupted(f"{url}: not complete after {limits.max_time_s:.0f} s (at byte {have})")
                if now - window_at >= limits.rate_window_s:
                    rate = (have - window_have) / (now - window_at)
                    if rate < limits.min_rate:
                        raise DownloadInterrupted(f"{url}: {rate:.0f} bytes/s over {now - window_at:.0f} s, "
                                                  f"below the minimum {limits.min_rate:.0f} (slow retrieval)")
                    window_at, window_have = now, have
                chunk = response.read1(CHUNK)  # what has arrived: a trickle cannot hold a read for ever
                if not chunk:
                    return have
                if have + len(chunk) > size:
                    out.write(chunk[: size - have])
                    out.flush()
                    part.unlink(missing_ok=True)
                    raise DownloadError(f"{url}: the server sent more than the declared {size} bytes", "too_large")
                out.write(chunk)
                digest.update(chunk)
                have += len(chunk)
                if progress is not None:
                    progress(have, size)
        except (OSError, urllib.error.URLError, http.client.HTTPException) as exc:
            out.flush()
            raise DownloadInterrupted(f"{url}: interrupted at byte {have} ({exc})") from None
        finally:
            out.flush()
            os.fsync(out.fileno())


def take_verified(source: Path, dest: str | Path, size: int, sha256: str, *,
                  progress: Callable[[int, int], None] | None = None) -> DownloadInfo:
    """A package that came on removable media (``tbox/offline.py``), taken as a download is:
    the declared size and SHA-256 enforced before it becomes ``dest``."""
    dest = Path(dest)
    try:
        have = source.stat().st_size
    except OSError as exc:
        raise DownloadError(f"{source.name}: not among the packages that came on the media ({exc.strerror})") from None
    if have != size:
        raise DownloadError(f"{source.name}: {have} bytes on the media, the campaign declares {size}",
                            "too_large" if have > size else "digest_mismatch")
    digest = hashlib.sha256()
    with open(source, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != sha256:
        raise DownloadError(f"{source.name}: SHA-256 {digest.hexdigest()} does not match the declared {sha256}",
                            "digest_mismatch")
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(source, dest)  # the copy off the media, on the same file system
    fsync_dir(dest.parent)
    if progress is not None:
        progress(size, size)
    return DownloadInfo(0, size)
