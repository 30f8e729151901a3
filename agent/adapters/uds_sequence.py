"""One engine for every traced UDS sequence: the TBOX's deploy to the gateway, the gateway's
flash and activation of an ECU, and the short calls on a link (the TBOX's install and read-back
calls, the gateway's content relay). A sequence is a series of named steps over one link; the
base class does what every step needs, the way python-can's ``BusABC`` leaves a backend two
methods, and a sequence writes only ``new_result`` and ``sequence``:

- the link: a udsoncan client over the segment's ISO-TP stack for one peer (``Peer``), every
  exchange recorded header-only (``agent/adapters/uds_client.py``);
- ``step(name, action)``: cancellation (``stop``), the step's hooks (the journal, progress), and
  one retry policy for every sequence: a busyRepeatRequest (NRC 0x21) is asked again after a
  pause, at most ``retries`` times, the earlier attempt marked ``x.retried`` so that only the
  last one is judged; a responsePending (NRC 0x78) is waited out by the client within P2*, each
  one recorded as ``x.pend``. Either way the step ends on its final answer. NRCs in
  ``tolerate`` end the step as done (marked ``x.tolerated``, not judged); anything else ends the
  sequence with ``FlashError(step, reason, nrc)``;
- ``request(spec)``: a step described as data (``StepSpec``: name, request bytes, tolerated
  NRCs), sent as it is;
- ``routine``, ``wait_back`` after a reset, and ``offer_compressed``: the negotiation of a
  compression method with a peer that may refuse it;
- ``run()``: the failure mapped into the result (``StepResult``: failed_step, reason, nrc), a
  late answer after a request that got none recorded (``x.late``), the link closed, the time
  taken; ``trace_text`` / ``write_trace`` for its header-only trace.
"""

from __future__ import annotations

import datetime as _dt
import functools
import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Generic, Iterable, Sequence, TypeVar

import udsoncan
from udsoncan import DataFormatIdentifier
from udsoncan.exceptions import NegativeResponseException, UnexpectedResponseException

from agent.adapters.plugins import seed_key_for
from agent.adapters.trace_files import write_trace
from agent.adapters.uds_client import ClientFaults, RawCodec, Transport, UdsLink, describe_failure
from agent.core.config import EcuConfig
from agent.core.faults import FaultCounter, FaultSpec
from agent.core.flash_profile import ProfileStep, RecordContext
from agent.core.trace import TraceHeader, TraceRecorder
from agent.errors import FlashError, VotaError
from agent.protocol.compression import compress
from agent.protocol.link import AUTH_TRAILER
from agent.protocol.uds import Nrc, RoutineType

__all__ = ["Peer", "StepResult", "StepSpec", "Offer", "UdsSequence", "CallSequence", "CallResult", "BUSY", "iso_time"]

log = logging.getLogger(__name__)

BUSY = frozenset({Nrc.BusyRepeatRequest})  # asked again after a pause (0x78 the client waits out itself)
NONE: frozenset[int] = frozenset()
BUSY_PAUSE_S = 0.1


def iso_time(epoch: float) -> str:
    return _dt.datetime.fromtimestamp(epoch, _dt.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Peer:
    """The server a sequence talks to: its addresses and timing, and what the client needs to
    talk to it (the SecurityAccess key function, DIDs read as raw bytes)."""

    name: str
    request_id: int
    response_id: int
    p2_s: float = 1.0
    p2_star_s: float = 6.0
    security: Callable[[int, bytes], bytes] | None = None
    dids: tuple[int, ...] = ()
    watch_ids: frozenset[int] = frozenset()  # other ids whose frames are not stray answers (the functional id)
    functional_id: int | None = None
    authenticate: str | None = None  # the link's secret: requests after SecurityAccess carry an authenticator

    @property
    def trailer(self) -> int:
        """Bytes each authenticated request carries besides its own (freshness and MAC)."""
        return AUTH_TRAILER if self.authenticate is not None else 0

    @classmethod
    def ecu(cls, ecu: EcuConfig, *dids: int) -> "Peer":
        """An ECU as the gateway talks to it: its addresses, timing and SecurityAccess key."""
        return cls(ecu.name, ecu.request_id, ecu.response_id, ecu.p2_ms / 1000.0, ecu.p2_star_ms / 1000.0,
                   security=seed_key_for(ecu), dids=dids,
                   watch_ids=frozenset({ecu.functional_id}), functional_id=ecu.functional_id)


@dataclass(kw_only=True)
class StepResult:
    """What every sequence's result carries: how it ended, where it failed and why."""

    result: str = "failed"  # success | failed
    failed_step: str | None = None
    reason: str | None = None
    nrc: int | None = None
    started: str = ""
    duration_s: float = 0.0
    trace_file: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class StepSpec:
    """A step as data: its name, the request (bytes, sent as they are), the NRCs that count as
    done, the NRCs asked again (busyRepeatRequest by default)."""

    name: str
    request: bytes
    tolerate: frozenset[int] = frozenset()
    retry_on: frozenset[int] = BUSY


@dataclass(frozen=True)
class Offer:
    """How a compression negotiation ended: the positive response, the bytes to transfer, the
    method they went with (None: uncompressed), and the methods the peer refused first."""

    response: Any
    payload: bytes
    method: str | None
    refused: tuple[str, ...] = ()


R = TypeVar("R", bound=StepResult)


class UdsSequence(Generic[R]):
    """The base of every traced sequence (see the module). ``retries``: busyRepeatRequest answers
    asked again per step; ``late_grace_s``: how long a late answer is waited for after a request
    that got none; ``on_step(step)``: told when a new step starts (the install journal)."""

    trace_steps = False  # record each exchange's step name (x.step); the programming sequences are known by their services

    def __init__(self, segment: Transport, peer: Peer, header: TraceHeader, *, retries: int = 2, late_grace_s: float = 0.0,
                 stop: threading.Event | None = None, faults: Sequence[FaultSpec] = (), fault_scope: str = "",
                 on_step: Callable[[str], None] | None = None, fault_counter: FaultCounter | None = None) -> None:
        self.segment, self.peer = segment, peer
        self.recorder = TraceRecorder(header)
        self.retries, self.late_grace_s = retries, late_grace_s
        self.stop = stop or threading.Event()
        self.faults = list(faults)
        self.fault_scope = fault_scope or peer.name
        self.fault_counter = fault_counter  # shared with other sequences that count faults together
        self.on_step = on_step
        self.current = ""  # the step running now (or the last one)
        self.max_block = 0  # the peer's maxNumberOfBlockLength, once known (fault injection sizes by it)
        self._link: UdsLink | None = None

    # ---- what a sequence writes --------------------------------------------------------
    def new_result(self) -> R:
        raise NotImplementedError

    def sequence(self, result: R) -> None:
        """The steps; raises FlashError where it fails."""
        raise NotImplementedError

    def progress(self, step: str) -> None:
        """Told as each step starts (a sequence that reports progress overrides it)."""

    def failed(self, result: R, error: FlashError) -> None:
        """After the failure was mapped into ``result`` (a sequence adds what it knows)."""

    def finished(self, result: R) -> None:
        """After the link is closed, success or not."""

    # ---- the engine --------------------------------------------------------------------
    @property
    def link(self) -> UdsLink:
        assert self._link is not None, "only while the sequence runs"
        return self._link

    @property
    def client(self) -> Any:
        return self.link.client

    def open_link(self) -> UdsLink:
        p = self.peer
        faults = None
        if self.faults or self.fault_counter is not None:
            faults = ClientFaults(self.faults, self.fault_scope, self.recorder.header.stage, lambda: self.max_block or None,
                                  self.fault_counter)
        return UdsLink(self.segment, p.request_id, p.response_id, name=p.name, recorder=self.recorder, p2=p.p2_s,
                       p2_star=p.p2_star_s, security=p.security, dids={d: RawCodec() for d in p.dids},
                       watch_ids=set(p.watch_ids), faults=faults, authenticate=p.authenticate)

    def run(self) -> R:
        began = time.time()
        result = self.new_result()
        result.started = iso_time(began)
        self._link = self.open_link()
        try:
            self.sequence(result)
            result.result = "success"
        except FlashError as exc:
            result.result, result.failed_step, result.reason, result.nrc = "failed", exc.step, exc.reason, exc.nrc
            # logged as the sequence's own module (gateway.flash, ...), which says whose sequence failed
            logging.getLogger(type(self).__module__).warning("%s: %s failed at %s: %s", self.peer.name,
                                                             self.recorder.header.stage, exc.step, exc.reason)
            self.failed(result, exc)
            if exc.nrc is None and exc.reason != "cancelled" and self.late_grace_s > 0:
                self.link.connection.drain_late(self.late_grace_s)  # a late answer is evidence
        finally:
            self._link.close()
        result.duration_s = round(time.time() - began, 3)
        self.finished(result)
        return result

    def step(self, name: str, action: Callable[[], Any], *, retry_on: Iterable[int] = BUSY,
             tolerate: Iterable[int] = NONE) -> Any:
        """One step: the answer of ``action`` (None for a tolerated NRC), or FlashError(name, ...)."""
        if self.stop.is_set():
            raise FlashError(name, "cancelled")
        if name != self.current and self.on_step is not None:
            self.on_step(name)
        self.current = name
        self.progress(name)
        retry_on = retry_on if isinstance(retry_on, frozenset) else frozenset(retry_on)
        tolerate = tolerate if isinstance(tolerate, frozenset) else frozenset(tolerate)
        if not self.trace_steps:
            return self._attempts(name, action, retry_on, tolerate)
        with self.recorder.step(name):
            return self._attempts(name, action, retry_on, tolerate)

    def _attempts(self, name: str, action: Callable[[], Any], retry_on: frozenset[int], tolerate: frozenset[int]) -> Any:
        for attempt in range(self.retries + 1):
            try:
                return action()
            except NegativeResponseException as exc:
                code = exc.response.code
                if code in tolerate:
                    self.mark(tolerated=True)  # an answer this step accepts: not judged
                    return None
                if code in retry_on and attempt < self.retries and not self.stop.is_set():
                    self.mark(retried=True)  # asked again: the last attempt is the one judged
                    time.sleep(BUSY_PAUSE_S)
                    continue
                raise FlashError(name, *describe_failure(exc)) from None
            except VotaError:
                raise  # ours: it says what it means (a step's own check, a peer's refusal)
            except Exception as exc:  # noqa: BLE001 - every other failure ends the sequence
                reason, nrc = describe_failure(exc)
                self.recorder.note(reason)  # no answer, a malformed one, a transmit error: said in the trace
                raise FlashError(name, reason, nrc) from None
        raise AssertionError("unreachable")

    def mark(self, **extra: Any) -> None:
        """Add to the extras of the exchange just recorded (if any)."""
        if self.recorder.current is not None:
            self.recorder.current.extra.update(extra)

    def request(self, spec: StepSpec) -> bytes | None:
        """A step described as data: its request sent as it is; the positive response's bytes, or
        None when the peer answered an NRC the step tolerates."""
        request = udsoncan.Request.from_payload(spec.request)
        response = self.step(spec.name, lambda: self.client.send_request(request), retry_on=spec.retry_on,
                             tolerate=spec.tolerate)
        return None if response is None else bytes(response.get_payload())

    def profile_step(self, spec: ProfileStep, ctx: RecordContext) -> bytes | None:
        """A flash profile's step (agent/core/flash_profile.py) other than a download: the positive
        response's bytes, or None (suppressed, tolerated, an optional step that failed, or a step for
        signed images only, ``when: signed``, of an image that carries no signature)."""
        if spec.when == "signed" and not ctx.signature:
            return None
        if spec.kind == "security":
            return self._guarded(spec, lambda: self.client.unlock_security_access(spec.level)) and b""
        payload = spec.payload(ctx)
        if spec.functional:
            if len(payload) > 7:
                raise FlashError(spec.name, f"a functional request must fit one frame (7 bytes), not {len(payload)}")
            return self._guarded(spec, functools.partial(self._send_functional, payload))
        request = udsoncan.Request.from_payload(payload)
        timeout = spec.timeout_ms / 1000.0 if spec.timeout_ms else -1

        def send() -> Any:
            response = self.client.send_request(request, timeout=timeout)
            if response is None:
                self.mark(suppressed=True, tolerated=True)  # suppressPosRsp: no answer is the answer
                return None
            data = bytes(response.get_payload())
            echo = bytes(((payload[1] & 0x7F,) if spec.sub is not None else ())) + payload[1 + (spec.sub is not None):][
                : 2 * ((spec.did is not None) + (spec.routine is not None))]
            if data[1 : 1 + len(echo)] != echo:  # a well-formed answer to another request
                raise UnexpectedResponseException(response, f"it echoes {data[1:1 + len(echo)].hex() or 'nothing'}, "
                                                            f"the request was {echo.hex()}")
            if spec.routine is not None and spec.ok_status and len(data) > 4 and data[4] not in spec.ok_status:
                raise FlashError(spec.name, f"routine 0x{spec.routine:04X} reported status 0x{data[4]:02X} (failed)")
            return data

        return self._guarded(spec, send)  # type: ignore[no-any-return]

    def _guarded(self, spec: ProfileStep, action: Callable[[], Any]) -> Any:
        """``action`` as step ``spec.name``; an optional step's failure is logged and tolerated."""
        tolerate = spec.tolerate if not spec.optional else frozenset(range(0x10, 0x100))
        try:
            return self.step(spec.name, action, retry_on=spec.retry_on, tolerate=tolerate)
        except FlashError as exc:
            if not spec.optional or exc.reason == "cancelled":
                raise
            self.mark(tolerated=True)
            log.warning("%s: optional step %s skipped: %s", self.peer.name, spec.name, exc.reason)
            return None

    def _send_functional(self, payload: bytes) -> None:
        """A single-frame request on the functional id; nothing is waited for (suppressPosRsp)."""
        if self.peer.functional_id is None:
            raise FlashError(self.current, "no functional id is known for this peer")
        self.recorder.request(payload, functional=True, suppressed=True, tolerated=True)
        self.segment.send_frame(self.peer.functional_id, bytes((len(payload),)) + payload)
        self.recorder.sent()

    def routine(self, name: str, routine: int, data: bytes | None = None) -> Any:
        """RoutineControl startRoutine as step ``name``; a status byte other than 00 fails it."""

        def start() -> Any:
            response = self.client.routine_control(routine, RoutineType.startRoutine, data)
            status = response.service_data.routine_status_record
            if status and status[0] != 0x00:
                raise FlashError(name, f"routine 0x{routine:04X} reported status 0x{status[0]:02X} (failed)")
            return response

        return self.step(name, start)

    def wait_back(self, step: str, timeout_s: float) -> None:
        """After a reset: TesterPresent (untraced) until the peer answers again, or FlashError at
        ``step``; the reset's exchange notes when it was back (``x.back``, ms after the reset)."""
        reset = self.recorder.current
        if not self.link.wait_answering(timeout_s):
            raise FlashError(step, f"ECU did not come back within {timeout_s * 1000:.0f} ms after reset")
        if reset is not None:
            reset.extra["back"] = round((time.time() - self.recorder.header.started) * 1000.0 - reset.t, 1)

    def offer_compressed(self, step: str, methods: Sequence[tuple[str, int]], data: bytes,
                         send: Callable[[DataFormatIdentifier | None, bytes], Any],
                         refused_on: frozenset[int] = frozenset({Nrc.RequestOutOfRange}),
                         pack: Callable[[str, bytes], bytes] | None = None) -> Offer:
        """Offer ``data`` compressed with each of ``methods`` ((name, dataFormatIdentifier nibble),
        in the order preferred) that makes it smaller, until the peer takes one; a method it
        refuses (requestOutOfRange, or any of ``refused_on``) is marked ``x.retried`` and the next
        one asked, at last none.
        ``send(dfi, payload)`` makes the request (dfi None: uncompressed); ``pack(method, data)``
        compresses (the method's default parameters if not given)."""
        refused: list[str] = []
        for method, nibble in methods:
            packed = pack(method, data) if pack is not None else compress(method, data)
            if len(packed) >= len(data):
                continue
            try:
                response = self.step(step, functools.partial(send, DataFormatIdentifier(compression=nibble), packed))
            except FlashError as exc:
                if exc.nrc not in refused_on:
                    raise
                self.mark(retried=True, csize=len(packed))  # judged: the next attempt
                log.warning("%s refused %s compression (NRC 0x%02X): trying the next way", self.peer.name, method,
                            exc.nrc)
                refused.append(method)
                continue
            self.mark(csize=len(packed))  # the bytes TransferData carries
            return Offer(response, packed, method, tuple(refused))
        return Offer(self.step(step, functools.partial(send, None, data)), data, None, tuple(refused))

    # ---- the trace ---------------------------------------------------------------------
    def trace_text(self, result: str | None = None) -> str:
        return self.recorder.trace(result).to_text()

    def write_trace(self, path: Any, result: StepResult) -> int:
        """The trace as ``path`` (its end line says how the sequence ended); its size in bytes."""
        size = write_trace(path, self.recorder, result.result)
        result.trace_file = getattr(path, "name", str(path))
        return size


@dataclass(kw_only=True)
class CallResult(StepResult):
    value: Any = None
    exchanges: list[Any] = field(default_factory=list)


class CallSequence(UdsSequence[CallResult]):
    """A short call on a link (a few requests, every exchange traced with the call's name as its
    step): ``steps(client)`` makes the requests; its return value is the result's ``value``."""

    trace_steps = True

    def __init__(self, segment: Transport, peer: Peer, recorder: TraceRecorder, name: str,
                 steps: Callable[[Any], Any], **kw: Any) -> None:
        super().__init__(segment, peer, recorder.header, **kw)
        self.recorder = recorder  # the caller's: one trace across its calls
        self.name, self.steps = name, steps

    def new_result(self) -> CallResult:
        return CallResult()

    def sequence(self, result: CallResult) -> None:
        first = len(self.recorder.exchanges)
        try:
            result.value = self.step(self.name, lambda: self.steps(self.client))
        finally:
            result.exchanges = self.recorder.exchanges[first:]
