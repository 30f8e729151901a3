"""The gateway's deploy server: receives upgrade packages from the TBOX over ISO-TP/UDS.

RequestFileTransfer (0x38) AddFile / ReplaceFile / ResumeFile / DeleteFile, TransferData
(0x36) carrying one deploy data packet each, RequestTransferExit (0x37) with the package's
SHA-256, which the gateway checks before it accepts the package. A package is received
into ``<name>.part`` and renamed into place only when complete and verified; a partial
package survives a restart of either side and is resumed from the last whole packet.

The wire layouts are in ``agent/protocol/files.py`` (file transfer) and
``agent/protocol/link.py`` (install, inventory and content routines).
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from udsoncan import services as svc

from agent.adapters.file_store import FileStore, request_file_transfer, transfer_data, transfer_exit
from agent.adapters.storage import atomic_write_json
from agent.adapters.uds_server import Outcome, Service, tester_present
from agent.core.config import DeployConfig
from agent.core.trace import request_header
from agent.errors import InstallRefused
from agent.protocol.files import is_name
from agent.protocol.link import (
    AUTH_TRAILER,
    BOOT_ID_DID,
    CANCEL_ROUTINE,
    CONTENT_ROUTINE,
    INSTALL_ROUTINE,
    INVENTORY_ROUTINE,
    InstallStatus,
    deploy_key,
    encode_install_status,
    open_request,
    session_key,
)
from agent.protocol.uds import Nrc, Request, RoutineType, Session, session_response

__all__ = ["DeployState", "DEPLOY_SERVICES", "Installer", "Relay"]


class Installer(Protocol):
    """The gateway's port to flashing and version collection (I/O lives behind it)."""

    def start(self, manifest: bytes) -> None:
        """Start installing; InstallRefused says why the manifest is refused."""

    def status(self, campaign: str | None) -> tuple[int, int, int]:
        """(InstallStatus, ECUs done, ECUs in total)."""

    def inventory(self) -> None:
        """Collect the inventory into ``inventory.json`` in the results directory."""

    def cancel(self, campaign: str, reason: str) -> tuple[int, int, int]:
        """The TBOX ended the campaign: its install goes back; the status as ``status`` gives it."""

    def unwritten(self, path: Path) -> bytes | None:
        """A result file the storage could not take yet (served by ReadFile as it will be)."""


class Relay(Protocol):
    """The gateway's port to owner content on its ECUs (``gateway/content_relay.py``)."""

    def run(self, record: bytes) -> tuple[int, bytes]:
        """(status: 0 done, 1 refused, 2 no answer; data or the reason)."""


log = logging.getLogger(__name__)

EXTENDED = frozenset({Session.extendedDiagnosticSession})


@dataclass
class DeployState:
    config: DeployConfig
    results_dir: str = "var/gateway/results"
    installer: Installer | None = None
    session: int = Session.defaultSession
    relay: Relay | None = None
    boot_id: bytes = field(default_factory=lambda: os.urandom(8))  # new at every start of the gateway
    unlocked: bool = False  # SecurityAccess passed in this session
    seed: bytes | None = None
    key: bytes | None = None  # the session key requests are authenticated with (deploy.authenticate_requests)
    freshness: int = 0  # the last freshness value taken in this session
    dids: dict[int, Callable[[], bytes]] = field(default_factory=dict)  # served to any tester, read only

    def __post_init__(self) -> None:
        self.files = FileStore(Path(self.config.package_dir), self.config.max_block_length, Path(self.results_dir),
                               compression=self.config.compression, reserve=self.config.min_free_mib << 20,
                               unwritten=self.installer.unwritten if self.installer is not None else None,
                               trailer=AUTH_TRAILER if self.config.secured else 0)
        self.security_file = Path(self.results_dir) / "deploy-security.json"  # wrong keys outlive a restart
        self.refused_log = Path(self.results_dir) / REFUSED_LOG  # requests refused for their authenticator

    @property
    def denied(self) -> bool:
        """SecurityAccess is required (deploy.security_secret) and was not passed in this session."""
        return self.config.security_secret is not None and not self.unlocked

    def security_record(self) -> dict[str, float]:
        try:
            doc = json.loads(self.security_file.read_text())
            return {"failures": float(doc.get("failures", 0)), "locked_until": float(doc.get("locked_until", 0))}
        except (OSError, ValueError, TypeError, AttributeError):
            return {"failures": 0.0, "locked_until": 0.0}  # none yet (an unreadable one is written anew)

    @property
    def transfer(self) -> Any:
        return self.files.transfer

    def session_timeout(self) -> None:
        self.files.abort()
        self.session = Session.defaultSession
        self.lock()

    def lock(self) -> None:
        self.unlocked, self.seed, self.key, self.freshness = False, None, None, 0

    def abort(self) -> None:
        self.files.abort()


def _session(s: DeployState, r: Request) -> bytes:
    if len(r.data) != 2:
        return r.negative(Nrc.IncorrectMessageLengthOrInvalidFormat)
    if r.data[1] not in (Session.defaultSession, Session.extendedDiagnosticSession):
        return r.negative(Nrc.SubFunctionNotSupported)
    s.files.abort()  # a (re)started session ends any transfer; its partial package stays for ResumeFile
    s.session = r.data[1]
    s.lock()  # every session starts locked
    return session_response(r.data[1], 50, 5000)


def _read_did(s: DeployState, r: Request) -> bytes:
    """The boot id and the DIDs the gateway serves (``DeployState.dids``: the RXSWIN set), one
    or several in a request."""
    if len(r.data) < 3 or len(r.data) % 2 != 1:
        return r.negative(Nrc.IncorrectMessageLengthOrInvalidFormat)
    out = bytearray((0x62,))
    for at in range(1, len(r.data), 2):
        did = int.from_bytes(r.data[at:at + 2], "big")
        if did == BOOT_ID_DID:
            value = s.boot_id
        elif did in s.dids:
            try:
                value = s.dids[did]()
            except ValueError as exc:  # its record is damaged: said, never a stale value
                log.error("DID %04X cannot be served: %s", did, exc)
                return r.negative(Nrc.ConditionsNotCorrect)
        else:
            return r.negative(Nrc.RequestOutOfRange)
        out += r.data[at:at + 2] + value
    return bytes(out)


def _write_did(s: DeployState, r: Request) -> bytes:
    """Nothing the gateway serves is written by a tester: the RXSWIN set changes only with a
    verified campaign's commit (gateway/rxswin.py)."""
    if len(r.data) < 4:
        return r.negative(Nrc.IncorrectMessageLengthOrInvalidFormat)
    did = int.from_bytes(r.data[1:3], "big")
    if did in s.dids:
        log.warning("a tester tried to write DID %04X (%d bytes): refused, only a verified campaign changes it", did,
                    len(r.data) - 3)
    return r.negative(Nrc.RequestOutOfRange)


MAX_FAILURES = 3


def _security(s: DeployState, r: Request) -> bytes:
    """SecurityAccess on the deploy link: seed (27 01), key (27 02, see ``deploy_key``)."""
    secret = s.config.security_secret
    if secret is None:
        return r.negative(Nrc.ServiceNotSupported)
    record = s.security_record()
    if time.time() < record["locked_until"]:
        return r.negative(Nrc.RequiredTimeDelayNotExpired)
    if r.data[1] == 0x01:
        if len(r.data) != 2:
            return r.negative(Nrc.IncorrectMessageLengthOrInvalidFormat)
        s.seed = bytes(16) if s.unlocked else os.urandom(16)  # an unlocked server answers a zero seed
        return b"\x67\x01" + s.seed
    if s.seed is None or s.unlocked:
        return r.negative(Nrc.RequestSequenceError)
    seed, s.seed = s.seed, None
    if hmac.compare_digest(bytes(r.data[2:]), deploy_key(secret, seed)):
        s.unlocked = True
        if s.config.secured:
            s.key, s.freshness = session_key(secret, seed), 0
        if record["failures"]:
            atomic_write_json(s.security_file, {"failures": 0, "locked_until": 0})
        return b"\x67\x02"
    failures = int(record["failures"]) + 1
    if failures >= MAX_FAILURES:
        log.warning("deploy link: %d wrong SecurityAccess keys, locked for %d s", failures, s.config.lockout_s)
        atomic_write_json(s.security_file, {"failures": 0, "locked_until": time.time() + s.config.lockout_s})
        return r.negative(Nrc.ExceedNumberOfAttempts)
    atomic_write_json(s.security_file, {"failures": failures, "locked_until": 0})
    return r.negative(Nrc.InvalidKey)


def _guarded(handler: Any) -> Any:
    """The handler, answering 0x33 until SecurityAccess is passed (when it is required), and with
    authenticated requests, 0x3A (secureDataVerificationFailed) to a request whose MAC does not
    verify or whose freshness is not above the last one taken; the handler sees the request
    without its authenticator."""

    def guarded(s: DeployState, r: Request) -> Any:
        if s.denied:
            return r.negative(Nrc.SecurityAccessDenied)
        if s.key is not None:
            opened = open_request(s.key, s.freshness, r.as_sent())  # every bit as sent: the suppress bit too
            if isinstance(opened, str):
                _refused(s, r, opened)
                return r.negative(Nrc.SecureDataVerificationFailed)
            data, s.freshness = opened
            if r.suppressed:
                data = data[:1] + bytes((data[1] & 0x7F,)) + data[2:]
            r = dataclasses.replace(r, data=data)
        return handler(s, r)

    return guarded


REFUSED_LOG = "deploy-refused.jsonl"
REFUSED_LOG_MAX = 256 * 1024  # then it starts again (the previous one kept as .1): a flood cannot fill the disk


def _refused(s: DeployState, r: Request, reason: str) -> None:
    """Log and trace (header-only, like every trace) a request refused for its authenticator."""
    log.warning("deploy link: refused %s (%d bytes): %s", request_header(bytes(r.data), "deploy").hex(), len(r.data),
                reason)
    entry = {"t": round(time.time(), 3), "request": request_header(bytes(r.data), "deploy").hex(), "length": len(r.data),
             "reason": reason}
    try:
        s.refused_log.parent.mkdir(parents=True, exist_ok=True)
        if s.refused_log.exists() and s.refused_log.stat().st_size > REFUSED_LOG_MAX:
            os.replace(s.refused_log, s.refused_log.with_name(REFUSED_LOG + ".1"))
        with open(s.refused_log, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")
    except OSError as exc:  # a full disk: the answer still goes
        log.warning("cannot record the refused request in %s: %s", s.refused_log, exc)


def _routine(s: DeployState, r: Request) -> bytes | Outcome:
    if len(r.data) < 4:
        return r.negative(Nrc.IncorrectMessageLengthOrInvalidFormat)
    kind, routine, option = r.data[1], int.from_bytes(r.data[2:4], "big"), r.data[4:]
    if routine == CONTENT_ROUTINE and s.relay is not None:
        if kind != RoutineType.startRoutine:
            return r.negative(Nrc.SubFunctionNotSupported)
        relay, head = s.relay, bytes((0x71, kind)) + r.data[2:4]

        def relayed() -> bytes:
            status, data = relay.run(bytes(option))
            return head + bytes((status,)) + data

        return Outcome(None, work=relayed)
    if routine not in (INSTALL_ROUTINE, INVENTORY_ROUTINE, CANCEL_ROUTINE) or s.installer is None:
        return r.negative(Nrc.RequestOutOfRange)
    head = bytes((0x71, kind)) + r.data[2:4]
    installer = s.installer
    if routine == CANCEL_ROUTINE:
        if kind != RoutineType.startRoutine:
            return r.negative(Nrc.SubFunctionNotSupported)
        named, _, why = bytes(option).partition(b"\x00")
        cancelled = named.decode("ascii", "replace")
        if not is_name(cancelled):
            return r.negative(Nrc.RequestOutOfRange)
        reason = "".join(ch if ch.isprintable() else "?" for ch in why.decode("utf-8", "replace"))
        return head + encode_install_status(*installer.cancel(cancelled, reason))
    if routine == INVENTORY_ROUTINE:
        if kind != RoutineType.startRoutine:
            return r.negative(Nrc.SubFunctionNotSupported)

        def collect() -> bytes:
            installer.inventory()
            return head + b"\x00"

        return Outcome(None, work=collect)
    if kind == RoutineType.requestRoutineResults:
        campaign = option.decode("ascii", "replace") if option else None
        status, done, total = installer.status(campaign)
        return head + encode_install_status(status, done, total)
    if kind != RoutineType.startRoutine:
        return r.negative(Nrc.SubFunctionNotSupported)
    name = option.decode("ascii", "replace")
    if not is_name(name) or not s.files.path(name).is_file():
        return r.negative(Nrc.RequestOutOfRange)
    if installer.status(None)[0] in (InstallStatus.RUNNING, InstallStatus.WAITING):
        return r.negative(Nrc.ConditionsNotCorrect)
    try:
        installer.start(s.files.path(name).read_bytes())
    except InstallRefused as refused:
        log.warning("install manifest %s refused: %s", name, refused)
        return r.negative(Nrc.ConditionsNotCorrect)
    return head + b"\x00"


DEPLOY_SERVICES: dict[int, Service[DeployState]] = {
    svc.RoutineControl.request_id(): Service(_guarded(_routine), min_length=4, sessions=EXTENDED, subfunction=True,
                                                   subfunctions=frozenset({1, 3})),
    svc.SecurityAccess.request_id(): Service(_security, min_length=2, sessions=EXTENDED, subfunction=True,
                                                   subfunctions=frozenset({1, 2})),
    svc.DiagnosticSessionControl.request_id(): Service(_session, min_length=2, subfunction=True, subfunctions=frozenset({1, 3})),
    svc.TesterPresent.request_id(): Service(tester_present, min_length=2, subfunction=True, subfunctions=frozenset({0})),
    svc.ReadDataByIdentifier.request_id(): Service(_read_did, min_length=3),
    svc.WriteDataByIdentifier.request_id(): Service(_write_did, min_length=4),
    svc.RequestFileTransfer.request_id(): Service(_guarded(lambda s, r: request_file_transfer(s.files, r)), min_length=2,
                                                  sessions=EXTENDED),
    svc.TransferData.request_id(): Service(_guarded(lambda s, r: transfer_data(s.files, r)), min_length=2, sessions=EXTENDED),
    svc.RequestTransferExit.request_id(): Service(_guarded(lambda s, r: transfer_exit(s.files, r)), min_length=1,
                                                  sessions=EXTENDED),
}
