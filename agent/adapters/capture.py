"""Standard CAN captures beside the header-only traces: every frame a process sends and receives
on each of its segments, written by python-can's writers in a format the field's tools open
(BLF: CANalyzer, CANoe, SavvyCAN, Wireshark with its plug-in; ASC; candump's log format).

Off unless a command is given ``--capture DIR``; then each segment the process opens writes
``DIR/<process>-<segment>.<format>``, one file per segment for the life of the process (a
segment closed and opened again goes on in the same file), appended to when the file is there
from an earlier run (BLF, candump log; an ASC file from before becomes ``.1``). The settings
reach the processes a command spawns through ``VOTA_CAPTURE`` (the gateway's flash workers
write ``gw-flash-<segment>``). Frames carry their epoch timestamps (the time a frame was
handed to the bus or received), the clock the traces' ``started`` and ``t`` use, so a trace
line is found in the capture by its time. Bounded: when a file passes half of ``max_bytes`` it
becomes ``<name>.1.<format>`` (replacing the one before) and a new file starts, so the two
never hold more than ``max_bytes`` together. python-can's writers buffer (BLF in compressed
containers of up to 128 KiB): a process killed with SIGKILL loses the frames not yet written.
"""

from __future__ import annotations

import atexit
import collections
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import can

from agent.errors import UsageError

__all__ = ["FORMATS", "Capture", "CaptureSettings", "configure", "inherit", "open_capture", "close_all"]

log = logging.getLogger(__name__)

FORMATS = {"blf": ".blf", "asc": ".asc", "log": ".log"}  # log: candump -L, what canplayer replays


@dataclass(frozen=True)
class CaptureSettings:
    directory: Path
    process: str
    format: str = "blf"
    max_bytes: int = 64 * 1024 * 1024


_settings: CaptureSettings | None = None
_open: dict[str, "Capture"] = {}  # segment name -> its capture, open until the process ends
_open_lock = threading.Lock()
ENV = "VOTA_CAPTURE"


def configure(directory: str | os.PathLike[str] | None, process: str, fmt: str = "blf", max_mib: float = 64) -> None:
    """Capture the frames of every segment this process (and the processes it spawns) opens
    from now on (None: none)."""
    global _settings
    if directory is None:
        _settings = None
        os.environ.pop(ENV, None)
        return
    if fmt not in FORMATS:
        raise UsageError(f"--capture-format must be one of {', '.join(FORMATS)}")
    if not 0 < max_mib <= 1 << 20:
        raise UsageError("--capture-max-mib must be above 0")
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--capture {path}: cannot create the directory ({exc.strerror})") from None
    if not os.access(path, os.W_OK):
        raise UsageError(f"--capture {path}: not writable")
    _settings = CaptureSettings(path.resolve(), process, fmt, int(max_mib * 1024 * 1024))
    os.environ[ENV] = json.dumps({"directory": str(_settings.directory), "process": process, "format": fmt,
                                  "max_bytes": _settings.max_bytes})


def inherit(role: str) -> None:
    """In a process spawned by one that captures: capture too, as ``<its process>-<role>``."""
    global _settings
    try:
        doc = json.loads(os.environ.get(ENV) or "null")
        if isinstance(doc, dict):
            _settings = CaptureSettings(Path(doc["directory"]), f"{doc['process']}-{role}", doc["format"],
                                        int(doc["max_bytes"]))
    except (ValueError, KeyError, TypeError):
        log.warning("%s is not a capture setting: no capture", ENV)


def open_capture(segment: str, echoes: bool = False) -> "Capture | None":
    """The capture of one segment of this process, when captures are on (one per segment, for the
    life of the process). ``echoes``: the bus hands this process its own frames back
    (udp_multicast): they are recorded once, as sent."""
    s = _settings
    if s is None:
        return None
    with _open_lock:
        capture = _open.get(segment)
        if capture is None:
            if not _open:
                atexit.register(close_all)
            capture = _open[segment] = Capture(s.directory, f"{s.process}-{segment}", s.format, s.max_bytes, segment,
                                               echoes)
        return capture


def close_all() -> None:
    """Every capture of this process, closed (its last frames written)."""
    with _open_lock:
        for capture in _open.values():
            capture.close()
        _open.clear()


class Capture:
    """One segment's frames, both directions, into one file (rotated once, see the module)."""

    CHECK_EVERY = 256  # frames between size checks

    def __init__(self, directory: Path, name: str, fmt: str, max_bytes: int, channel: str, echoes: bool = False) -> None:
        suffix = FORMATS[fmt]
        # the frames sent and not yet seen back, per CAN id, when the bus echoes them
        self._echoes: dict[int, collections.deque[bytes]] | None = {} if echoes else None
        self._last = 0.0  # timestamps never go back (ASC stores them relative to the first)
        self.path, self.older = directory / f"{name}{suffix}", directory / f"{name}.1{suffix}"
        self.max_bytes, self.channel = max_bytes, channel
        self.frames = 0
        self._lock = threading.Lock()
        self._closed = False
        self._flushed = time.monotonic()
        self._writer: Any = self._open(resume=True)

    def _open(self, resume: bool = False) -> Any:
        """A writer on ``path``: appended to when ``resume`` and the format can (BLF, candump log),
        else a file from before becomes the older one."""
        if resume and self.path.exists():
            if self.path.suffix in (".blf", ".log"):
                try:
                    return can.Logger(str(self.path), append=True)
                except (OSError, ValueError, can.CanError) as exc:  # cut short by a kill: kept as the older file
                    log.warning("capture %s cannot be appended to (%s): started anew", self.path, exc)
            os.replace(self.path, self.older)
        return can.Logger(str(self.path))

    def _size(self) -> int:
        size = getattr(self._writer, "file_size", None)
        try:
            return int(size()) if callable(size) else self.path.stat().st_size
        except (OSError, ValueError):
            return 0

    def frame(self, msg: can.Message, received: bool) -> None:
        """Record one frame (received: from the bus; else sent by this process)."""
        data = bytes(msg.data)
        with self._lock:
            if self._echoes is not None:
                pending = self._echoes.get(msg.arbitration_id)
                if not received:
                    self._echoes.setdefault(msg.arbitration_id, collections.deque(maxlen=1024)).append(data)
                elif pending and pending[0] == data:
                    pending.popleft()  # this process's own frame, back from the bus
                    return
            stamp = max(self._last, msg.timestamp if received and msg.timestamp else time.time())
            self._last = stamp
            self._write(msg, data, stamp, received)

    def _write(self, msg: can.Message, data: bytes, stamp: float, received: bool) -> None:
        copy = can.Message(timestamp=stamp,
                           arbitration_id=msg.arbitration_id, is_extended_id=msg.is_extended_id, is_fd=msg.is_fd,
                           bitrate_switch=msg.bitrate_switch, is_error_frame=msg.is_error_frame,
                           is_remote_frame=msg.is_remote_frame, dlc=msg.dlc, data=data, is_rx=received,
                           channel=self.channel)
        if self._closed:
            return
        try:
            self._writer.on_message_received(copy)
            self.frames += 1
            if self.frames % self.CHECK_EVERY == 0:
                self._check()
        except (OSError, ValueError) as exc:  # a full disk: the capture stops, the process goes on
            log.warning("capture %s stopped: %s", self.path, exc)
            self._close()

    def _check(self) -> None:
        if self._size() > self.max_bytes // 2:
            self._writer.stop()
            os.replace(self.path, self.older)
            self._writer = self._open()
        elif time.monotonic() - self._flushed > 1.0:  # text formats: whole lines on disk within a second
            self._flushed = time.monotonic()
            flush = getattr(getattr(self._writer, "file", None), "flush", None)
            if callable(flush) and not self.path.suffix == ".blf":
                flush()

    def _close(self) -> None:
        self._closed = True
        try:
            self._writer.stop()
        except (OSError, ValueError):
            log.debug("capture %s: closing failed", self.path, exc_info=True)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._close()
