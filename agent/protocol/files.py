"""The file-transfer protocol: how the TBOX deploys packages to the gateway and the gateway
stores owner content on an ECU (the same codecs on both links).

    38 01|03|06 LLLL path DFI(00) FSL size size   add / replace / resume a file
    38 02 LLLL path                                delete a file
    38 04 LLLL path 00                             read a file (results, traces, inventory)
    ->  78 mode 02 MMMM 00 [position:8]            MMMM: maxNumberOfBlockLength; ResumeFile adds where to go on
    ->  78 04 02 MMMM 00 0004 size:4 size:4        ReadFile: the file's size
    36 nn PPPPPPPP data                            one packet: block counter, packet id (4 bytes, big endian)
    36 nn  ->  76 nn data                          (reading) the next block of the file
    37 <32-byte SHA-256>                           end of file, digest to check (reading: 37 alone)

Every name on the link (packages, campaigns, content items, apps) matches ``NAME``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TypeGuard

from udsoncan.services import RequestFileTransfer

__all__ = ["NAME", "is_name", "Mode", "PACKET_HEADER", "packet_payload", "FileRequest", "parse_file_request",
           "file_transfer_response", "read_file_response", "DIGEST_LENGTH", "PARTIAL_SUFFIXES"]

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
PARTIAL_SUFFIXES = (".part", ".part.json", ".part.raw")  # a file still arriving, its sidecar, its unpacked copy
Mode = RequestFileTransfer.ModeOfOperation
PACKET_HEADER = 4  # deploy packet id, big endian, after SID and block counter
DIGEST_LENGTH = 32  # RequestTransferExit carries the file's SHA-256


def is_name(value: object) -> TypeGuard[str]:
    """A name allowed on the link: letters, digits and ``._+-``, at most 128, no leading dot."""
    return isinstance(value, str) and NAME.match(value) is not None


def packet_payload(max_block_length: int) -> int:
    """File bytes per data packet: the block minus SID, counter and packet id."""
    return max_block_length - 2 - PACKET_HEADER


@dataclass(frozen=True)
class FileRequest:
    mode: int
    path: str
    size: int | None  # the file's size (fileSizeUncompressed); None for delete and read
    dfi: int = 0  # dataFormatIdentifier: compression method (high nibble), encryption (low)
    packed: int | None = None  # fileSizeCompressed: the bytes TransferData carries


def parse_file_request(data: bytes) -> FileRequest | None:
    """A RequestFileTransfer's fields, or None when its layout is broken."""
    if len(data) < 4:
        return None
    mode, length = data[1], int.from_bytes(data[2:4], "big")
    if length == 0 or len(data) < 4 + length:
        return None
    try:
        path = data[4 : 4 + length].decode("ascii")
    except UnicodeDecodeError:
        return None
    rest = data[4 + length :]
    if mode == Mode.DeleteFile:
        return FileRequest(mode, path, None) if not rest else None
    if mode == Mode.ReadFile:
        return FileRequest(mode, path, None) if rest == b"\x00" else None
    if len(rest) < 2:
        return None
    dfi, width = rest[0], rest[1]  # dataFormatIdentifier, fileSizeParameterLength
    if not 1 <= width <= 8 or len(rest) != 2 + 2 * width:
        return None
    size, packed = int.from_bytes(rest[2 : 2 + width], "big"), int.from_bytes(rest[2 + width :], "big")
    return FileRequest(mode, path, size, dfi, packed)


def file_transfer_response(mode: int, max_block_length: int, position: int | None = None, dfi: int = 0) -> bytes:
    """Positive answer to add / replace / resume (with the position to go on from) / delete."""
    if mode == Mode.DeleteFile:
        return bytes((0x78, mode))
    head = bytes((0x78, mode, 0x02)) + max_block_length.to_bytes(2, "big") + bytes((dfi,))
    return head + (position or 0).to_bytes(8, "big") if mode == Mode.ResumeFile else head


def read_file_response(max_block_length: int, size: int) -> bytes:
    """Positive answer to ReadFile: block length, no compression, 4-byte sizes."""
    length = size.to_bytes(4, "big")
    return bytes((0x78, Mode.ReadFile, 0x02)) + max_block_length.to_bytes(2, "big") + b"\x00" + b"\x00\x04" + length + length
