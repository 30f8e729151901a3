"""The TBOX's side of the gateway link beyond package deploy: start the install, follow it,
read back flash results, flash traces and the inventory (RequestFileTransfer ReadFile).

Inside ``traced(directory, name)`` every exchange of these calls is recorded (stage ``link``,
each with its step: ``boot id``, ``collect inventory``, ``install status``, ``read <file>``...)
and written with its result as ``<name>.link.trace.jsonl`` / ``<name>.link.result.json``, so
that a campaign that fails on them is diagnosed like a failed transfer. Identical polls of one
step (the install status every half second) are kept once, with their count (``x.rep``).
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from agent.adapters.file_client import DeployResult, PackageDeployer, deploy_peer, link_header
from agent.adapters.trace_files import write_link_trace
from agent.adapters.uds_client import Transport, client_fault_counter
from agent.adapters.uds_sequence import CallSequence
from agent.core.config import DeployConfig
from agent.core.faults import FaultSpec
from agent.core.rxswin import decode_did
from agent.core.trace import Exchange, TraceHeader, TraceRecorder
from agent.errors import Refused, TryLater, VotaError
from agent.protocol.link import (
    BOOT_ID_DID,
    CANCEL_ROUTINE,
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
from agent.protocol.uds import Nrc, RoutineType, Session

__all__ = ["GatewayClient", "GatewayError", "InstallStatus", "ContentOp"]


@dataclass
class _LinkTrace:
    """The exchanges of the gateway calls made in one ``traced`` block, and how the last failed."""

    recorder: TraceRecorder
    last: tuple[str, tuple[Any, ...], int] | None = None  # step, what its exchanges were, index of its first
    failure: dict[str, Any] | None = None
    failed_before: dict[str, Any] | None = None  # the last call that failed, even when a later one went through
    calls: int = 0
    fields: dict[str, Any] = field(default_factory=dict)


def _shape(exchanges: list[Exchange]) -> tuple[Any, ...]:
    """What makes two polls the same: requests, answers, errors (a seed's value aside)."""
    return tuple((e.header, e.length, None if e.header[:1] == b"\x27" else e.response,
                  tuple(sorted((k, repr(v)) for k, v in e.extra.items() if k not in ("step", "rep"))))
                 for e in exchanges)


class GatewayError(TryLater):
    """The gateway could not be reached, or did not finish what was asked: try later. When the
    gateway or an ECU behind it says no, the call raises Refused instead. ``nrc``: the gateway's
    negative response, when it answered one."""

    def __init__(self, message: str, nrc: int | None = None) -> None:
        super().__init__(message)
        self.nrc = nrc


class GatewayClient:
    """The TBOX's gateway port (``tbox/ports.py``) over the deploy link: one UDS conversation with
    the gateway at a time, whoever asks (campaigns, content)."""

    def __init__(self, segment: Transport, link: DeployConfig, stop: threading.Event | None = None,
                 faults: list[FaultSpec] | None = None, rxswin_did: int = 0xF1EF) -> None:
        self.segment, self.link, self.rxswin_did = segment, link, rxswin_did
        self.stop = stop or threading.Event()
        self.faults = faults or []
        self.link_faults = client_fault_counter(self.faults, "link")  # the link-stage client faults, across every call
        self.lock = threading.RLock()
        self._local = threading.local()  # the open ``traced`` block of the calling thread, if any

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

    @contextmanager
    def traced(self, directory: Path, name: str) -> Iterator[None]:
        """Record the calls made inside (this thread's only) into ``directory``: the trace and a
        result that is ``failed`` when the block ends with a call's failure."""
        trace = _LinkTrace(TraceRecorder(self._header(name)))
        outer, self._local.trace = getattr(self._local, "trace", None), trace
        failed = False
        try:
            yield
        except BaseException:
            # the block ends on a failure: the last call that failed explains it, even when a call
            # after it went through (an install status asked after a refused start)
            trace.failure = trace.failure or trace.failed_before
            failed = trace.failure is not None
            raise
        finally:
            self._local.trace = outer
            if trace.recorder.exchanges:
                self._write(directory, name, trace, failed)

    def _header(self, name: str) -> TraceHeader:
        return link_header(self.link, "link", name)

    @staticmethod
    def _write(directory: Path, name: str, trace: _LinkTrace, failed: bool) -> None:
        failure = trace.failure if failed else None
        write_link_trace(directory, name, trace.recorder,
                         None if failure is None else (failure["step"], failure["reason"], failure["nrc"]), calls=trace.calls)

    def _call(self, what: str, fn: Any, essential: bool = True) -> Any:
        """One call on the link (extended session, SecurityAccess when the link has it, then
        ``fn(client)``), on the sequence engine: traced into the open ``traced`` block of this
        thread, busyRepeatRequest asked again, a late answer to a request that got none recorded.
        A call that is not ``essential`` (the install's progress) is traced but its failure does not
        make the block's: nothing the campaign depends on went wrong."""
        trace: _LinkTrace | None = getattr(self._local, "trace", None)
        recorder = trace.recorder if trace is not None else TraceRecorder(self._header(what))

        def steps(c: Any) -> Any:
            c.change_session(Session.extendedDiagnosticSession)
            if self.link.security_secret is not None:
                c.unlock_security_access(1)
            return fn(c)

        call = CallSequence(self.segment, deploy_peer(self.link, BOOT_ID_DID, self.rxswin_did), recorder, what, steps,
                            retries=self.link.retries, late_grace_s=self.link.late_response_grace_ms / 1000.0,
                            fault_scope="GW", fault_counter=self.link_faults)
        with self.lock:
            try:
                result = call.run()
            except VotaError as exc:  # the gateway's or an ECU's answer, said by ``fn``
                if essential:
                    self._failed(trace, what, str(exc), None)
                raise
        if result.result != "success":
            if essential:
                self._failed(trace, what, str(result.reason), result.nrc)
            raise GatewayError(f"{what}: {result.reason}", result.nrc)
        if trace is not None:
            trace.failure = None  # a later call went through: an earlier failure did not end the block
            self._fold(trace, what, result.exchanges)
        return result.value

    @staticmethod
    def _failed(trace: _LinkTrace | None, what: str, reason: str, nrc: int | None) -> None:
        if trace is not None:
            trace.calls += 1
            trace.last = None
            trace.failure = trace.failed_before = {"step": what, "reason": reason, "nrc": nrc}

    @staticmethod
    def _fold(trace: _LinkTrace, what: str, made: list[Exchange]) -> None:
        """A call that went exactly as the one before it (the same step, the same answers) is
        kept once, with the count of repeats on its first exchange."""
        trace.calls += 1
        exchanges = trace.recorder.exchanges
        first = len(exchanges) - len(made)
        shape = _shape(made)
        last = trace.last
        if last is not None and last[0] == what and last[1] == shape and made:
            del exchanges[first:]
            head = exchanges[last[2]]
            head.extra["rep"] = int(head.extra.get("rep", 0)) + 1
        else:
            trace.last = (what, shape, first)

    def boot_id(self) -> bytes:
        def read(c: Any) -> bytes:
            return bytes(c.read_data_by_identifier(BOOT_ID_DID).service_data.values[BOOT_ID_DID])

        return self._call("boot id", read)  # type: ignore[no-any-return]

    def rxswin(self) -> dict[str, str] | None:
        """The vehicle's RXSWIN set as the gateway serves it to any tester (22 <gateway.rxswin_did>);
        None when it serves none (a vehicle without approvals)."""
        did = self.rxswin_did

        def read(c: Any) -> bytes:
            return bytes(c.read_data_by_identifier(did).service_data.values[did])

        try:
            data = self._call("rxswin", read)
        except GatewayError as exc:
            if exc.nrc == Nrc.RequestOutOfRange:
                return None
            raise
        try:
            return decode_did(data)
        except ValueError as exc:
            raise GatewayError(f"rxswin: the value of DID {did:04X} is not laid out as documented ({exc})") from None

    def start_install(self, manifest_name: str) -> None:
        self._call("start install", lambda c: c.routine_control(INSTALL_ROUTINE, RoutineType.startRoutine, manifest_name.encode()))

    def install_status(self, campaign: str) -> tuple[int, int, int]:
        return self._status("install status", INSTALL_ROUTINE, RoutineType.requestRoutineResults, campaign.encode())

    def cancel_install(self, campaign: str, reason: str) -> tuple[int, int, int]:
        why = reason.encode("ascii", "replace")[:max(0, 195 - len(campaign))]  # the request within 200 bytes
        return self._status("cancel install", CANCEL_ROUTINE, RoutineType.startRoutine, campaign.encode() + b"\x00" + why)

    def _status(self, what: str, routine: int, kind: int, option: bytes) -> tuple[int, int, int]:
        """A routine answered with an install status record."""
        def ask(c: Any) -> tuple[int, int, int]:
            record = c.routine_control(routine, kind, option)
            status = decode_install_status(bytes(record.service_data.routine_status_record))
            if status is None:
                raise GatewayError(f"{what}: unexpected record {bytes(record.service_data.routine_status_record).hex()}")
            return status

        return self._call(what, ask)  # type: ignore[no-any-return]

    def wait_install(self, campaign: str, timeout: float, poll: float = 0.5, should_stop: Any = None,
                     waiting: Any = None) -> int:
        deadline = time.monotonic() + timeout
        while True:
            status, done, total = self.install_status(campaign)
            if status not in (InstallStatus.RUNNING, InstallStatus.WAITING):
                return status
            if waiting is not None:
                waiting(status == InstallStatus.WAITING)
            if status == InstallStatus.WAITING:  # for the vehicle's state, within the campaign's window: no work to time
                deadline = time.monotonic() + timeout
            if time.monotonic() > deadline:
                raise GatewayError(f"install of {campaign} still running after {timeout:.0f} s")
            if should_stop is not None and should_stop(done, total):
                raise GatewayError("stopped while waiting for the install")
            time.sleep(poll)

    def install_progress(self, campaign: str) -> dict[str, tuple[str, int, int]]:
        """Each ECU's (step, bytes done, bytes in all) while the install runs, from the gateway's
        ``<campaign>/progress.json`` (served from its memory); empty when it cannot be had."""
        try:
            doc = json.loads(self.read_file(f"{campaign}/progress.json", essential=False))
            ecus = doc["ecus"]
            return {str(e): (str(p["step"]), int(p["done"]), int(p["total"])) for e, p in ecus.items()}
        except (VotaError, ValueError, KeyError, TypeError, AttributeError):
            return {}

    def read_file(self, path: str, *, essential: bool = True) -> bytes:
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

        return self._call(f"read {path}", read, essential)  # type: ignore[no-any-return]

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
