"""ECU software as it is delivered (docs/flash-profiles.md#image-containers): Intel HEX and
Motorola S-record files (read by bincopy, every record's checksum checked), VBF files (the
header, the erase list, blocks of address, length, data and CRC-16, the file checksum), or a
raw binary. ``read_image`` gives the memory segments to program, block by block, or ImageError
naming what is wrong before anything is erased.
"""

from __future__ import annotations

import binascii
import re
import zlib
from dataclasses import dataclass, field

from agent.errors import VotaError

__all__ = ["ImageError", "ImageFile", "read_image", "sniff", "write_vbf", "vbf_crc16"]


class ImageError(VotaError):
    """An image file that cannot be programmed: its format, a checksum, an overlap."""


@dataclass(frozen=True)
class ImageFile:
    format: str  # binary | ihex | srec | vbf
    segments: tuple[tuple[int, bytes], ...] = ()  # (address, bytes); empty for a raw binary
    header: dict[str, str] = field(default_factory=dict)  # VBF: its header's fields as written
    erase: tuple[tuple[int, int], ...] = ()  # VBF: the ranges its header says to erase

    @property
    def size(self) -> int:
        return sum(len(d) for _, d in self.segments)


def vbf_crc16(data: bytes) -> int:
    """The block checksum of VBF: CRC-16/CCITT-FALSE."""
    return binascii.crc_hqx(data, 0xFFFF)


def sniff(head: bytes) -> str:
    """The format the first bytes of a file announce: vbf, ihex, srec or binary."""
    start = head[:32].lstrip()
    if start.startswith(b"vbf_version"):
        return "vbf"
    if not _text(head[:4096]):
        return "binary"
    if re.match(rb":[0-9A-Fa-f]{10}", start):
        return "ihex"
    if re.match(rb"S[0-9][0-9A-Fa-f]{6}", start):
        return "srec"
    return "binary"


def read_image(data: bytes, name: str = "<image>") -> ImageFile:
    """The image in ``data`` (its format told by its first bytes)."""
    kind = sniff(data)
    if kind == "vbf":
        return _vbf(data, name)
    if kind in ("ihex", "srec") and _text(data):
        return _bincopy(data, name, kind)
    return ImageFile("binary")


def _text(data: bytes) -> bool:
    try:
        data.decode("ascii")
    except UnicodeDecodeError:
        return False
    return True


def _bincopy(data: bytes, name: str, kind: str) -> ImageFile:
    import bincopy

    f = bincopy.BinFile()
    try:
        (f.add_ihex if kind == "ihex" else f.add_srec)(data.decode("ascii"))
    except (bincopy.Error, ValueError, IndexError) as exc:
        raise ImageError(f"{name}: not a valid {'Intel HEX' if kind == 'ihex' else 'S-record'} file: {exc}") from None
    segments = tuple((int(s.minimum_address), bytes(s.data)) for s in f.segments)
    if not segments:
        raise ImageError(f"{name}: no data records")
    return ImageFile(kind, segments)


_FIELD = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*;\s*$", re.S)
_PAIR = re.compile(r"\{\s*(0x[0-9A-Fa-f]+|\d+)\s*,\s*(0x[0-9A-Fa-f]+|\d+)\s*\}")


def _vbf_header(data: bytes, name: str) -> tuple[str, int]:
    """The header's text and where the binary blocks begin (after its closing brace)."""
    found = re.search(rb"\bheader\s*\{", data[:65536])
    if found is None:
        raise ImageError(f"{name}: VBF without a header {{...}}")
    brace = found.end() - 1
    depth, i, quoted = 0, brace, False
    while i < len(data):
        c = data[i : i + 1]
        if quoted:
            quoted = c != b'"'
        elif c == b'"':
            quoted = True
        elif data[i : i + 2] == b"//":
            i = data.find(b"\n", i)
            if i < 0:
                break
        elif data[i : i + 2] == b"/*":
            i = data.find(b"*/", i) + 1
            if i <= 0:
                break
        elif c == b"{":
            depth += 1
        elif c == b"}":
            depth -= 1
            if depth == 0:
                return data[brace + 1 : i].decode("latin-1"), i + 1
        i += 1
    raise ImageError(f"{name}: VBF header is not closed")


def _vbf_fields(text: str) -> dict[str, str]:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    fields: dict[str, str] = {}
    for statement in re.findall(r"[^;]*;", text):
        m = _FIELD.match(statement)
        if m:
            fields[m.group(1)] = m.group(2).strip().strip('"')
    return fields


def _number(text: str) -> int:
    """``0x...`` in hex, else decimal (leading zeros allowed)."""
    return int(text[2:], 16) if text[:2].lower() == "0x" else int(text, 10)


def _vbf(data: bytes, name: str) -> ImageFile:
    text, at = _vbf_header(data, name)
    fields = _vbf_fields(text)
    body = data[at:]
    segments: list[tuple[int, bytes]] = []
    i = 0
    while i < len(body):
        if len(body) - i < 10:
            raise ImageError(f"{name}: VBF block {len(segments)} is truncated at byte {at + i}")
        address, length = int.from_bytes(body[i : i + 4], "big"), int.from_bytes(body[i + 4 : i + 8], "big")
        if len(body) - i < 10 + length:
            raise ImageError(f"{name}: VBF block {len(segments)} at 0x{address:X} announces {length} bytes; the file ends first")
        chunk = body[i + 8 : i + 8 + length]
        crc = int.from_bytes(body[i + 8 + length : i + 10 + length], "big")
        if vbf_crc16(chunk) != crc:
            raise ImageError(f"{name}: VBF block {len(segments)} at 0x{address:X}: checksum 0x{vbf_crc16(chunk):04X}, "
                             f"the file says 0x{crc:04X}")
        segments.append((address, chunk))
        i += 10 + length
    if not segments:
        raise ImageError(f"{name}: VBF without data blocks")
    if "file_checksum" in fields:  # after the blocks: a damaged block is named as such
        try:
            want = _number(fields["file_checksum"])
        except ValueError:
            raise ImageError(f"{name}: VBF file_checksum {fields['file_checksum']!r} is not a number") from None
        if zlib.crc32(body) != want:
            raise ImageError(f"{name}: VBF file checksum 0x{zlib.crc32(body):08X} is not the header's 0x{want:08X}")
    erase = tuple((_number(a), _number(s)) for a, s in _PAIR.findall(fields.get("erase", "")))
    return ImageFile("vbf", tuple(segments), fields, erase)


def write_vbf(segments: list[tuple[int, bytes]], part_number: str, part_type: str = "EXE",
              erase: list[tuple[int, int]] | None = None) -> bytes:
    """A VBF file of ``segments`` (for tests, benchmarks and bench tooling)."""
    body = b"".join(a.to_bytes(4, "big") + len(d).to_bytes(4, "big") + d + vbf_crc16(d).to_bytes(2, "big")
                    for a, d in segments)
    ranges = ", ".join(f"{{0x{a:08X}, 0x{s:08X}}}" for a, s in (erase or [(a, len(d)) for a, d in segments]))
    header = (f'vbf_version = 2.6;\nheader {{\n    // written by vota\n    sw_part_number = "{part_number}";\n'
              f"    sw_part_type = {part_type};\n    data_format_identifier = 0x00;\n    erase = {{{ranges}}};\n"
              f"    file_checksum = 0x{zlib.crc32(body):08X};\n}}")
    return header.encode("ascii") + body
