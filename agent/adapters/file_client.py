"""The client side of the file-transfer protocol (``agent/protocol/files.py``): the TBOX deploys
upgrade packages to the gateway with it (D1, D3), the gateway stores owner content on an ECU.
Each file goes as data packets over ISO-TP/UDS, with its header-only interaction trace."""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import io
import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from udsoncan import DataFormatIdentifier, Filesize

from agent.adapters.canbus import Segment
from agent.adapters.storage import atomic_write_json
from agent.adapters.trace_files import write_trace
from agent.adapters.uds_client import ClientFaults, UdsLink, run_step
from agent.core.config import DeployConfig
from agent.core.faults import FaultSpec
from agent.core.trace import TraceHeader, TraceRecorder
from agent.errors import FlashError
from agent.protocol.compression import compress
from agent.protocol.files import PACKET_HEADER, packet_payload
from agent.protocol.link import deploy_key
from agent.protocol.uds import Session

__all__ = ["DeployResult", "PackageDeployer", "deploy_security", "file_sha256"]

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

class DeployResult:
    package: str
    result: str  # success | failed
    size: int
    sha256: str
    failed_step: str | None = None
    reason: str | None = None
    nrc: int | None = None
    failed_packet: int | None = None
    packets: int = 0
    resumed_from: int = 0
    bytes_transferred: int = 0  # on the link this time (compressed, when it was)
    compression: str | None = None  # the method the package went with (RequestFileTransfer's dataFormatIdentifier)
    started: str = ""
    duration_s: float = 0.0
    trace_file: str | None = None
    trace_bytes: int = 0
    trace_fraction: float = 0.0
    schema: str = field(default="vota-deploy-result/1")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class PackageDeployer:
    """Deploys one package file to the gateway under ``name``; ``resume`` continues a
    package whose deploy was interrupted (RequestFileTransfer ResumeFile)."""

    def __init__(
        self,
        segment: Segment,
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
        self.segment, self.link, self.name = segment, link, name
        self.faults = [f for f in faults or [] if f.stage == "deploy" and f.side == "client"]
        self.max_block = 0
        self.path = Path(path)
        self.sha256 = sha256
        self.resume = resume
        self.progress = progress or (lambda *a: None)
        self.stop = stop or threading.Event()
        self.size = self.path.stat().st_size
        self.recorder = TraceRecorder(
            TraceHeader(
                stage="deploy",
                client="TBOX",
                server="GW",
                packet=name,
                request_id=link.request_id,
                response_id=link.response_id,
                functional_id=None,
                started=time.time(),
                extra={"segment": link.segment, "package": name, "package_size": self.size, "package_sha256": sha256},
            )
        )
        self.step = ""
        self.sent = 0
        self.packet: int | None = None
        self.compression: str | None = None  # the method the package went with, if any
        self.total = self.size  # the bytes TransferData carries (fewer when compressed)

    def run(self) -> DeployResult:
        started = time.time()
        result = DeployResult(self.name, "failed", self.size, self.sha256,
                              started=_dt.datetime.fromtimestamp(started, _dt.timezone.utc).isoformat(timespec="seconds"))
        faults = ClientFaults(self.faults, self.name, "deploy", lambda: self.max_block or None) if self.faults else None
        link = UdsLink(self.segment, self.link.request_id, self.link.response_id, name="gateway",
                       recorder=self.recorder, p2=self.link.p2_ms / 1000.0, p2_star=self.link.p2_star_ms / 1000.0,
                       faults=faults, security=deploy_security(self.link))
        try:
            self._sequence(link, result)
            result.result = "success"
        except FlashError as exc:
            result.failed_step, result.reason, result.nrc = exc.step, exc.reason, exc.nrc
            if exc.step == "transfer_data":
                result.failed_packet = self.packet
            log.warning("deploy of %s failed at %s: %s", self.name, exc.step, exc.reason)
            if exc.nrc is None and self.link.late_response_grace_ms:
                link.connection.drain_late(self.link.late_response_grace_ms / 1000.0)  # a late answer is evidence
        finally:
            link.close()
        result.duration_s = round(time.time() - started, 3)
        result.bytes_transferred = self.sent - result.resumed_from
        return result

    def _do(self, step: str, action: Callable[[], Any]) -> Any:
        if self.stop.is_set():
            raise FlashError(step, "cancelled")
        self.step = step
        if step in ("transfer_data", "transfer_exit"):  # before, the bytes to send are not settled (compression)
            self.progress(self.name, step, self.sent, self.total)
        return run_step(step, action, self.recorder)

    def _sequence(self, link: UdsLink, result: DeployResult) -> None:
        c = link.client
        self._do("extended_session", lambda: c.change_session(Session.extendedDiagnosticSession))
        if self.link.security_secret is not None:
            self._do("security_access", lambda: c.unlock_security_access(1))
        response, stream = self._request_file_transfer(c)
        position = int(response.service_data.fileposition or 0) if self.resume else 0
        max_block = self.max_block = int(response.service_data.max_length)
        payload = packet_payload(max_block)
        if payload < 1:
            raise FlashError("request_file_transfer", f"maxNumberOfBlockLength {max_block} leaves no room for data")
        if position % payload or position > self.total:
            raise FlashError("request_file_transfer", f"gateway resumes at byte {position}, not a packet boundary")
        result.resumed_from = self.sent = position
        result.compression = self.compression
        self.progress(self.name, "request_file_transfer", position, self.total)
        counter = 1
        with (open(self.path, "rb") if stream is None else io.BytesIO(stream)) as handle:
            handle.seek(position)
            self.packet = position // payload
            while self.sent < self.total:
                data = handle.read(payload)
                block = self.packet.to_bytes(PACKET_HEADER, "big") + data
                self._do("transfer_data", functools.partial(c.transfer_data, counter, block))
                self.sent += len(data)
                self.packet += 1
                result.packets += 1
                counter = (counter + 1) & 0xFF
        digest = bytes.fromhex(self.sha256)
        self._do("transfer_exit", lambda: c.request_transfer_exit(digest))
        self.progress(self.name, "done", self.sent, self.total)

    def _request_file_transfer(self, c: Any) -> tuple[Any, bytes | None]:
        """ReplaceFile (or ResumeFile), compressed with the first of the link's methods that
        makes the package smaller and that the gateway takes; a method it refuses (NRC 0x31) is
        followed by the next, at last none. (The response, the compressed stream or None.)"""
        send = c.resume_file if self.resume else c.replace_file  # Replace: a package of that name is replaced
        if self.link.compression:
            data = self.path.read_bytes()
            for method, nibble in self.link.compression:
                packed = compress(method, data)
                if len(packed) >= len(data):
                    continue
                size = Filesize(uncompressed=len(data), compressed=len(packed), width=4)
                try:
                    response = self._do("request_file_transfer", functools.partial(
                        send, self.name, dfi=DataFormatIdentifier(compression=nibble), filesize=size))
                except FlashError as exc:
                    if exc.nrc != 0x31:
                        raise
                    if self.recorder.current is not None:
                        self.recorder.current.extra["retried"] = True  # judged: the next attempt
                    log.warning("the gateway refused %s for %s (NRC 0x31): trying the next way", method, self.name)
                    continue
                self.compression, self.total = method, len(packed)
                return response, packed
        return self._do("request_file_transfer", lambda: send(self.name, filesize=self.size)), None

    def write(self, out_dir: str | Path, result: DeployResult) -> None:
        """Write ``<package>.deploy.trace.jsonl`` and ``<package>.deploy.result.json``."""
        out = Path(out_dir)
        trace_path = out / f"{self.name}.deploy.trace.jsonl"
        result.trace_bytes = write_trace(trace_path, self.recorder, result.result)
        result.trace_file = trace_path.name
        result.trace_fraction = round(result.trace_bytes / max(1, self.size), 5)
        atomic_write_json(out / f"{self.name}.deploy.result.json", result.to_json())
