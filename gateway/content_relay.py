"""Owner content for ECUs behind the gateway (C6): the TBOX deploys the material to the
gateway like a package, then asks the gateway, by routine 0x0303, to store it on the ECU
that shows it (RequestFileTransfer, the deploy protocol), to show or stop it (the ECU's
RoutineControl 0x0401 / 0x0402), or to read a DID for it (the light sensor for day/night).
No software is flashed.

    31 01 0303 01 <ecu> 00 <file>     store <file> from the package directory on <ecu>
    31 01 0303 02 <ecu> 00 <file>     show it
    31 01 0303 03 <ecu> 00            stop showing
    31 01 0303 04 <ecu> 00 <did:2>    read a DID
    31 01 0303 05 <ecu> 00 <file>     delete it from the ECU (RequestFileTransfer DeleteFile)
    ->  71 01 0303 00 <data>          done (data: the DID's value for 04)
    ->  71 01 0303 01 <reason>        the ECU refused; the reason in ASCII
    ->  71 01 0303 02 <reason>        the ECU did not answer (asleep, unplugged): worth trying later

The gateway's copy of stored material is removed once the ECU holds it; the transfer's
result and header-only trace stay in ``<results_dir>/content/`` (the TBOX reads them back).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from agent.canbus import Segment
from agent.config import DeployConfig, VehicleConfig
from agent.file_transfer import NAME
from agent.uds_client import RawCodec, UdsLink, describe_failure
from ecu_sim.content import ROUTINE_SHOW_CONTENT, ROUTINE_STOP_CONTENT
from gateway.deploy_server import CONTENT_ROUTINE

__all__ = ["CONTENT_ROUTINE", "ContentOp", "ContentRelay", "encode_request"]

log = logging.getLogger(__name__)


DONE, REFUSED, SILENT = 0x00, 0x01, 0x02


class ContentOp:
    STORE = 0x01
    SHOW = 0x02
    STOP = 0x03
    READ_DID = 0x04
    DELETE = 0x05


def encode_request(op: int, ecu: str, arg: bytes = b"") -> bytes:
    return bytes((op,)) + ecu.encode("ascii") + b"\x00" + arg


class ContentRelay:
    def __init__(self, config: VehicleConfig, package_dir: Path, results_dir: Path | None = None) -> None:
        self.config, self.package_dir, self.results_dir = config, package_dir, results_dir

    def run(self, record: bytes) -> tuple[int, bytes]:
        """(status, data or reason) for one routine option record: 0 done, 1 refused, 2 no answer."""
        if len(record) < 3 or b"\x00" not in record[1:]:
            return REFUSED, b"malformed request"
        op = record[0]
        ecu_name, _, arg = record[1:].partition(b"\x00")
        ecu = self.config.ecus.get(ecu_name.decode("ascii", "replace"))
        if ecu is None:
            return REFUSED, b"unknown ECU " + ecu_name[:32]
        name = arg.decode("ascii", "replace")
        if op in (ContentOp.STORE, ContentOp.SHOW, ContentOp.DELETE) and not NAME.match(name):
            return REFUSED, b"bad file name"
        if op == ContentOp.STORE and not (self.package_dir / name).is_file():
            return REFUSED, b"not deployed to the gateway: " + arg[:64]
        if op == ContentOp.READ_DID and len(arg) != 2:
            return REFUSED, b"a DID is two bytes"
        if op not in (ContentOp.STORE, ContentOp.SHOW, ContentOp.STOP, ContentOp.READ_DID, ContentOp.DELETE):
            return REFUSED, b"unknown operation"
        with Segment(self.config.segments[ecu.segment]) as segment:
            if op == ContentOp.STORE:
                return self._store(segment, ecu.name, name)
            did = int.from_bytes(arg, "big") if op == ContentOp.READ_DID else 0
            with UdsLink(segment, ecu.request_id, ecu.response_id, name=ecu.name, p2=ecu.p2_ms / 1000.0,
                         p2_star=ecu.p2_star_ms / 1000.0, dids={did: RawCodec()} if did else None) as link:
                try:
                    if op == ContentOp.READ_DID:
                        return DONE, bytes(link.client.read_data_by_identifier(did).service_data.values[did])
                    link.client.change_session(0x03)
                    if op == ContentOp.SHOW:
                        link.client.routine_control(ROUTINE_SHOW_CONTENT, 0x01, arg)
                    elif op == ContentOp.DELETE:
                        link.client.delete_file(name)
                    else:
                        link.client.routine_control(ROUTINE_STOP_CONTENT, 0x01)
                    log.info("content on %s: %s", ecu.name, {ContentOp.SHOW: f"showing {name}", ContentOp.DELETE: f"{name} deleted"}
                             .get(op, "stopped"))
                    return DONE, b""
                except Exception as exc:  # noqa: BLE001 - the ECU's answer goes back to the TBOX
                    reason, nrc = describe_failure(exc)
                    return REFUSED if nrc is not None else SILENT, reason.encode("ascii", "replace")[:200]

    def _store(self, segment: Segment, ecu_name: str, name: str) -> tuple[int, bytes]:
        from tbox.deploy import PackageDeployer  # the client side of the same file-transfer protocol

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
