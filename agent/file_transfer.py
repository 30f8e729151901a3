"""Receiving and handing out files over UDS, shared by the gateway's deploy server and the
ECU simulators' content store: RequestFileTransfer (0x38) Add/Replace/Resume/Delete/Read,
TransferData (0x36) with a block counter and a 4-byte packet id, RequestTransferExit
(0x37) with the file's SHA-256. A file grows in ``<name>.part`` and is renamed into place
only when complete and verified; a partial file resumes from its last whole packet.

Each handler is a pure function of (file store, request) -> response bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from agent.storage import atomic_write_json, fsync_dir
from agent.uds_server import BlockCounter, Nrc, Request, negative

__all__ = ["FileStore", "PACKET_HEADER", "packet_payload", "request_file_transfer", "transfer_data", "transfer_exit",
           "NAME"]

log = logging.getLogger(__name__)

PACKET_HEADER = 4  # deploy packet id, big endian, after SID and block counter
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
_NAME = NAME


def packet_payload(max_block_length: int) -> int:
    """Package bytes per deploy data packet: the block minus SID, counter and packet id."""
    return max_block_length - 2 - PACKET_HEADER


@dataclass
class _Transfer:
    name: str
    size: int
    handle: object
    received: int = 0
    counter: BlockCounter = field(default_factory=BlockCounter)
    digest: "hashlib._Hash" = field(default_factory=hashlib.sha256)


@dataclass
class _Upload:
    """A file the TBOX reads back (ReadFile): flash results, traces, the inventory."""

    name: str
    data: bytes
    offset: int = 0
    counter: BlockCounter = field(default_factory=BlockCounter)
    last_block: bytes = b""


@dataclass
class FileStore:
    """Where files arrive (``dir``) and which directory ReadFile may serve (``readable``)."""

    dir: Path
    max_block_length: int
    readable: Path | None = None
    transfer: _Transfer | None = None
    upload: _Upload | None = None
    accepted: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def busy(self) -> bool:
        return self.transfer is not None or self.upload is not None

    @property
    def payload(self) -> int:
        return packet_payload(self.max_block_length)

    @property
    def results(self) -> Path:
        return self.readable if self.readable is not None else self.dir

    def abort(self) -> None:
        """Stop transferring; a partial file stays on disk for ResumeFile."""
        self.upload = None
        if self.transfer is not None:
            self.transfer.handle.close()  # type: ignore[attr-defined]
            self.transfer = None

    def path(self, name: str) -> Path:
        return self.dir / name

    def part(self, name: str) -> Path:
        return self.dir / f"{name}.part"

    def sidecar(self, name: str) -> Path:
        return self.dir / f"{name}.part.json"


def _parse_file_request(data: bytes) -> tuple[int, str, int | None] | None:
    """(mode, path, size) of a RequestFileTransfer, or None when malformed."""
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
    if mode == 0x02:
        return (mode, path, None) if not rest else None
    if mode == 0x04:
        return (mode, path, None) if rest == b"\x00" else None
    if len(rest) < 2 or rest[0] != 0x00:  # dataFormatIdentifier: no compression/encryption
        return None
    width = rest[1]
    if not 1 <= width <= 8 or len(rest) != 2 + 2 * width:
        return None
    size = int.from_bytes(rest[2 : 2 + width], "big")
    return mode, path, size


def request_file_transfer(s: FileStore, r: Request) -> bytes:
    if len(r.data) < 2:
        return negative(0x38, Nrc.INCORRECT_LENGTH)
    mode = r.data[1]
    if mode not in (0x01, 0x02, 0x03, 0x04, 0x06):
        return negative(0x38, Nrc.OUT_OF_RANGE)
    parsed = _parse_file_request(r.data)
    if parsed is None:
        return negative(0x38, Nrc.INCORRECT_LENGTH)
    _, name, size = parsed
    if mode == 0x04:
        return _read_file(s, name)
    if not _NAME.match(name) or name.endswith((".part", ".part.json")):
        return negative(0x38, Nrc.OUT_OF_RANGE)
    if s.transfer is not None:
        return negative(0x38, Nrc.CONDITIONS_NOT_CORRECT)
    if mode == 0x02:
        for p in (s.path(name), s.part(name), s.sidecar(name)):
            p.unlink(missing_ok=True)
        return b"\x78\x02"
    assert size is not None
    if size == 0:
        return negative(0x38, Nrc.OUT_OF_RANGE)
    if mode == 0x01 and s.path(name).exists():
        return negative(0x38, Nrc.CONDITIONS_NOT_CORRECT)  # AddFile of a package already accepted
    position = 0
    if mode == 0x06:
        position = _resume_position(s, name, size)
    else:
        atomic_write_json(s.sidecar(name), {"name": name, "size": size})
        with open(s.part(name), "wb"):
            pass
    handle = open(s.part(name), "r+b")
    handle.truncate(position)
    transfer = _Transfer(name, size, handle, received=position)
    if position:
        handle.seek(0)
        transfer.digest.update(handle.read(position))
    s.transfer = transfer
    block = s.max_block_length.to_bytes(2, "big")
    head = bytes((0x78, mode, 0x02)) + block + b"\x00"
    return head + position.to_bytes(8, "big") if mode == 0x06 else head


def _resume_position(s: FileStore, name: str, size: int) -> int:
    """Bytes of whole packets already stored for this file (0: start afresh)."""
    try:
        meta = json.loads(s.sidecar(name).read_text())
        have = s.part(name).stat().st_size
    except (OSError, ValueError):
        meta, have = None, 0
    if not meta or meta.get("size") != size:
        atomic_write_json(s.sidecar(name), {"name": name, "size": size})
        with open(s.part(name), "wb"):
            pass
        return 0
    return min(have, size) // s.payload * s.payload


def _read_file(s: FileStore, path: str) -> bytes:
    parts = path.split("/")
    if not 1 <= len(parts) <= 2 or not all(_NAME.match(p) for p in parts):
        return negative(0x38, Nrc.OUT_OF_RANGE)
    if s.transfer is not None or s.upload is not None:
        return negative(0x38, Nrc.CONDITIONS_NOT_CORRECT)
    try:
        data = (s.results / path).read_bytes()
    except OSError:
        return negative(0x38, Nrc.OUT_OF_RANGE)
    s.upload = _Upload(path, data)
    size = len(data).to_bytes(4, "big")
    return bytes((0x78, 0x04, 0x02)) + s.max_block_length.to_bytes(2, "big") + b"\x00" + b"\x00\x04" + size + size


def _send_block(s: FileStore, r: Request) -> bytes:
    u = s.upload
    assert u is not None
    if len(r.data) != 2:
        return negative(0x36, Nrc.INCORRECT_LENGTH)
    counter = r.data[1]
    kind = u.counter.classify(counter)
    if kind == "repeat":
        return bytes((0x76, counter)) + u.last_block
    if kind == "wrong":
        return negative(0x36, Nrc.WRONG_BLOCK_SEQUENCE_COUNTER)
    if u.offset >= len(u.data):
        return negative(0x36, Nrc.REQUEST_SEQUENCE_ERROR)  # nothing left to read
    room = s.max_block_length - 2
    u.last_block = u.data[u.offset : u.offset + room]
    u.offset += len(u.last_block)
    u.counter.accept(counter)
    return bytes((0x76, counter)) + u.last_block


def transfer_data(s: FileStore, r: Request) -> bytes:
    if s.upload is not None:
        return _send_block(s, r)
    t = s.transfer
    if t is None:
        return negative(0x36, Nrc.REQUEST_SEQUENCE_ERROR)
    if len(r.data) < 2 + PACKET_HEADER + 1 or len(r.data) > s.max_block_length:
        return negative(0x36, Nrc.INCORRECT_LENGTH)
    counter = r.data[1]
    kind = t.counter.classify(counter)
    if kind == "repeat":
        return bytes((0x76, counter))
    if kind == "wrong":
        return negative(0x36, Nrc.WRONG_BLOCK_SEQUENCE_COUNTER)
    packet = int.from_bytes(r.data[2 : 2 + PACKET_HEADER], "big")
    if packet * s.payload != t.received:
        return negative(0x36, Nrc.OUT_OF_RANGE)  # not the packet that comes next
    data = r.data[2 + PACKET_HEADER :]
    if t.received + len(data) > t.size:
        return negative(0x36, Nrc.TRANSFER_SUSPENDED)
    if len(data) != s.payload and t.received + len(data) != t.size:
        return negative(0x36, Nrc.INCORRECT_LENGTH)  # only the last packet may be short
    t.handle.write(data)  # type: ignore[attr-defined]
    t.digest.update(data)
    t.received += len(data)
    t.counter.accept(counter)
    return bytes((0x76, counter))


def transfer_exit(s: FileStore, r: Request) -> bytes:
    if s.upload is not None:
        if len(r.data) != 1:
            return negative(0x37, Nrc.INCORRECT_LENGTH)
        if s.upload.offset < len(s.upload.data):
            return negative(0x37, Nrc.REQUEST_SEQUENCE_ERROR)
        s.upload = None
        return b"\x77"
    t = s.transfer
    if t is None:
        return negative(0x37, Nrc.REQUEST_SEQUENCE_ERROR)
    if len(r.data) != 33:
        return negative(0x37, Nrc.INCORRECT_LENGTH)
    if t.received != t.size:
        return negative(0x37, Nrc.REQUEST_SEQUENCE_ERROR)
    handle = t.handle
    handle.flush()  # type: ignore[attr-defined]
    os.fsync(handle.fileno())  # type: ignore[attr-defined]
    handle.close()  # type: ignore[attr-defined]
    s.transfer = None
    if t.digest.digest() != r.data[1:]:
        log.warning("package %s refused: SHA-256 %s does not match", t.name, t.digest.hexdigest())
        s.part(t.name).unlink(missing_ok=True)
        s.sidecar(t.name).unlink(missing_ok=True)
        return negative(0x37, Nrc.GENERAL_PROGRAMMING_FAILURE)
    os.replace(s.part(t.name), s.path(t.name))
    s.sidecar(t.name).unlink(missing_ok=True)
    fsync_dir(s.dir)
    s.accepted.append(t.name)
    log.info("package %s accepted (%d bytes, sha256 %s)", t.name, t.size, t.digest.hexdigest())
    return b"\x77"
