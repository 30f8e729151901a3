"""Receiving and handing out files over UDS, shared by the gateway's deploy server and the
ECU simulators' content store: RequestFileTransfer (0x38) Add/Replace/Resume/Delete/Read,
TransferData (0x36) with a block counter and a 4-byte packet id, RequestTransferExit
(0x37) with the file's SHA-256. A file grows in ``<name>.part`` and is renamed into place
only when complete and verified; a partial file resumes from its last whole packet.

Each handler is a pure function of (file store, request) -> response bytes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

from agent.adapters.storage import atomic_write_json, free_bytes, fsync_dir
from agent.protocol.compression import DecompressError, decompressor, named_by
from agent.protocol.files import (
    DIGEST_LENGTH,
    PACKET_HEADER,
    PARTIAL_SUFFIXES,
    Mode,
    file_transfer_response,
    is_name,
    packet_payload,
    parse_file_request,
    read_file_response,
)
from agent.protocol.uds import BlockCounter, Nrc, Request

__all__ = ["FileStore", "request_file_transfer", "transfer_data", "transfer_exit"]

log = logging.getLogger(__name__)


@dataclass
class _Transfer:
    name: str
    size: int  # bytes TransferData carries (the compressed stream, when compressed)
    handle: object
    received: int = 0
    method: str | None = None  # compression: the stream is unpacked and checked at the exit
    unpacked: int = 0  # the file's size once unpacked
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
    compression: tuple[tuple[str, int], ...] = ()  # methods accepted, with their dataFormatIdentifier nibble
    reserve: int = 0  # bytes that must stay free where files arrive: a file that would not leave them is refused (0x70)
    unwritten: Callable[[Path], bytes | None] | None = None  # a readable file the storage could not take yet
    trailer: int = 0  # bytes of each request's authenticator (agent/protocol/link.py): fewer file bytes per packet
    transfer: _Transfer | None = None
    upload: _Upload | None = None

    def __post_init__(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def busy(self) -> bool:
        return self.transfer is not None or self.upload is not None

    @property
    def payload(self) -> int:
        return packet_payload(self.max_block_length) - self.trailer

    @property
    def results(self) -> Path:
        return self.readable if self.readable is not None else self.dir

    def abort(self) -> None:
        """Stop transferring; a partial file stays on disk for ResumeFile."""
        self.upload = None
        if self.transfer is not None:
            transfer, self.transfer = self.transfer, None
            try:
                transfer.handle.close()  # type: ignore[attr-defined]
            except OSError:  # its buffered tail could not be written (a full disk): resumed from what is there
                pass

    def path(self, name: str) -> Path:
        return self.dir / name

    def part(self, name: str) -> Path:
        return self.dir / f"{name}.part"

    def sidecar(self, name: str) -> Path:
        return self.dir / f"{name}.part.json"

    def raw(self, name: str) -> Path:
        return self.dir / f"{name}.part.raw"

    def method(self, dfi: int) -> str | None | Literal[False]:
        """The compression a dataFormatIdentifier names (None: none); False: not accepted here."""
        return named_by(dfi, self.compression)


def _storage_guarded(nrc: int) -> Callable[[Callable[[FileStore, Request], bytes]], Callable[[FileStore, Request], bytes]]:
    """A file service whose writes fail (the disk full, read-only, failing) answers ``nrc`` at
    once, instead of no answer (a client would take it for a restart): the transfer is ended, its
    partial file stays for a ResumeFile once there is room."""

    def wrap(handler: Callable[[FileStore, Request], bytes]) -> Callable[[FileStore, Request], bytes]:
        @functools.wraps(handler)
        def guarded(s: FileStore, r: Request) -> bytes:
            try:
                return handler(s, r)
            except OSError as exc:
                log.error("file transfer: the storage under %s cannot take it (%s): answered 0x%02X", s.dir, exc, nrc)
                s.abort()
                return r.negative(nrc)

        return guarded

    return wrap


def _room(s: FileStore, size: int) -> bool:
    """A file of ``size`` more bytes leaves ``reserve`` free where it arrives."""
    return s.reserve == 0 or free_bytes(s.dir) - size >= s.reserve


@_storage_guarded(Nrc.UploadDownloadNotAccepted)
def request_file_transfer(s: FileStore, r: Request) -> bytes:
    if len(r.data) < 2:
        return r.negative(Nrc.IncorrectMessageLengthOrInvalidFormat)
    mode = r.data[1]
    if mode not in (Mode.AddFile, Mode.DeleteFile, Mode.ReplaceFile, Mode.ReadFile, Mode.ResumeFile):
        return r.negative(Nrc.RequestOutOfRange)
    parsed = parse_file_request(r.data)
    if parsed is None:
        return r.negative(Nrc.IncorrectMessageLengthOrInvalidFormat)
    name, size = parsed.path, parsed.size
    if mode == Mode.ReadFile:
        return _read_file(s, r, name)
    if not is_name(name) or name.endswith(PARTIAL_SUFFIXES):
        return r.negative(Nrc.RequestOutOfRange)
    if s.transfer is not None:
        return r.negative(Nrc.ConditionsNotCorrect)
    if mode == Mode.DeleteFile:
        for p in (s.path(name), s.part(name), s.sidecar(name), s.raw(name)):
            p.unlink(missing_ok=True)
        return file_transfer_response(mode, s.max_block_length)
    assert size is not None
    method = s.method(parsed.dfi)
    if method is False:
        return r.negative(Nrc.RequestOutOfRange)  # a compression (or encryption) this server does not take
    stream = parsed.packed if method else size  # the bytes TransferData will carry
    if size == 0 or not stream:
        return r.negative(Nrc.RequestOutOfRange)
    if mode == Mode.AddFile and s.path(name).exists():
        return r.negative(Nrc.ConditionsNotCorrect)  # AddFile of a package already accepted
    if not _room(s, stream + (size if method else 0)):
        log.error("file transfer: %s (%d bytes) would leave less than %d MiB free in %s: refused", name, size,
                  s.reserve >> 20, s.dir)
        return r.negative(Nrc.UploadDownloadNotAccepted)
    meta = {"name": name, "size": stream, "method": method, "unpacked": size}
    position = 0
    if mode == Mode.ResumeFile:
        position = _resume_position(s, name, meta)
    else:
        atomic_write_json(s.sidecar(name), meta)
        with open(s.part(name), "wb"):
            pass
    handle = open(s.part(name), "r+b")
    handle.truncate(position)
    transfer = _Transfer(name, stream, handle, received=position, method=method, unpacked=size)
    if position:
        handle.seek(0)
        transfer.digest.update(handle.read(position))
    s.transfer = transfer
    return file_transfer_response(mode, s.max_block_length, position, parsed.dfi)


def _resume_position(s: FileStore, name: str, meta: dict[str, object]) -> int:
    """Bytes of whole packets already stored for this file, sent the same way (0: start afresh)."""
    try:
        have_meta = json.loads(s.sidecar(name).read_text())
        have = s.part(name).stat().st_size
    except (OSError, ValueError):
        have_meta, have = None, 0
    if have_meta != meta:
        atomic_write_json(s.sidecar(name), meta)
        with open(s.part(name), "wb"):
            pass
        return 0
    return min(have, int(meta["size"])) // s.payload * s.payload  # type: ignore[call-overload]


def _read_file(s: FileStore, r: Request, path: str) -> bytes:
    parts = path.split("/")
    if not 1 <= len(parts) <= 2 or not all(is_name(p) for p in parts):
        return r.negative(Nrc.RequestOutOfRange)
    if s.transfer is not None or s.upload is not None:
        return r.negative(Nrc.ConditionsNotCorrect)
    data = s.unwritten(s.results / path) if s.unwritten is not None else None
    try:
        data = data if data is not None else (s.results / path).read_bytes()
    except OSError:
        return r.negative(Nrc.RequestOutOfRange)
    s.upload = _Upload(path, data)
    return read_file_response(s.max_block_length, len(data))


def _send_block(s: FileStore, r: Request) -> bytes:
    u = s.upload
    assert u is not None
    if len(r.data) != 2:
        return r.negative(Nrc.IncorrectMessageLengthOrInvalidFormat)
    counter = r.data[1]
    kind = u.counter.classify(counter)
    if kind == "repeat":
        return bytes((0x76, counter)) + u.last_block
    if kind == "wrong":
        return r.negative(Nrc.WrongBlockSequenceCounter)
    if u.offset >= len(u.data):
        return r.negative(Nrc.RequestSequenceError)  # nothing left to read
    room = s.max_block_length - 2
    u.last_block = u.data[u.offset : u.offset + room]
    u.offset += len(u.last_block)
    u.counter.accept(counter)
    return bytes((0x76, counter)) + u.last_block


@_storage_guarded(Nrc.GeneralProgrammingFailure)
def transfer_data(s: FileStore, r: Request) -> bytes:
    if s.upload is not None:
        return _send_block(s, r)
    t = s.transfer
    if t is None:
        return r.negative(Nrc.RequestSequenceError)
    if len(r.data) < 2 + PACKET_HEADER + 1 or len(r.data) > s.max_block_length:
        return r.negative(Nrc.IncorrectMessageLengthOrInvalidFormat)
    counter = r.data[1]
    kind = t.counter.classify(counter)
    if kind == "repeat":
        return bytes((0x76, counter))
    if kind == "wrong":
        return r.negative(Nrc.WrongBlockSequenceCounter)
    packet = int.from_bytes(r.data[2 : 2 + PACKET_HEADER], "big")
    if packet * s.payload != t.received:
        return r.negative(Nrc.RequestOutOfRange)  # not the packet that comes next
    data = r.data[2 + PACKET_HEADER :]
    if t.received + len(data) > t.size:
        return r.negative(Nrc.TransferDataSuspended)
    if len(data) != s.payload and t.received + len(data) != t.size:
        return r.negative(Nrc.IncorrectMessageLengthOrInvalidFormat)  # only the last packet may be short
    t.handle.write(data)  # type: ignore[attr-defined]
    t.digest.update(data)
    t.received += len(data)
    t.counter.accept(counter)
    return bytes((0x76, counter))


@_storage_guarded(Nrc.GeneralProgrammingFailure)
def transfer_exit(s: FileStore, r: Request) -> bytes:
    if s.upload is not None:
        if len(r.data) != 1:
            return r.negative(Nrc.IncorrectMessageLengthOrInvalidFormat)
        if s.upload.offset < len(s.upload.data):
            return r.negative(Nrc.RequestSequenceError)
        s.upload = None
        return b"\x77"
    t = s.transfer
    if t is None:
        return r.negative(Nrc.RequestSequenceError)
    if len(r.data) != 1 + DIGEST_LENGTH:
        return r.negative(Nrc.IncorrectMessageLengthOrInvalidFormat)
    if t.received != t.size:
        return r.negative(Nrc.RequestSequenceError)
    handle = t.handle
    handle.flush()  # type: ignore[attr-defined]
    os.fsync(handle.fileno())  # type: ignore[attr-defined]
    handle.close()  # type: ignore[attr-defined]
    s.transfer = None
    got, problem = (t.digest.hexdigest(), None) if t.method is None else _unpack(s, t)
    if problem is not None or got != r.data[1:].hex():
        log.warning("package %s refused: %s", t.name, problem or f"SHA-256 {got} does not match")
        for p in (s.part(t.name), s.sidecar(t.name), s.raw(t.name)):
            p.unlink(missing_ok=True)
        return r.negative(Nrc.GeneralProgrammingFailure)
    if t.method is not None:
        os.replace(s.raw(t.name), s.path(t.name))
        s.part(t.name).unlink(missing_ok=True)
    else:
        os.replace(s.part(t.name), s.path(t.name))
    s.sidecar(t.name).unlink(missing_ok=True)
    fsync_dir(s.dir)
    log.info("package %s accepted (%d bytes%s, sha256 %s)", t.name, t.unpacked,
             f", {t.size} on the link ({t.method})" if t.method else "", got)
    return b"\x77"


def _unpack(s: FileStore, t: _Transfer) -> tuple[str, str | None]:
    """Unpack a compressed file into ``<name>.part.raw`` (never more than announced): its
    SHA-256, or the reason it is not the file announced."""
    assert t.method is not None
    unpack = decompressor(t.method, t.unpacked)
    digest = hashlib.sha256()
    written = 0
    try:
        with open(s.part(t.name), "rb") as source, open(s.raw(t.name), "wb") as target:
            for chunk in iter(lambda: source.read(1 << 16), b""):
                out = unpack.feed(chunk, t.unpacked - written)
                written += len(out)
                if written > t.unpacked:
                    return "", f"unpacks to more than the {t.unpacked} bytes announced"
                target.write(out)
                digest.update(out)
            target.flush()
            os.fsync(target.fileno())
    except DecompressError as exc:
        return "", f"the {t.method} stream is broken ({exc})"
    if not unpack.finished or written != t.unpacked:
        return "", f"the {t.method} stream unpacks to {written} of the {t.unpacked} bytes announced"
    return digest.hexdigest(), None
