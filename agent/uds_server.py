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

from agent.canbus import Segment
from agent.faults import FaultCounter, FaultSpec

__all__ = [
    "Request",
    "Outcome",
    "Service",
    "ServerState",
    "UdsServer",
    "negative",
    "session_response",
    "tester_present",
    "BlockCounter",
    "Nrc",
    "SESSION_DEFAULT",
    "SESSION_PROGRAMMING",
    "SESSION_EXTENDED",
]

log = logging.getLogger(__name__)

SESSION_DEFAULT = 0x01
SESSION_PROGRAMMING = 0x02
SESSION_EXTENDED = 0x03


class Nrc:
    GENERAL_REJECT = 0x10
    SERVICE_NOT_SUPPORTED = 0x11
    SUBFUNCTION_NOT_SUPPORTED = 0x12
    INCORRECT_LENGTH = 0x13
    BUSY_REPEAT = 0x21
    CONDITIONS_NOT_CORRECT = 0x22
    REQUEST_SEQUENCE_ERROR = 0x24
    OUT_OF_RANGE = 0x31
    SECURITY_ACCESS_DENIED = 0x33
    INVALID_KEY = 0x35
    EXCEEDED_ATTEMPTS = 0x36
    TIME_DELAY_NOT_EXPIRED = 0x37
    UPLOAD_DOWNLOAD_NOT_ACCEPTED = 0x70
    TRANSFER_SUSPENDED = 0x71
    GENERAL_PROGRAMMING_FAILURE = 0x72
    WRONG_BLOCK_SEQUENCE_COUNTER = 0x73
    RESPONSE_PENDING = 0x78
    SUBFUNCTION_NOT_IN_SESSION = 0x7E
    SERVICE_NOT_IN_SESSION = 0x7F


# NRCs a server does not send for functionally addressed requests (ISO 14229-1, 7.5).
_FUNCTIONAL_SILENT_NRCS = {0x11, 0x12, 0x31, 0x7E, 0x7F}


def negative(sid: int, nrc: int) -> bytes:
    return bytes((0x7F, sid, nrc))


def session_response(session: int, p2_ms: int, p2_star_ms: int) -> bytes:
    """Positive DiagnosticSessionControl response: P2 in ms, P2* in units of 10 ms."""
    return bytes((0x50, session)) + p2_ms.to_bytes(2, "big") + (p2_star_ms // 10).to_bytes(2, "big")


def tester_present(state: object, r: "Request") -> bytes:
    """TesterPresent (3E 00); the framework handles suppress-positive-response (3E 80)."""
    if len(r.data) != 2:
        return negative(0x3E, Nrc.INCORRECT_LENGTH)
    if r.data[1] != 0x00:
        return negative(0x3E, Nrc.SUBFUNCTION_NOT_SUPPORTED)
    return b"\x7e\x00"


@dataclass
class BlockCounter:
    """TransferData's blockSequenceCounter: starts at 01, wraps FF -> 00; a repeat of the last
    accepted block is acknowledged without being written again; anything else is NRC 0x73."""

    expected: int = 1
    last: int | None = None

    def classify(self, counter: int) -> str:
        if counter == self.expected:
            return "next"
        if counter == self.last:
            return "repeat"
        return "wrong"

    def accept(self, counter: int) -> None:
        self.last = counter
        self.expected = (counter + 1) & 0xFF


@dataclass(frozen=True)
class Request:
    data: bytes
    now: float
    functional: bool = False

    @property
    def sid(self) -> int:
        return self.data[0]


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


@dataclass(frozen=True)
class Service(Generic[S]):
    handler: Callable[[S, Request], "bytes | Outcome | None"]
    min_length: int = 1
    sessions: frozenset[int] = frozenset({SESSION_DEFAULT, SESSION_PROGRAMMING, SESSION_EXTENDED})
    subfunction: bool = False


@dataclass
class UdsServer(Generic[S]):
    """Serves one UDS address pair (plus the functional address) on a segment."""

    name: str
    segment: Segment
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
        self._faults = FaultCounter(self.faults, self.fault_targets)
        self._threads: list[threading.Thread] = []
        self.physical = self.segment.stack(self.response_id, self.request_id)
        self.functional = (
            self.segment.stack(self.response_id, self.functional_id) if self.functional_id is not None else None
        )

    # ---- life cycle -------------------------------------------------------------------
    def start(self) -> None:
        for stack, functional in ((self.physical, False), (self.functional, True)):
            if stack is None:
                continue
            t = threading.Thread(target=self._serve, args=(stack, functional), name=f"uds-{self.name}", daemon=True)
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
            if stack is not None:
                self.segment.release(stack)

    def go_silent(self, seconds: float) -> None:
        with self._lock:
            self._silent_until = max(self._silent_until, self.clock() + seconds)

    # ---- serving ----------------------------------------------------------------------
    def _serve(self, stack, functional: bool) -> None:  # type: ignore[no-untyped-def]
        while not self._stop.is_set():
            try:
                data = stack.recv(block=True, timeout=0.1)
            except Exception:  # noqa: BLE001 - garbage on the bus must not stop the server
                log.debug("%s: receive failed", self.name, exc_info=True)
                continue
            if not data:
                continue
            try:
                self._handle(stack, bytes(data), functional)
            except Exception:  # noqa: BLE001 - a bad request must not stop the server
                log.exception("%s: request %s failed", self.name, bytes(data[:8]).hex())

    def _watch_s3(self) -> None:
        while not self._stop.wait(0.1):
            with self._lock:
                if self.state.session != SESSION_DEFAULT and self.clock() - self._last_activity > self.s3:
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
            response, outcome = self._dispatch(request)
            fault = self._faults.next(request.sid, scope)
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
            return self._filter(request, negative(sid, Nrc.SERVICE_NOT_SUPPORTED)), None
        if self.state.session not in service.sessions:
            return self._filter(request, negative(sid, Nrc.SERVICE_NOT_IN_SESSION)), None
        if len(request.data) < service.min_length:
            return self._filter(request, negative(sid, Nrc.INCORRECT_LENGTH)), None
        suppress = False
        if service.subfunction:
            suppress = bool(request.data[1] & 0x80)
            request = Request(bytes((sid, request.data[1] & 0x7F)) + request.data[2:], request.now, request.functional)
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
                result.append(negative(sid, Nrc.GENERAL_PROGRAMMING_FAILURE))

        worker = threading.Thread(target=run, name=f"work-{self.name}", daemon=True)
        worker.start()
        worker.join(0.02)
        while worker.is_alive():
            stack.send(negative(sid, Nrc.RESPONSE_PENDING))
            worker.join(self.pending_interval)
        return result[0]

    def _pending(self, stack, sid: int, busy: float) -> None:  # type: ignore[no-untyped-def]
        deadline = self.clock() + busy
        while True:
            stack.send(negative(sid, Nrc.RESPONSE_PENDING))
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
        elif action == "nrc":
            stack.send(negative(request.sid, fault.arg or Nrc.GENERAL_REJECT))
        elif action == "malformed":
            stack.send(malformed(response))
        elif action == "mismatch":
            stack.send(mismatched(request.data, response))
        elif action == "wrong_id":
            wrong = fault.arg if fault.arg is not None else self.response_id + 0x10
            self._send_raw(wrong, response)

    def _send_raw(self, can_id: int, payload: bytes) -> None:
        """Send a response's first frame from another CAN id (no flow control follows)."""
        size = len(payload)
        frame_room = self.segment.config.tx_data_length
        if size <= 7:
            frame = bytes((size,)) + payload  # classic single frame
        elif size <= frame_room - 2:
            frame = bytes((0, size)) + payload  # CAN FD single frame with escape
        else:
            frame = bytes((0x10 | (size >> 8), size & 0xFF)) + payload[: frame_room - 2]  # first frame
        self.segment.send_frame(can_id, frame)


def malformed(response: bytes) -> bytes:
    """A response that breaks the format: a positive one cut to its SID, or a bare 7F."""
    if response[0] == 0x7F:
        return response[:2]
    if len(response) > 1:
        return response[:1]
    return bytes((0x7F,))


def mismatched(request: bytes, response: bytes) -> bytes:
    """A well-formed response that answers another request: wrong echo, else wrong SID."""
    if response[0] != 0x7F and len(response) >= 2 and len(request) >= 2:
        echo = bytearray(response)
        echo[1] = (echo[1] + 1) & 0xFF
        return bytes(echo)
    if response[0] == 0x7F:
        return bytes((0x7F, (request[0] + 1) & 0xFF)) + response[2:]
    return bytes(((response[0] + 1) & 0xFF,)) + response[1:]
