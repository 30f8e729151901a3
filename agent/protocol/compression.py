"""Compressed transfer through RequestDownload's dataFormatIdentifier (ISO 14229-1): the high
nibble names the compression method, the low nibble the encryption method (0: none).

Which nibble means which method is OEM-defined, so it is per-ECU configuration
(``ecus.<name>.compression``: method -> nibble, in the order the gateway prefers them). The
methods are ones bootloaders really ship, from Python's standard library:

- ``zlib``: deflate in a zlib stream (RFC 1950, with its Adler-32), level 9;
- ``lzma``: LZMA in the ``.lzma`` ("alone") container of the LZMA SDK, preset 6.

The ECU decompresses while it writes; memorySize announces the uncompressed image, and check
memory compares the decompressed image as without compression.
"""

from __future__ import annotations

import lzma
import zlib
from typing import Iterable, Literal, Protocol

__all__ = ["METHODS", "compress", "Decompressor", "decompressor", "DecompressError", "named_by"]

METHODS = ("zlib", "lzma")


class DecompressError(ValueError):
    """The stream is not what the method produces (corrupted, truncated, another method)."""


class Decompressor(Protocol):
    def feed(self, data: bytes, limit: int) -> bytes:
        """The output for ``data``; at most ``limit`` bytes (more: the stream is longer than announced)."""

    @property
    def finished(self) -> bool:
        """The stream ended (its end marker and check were read)."""

    def close(self) -> None:
        """The download is over (or abandoned): let go of what it held."""


def named_by(identifier: int, accepted: Iterable[tuple[str, int]]) -> str | None | Literal[False]:
    """The compression method a dataFormatIdentifier names among the ``accepted`` (method,
    nibble) pairs: None for no compression; False when the receiver does not take it (an
    encryption method, or a compression it does not know), which it answers with NRC 0x31."""
    if identifier & 0x0F:
        return False  # no encryption method is supported
    if identifier == 0:
        return None
    return next((method for method, nibble in accepted if nibble == identifier >> 4), False)


def compress(method: str, data: bytes) -> bytes:
    if method == "zlib":
        return zlib.compress(data, 9)
    if method == "lzma":
        return lzma.compress(data, format=lzma.FORMAT_ALONE, preset=6)
    raise ValueError(f"unknown compression method {method!r} (known: {', '.join(METHODS)})")


class _Zlib:
    def __init__(self) -> None:
        self._d = zlib.decompressobj()

    def feed(self, data: bytes, limit: int) -> bytes:
        try:
            out = self._d.decompress(data, limit + 1)
        except zlib.error as exc:
            raise DecompressError(f"zlib: {exc}") from None
        if self._d.unconsumed_tail:
            return out + b"\0"  # more output than the limit: the caller sees it is too long
        return out

    @property
    def finished(self) -> bool:
        return self._d.eof

    def close(self) -> None:
        pass


class _Lzma:
    def __init__(self) -> None:
        self._d = lzma.LZMADecompressor(format=lzma.FORMAT_ALONE)

    def feed(self, data: bytes, limit: int) -> bytes:
        try:
            out = self._d.decompress(data, limit + 1)
        except lzma.LZMAError as exc:
            raise DecompressError(f"lzma: {exc}") from None
        except EOFError:
            raise DecompressError("lzma: data after the end of the stream") from None
        return out

    @property
    def finished(self) -> bool:
        return self._d.eof

    def close(self) -> None:
        pass


def decompressor(method: str) -> Decompressor:
    if method == "zlib":
        return _Zlib()
    if method == "lzma":
        return _Lzma()
    raise ValueError(f"unknown compression method {method!r} (known: {', '.join(METHODS)})")
