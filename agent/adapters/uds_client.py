"""The UDS client side: udsoncan over our ISO-TP stacks, with every exchange traced.

``TracingConnection`` is the udsoncan connection: it sees each request as it is handed to
ISO-TP, every 0x78 pending and the final response, and records them header-only into a
``TraceRecorder``. ``StrayListener`` watches the segment for responses that come from a
CAN id other than the expected one (a misaddressed ECU), which ISO-TP itself would drop.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence, cast

import can
import udsoncan
from udsoncan.client import Client
from udsoncan.connections import BaseConnection
from udsoncan.exceptions import (
    InvalidResponseException,
    NegativeResponseException,
    TimeoutException,
    UnexpectedResponseException,
)
from udsoncan.typing import ClientConfig

from agent.core.faults import FaultCounter, FaultSpec
from agent.core.trace import TraceRecorder
from agent.protocol.link import SECURED_SERVICES, secure_request, session_key
from agent.protocol.uds import plausible_reply

__all__ = ["Transport", "TracingConnection", "RequestAuthenticator", "ClientFaults", "client_fault_counter",
           "StrayListener", "UdsLink", "RawCodec", "describe_failure"]

log = logging.getLogger(__name__)


class Transport(Protocol):
    """What a UDS link opens its stack on: a CAN segment (``agent/adapters/canbus.py``) or the
    deploy link over DoIP (``agent/adapters/doip_client.py``, no CAN frames: no notifier)."""

    @property
    def notifier(self) -> can.Notifier | None: ...

    def stack(self, txid: int, rxid: int) -> Any: ...

    def release(self, stack: Any) -> None: ...

    def send_frame(self, can_id: int, data: bytes) -> None: ...


class RawCodec(udsoncan.DidCodec):
    """A DID codec that passes the bytes through (identification strings, fingerprints)."""

    def encode(self, *values: Any) -> bytes:
        return bytes(values[0])

    def decode(self, payload: bytes) -> Any:
        return bytes(payload)

    def __len__(self) -> int:
        raise udsoncan.DidCodec.ReadAllRemainingData


def client_fault_counter(specs: Sequence[FaultSpec], stage: str) -> FaultCounter:
    """The counter of a stage's client faults (the deploy client also answers to TBOX, the link's to GW)."""
    always = {"deploy": ("*", "TBOX", "tbox"), "link": ("*", "GW", "gateway")}.get(stage, ("*",))
    return FaultCounter([s for s in specs if s.side == "client" and s.stage == stage], always)


class ClientFaults:
    """Client-side fault injection (tests, benches): what the client puts on the wire.

    ``apply`` returns the action due for this request (if any); ``mangle`` builds the
    faulty request. The connection does the sending, so the trace records what really
    went out (or that nothing did)."""

    def __init__(self, specs: list[FaultSpec], scope: str, stage: str, block_length: Callable[[], int | None],
                 counter: FaultCounter | None = None) -> None:
        """``counter``: shared by several sequences (the TBOX's calls, one ECU's actions) that count together."""
        self.counter = counter or client_fault_counter(specs, stage)
        self.scope, self.stage, self.block_length = scope, stage, block_length

    def due(self, payload: bytes) -> FaultSpec | None:
        if not payload or payload[:2] == b"\x3e\x80":
            return None
        return self.counter.next(payload[0], self.scope)

    def mangle(self, spec: FaultSpec, payload: bytes) -> bytes:
        sid = payload[0]
        if spec.action == "bad_format":
            if sid == 0x36:  # TransferData without its header: no counter (flash), no packet id (deploy)
                return payload[:2] if self.stage == "deploy" else payload[:1]
            if sid in _SUBFUNCTION_SERVICES and len(payload) >= 2:
                return payload[:1] + b"\x7f" + payload[2:]
            return b"\xba" + payload[1:]  # a service the protocol does not have
        if spec.action == "bad_length":
            if sid == 0x36:
                return payload + bytes(max(16, (self.block_length() or len(payload)) - len(payload) + 16))
            # past the longest legal request of the service on any link: a RoutineControl's option
            # record (a file name up to 128 bytes and an authenticator) may be long itself
            return payload + bytes(300 if sid == 0x38 else 256 if sid == 0x31 else 64)
        if spec.action == "corrupt_data" and sid == 0x36:
            keep = 6 if self.stage == "deploy" else 2  # SID, counter[, packet id]
            return payload[:keep] + bytes(b ^ 0xFF for b in payload[keep:])
        if spec.action == "skip_counter" and sid == 0x36 and len(payload) >= 2:
            return payload[:1] + bytes(((payload[1] + 1) & 0xFF,)) + payload[2:]
        return payload


_SUBFUNCTION_SERVICES = {0x10, 0x11, 0x27, 0x28, 0x31, 0x38, 0x3E, 0x85}


class RequestAuthenticator:
    """The client's half of authenticated requests (``agent/protocol/link.py``): the session key
    from the SecurityAccess seed, and freshness and MAC appended to each request that needs them."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.key: bytes | None = None
        self.freshness = 0

    def start(self, seed: bytes) -> None:
        """A new SecurityAccess exchange: a new session key, freshness from the start."""
        self.key, self.freshness = session_key(self.secret, seed), 0

    def wrap(self, payload: bytes) -> bytes:
        if self.key is None or not payload or payload[0] not in SECURED_SERVICES:
            return payload
        self.freshness += 1
        return secure_request(self.key, self.freshness, payload)


class TracingConnection(BaseConnection):
    def __init__(self, stack: Any, recorder: TraceRecorder | None, name: str, segment: Transport | None = None,
                 faults: ClientFaults | None = None, authenticator: RequestAuthenticator | None = None) -> None:
        super().__init__(name)
        self.stack = stack
        self.recorder = recorder
        self.segment = segment
        self.faults = faults
        self.authenticator = authenticator
        self.paused = False
        self.opened = False
        self._fake: bytes | None = None
        self._sid: int | None = None  # the service of the request waiting for its answer

    def _rec(self) -> TraceRecorder | None:
        return None if self.paused else self.recorder

    def open(self) -> "TracingConnection":
        self.opened = True
        return self

    def close(self) -> None:
        self.opened = False

    def is_open(self) -> bool:
        return self.opened

    def __enter__(self) -> "TracingConnection":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def specific_send(self, payload: bytes, timeout: float | None = None) -> None:
        self._sid = payload[0] if payload else None
        rec = self._rec()
        fault = self.faults.due(payload) if self.faults is not None and rec is not None else None
        if fault is not None:
            log.warning("injecting client fault %s", fault.text)
            if fault.action == "skip_step":  # left out: the client goes on as if it had been answered
                self._fake = plausible_reply(payload)
                return
            payload = self.faults.mangle(fault, payload)  # type: ignore[union-attr]
        if self.authenticator is not None:  # a client's own mistake is authenticated like the rest; the trace
            payload = self.authenticator.wrap(payload)  # records the length with the authenticator, as on the wire
        if rec is not None:
            rec.request(payload)
        if fault is not None and fault.action == "not_sent":
            if rec is not None:
                rec.not_sent("injected: transmit error")
            raise OSError("transmit error (injected)")
        if fault is not None and fault.action == "from_id":
            wrong = fault.arg if fault.arg is not None else self.stack.address.get_tx_arbitration_id() + 0x10
            if rec is not None and rec.current is not None:
                rec.current.extra["id"] = wrong
            if self.segment is not None:
                size = len(payload)
                frame = bytes((size,)) + payload if size <= 7 else bytes((0x10 | (size >> 8), size & 0xFF)) + payload[:6]
                self.segment.send_frame(wrong, frame)
            if rec is not None:
                rec.sent()
            return
        try:
            # bounded even when udsoncan passes none: a send that never completes fails the step
            # (retried) instead of hanging the install; 10 s plus 10 ms a byte covers 1 kbit/s
            self.stack.send(payload, send_timeout=timeout if timeout is not None else 10.0 + 0.01 * len(payload))
        except Exception as exc:
            if rec is not None:
                rec.not_sent(f"{type(exc).__name__}: {exc}")
                _link_failure(rec, exc)
            raise
        if rec is not None:
            rec.sent()

    def specific_wait_frame(self, timeout: float | None = None) -> bytes | None:
        if self._fake is not None:
            fake, self._fake = self._fake, None
            return fake
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                frame = self.stack.recv(block=True, timeout=left)
            except Exception as exc:  # the link itself ended (DoIP: the connection closed)
                rec = self._rec()
                if rec is not None:
                    _link_failure(rec, exc)
                raise
            if frame is None:
                raise TimeoutException(f"no response within {timeout} s")
            frame = bytes(frame)
            rec = self._rec()
            if not self._answers(frame):
                # an answer to an earlier request (one the client gave up on, or a tester that was
                # stopped): never taken for the answer to this one
                log.info("%s: dropped a response to another request: %s", self.name, frame[:8].hex())
                if rec is not None:
                    rec.unmatched(frame)
                continue
            if rec is not None:
                rec.response(frame)
            return frame

    def _answers(self, frame: bytes) -> bool:
        """False only when ``frame`` is, by its own bytes, the response to another service: a
        positive response with another service's SID, or a complete negative response naming
        another service. Anything else (this service's answer, a malformed one) is the answer."""
        sid = self._sid
        if sid is None or not frame:
            return True
        if frame[0] == 0x7F:
            return len(frame) < 3 or frame[1] == sid
        return not (frame[0] & 0x40) or frame[0] == (sid + 0x40) & 0xFF

    def drain_late(self, wait: float = 0.0) -> None:
        """Record responses that arrived after the client gave up (within ``wait`` s); none
        can come on a link that ended (a closed DoIP connection)."""
        try:
            frame = self.stack.recv(block=wait > 0, timeout=wait if wait > 0 else None)
            while frame is not None:
                rec = self._rec()
                if rec is not None:
                    rec.late(bytes(frame))
                frame = self.stack.recv(block=False)
        except ConnectionError:
            return

    def empty_rxqueue(self) -> None:
        self.drain_late()
        self.stack.stop_receiving()
        self.stack.clear_rx_queue()

    def empty_txqueue(self) -> None:
        self.stack.stop_sending()
        self.stack.clear_tx_queue()


def _link_failure(rec: TraceRecorder, exc: BaseException) -> None:
    """What a link of DoIP said of its own failure, kept with the exchange (``x.doip``)."""
    said = getattr(exc, "trace", None)
    if isinstance(said, dict) and said and rec.current is not None:
        rec.current.extra["doip"] = said


class StrayListener(can.Listener):
    """Records frames that answer the current request but come from a wrong CAN id."""

    def __init__(self, recorder: TraceRecorder, own_ids: set[int]) -> None:
        self.recorder = recorder
        self.own_ids = own_ids

    def on_message_received(self, msg: can.Message) -> None:
        """Runs in the segment's notifier thread: any frame at all, never an exception."""
        if msg.arbitration_id in self.own_ids or msg.is_error_frame or not msg.data:
            return
        exchange = self.recorder.current
        if exchange is None or exchange.service is None:
            return
        data = bytes(msg.data)
        kind = data[0] >> 4
        if kind == 0:  # single frame; a CAN FD one escapes its length into the second byte
            size = data[0] & 0x0F
            if size == 0 and len(data) < 2:
                return  # one byte: no frame of any kind
            payload = data[1 : 1 + size] if size else data[2 : 2 + data[1]]
        elif kind == 1:  # first frame
            payload = data[2:]
        else:
            return
        sid = exchange.service
        if payload[:1] == bytes((sid + 0x40,)) or payload[:2] == bytes((0x7F, sid)):
            self.recorder.stray(msg.arbitration_id, payload)


def describe_failure(exc: BaseException) -> tuple[str, int | None]:
    """A one-line reason and the NRC (if any) for a failed request."""
    if isinstance(exc, NegativeResponseException):
        code = exc.response.code
        return f"negative response 0x{code:02X} ({exc.response.code_name})", code
    if isinstance(exc, TimeoutException):
        return "no response (timeout)", None
    if isinstance(exc, InvalidResponseException):
        return f"malformed response ({exc.response.invalid_reason})", None
    if isinstance(getattr(exc, "trace", None), dict) and isinstance(exc, ConnectionError):
        return f"DoIP: {exc}", None  # the link's own failure (agent/adapters/doip_client.py)
    if isinstance(exc, UnexpectedResponseException):
        return f"response does not match the request ({getattr(exc.response, 'unexpected_reason', '') or exc})", None
    return f"request not sent ({type(exc).__name__}: {exc})", None


class UdsLink:
    """A udsoncan client bound to one ECU's physical addresses on a segment."""

    def __init__(
        self,
        segment: Transport,
        request_id: int,
        response_id: int,
        *,
        name: str,
        recorder: TraceRecorder | None = None,
        p2: float = 1.0,
        p2_star: float = 6.0,
        security: Callable[[int, bytes], bytes] | None = None,
        dids: Mapping[int, udsoncan.DidCodec] | None = None,
        watch_ids: set[int] | None = None,
        faults: ClientFaults | None = None,
        authenticate: str | None = None,
    ) -> None:
        """``authenticate``: the link's secret, when requests after SecurityAccess carry an authenticator."""
        self.segment = segment
        self.stack = segment.stack(request_id, response_id)
        self.authenticator = RequestAuthenticator(authenticate) if authenticate is not None else None
        self.connection = TracingConnection(self.stack, recorder, name, segment, faults, self.authenticator)
        config = dict(udsoncan.configs.default_client_config)
        config.update(
            request_timeout=None,  # never cut a 0x78-pending wait short; P2/P2* bound each wait
            p2_timeout=p2,
            p2_star_timeout=p2_star,
            use_server_timing=False,
            security_algo=(lambda level, seed, params: self._key(security, level, seed)) if security else None,
            data_identifiers=dict(dids or {}),
        )
        self.client = Client(self.connection, config=cast(ClientConfig, config))
        self.client.open()
        self.listener: StrayListener | None = None
        if recorder is not None and segment.notifier is not None:  # a link of CAN frames
            self.listener = StrayListener(recorder, {request_id, response_id} | (watch_ids or set()))
            segment.notifier.add_listener(self.listener)

    def _key(self, security: Callable[[int, bytes], bytes], level: int, seed: bytes) -> bytes:
        if self.authenticator is not None:
            self.authenticator.start(bytes(seed))
        return security(level, bytes(seed))

    @contextmanager
    def step(self, name: str) -> Iterator[list[Any]]:
        """Exchanges outside the programming sequence (version reads), traced with their step
        name (``x.step``); yields the list of those exchanges."""
        rec = self.connection.recorder
        if rec is None:
            yield []
            return
        with rec.step(name) as made:
            yield made

    @contextmanager
    def untraced(self) -> Iterator[None]:
        self.connection.paused = True
        try:
            yield
        finally:
            self.connection.paused = False

    def wait_answering(self, timeout: float, poll_p2: float = 0.1) -> bool:
        """After a reset: TesterPresent (untraced) until the server answers; False after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        p2 = self.client.config["p2_timeout"]
        self.client.config["p2_timeout"] = poll_p2
        try:
            with self.untraced():
                while time.monotonic() < deadline:
                    try:
                        self.client.tester_present()
                        return True
                    except Exception:  # noqa: BLE001 - still rebooting
                        time.sleep(0.02)
            return False
        finally:
            self.client.config["p2_timeout"] = p2

    def close(self) -> None:
        if self.listener is not None and self.segment.notifier is not None:
            try:
                self.segment.notifier.remove_listener(self.listener)
            except ValueError:
                pass
            self.listener = None
        self.client.close()
        self.segment.release(self.stack)

    def __enter__(self) -> "UdsLink":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
