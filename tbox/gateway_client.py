"""The TBOX's side of the gateway link beyond package deploy: start the install, follow it,
read back flash results, flash traces and the inventory (RequestFileTransfer ReadFile)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Callable

from agent.adapters.canbus import Segment
from agent.adapters.file_client import DeployResult, PackageDeployer, deploy_security
from agent.adapters.uds_client import RawCodec, UdsLink, describe_failure
from agent.core.config import DeployConfig
from agent.core.faults import FaultSpec
from agent.errors import Refused, TryLater, VotaError
from agent.protocol.link import (
    BOOT_ID_DID,
    CONTENT_ROUTINE,
    INSTALL_ROUTINE,
    INVENTORY_FILE,
    INVENTORY_ROUTINE,
    ContentOp,
    InstallStatus,
    RelayStatus,
    decode_install_status,
    encode_content_request,
)
from agent.protocol.uds import RoutineType, Session

__all__ = ["GatewayClient", "GatewayError", "InstallStatus", "ContentOp"]


class GatewayError(TryLater):
    """The gateway could not be reached, or did not finish what was asked: try later. When the
    gateway or an ECU behind it says no, the call raises Refused instead."""


class GatewayClient:
    """The TBOX's gateway port (``tbox/ports.py``) over the deploy link: one UDS conversation with
    the gateway at a time, whoever asks (campaigns, content)."""

    def __init__(self, segment: Segment, link: DeployConfig, stop: threading.Event | None = None,
                 faults: list[FaultSpec] | None = None) -> None:
        self.segment, self.link = segment, link
        self.stop = stop or threading.Event()
        self.faults = faults or []
        self.lock = threading.RLock()

    def deploy(self, name: str, path: Path, sha256: str, out_dir: Path | None = None, *, resume: bool = False,
               progress: Callable[[int, int], None] | None = None) -> DeployResult:
        """Deploy one file (RequestFileTransfer); result and trace into ``out_dir`` unless cancelled."""
        report = progress

        def sent(package: str, step: str, done: int, size: int) -> None:
            if report is not None:
                report(done, size)

        deployer = PackageDeployer(self.segment, self.link, name, path, sha256, resume=resume, stop=self.stop,
                                   faults=self.faults, progress=sent)
        with self.lock:
            result = deployer.run()
        if out_dir is not None and result.reason != "cancelled":
            deployer.write(out_dir, result)
        return result

    def _link(self) -> UdsLink:
        return UdsLink(self.segment, self.link.request_id, self.link.response_id, name="gateway",
                       p2=self.link.p2_ms / 1000.0, p2_star=self.link.p2_star_ms / 1000.0, dids={BOOT_ID_DID: RawCodec()},
                       security=deploy_security(self.link))

    def _call(self, what: str, fn: Any) -> Any:
        with self.lock, self._link() as link:
            try:
                link.client.change_session(Session.extendedDiagnosticSession)
                if self.link.security_secret is not None:
                    link.client.unlock_security_access(1)
                return fn(link.client)
            except VotaError:
                raise
            except Exception as exc:  # noqa: BLE001 - one error type for the TBOX's state machine
                raise GatewayError(f"{what}: {describe_failure(exc)[0]}") from None

    def boot_id(self) -> bytes:
        def read(c: Any) -> bytes:
            return bytes(c.read_data_by_identifier(BOOT_ID_DID).service_data.values[BOOT_ID_DID])

        return self._call("boot id", read)  # type: ignore[no-any-return]

    def start_install(self, manifest_name: str) -> None:
        self._call("start install", lambda c: c.routine_control(INSTALL_ROUTINE, RoutineType.startRoutine, manifest_name.encode()))

    def install_status(self, campaign: str) -> tuple[int, int, int]:
        def ask(c: Any) -> tuple[int, int, int]:
            record = c.routine_control(INSTALL_ROUTINE, RoutineType.requestRoutineResults, campaign.encode())
            status = decode_install_status(bytes(record.service_data.routine_status_record))
            if status is None:
                raise GatewayError(f"install status: unexpected record {bytes(record.service_data.routine_status_record).hex()}")
            return status

        return self._call("install status", ask)  # type: ignore[no-any-return]

    def wait_install(self, campaign: str, timeout: float, poll: float = 0.5, should_stop: Any = None) -> int:
        deadline = time.monotonic() + timeout
        while True:
            status, done, total = self.install_status(campaign)
            if status != InstallStatus.RUNNING:
                return status
            if time.monotonic() > deadline:
                raise GatewayError(f"install of {campaign} still running after {timeout:.0f} s")
            if should_stop is not None and should_stop(done, total):
                raise GatewayError("stopped while waiting for the install")
            time.sleep(poll)

    def read_file(self, path: str) -> bytes:
        def read(c: Any) -> bytes:
            response = c.read_file(path)
            size = response.service_data.filesize.uncompressed
            data = bytearray()
            counter = 1
            while len(data) < size:
                block = c.transfer_data(counter).service_data.parameter_records
                if not block:
                    raise GatewayError(f"read {path}: empty block at byte {len(data)} of {size}")
                data += block
                counter = (counter + 1) & 0xFF
            c.request_transfer_exit()
            if len(data) != size:
                raise GatewayError(f"read {path}: got {len(data)} bytes, expected {size}")
            return bytes(data)

        return self._call(f"read {path}", read)  # type: ignore[no-any-return]

    def inventory(self) -> list[dict[str, Any]]:
        self._call("collect inventory", lambda c: c.routine_control(INVENTORY_ROUTINE, RoutineType.startRoutine))
        doc = json.loads(self.read_file(INVENTORY_FILE))
        return list(doc["ecus"])

    def content(self, op: int, ecu: str, arg: bytes = b"") -> bytes:
        """Owner content on an ECU behind the gateway (routine 0x0303); the ECU's refusal is a
        GatewayError with ``refused`` set."""
        def ask(c: Any) -> bytes:
            request = encode_content_request(op, ecu, arg)
            record = c.routine_control(CONTENT_ROUTINE, RoutineType.startRoutine, request).service_data.routine_status_record
            if not record:
                raise GatewayError("content: empty routine status record")
            if record[0] != RelayStatus.DONE:
                why = f"{ecu}: {bytes(record[1:]).decode('ascii', 'replace')}"
                if record[0] == RelayStatus.REFUSED:
                    raise Refused("ecu_refused", why)
                raise GatewayError(why)  # SILENT: the ECU did not answer (or is busy): worth trying later
            return bytes(record[1:])

        return self._call(f"content on {ecu}", ask)  # type: ignore[no-any-return]
