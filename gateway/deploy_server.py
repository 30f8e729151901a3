"""The gateway's deploy server: receives upgrade packages from the TBOX over ISO-TP/UDS.

RequestFileTransfer (0x38) AddFile / ReplaceFile / ResumeFile / DeleteFile, TransferData
(0x36) carrying one deploy data packet each, RequestTransferExit (0x37) with the package's
SHA-256, which the gateway checks before it accepts the package. A package is received
into ``<name>.part`` and renamed into place only when complete and verified; a partial
package survives a restart of either side and is resumed from the last whole packet.

Request layouts (the deploy protocol, documented in the README):

    38 01|03|06 LLLL path DFI(00) FSL size size   add / replace / resume a package
    38 02 LLLL path                                delete a package
    36 nn PPPPPPPP data                            nn: block counter, P: deploy packet id
    37 <32-byte SHA-256>                           end of package, digest to check
    38 04 LLLL path 00                             read a file the gateway produced
    36 nn  ->  76 nn data                          (reading) the next block of the file
    31 01 0301 manifest                            start installing (flashing) per manifest
    31 03 0301 [campaign]                          install status: 71 03 0301 SS DDDD TTTT
    31 01 0302                                     collect the ECU inventory (0x78 meanwhile)
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from agent.config import DeployConfig
from agent.storage import atomic_write_json, fsync_dir
from agent.uds_server import (
    SESSION_DEFAULT,
    SESSION_EXTENDED,
    BlockCounter,
    Nrc,
    Outcome,
    Request,
    Service,
    negative,
)

__all__ = ["DeployState", "DEPLOY_SERVICES", "PACKET_HEADER", "packet_payload", "Installer",
           "INSTALL_ROUTINE", "INVENTORY_ROUTINE", "InstallStatus"]

INSTALL_ROUTINE = 0x0301
INVENTORY_ROUTINE = 0x0302


class InstallStatus:
    NONE = 0x00
    RUNNING = 0x01
    SUCCEEDED = 0x02
    FAILED = 0x03
    REFUSED = 0x04  # the manifest could not be used


class Installer(Protocol):
    """The gateway's port to flashing and version collection (I/O lives behind it)."""

    def start(self, manifest: bytes) -> str | None:
        """Start installing; None, or why the manifest is refused."""

    def status(self, campaign: str | None) -> tuple[int, int, int]:
        """(InstallStatus, ECUs done, ECUs in total)."""

    def inventory(self) -> None:
        """Collect the inventory into ``inventory.json`` in the results directory."""

log = logging.getLogger(__name__)

PACKET_HEADER = 4  # deploy packet id, big endian, after SID and block counter
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
EXTENDED = frozenset({SESSION_EXTENDED})


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
class DeployState:
    config: DeployConfig
    results_dir: str = "var/gateway/results"
    installer: Installer | None = None
    session: int = SESSION_DEFAULT
    transfer: _Transfer | None = None
    upload: _Upload | None = None
    accepted: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.dir = Path(self.config.package_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.results = Path(self.results_dir)

    @property
    def payload(self) -> int:
        return packet_payload(self.config.max_block_length)

    def session_timeout(self) -> None:
        self.abort()
        self.session = SESSION_DEFAULT

    def abort(self) -> None:
        """Stop receiving; the partial package stays on disk for ResumeFile."""
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


def _session(s: DeployState, r: Request) -> bytes:
    if len(r.data) != 2:
        return negative(0x10, Nrc.INCORRECT_LENGTH)
    if r.data[1] not in (SESSION_DEFAULT, SESSION_EXTENDED):
        return negative(0x10, Nrc.SUBFUNCTION_NOT_SUPPORTED)
    s.abort()  # a (re)started session ends any transfer; its partial package stays for ResumeFile
    s.session = r.data[1]
    return bytes((0x50, r.data[1])) + (50).to_bytes(2, "big") + (500).to_bytes(2, "big")


def _tester_present(s: DeployState, r: Request) -> bytes:
    if len(r.data) != 2:
        return negative(0x3E, Nrc.INCORRECT_LENGTH)
    if r.data[1] != 0:
        return negative(0x3E, Nrc.SUBFUNCTION_NOT_SUPPORTED)
    return b"\x7e\x00"


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


def _request_file_transfer(s: DeployState, r: Request) -> bytes:
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
    block = s.config.max_block_length.to_bytes(2, "big")
    head = bytes((0x78, mode, 0x02)) + block + b"\x00"
    return head + position.to_bytes(8, "big") if mode == 0x06 else head


def _resume_position(s: DeployState, name: str, size: int) -> int:
    """Bytes of whole packets already stored for this package (0: start afresh)."""
    import json

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


def _read_file(s: DeployState, path: str) -> bytes:
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
    return bytes((0x78, 0x04, 0x02)) + s.config.max_block_length.to_bytes(2, "big") + b"\x00" + b"\x00\x04" + size + size


def _send_block(s: DeployState, r: Request) -> bytes:
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
    room = s.config.max_block_length - 2
    u.last_block = u.data[u.offset : u.offset + room]
    u.offset += len(u.last_block)
    u.counter.accept(counter)
    return bytes((0x76, counter)) + u.last_block


def _transfer_data(s: DeployState, r: Request) -> bytes:
    if s.upload is not None:
        return _send_block(s, r)
    t = s.transfer
    if t is None:
        return negative(0x36, Nrc.REQUEST_SEQUENCE_ERROR)
    if len(r.data) < 2 + PACKET_HEADER + 1 or len(r.data) > s.config.max_block_length:
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


def _transfer_exit(s: DeployState, r: Request) -> bytes:
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


def _routine(s: DeployState, r: Request) -> bytes | Outcome:
    if len(r.data) < 4:
        return negative(0x31, Nrc.INCORRECT_LENGTH)
    kind, routine, option = r.data[1], int.from_bytes(r.data[2:4], "big"), r.data[4:]
    if routine not in (INSTALL_ROUTINE, INVENTORY_ROUTINE) or s.installer is None:
        return negative(0x31, Nrc.OUT_OF_RANGE)
    head = bytes((0x71, kind)) + r.data[2:4]
    installer = s.installer
    if routine == INVENTORY_ROUTINE:
        if kind != 0x01:
            return negative(0x31, Nrc.SUBFUNCTION_NOT_SUPPORTED)

        def collect() -> bytes:
            installer.inventory()
            return head + b"\x00"

        return Outcome(None, work=collect)
    if kind == 0x03:
        campaign = option.decode("ascii", "replace") if option else None
        status, done, total = installer.status(campaign)
        return head + bytes((status,)) + done.to_bytes(2, "big") + total.to_bytes(2, "big")
    if kind != 0x01:
        return negative(0x31, Nrc.SUBFUNCTION_NOT_SUPPORTED)
    name = option.decode("ascii", "replace")
    if not _NAME.match(name) or not s.path(name).is_file():
        return negative(0x31, Nrc.OUT_OF_RANGE)
    if installer.status(None)[0] == InstallStatus.RUNNING:
        return negative(0x31, Nrc.CONDITIONS_NOT_CORRECT)
    refused = installer.start(s.path(name).read_bytes())
    if refused:
        log.warning("install manifest %s refused: %s", name, refused)
        return negative(0x31, Nrc.CONDITIONS_NOT_CORRECT)
    return head + b"\x00"


DEPLOY_SERVICES: dict[int, Service[DeployState]] = {
    0x31: Service(_routine, min_length=4, sessions=EXTENDED, subfunction=True),
    0x10: Service(_session, min_length=2, subfunction=True),
    0x3E: Service(_tester_present, min_length=2, subfunction=True),
    0x38: Service(_request_file_transfer, min_length=2, sessions=EXTENDED),
    0x36: Service(_transfer_data, min_length=2, sessions=EXTENDED),
    0x37: Service(_transfer_exit, min_length=1, sessions=EXTENDED),
}
