"""Compressed transfer through RequestDownload's dataFormatIdentifier (ISO 14229-1): the high
nibble names the compression method, the low nibble the encryption method (0: none).

Which nibble means which method is OEM-defined, so it is per-ECU configuration
(``ecus.<name>.compression``: method -> nibble, in the order the gateway prefers them). The
methods are ones bootloaders really ship, from Python's standard library:

- ``zlib``: deflate in a zlib stream (RFC 1950, with its Adler-32), level 9;
- ``lzma``: LZMA in the ``.lzma`` ("alone") container of the LZMA SDK, preset 6 with a
  bounded dictionary (64 KiB by default: a bootloader decoding while it writes holds the
  whole dictionary in RAM; Python's default announces 8 MiB);
- ``lzss``: heatshrink's LZSS (window and lookahead as powers of two, 2^11 and 2^4 by
  default), the family small bootloaders decode in a few KiB of RAM. Its stream has no end
  marker: it ends when the announced size is out.

The ECU decompresses while it writes; memorySize announces the uncompressed image, and check
memory compares the decompressed image as without compression. What each method's decoder
holds in RAM: ``decoder_ram``.
"""

from __future__ import annotations

import lzma
import zlib
from dataclasses import dataclass
from typing import Iterable, Literal, Protocol

__all__ = ["METHODS", "Params", "compress", "Decompressor", "decompressor", "DecompressError", "named_by", "decoder_ram", "DEFAULT"]

METHODS = ("zlib", "lzma", "lzss")


@dataclass(frozen=True)
class Params:
    """How the methods that have parameters encode (the ECU's decoder must use the same)."""

    lzma_dict_size: int = 64 * 1024
    lzss_window_bits: int = 11
    lzss_lookahead_bits: int = 4


DEFAULT = Params()


def decoder_ram(method: str, params: Params = DEFAULT) -> int:
    """The bytes a streaming decoder of ``method`` holds (its window or dictionary, and state):
    zlib's inflate a 32 KiB window and about 7 KiB of tables; LZMA its dictionary and 2 bytes per
    probability (lc=3, lp=0: 7,990); heatshrink its window and its input buffer (32 bytes)."""
    if method == "zlib":
        return 32 * 1024 + 7 * 1024
    if method == "lzma":
        return params.lzma_dict_size + 2 * (1846 + 768 * 8)
    if method == "lzss":
        return (1 << params.lzss_window_bits) + 32
    raise ValueError(f"unknown compression method {method!r} (known: {', '.join(METHODS)})")


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


def compress(method: str, data: bytes, params: Params = DEFAULT) -> bytes:
    if method == "zlib":
        return zlib.compress(data, 9)
    if method == "lzma":
        return lzma.compress(data, format=lzma.FORMAT_ALONE, filters=[
            {"id": lzma.FILTER_LZMA1, "preset": 6, "dict_size": params.lzma_dict_size}])
    if method == "lzss":
        import heatshrink2

        return bytes(heatshrink2.compress(data, window_sz2=params.lzss_window_bits,
                                          lookahead_sz2=params.lzss_lookahead_bits))
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


class _Lzss:
    def __init__(self, size: int, params: Params) -> None:
        import heatshrink2.core as hs

        self._d = hs.Encoder(hs.Reader(window_sz2=params.lzss_window_bits, lookahead_sz2=params.lzss_lookahead_bits))
        self.size, self.out = size, 0

    def feed(self, data: bytes, limit: int) -> bytes:
        try:
            out = bytes(self._d.fill(data))
        except Exception as exc:  # noqa: BLE001 - the decoder's own errors: not an LZSS stream
            raise DecompressError(f"lzss: {exc}") from None
        self.out += len(out)
        return out

    @property
    def finished(self) -> bool:
        return self.out == self.size

    def close(self) -> None:
        pass


def decompressor(method: str, size: int = -1, params: Params = DEFAULT) -> Decompressor:
    """A streaming decoder; ``size``: the bytes it must make (LZSS streams end there)."""
    if method == "zlib":
        return _Zlib()
    if method == "lzma":
        return _Lzma()
    if method == "lzss":
        return _Lzss(size, params)
    raise ValueError(f"unknown compression method {method!r} (known: {', '.join(METHODS)})")
