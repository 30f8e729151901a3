"""A small UDS server framework over ISO-TP, shared by the ECU simulator and the gateway.

Services are a table of handlers, each a function of ``(state, request) -> outcome`` that
does no bus I/O and reads no clock (``request.now`` carries the time). The server owns the
transport: physical and functional addressing, suppress-positive-response, NRC rules for
functional requests, the S3 session timeout, 0x78 response-pending while a slow operation
works, silent periods (ECU reset), and fault injection on the way out.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Generic, Protocol, TypeVar

import isotp

from agent.adapters.canbus import Segment
from agent.adapters.heartbeat import Heartbeats
from agent.core.faults import FaultCounter, FaultSpec
from agent.protocol.uds import Nrc, Request, Session, malformed, mismatched, negative

__all__ = ["Outcome", "Service", "ServerState", "UdsServer", "tester_present"]

log = logging.getLogger(__name__)

OPENS_TRANSFER = frozenset({0x34, 0x35, 0x38})  # RequestDownload, RequestUpload, RequestFileTransfer

# NRCs a server does not send for functionally addressed requests (ISO 14229-1, 7.5).
_FUNCTIONAL_SILENT_NRCS = {Nrc.ServiceNotSupported, Nrc.SubFunctionNotSupported, Nrc.RequestOutOfRange,
                           Nrc.SubFunctionNotSupportedInActiveSession, Nrc.ServiceNotSupportedInActiveSession}

def tester_present(state: object, r: "Request") -> bytes:
    """TesterPresent (3E 00); the framework handles suppress-positive-response (3E 80)."""
    if len(r.data) != 2:
        return r.negative(Nrc.IncorrectMessageLengthOrInvalidFormat)
    if r.data[1] != 0x00:
        return r.negative(Nrc.SubFunctionNotSupported)
    return b"\x7e\x00"



@dataclass
class Outcome:
    """What a handler answers. ``busy`` seconds of (simulated) work are covered by 0x78
    pending; ``work`` is real work run off the handler while 0x78 pendings go out, and
    returns the final response; ``after`` runs once the response is on the bus; ``silent``
    seconds follow it."""

    response: bytes | None
    busy: float = 0.0
    work: Callable[[], bytes] | None = None
    after: Callable[[], None] | None = None
    silent: float = 0.0


class ServerState(Protocol):
    session: int

    def session_timeout(self) -> None: ...


S = TypeVar("S", bound=ServerState)


class _Reply:
    """An answer path that is not an ISO-TP stack: what ``_handle`` sends goes to a callable."""

    def __init__(self, reply: Callable[[bytes], None]) -> None:
        self.reply = reply

    def send(self, payload: bytes, send_timeout: float | None = None) -> None:
        self.reply(bytes(payload))


@dataclass(frozen=True)
class Service(Generic[S]):
    handler: Callable[[S, Request], "bytes | Outcome | None"]
    min_length: int = 1
    sessions: frozenset[int] = frozenset({Session.defaultSession, Session.programmingSession, Session.extendedDiagnosticSession})
    subfunction: bool = False
    subfunctions: frozenset[int] | None = None  # the sub-functions it supports (None: the handler decides)


@dataclass
class UdsServer(Generic[S]):
    """Serves one UDS address pair (plus the functional address) on a segment; with no segment,
    only the requests handed to ``serve`` by another transport (the gateway's DoIP entity)."""

    name: str
    segment: Segment | None
    request_id: int
    response_id: int
    functional_id: int | None
    services: dict[int, Service[S]]
    state: S
    s3: float = 5.0
    pending_interval: float = 1.0
    faults: list[FaultSpec] = field(default_factory=list)
    fault_targets: tuple[str, ...] = ("*",)  # targets whose faults apply to every request
    fault_scope: Callable[[S], str | None] | None = None  # the current target (e.g. the package)
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._silent_until = 0.0
        self._last_activity = self.clock()
        self._segment_at = float("-inf")  # the last request that came on the segment (not by ``serve``)
        self._faults = FaultCounter(self.faults, self.fault_targets)
        self._threads: list[threading.Thread] = []
        self._beats = Heartbeats(0.0, self.clock)  # every serving thread, each loop turn and pending
        # every answer goes out on the physical stack (ISO 15765-2); it takes the tester's flow
        # control from the physical request id, and from the functional id too (some testers)
        self.physical = self.functional = None
        if self.segment is not None:
            self.physical = self.segment.stack(self.response_id, self.request_id, flow_control_from=self.functional_id)
            if self.functional_id is not None:
                self.functional = self.segment.stack(self.response_id, self.functional_id, receive_only=True)

    # ---- life cycle -------------------------------------------------------------------
    def start(self) -> None:
        for stack, functional in ((self.physical, False), (self.functional, True)):
            if stack is None:
                continue
            name = f"uds-{self.name}-{'functional' if functional else 'physical'}"
            self._beats.beat(name)
            t = threading.Thread(target=self._serve, args=(stack, functional), name=name, daemon=True)
            t.start()
            self._threads.append(t)
        t = threading.Thread(target=self._watch_s3, name=f"s3-{self.name}", daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=2.0)
        self._threads.clear()
        for stack in (self.physical, self.functional):
            if stack is not None and self.segment is not None:
                self.segment.release(stack)

    def alive(self, max_age_s: float) -> list[str]:
        """What is wrong with the server, for a watchdog: its threads that ended, and those
        that have not come round their loop (or sent a response-pending) within ``max_age_s``."""
        return [f"{t.name} ended" for t in self._threads if not t.is_alive()] + self._beats.stale(max_age_s)

    def go_silent(self, seconds: float) -> None:
        with self._lock:
            self._silent_until = max(self._silent_until, self.clock() + seconds)

    def busy_on_segment(self, within: float) -> bool:
        """A client on the segment sent a request within ``within`` s: a client of another
        transport waits (the gateway's DoIP testers, gateway/doip_routing.py)."""
        return self.clock() - self._segment_at < within

    # ---- serving ----------------------------------------------------------------------
    def serve(self, data: bytes, reply: Callable[[bytes], None]) -> None:
        """A request that came by another transport (the gateway's DoIP entity), handled as one on
        the physical address; every answer, response-pending too, goes to ``reply``."""
        self._handle(_Reply(reply), data, False)

    def _serve(self, stack, functional: bool) -> None:  # type: ignore[no-untyped-def]
        while not self._stop.is_set():
            self._beats.beat(threading.current_thread().name)
            try:
                data = stack.recv(block=True, timeout=0.1)
            except Exception:  # noqa: BLE001 - garbage on the bus must not stop the server
                log.debug("%s: receive failed", self.name, exc_info=True)
                continue
            if not data:
                continue
            self._segment_at = self.clock()
            try:
                self._handle(self.physical, bytes(data), functional)  # every answer is physical
            except isotp.errors.BlockingSendFailure as exc:  # the bus, not this server: e.g. an overflow flow control
                log.warning("%s: the answer to %s was not sent: %s", self.name, bytes(data[:8]).hex(), exc)
            except Exception:  # noqa: BLE001 - a bad request must not stop the server
                log.exception("%s: request %s failed", self.name, bytes(data[:8]).hex())

    def _watch_s3(self) -> None:
        while not self._stop.wait(0.1):
            with self._lock:
                if self.state.session != Session.defaultSession and self.clock() - self._last_activity > self.s3:
                    log.info("%s: S3 timeout, back to the default session", self.name)
                    self.state.session_timeout()

    def _handle(self, stack, data: bytes, functional: bool) -> None:  # type: ignore[no-untyped-def]
        with self._lock:
            now = self.clock()
            if now < self._silent_until:
                log.debug("%s: silent, ignoring %s", self.name, data[:4].hex())
                return
            self._last_activity = now
            request = Request(data, now, functional)
            scope = self.fault_scope(self.state) if self.fault_scope is not None else None
            fault = self._faults.next(request.sid, scope) if scope is not None or self.fault_scope is None else None
            # not done at all: busy (the client asks again), or a refused request that would open a
            # transfer (RequestDownload/Upload, RequestFileTransfer), which an ECU refuses before it acts
            busy = fault is not None and fault.action == "nrc" and (fault.arg == Nrc.BusyRepeatRequest
                                                                    or request.sid in OPENS_TRANSFER)
            if not busy:
                response, outcome = self._dispatch(request)
            if scope is None and self.fault_scope is not None:
                scope = self.fault_scope(self.state)  # the request that opened it (0x38) is the package's too
                fault = self._faults.next(request.sid, scope)
                if fault is not None and fault.action == "nrc" and request.sid in OPENS_TRANSFER:
                    abort = getattr(self.state, "abort", None)  # refused: the transfer it opened is not left open
                    if abort is not None:
                        abort()
        if busy:
            self._respond(stack, request, request.negative(fault.arg or Nrc.GeneralReject), fault)  # type: ignore[union-attr]
            return
        if outcome is not None and outcome.work is not None:
            response = self._work(stack, request.sid, outcome.work)
        elif outcome is not None and outcome.busy > 0 and response is not None:
            self._pending(stack, request.sid, outcome.busy)
        with self._lock:
            self._last_activity = self.clock()
        if response is not None:
            self._respond(stack, request, response, fault)
        if outcome is not None:
            if outcome.silent > 0:
                self.go_silent(outcome.silent)
            if outcome.after is not None:
                with self._lock:
                    outcome.after()

    def _dispatch(self, request: Request) -> tuple[bytes | None, Outcome | None]:
        sid = request.sid
        service = self.services.get(sid)
        if service is None:
            return self._filter(request, request.negative(Nrc.ServiceNotSupported)), None
        # ISO 14229-1's order of checks: service, session, minimum length (SID + sub-function),
        # sub-function, then the service's own length and parameters
        if self.state.session not in service.sessions:
            return self._filter(request, request.negative(Nrc.ServiceNotSupportedInActiveSession)), None
        if service.subfunction and len(request.data) < 2:
            return self._filter(request, request.negative(Nrc.IncorrectMessageLengthOrInvalidFormat)), None
        if service.subfunctions is not None and request.data[1] & 0x7F not in service.subfunctions:
            return self._filter(request, request.negative(Nrc.SubFunctionNotSupported)), None
        if len(request.data) < service.min_length:
            return self._filter(request, request.negative(Nrc.IncorrectMessageLengthOrInvalidFormat)), None
        suppress = False
        if service.subfunction:
            suppress = bool(request.data[1] & 0x80)
            request = Request(bytes((sid, request.data[1] & 0x7F)) + request.data[2:], request.now, request.functional,
                              suppressed=suppress)
        result = service.handler(self.state, request)
        outcome = result if isinstance(result, Outcome) else Outcome(result)
        response = outcome.response
        if response is not None and response[0] != 0x7F and suppress and outcome.busy <= 0:
            response = None
        return self._filter(request, response), outcome

    @staticmethod
    def _filter(request: Request, response: bytes | None) -> bytes | None:
        if (
            response is not None
            and request.functional
            and response[0] == 0x7F
            and len(response) >= 3
            and response[2] in _FUNCTIONAL_SILENT_NRCS
        ):
            return None
        return response

    def _work(self, stack, sid: int, work: Callable[[], bytes]) -> bytes:  # type: ignore[no-untyped-def]
        result: list[bytes] = []

        def run() -> None:
            try:
                result.append(work())
            except Exception:  # noqa: BLE001 - the client gets an NRC, the server goes on
                log.exception("%s: work for service 0x%02X failed", self.name, sid)
                result.append(negative(sid, Nrc.GeneralProgrammingFailure))

        worker = threading.Thread(target=run, name=f"work-{self.name}", daemon=True)
        worker.start()
        worker.join(0.02)
        while worker.is_alive():
            self._beat()
            stack.send(negative(sid, Nrc.RequestCorrectlyReceived_ResponsePending))
            worker.join(self.pending_interval)
        return result[0]

    def _beat(self) -> None:
        """A request being worked on (response-pending going out) is progress for its thread."""
        self._beats.beat(threading.current_thread().name)

    def _pending(self, stack, sid: int, busy: float) -> None:  # type: ignore[no-untyped-def]
        deadline = self.clock() + busy
        while True:
            self._beat()
            stack.send(negative(sid, Nrc.RequestCorrectlyReceived_ResponsePending))
            left = deadline - self.clock()
            if left <= 0 or self._stop.wait(min(left, self.pending_interval)):
                return
            if self.clock() >= deadline:
                return

    def _respond(self, stack, request: Request, response: bytes, fault: FaultSpec | None) -> None:  # type: ignore[no-untyped-def]
        if fault is None:
            stack.send(response)
            return
        log.warning("%s: injecting fault %s", self.name, fault.text)
        action = fault.action
        if action == "drop":
            return
        if action == "delay":
            self._stop.wait((fault.arg or 0) / 1000.0)
            stack.send(response)
        elif action == "pending":  # slow, and says so: 0x78 until the answer
            self._pending(stack, request.sid, (fault.arg or 0) / 1000.0)
            stack.send(response)
        elif action == "nrc":
            stack.send(request.negative(fault.arg or Nrc.GeneralReject))
        elif action == "malformed":
            stack.send(malformed(response))
        elif action == "mismatch":
            stack.send(mismatched(request.data, response))
        elif action == "wrong_id":
            wrong = fault.arg if fault.arg is not None else self.response_id + 0x10
            if self.segment is not None:
                self._send_raw(wrong, response)  # on another transport the answer is lost the same way

    def _send_raw(self, can_id: int, payload: bytes) -> None:
        """Send a response's first frame from another CAN id (no flow control follows)."""
        assert self.segment is not None
        size = len(payload)
        frame_room = self.segment.config.tx_data_length
        if size <= 7:
            frame = bytes((size,)) + payload  # classic single frame
        elif size <= frame_room - 2:
            frame = bytes((0, size)) + payload  # CAN FD single frame with escape
        else:
            frame = bytes((0x10 | (size >> 8), size & 0xFF)) + payload[: frame_room - 2]  # first frame
        self.segment.send_frame(can_id, frame)
