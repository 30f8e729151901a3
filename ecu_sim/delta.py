"""Delta images applied as they arrive (``agent/protocol/delta.py`` says what a delta is): the
simulated bootloader writes the new image while the patch's blocks come in, never holding the
patch or the image whole. detools' applier pulls its input; it runs in a thread of its own that
waits for each block."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import BinaryIO

from agent.protocol.compression import DecompressError
from agent.protocol.delta import PATCH_COMPRESSION, DeltaError

__all__ = ["DeltaApplier"]


class _Patch:
    """The patch as detools reads it: a read blocks until the next block has arrived."""

    def __init__(self, cond: threading.Condition) -> None:
        self.cond = cond
        self.buf = bytearray()
        self.closed = False
        self.waiting = False  # the applier wants more than has arrived

    def read(self, size: int = -1) -> bytes:
        with self.cond:
            while not self.buf and not self.closed:
                self.waiting = True
                self.cond.notify_all()
                self.cond.wait()
            self.waiting = False
            n = len(self.buf) if size < 0 else min(size, len(self.buf))
            data = bytes(self.buf[:n])
            del self.buf[:n]
            return data


class _Overflow(Exception):
    """The patch makes more than the memory the download announced: the applier stops there."""


class _Image:
    """The new image as the applier writes it, never more than ``room`` bytes past what was
    handed on: a patch that claims a far larger image stops at once, not after writing it."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.room: int | None = None  # bytes it may still write (the announced size left, plus one to tell)

    def write(self, data: bytes) -> int:
        if self.room is not None:
            if len(data) > self.room:
                self.parts.append(bytes(data[: self.room]))
                self.room = 0
                raise _Overflow()
            self.room -= len(data)
        self.parts.append(bytes(data))
        return len(data)


class DeltaApplier:
    """Applies a patch pushed block by block (the ``Decompressor`` protocol of
    ``agent/protocol/compression.py``): ``feed`` returns the new image's bytes that block made.

    detools' applier pulls its input; it runs in a thread of its own that waits for each block,
    so the new image is written while the patch arrives, never held whole. ``base`` is the old
    image (a path: opened here and closed by ``close``)."""

    def __init__(self, base: str | Path | BinaryIO) -> None:
        self._cond = threading.Condition()
        self._patch = _Patch(self._cond)
        self._image = _Image()
        self._own = isinstance(base, (str, Path))
        self._base: BinaryIO = open(base, "rb") if isinstance(base, (str, Path)) else base  # noqa: SIM115
        self._done = False
        self._error: str | None = None
        self._overflow = False
        self._thread = threading.Thread(target=self._run, name="delta", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from detools.apply import apply_patch_sequential  # noqa: PLC0415
        from detools.common import COMPRESSION_LZMA, PATCH_TYPE_SEQUENTIAL  # noqa: PLC0415

        try:
            head = self._patch.read(1)
            # the type and compression this project makes; the others detools reads need the
            # whole patch at once (its length), which a bootloader receiving blocks has not
            if len(head) != 1 or (head[0] >> 4) & 7 != PATCH_TYPE_SEQUENTIAL or head[0] & 0x0F != COMPRESSION_LZMA:
                raise DeltaError(f"not a sequential {PATCH_COMPRESSION} patch (header {head.hex() or 'missing'})")
            self._patch.buf[:0] = head  # give it back: detools reads the header itself
            apply_patch_sequential(self._base, self._patch, self._image)
        except _Overflow:
            self._overflow = True  # what it wrote up to the limit is handed on: the caller refuses it (too long)
        except Exception as exc:  # noqa: BLE001 - whatever a damaged patch makes detools raise is this patch's fault
            self._error = f"{exc}" or type(exc).__name__
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def feed(self, data: bytes, limit: int) -> bytes:
        with self._cond:
            if self._overflow:
                return b"\0" * (limit + 1)  # it went on past the announced size: too long, whatever comes
            if self._done and data:
                if self._error is None:
                    raise DecompressError("delta: data after the end of the patch")
            self._patch.buf += data
            self._image.room = limit + 1  # one byte past the announced size tells the caller
            self._cond.notify_all()
            while not self._done and not (self._patch.waiting and not self._patch.buf):
                self._cond.wait()
            out = b"".join(self._image.parts)
            self._image.parts.clear()
            if self._error is not None:
                raise DecompressError(f"delta: {self._error}")
        return out if len(out) <= limit else out[: limit + 1]

    @property
    def finished(self) -> bool:
        """The patch ended (its whole image written, its end marker read)."""
        return self._done and self._error is None

    def close(self) -> None:
        with self._cond:
            self._patch.closed = True
            self._cond.notify_all()
        self._thread.join(timeout=5.0)
        if self._own:
            self._base.close()
