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
    31 01 0303 op ecu 00 arg                       owner content on an ECU (gateway/content_relay.py)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from agent.config import DeployConfig
from agent.file_transfer import (
    NAME,
    PACKET_HEADER,
    FileStore,
    packet_payload,
    request_file_transfer,
    transfer_data,
    transfer_exit,
)
from agent.uds_server import (
    SESSION_DEFAULT,
    SESSION_EXTENDED,
    Nrc,
    Outcome,
    Request,
    Service,
    negative,
    session_response,
    tester_present,
)

__all__ = ["DeployState", "DEPLOY_SERVICES", "PACKET_HEADER", "packet_payload", "Installer",
           "INSTALL_ROUTINE", "INVENTORY_ROUTINE", "CONTENT_ROUTINE", "InstallStatus", "Relay"]

INSTALL_ROUTINE = 0x0301
INVENTORY_ROUTINE = 0x0302
CONTENT_ROUTINE = 0x0303


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

class Relay(Protocol):
    """The gateway's port to owner content on its ECUs (``gateway/content_relay.py``)."""

    def run(self, record: bytes) -> tuple[int, bytes]:
        """(status: 0 done, 1 refused, 2 no answer; data or the reason)."""


log = logging.getLogger(__name__)

EXTENDED = frozenset({SESSION_EXTENDED})


@dataclass
class DeployState:
    config: DeployConfig
    results_dir: str = "var/gateway/results"
    installer: Installer | None = None
    session: int = SESSION_DEFAULT
    relay: Relay | None = None

    def __post_init__(self) -> None:
        self.files = FileStore(Path(self.config.package_dir), self.config.max_block_length, Path(self.results_dir))

    @property
    def transfer(self) -> Any:
        return self.files.transfer

    def session_timeout(self) -> None:
        self.files.abort()
        self.session = SESSION_DEFAULT

    def abort(self) -> None:
        self.files.abort()


def _session(s: DeployState, r: Request) -> bytes:
    if len(r.data) != 2:
        return negative(0x10, Nrc.INCORRECT_LENGTH)
    if r.data[1] not in (SESSION_DEFAULT, SESSION_EXTENDED):
        return negative(0x10, Nrc.SUBFUNCTION_NOT_SUPPORTED)
    s.files.abort()  # a (re)started session ends any transfer; its partial package stays for ResumeFile
    s.session = r.data[1]
    return session_response(r.data[1], 50, 5000)


def _routine(s: DeployState, r: Request) -> bytes | Outcome:
    if len(r.data) < 4:
        return negative(0x31, Nrc.INCORRECT_LENGTH)
    kind, routine, option = r.data[1], int.from_bytes(r.data[2:4], "big"), r.data[4:]
    if routine == CONTENT_ROUTINE and s.relay is not None:
        if kind != 0x01:
            return negative(0x31, Nrc.SUBFUNCTION_NOT_SUPPORTED)
        relay, head = s.relay, bytes((0x71, kind)) + r.data[2:4]

        def relayed() -> bytes:
            status, data = relay.run(bytes(option))
            return head + bytes((status,)) + data

        return Outcome(None, work=relayed)
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
    if not NAME.match(name) or not s.files.path(name).is_file():
        return negative(0x31, Nrc.OUT_OF_RANGE)
    if installer.status(None)[0] == InstallStatus.RUNNING:
        return negative(0x31, Nrc.CONDITIONS_NOT_CORRECT)
    refused = installer.start(s.files.path(name).read_bytes())
    if refused:
        log.warning("install manifest %s refused: %s", name, refused)
        return negative(0x31, Nrc.CONDITIONS_NOT_CORRECT)
    return head + b"\x00"


DEPLOY_SERVICES: dict[int, Service[DeployState]] = {
    0x31: Service(_routine, min_length=4, sessions=EXTENDED, subfunction=True),
    0x10: Service(_session, min_length=2, subfunction=True),
    0x3E: Service(tester_present, min_length=2, subfunction=True),
    0x38: Service(lambda s, r: request_file_transfer(s.files, r), min_length=2, sessions=EXTENDED),
    0x36: Service(lambda s, r: transfer_data(s.files, r), min_length=2, sessions=EXTENDED),
    0x37: Service(lambda s, r: transfer_exit(s.files, r), min_length=1, sessions=EXTENDED),
}
