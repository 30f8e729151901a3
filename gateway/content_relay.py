"""Owner content for ECUs behind the gateway (C6): the TBOX deploys the material to the
gateway like a package, then asks the gateway, by routine 0x0303, to store it on the ECU
that shows it (RequestFileTransfer, the deploy protocol), to show or stop it (the ECU's
RoutineControl 0x0401 / 0x0402), or to read a DID for it (the light sensor for day/night).
No software is flashed.

The routine's layout is in ``agent/protocol/link.py``.

The gateway's copy of stored material is removed once the ECU holds it; the transfer's
result and header-only trace stay in ``<results_dir>/content/`` (the TBOX reads them back),
and so do the last show, stop and delete exchanges with each ECU and a failed DID read
(``<ecu>.<step>.link.trace.jsonl``, stage ``link``).
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any

from agent.adapters.canbus import Segment
from agent.adapters.file_client import PackageDeployer
from agent.adapters.trace_files import write_link_trace
from agent.adapters.uds_sequence import CallSequence, Peer
from agent.core.config import DeployConfig, EcuConfig, VehicleConfig
from agent.core.trace import TraceHeader, TraceRecorder
from agent.protocol.ecu import ROUTINE_SHOW_CONTENT, ROUTINE_STOP_CONTENT
from agent.protocol.files import is_name
from agent.protocol.link import ContentOp, RelayStatus, decode_content_request
from agent.protocol.uds import RoutineType, Session
from gateway.buses import Buses, EcuBusy

__all__ = ["ContentRelay"]

log = logging.getLogger(__name__)

DONE, REFUSED, SILENT = RelayStatus.DONE, RelayStatus.REFUSED, RelayStatus.SILENT


_STEPS = {ContentOp.SHOW: "show", ContentOp.STOP: "stop", ContentOp.DELETE: "delete", ContentOp.READ_DID: "read_did",
          ContentOp.STORE: "store"}

BUSY_WAIT_S = 1.0  # how long a content request waits for an ECU held by other work (a flash) before "try later"


class ContentRelay:
    def __init__(self, config: VehicleConfig, package_dir: Path, results_dir: Path | None, buses: Buses) -> None:
        self.config, self.package_dir, self.results_dir, self.buses = config, package_dir, results_dir, buses

    def run(self, record: bytes) -> tuple[int, bytes]:
        """(status, data or reason) for one routine option record: 0 done, 1 refused, 2 no answer."""
        decoded = decode_content_request(record)
        if decoded is None:
            return REFUSED, b"malformed request"
        op, ecu_name, arg = decoded
        ecu = self.config.ecus.get(ecu_name)
        if ecu is None:
            return REFUSED, b"unknown ECU " + ecu_name[:32].encode("ascii", "replace")
        name = arg.decode("ascii", "replace")
        if op in (ContentOp.STORE, ContentOp.SHOW, ContentOp.DELETE) and not is_name(name):
            return REFUSED, b"bad file name"
        if op == ContentOp.STORE and not (self.package_dir / name).is_file():
            return REFUSED, b"not deployed to the gateway: " + arg[:64]
        if op == ContentOp.READ_DID and len(arg) != 2:
            return REFUSED, b"a DID is two bytes"
        if op not in (ContentOp.STORE, ContentOp.SHOW, ContentOp.STOP, ContentOp.READ_DID, ContentOp.DELETE):
            return REFUSED, b"unknown operation"
        try:
            with self.buses.ecu(ecu.name, "content", wait=BUSY_WAIT_S) as segment:
                return self._on_ecu(segment, op, ecu, name, arg)
        except EcuBusy as busy:
            log.info("content on %s deferred: %s", ecu.name, busy)
            return SILENT, str(busy).encode("ascii", "replace")  # the TBOX tries again later

    def _on_ecu(self, segment: Segment, op: int, ecu: EcuConfig, name: str, arg: bytes) -> tuple[int, bytes]:
        if op == ContentOp.STORE:
            return self._store(segment, ecu.name, name)
        did = int.from_bytes(arg, "big") if op == ContentOp.READ_DID else 0
        step = _STEPS[ContentOp(op)]
        recorder = TraceRecorder(TraceHeader(
            stage="link", client="GW", server=ecu.name, packet=ecu.name, request_id=ecu.request_id,
            response_id=ecu.response_id, functional_id=ecu.functional_id, started=time.time(), extra={"segment": ecu.segment}))

        def steps(c: Any) -> bytes:
            if op == ContentOp.READ_DID:
                return bytes(c.read_data_by_identifier(did).service_data.values[did])
            c.change_session(Session.extendedDiagnosticSession)
            if op == ContentOp.SHOW:
                c.routine_control(ROUTINE_SHOW_CONTENT, RoutineType.startRoutine, arg)
            elif op == ContentOp.DELETE:
                c.delete_file(name)
            else:
                c.routine_control(ROUTINE_STOP_CONTENT, RoutineType.startRoutine)
            log.info("content on %s: %s", ecu.name, {ContentOp.SHOW: f"showing {name}",
                                                     ContentOp.DELETE: f"{name} deleted"}.get(ContentOp(op), "stopped"))
            return b""

        gw = self.config.gateway
        done = CallSequence(segment, Peer.ecu(ecu, *([did] if did else [])), recorder, step, steps, retries=gw.retries,
                            late_grace_s=gw.late_response_grace_ms / 1000.0).run()
        failure = None if done.result == "success" else (str(done.reason), done.nrc)
        value = bytes(done.value or b"")
        if failure is not None or op != ContentOp.READ_DID:  # a sensor read that went well is not kept each time
            self._write(ecu.name, step, recorder, failure)
        if failure is not None:
            return REFUSED if failure[1] is not None else SILENT, failure[0].encode("ascii", "replace")[:200]
        return DONE, value

    def _write(self, ecu: str, step: str, recorder: TraceRecorder, failure: tuple[str, int | None] | None) -> None:
        """The last exchange of each kind with an ECU: ``content/<ecu>.<step>.link.trace.jsonl`` and its result."""
        if self.results_dir is None:
            return
        name = f"{ecu}.{step}"
        try:
            write_link_trace(self.results_dir / "content", name, recorder,
                             None if failure is None else (step, failure[0], failure[1]))
        except OSError as exc:  # the relay's answer matters more than its evidence
            log.warning("content trace of %s not written: %s", name, exc)

    def _store(self, segment: Segment, ecu_name: str, name: str) -> tuple[int, bytes]:

        ecu = self.config.ecus[ecu_name]
        path = self.package_dir / name
        link = DeployConfig(ecu.segment, ecu.request_id, ecu.response_id, max_block_length=4095,
                            p2_ms=ecu.p2_ms, p2_star_ms=ecu.p2_star_ms)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        deployer = PackageDeployer(segment, link, name, path, digest)
        result = deployer.run()
        if self.results_dir is not None:  # result and header-only trace, like any transfer: vota diagnose reads them
            deployer.write(self.results_dir / "content", result)
        if result.result != "success":
            status = REFUSED if result.nrc is not None else SILENT
            return status, f"{result.failed_step}: {result.reason}".encode("ascii", "replace")[:200]
        path.unlink(missing_ok=True)  # the ECU holds it now
        log.info("content %s stored on %s (%d bytes)", name, ecu_name, result.size)
        return DONE, b""
