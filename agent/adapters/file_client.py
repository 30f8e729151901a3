"""The client side of the file-transfer protocol (``agent/protocol/files.py``): the TBOX deploys
upgrade packages to the gateway with it (D1, D3), the gateway stores owner content on an ECU.
Each file goes as data packets over ISO-TP/UDS, with its header-only interaction trace."""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from udsoncan import DataFormatIdentifier, Filesize

from agent.adapters.storage import atomic_write_json
from agent.adapters.uds_client import Transport
from agent.adapters.uds_sequence import Peer, StepResult, UdsSequence
from agent.core.config import DeployConfig
from agent.core.faults import FaultSpec
from agent.core.trace import TraceHeader
from agent.errors import FlashError
from agent.protocol.files import PACKET_HEADER, packet_payload
from agent.protocol.link import deploy_key
from agent.protocol.uds import Session

__all__ = ["DeployResult", "PackageDeployer", "deploy_security", "deploy_peer", "file_sha256", "link_header"]

log = logging.getLogger(__name__)

Progress = Callable[[str, str, int, int], None]


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def deploy_security(link: DeployConfig) -> Callable[[int, bytes], bytes] | None:
    """The key function of the deploy link's SecurityAccess, when the link requires it."""
    secret = link.security_secret
    return None if secret is None else (lambda level, seed: deploy_key(secret, seed))


@dataclass
class DeployResult(StepResult):
    package: str
    size: int
    sha256: str
    failed_packet: int | None = None
    packets: int = 0
    resumed_from: int = 0
    bytes_transferred: int = 0  # on the link this time (compressed, when it was)
    compression: str | None = None  # the method the package went with (RequestFileTransfer's dataFormatIdentifier)
    trace_bytes: int = 0
    trace_fraction: float = 0.0
    schema: str = field(default="vota-deploy-result/1")


def link_header(link: DeployConfig, stage: str, packet: str, **extra: Any) -> TraceHeader:
    """A trace header of the deploy link: its CAN ids and segment, or over DoIP the logical
    addresses (the TBOX's source, the gateway's target) in their place and the connection in
    ``doip`` (the DoIP header of each diagnostic message follows from them and the length)."""
    if link.transport == "doip":
        ids, where = (link.doip_source, link.doip_target), {
            "transport": "doip", "doip": {"host": link.doip_host, "port": link.doip_port, "source": link.doip_source,
                                          "target": link.doip_target, "version": 2, "payload_type": 0x8001,
                                          "tls": link.doip_tls}}
    else:
        ids, where = (link.request_id, link.response_id), {"segment": link.segment}
    return TraceHeader(stage=stage, client="TBOX", server="GW", packet=packet, request_id=ids[0], response_id=ids[1],
                       functional_id=None, started=time.time(), extra={**where, **extra})


def deploy_peer(link: DeployConfig, *dids: int, name: str = "gateway") -> Peer:
    """The deploy link's server as a sequence's peer (the gateway; an ECU for owner content)."""
    return Peer(name, link.request_id, link.response_id, link.p2_ms / 1000.0, link.p2_star_ms / 1000.0,
                security=deploy_security(link), dids=dids,
                authenticate=link.security_secret if link.secured else None)


class PackageDeployer(UdsSequence[DeployResult]):
    """Deploys one package file to the gateway under ``name``; ``resume`` continues a
    package whose deploy was interrupted (RequestFileTransfer ResumeFile)."""

    def __init__(
        self,
        segment: Transport,
        link: DeployConfig,
        name: str,
        path: str | Path,
        sha256: str,
        *,
        resume: bool = False,
        progress: Progress | None = None,
        stop: threading.Event | None = None,
        faults: list[FaultSpec] | None = None,
    ) -> None:
        self.path = Path(path)
        self.size = self.path.stat().st_size
        header = link_header(link, "deploy", name, package=name, package_size=self.size, package_sha256=sha256)
        super().__init__(segment, deploy_peer(link), header, retries=link.retries,
                         late_grace_s=link.late_response_grace_ms / 1000.0, stop=stop,
                         faults=[f for f in faults or [] if f.stage == "deploy" and f.side == "client"], fault_scope=name)
        self.link_cfg, self.name, self.sha256, self.resume = link, name, sha256, resume
        self.report = progress or (lambda *a: None)
        self.sent = 0
        self.packet: int | None = None
        self.total = self.size  # the bytes TransferData carries (fewer when compressed)
        self.compression: str | None = None  # the method the package went with, if any

    def new_result(self) -> DeployResult:
        return DeployResult(package=self.name, size=self.size, sha256=self.sha256)

    def progress(self, step: str) -> None:
        if step in ("transfer_data", "transfer_exit"):  # before, the bytes to send are not settled (compression)
            self.report(self.name, step, self.sent, self.total)

    def failed(self, result: DeployResult, error: FlashError) -> None:
        if error.step == "transfer_data":
            result.failed_packet = self.packet

    def finished(self, result: DeployResult) -> None:
        result.bytes_transferred = self.sent - result.resumed_from

    def sequence(self, result: DeployResult) -> None:
        c = self.client
        self.step("extended_session", lambda: c.change_session(Session.extendedDiagnosticSession))
        if self.link_cfg.security_secret is not None:
            self.step("security_access", lambda: c.unlock_security_access(1))
        response, stream = self._request_file_transfer(c)
        position = int(response.service_data.fileposition or 0) if self.resume else 0
        max_block = self.max_block = int(response.service_data.max_length)
        payload = packet_payload(max_block) - self.peer.trailer  # the request with its authenticator fits the block
        if payload < 1:
            raise FlashError("request_file_transfer", f"maxNumberOfBlockLength {max_block} leaves no room for data")
        if position % payload or position > self.total:
            raise FlashError("request_file_transfer", f"gateway resumes at byte {position}, not a packet boundary")
        result.resumed_from = self.sent = position
        result.compression = self.compression
        self.report(self.name, "request_file_transfer", position, self.total)
        counter = 1
        with (open(self.path, "rb") if stream is None else io.BytesIO(stream)) as handle:
            handle.seek(position)
            self.packet = position // payload
            while self.sent < self.total:
                data = handle.read(payload)
                block = self.packet.to_bytes(PACKET_HEADER, "big") + data
                self.step("transfer_data", functools.partial(c.transfer_data, counter, block))
                self.sent += len(data)
                self.packet += 1
                result.packets += 1
                counter = (counter + 1) & 0xFF
        digest = bytes.fromhex(self.sha256)
        self.step("transfer_exit", lambda: c.request_transfer_exit(digest))
        self.report(self.name, "done", self.sent, self.total)

    def _request_file_transfer(self, c: Any) -> tuple[Any, bytes | None]:
        """ReplaceFile (or ResumeFile), compressed with the first of the link's methods that
        makes the package smaller and that the gateway takes (``offer_compressed``). (The
        response, the compressed stream or None.)"""
        send = c.resume_file if self.resume else c.replace_file  # Replace: a package of that name is replaced
        if not self.link_cfg.compression:
            return self.step("request_file_transfer", lambda: send(self.name, filesize=self.size)), None
        data = self.path.read_bytes()

        def request(dfi: DataFormatIdentifier | None, payload: bytes) -> Any:
            if dfi is None:
                return send(self.name, filesize=self.size)
            return send(self.name, dfi=dfi, filesize=Filesize(uncompressed=len(data), compressed=len(payload), width=4))

        offer = self.offer_compressed("request_file_transfer", self.link_cfg.compression, data, request)
        if offer.method is None:
            return offer.response, None
        self.compression, self.total = offer.method, len(offer.payload)
        return offer.response, offer.payload

    def write(self, out_dir: str | Path, result: DeployResult) -> None:
        """Write ``<package>.deploy.trace.jsonl`` and ``<package>.deploy.result.json``."""
        out = Path(out_dir)
        result.trace_bytes = self.write_trace(out / f"{self.name}.deploy.trace.jsonl", result)
        result.trace_fraction = round(result.trace_bytes / max(1, self.size), 5)
        atomic_write_json(out / f"{self.name}.deploy.result.json", result.to_json())
