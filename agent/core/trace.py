"""Header-only interaction traces (D1, D2): the model, the recorder and the reader.

A trace is JSON Lines. Line 1 is the header object; every further line is one exchange,
a JSON array (compact on purpose: a trace must stay well under 1 % of the image)::

    {"format": "vota-trace", "version": 1, "stage": "flash", "client": "GW", "server": "bms",
     "packet": "bms", "request_id": 2016, "response_id": 2024, "functional_id": 2015,
     "started": 1763770000.123456, "columns": ["t", "req", "len", "dt", "rsp", "x"]}
    [812.3, "3601", 4095, 2.8, "7601"]
    [815.9, "3602", 4095, null, null, {"sent": false, "err": "..."}]

``t`` ms since ``started`` when the request was handed to ISO-TP; ``req`` the request
header in hex (never its data: for TransferData only SID and block counter); ``len`` the
full request length; ``dt`` ms from the end of the request's transmission to its final
response (null: none came), the time P2/P2* limit;
``rsp`` the whole final response in hex; ``x`` optional extras: ``id`` request CAN id and
``rid`` response CAN id where they differ from the header's, ``sent`` false when the
request never left, ``func`` true for functional requests, ``pend`` the ms of every 0x78
response-pending, ``late`` [ms, hex] a response that came after the client gave up,
``other`` [[ms, hex], ...] responses to an earlier request (dropped, never taken for this
one's), ``stray`` [[ms, can_id, hex], ...] response frames from other CAN ids, ``err`` what went
wrong on the client side, ``step`` the step of an exchange outside the programming sequence
(the version reads), ``retried`` a request the client asked again (only its last attempt is judged), ``tolerated`` a
negative answer the step accepts (not judged), ``csize`` the bytes a compressed or delta
download carries, ``back`` ms from a reset to the first answer after it, ``rlen`` the
length of a response whose data was left out (a block of a file read in stage ``link``), ``rep`` how many
times more the same step went exactly so (a polled status: one record for identical polls), ``doip``
what a link over DoIP reported of its own failure (docs/doip.md). In the
deploy stage a TransferData header is ``36 nn PPPPPPPP``: block counter and the deploy packet
id (the packet's number within the package). The last line may be a trailer object
``{"end": true, "exchanges": N, "result": "success"|"failed", "tester_present": [ms, ...]}``
(the functional TesterPresent requests, ``3E 80`` on the functional id, sent meanwhile).
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from agent.errors import TraceFormatError

__all__ = [
    "FORMAT",
    "VERSION",
    "Exchange",
    "TraceHeader",
    "TraceRecorder",
    "Trace",
    "request_header",
    "parse_trace",
]

FORMAT = "vota-trace"
VERSION = 1
COLUMNS = ["t", "req", "len", "dt", "rsp", "x"]

# How many leading bytes of a request are its header, per stage and service; the rest is
# data and never recorded.
_HEADER_LENGTH = {
    "flash": {
        0x27: 2,  # SID, sub-function (the key is not recorded)
        0x2E: 3,  # SID, DID
        0x31: 4,  # SID, sub-function, routine id
        0x36: 2,  # SID, block sequence counter
        0x37: 1,
        0x3D: 1,
    },
    "deploy": {
        0x27: 2,  # SID, sub-function (the key is not recorded)
        0x31: 4,
        0x36: 6,  # SID, block sequence counter, deploy packet id (4 bytes, big endian)
        0x37: 1,  # the package digest that follows is data
        0x38: 0x10000,  # RequestFileTransfer: mode, path, format and sizes are all header
    },
}
_HEADER_LENGTH["activate"] = _HEADER_LENGTH["flash"]  # the same services: the key is never recorded either
# stage "link": the exchanges around the transfers (the TBOX asking the gateway for its boot id, the
# inventory, an install and its status, a result file; the gateway reading an ECU's identification or
# relaying content to it): the deploy link's services, recorded the same way
_HEADER_LENGTH["link"] = _HEADER_LENGTH["deploy"]
_DEFAULT_HEADER_LENGTH = 12
# Services whose whole request is parameters (sessions, resets, reads, RequestDownload's address
# and size...): up to the default length is recorded. Any other service id (a garbled or unknown
# one) gets its SID only: what follows it may be data (a digest, an image).
_PARAMETER_SERVICES = frozenset({0x10, 0x11, 0x14, 0x19, 0x22, 0x23, 0x28, 0x2C, 0x2F, 0x34, 0x35, 0x3E, 0x85, 0x87})
_MAX_RESPONSE = 64


def request_header(payload: bytes, stage: str = "flash") -> bytes:
    if not payload:
        return b""
    known = _HEADER_LENGTH.get(stage, {}).get(payload[0])
    if known is None:
        known = _DEFAULT_HEADER_LENGTH if payload[0] in _PARAMETER_SERVICES else 1
    return payload[:known]


def _ms(seconds: float) -> float:
    value = round(seconds * 1000.0, 1)
    return int(value) if value == int(value) else value  # type: ignore[return-value]


@dataclass(slots=True)
class Exchange:
    """One request (its header only) and what answered it."""

    t: float
    header: bytes
    length: int
    dt: float | None = None
    response: bytes | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    sent_at: float | None = field(default=None, repr=False, compare=False)  # recording only: end of send

    @property
    def sent(self) -> bool:
        return bool(self.extra.get("sent", True))

    @property
    def service(self) -> int | None:
        return self.header[0] if self.header else None

    def to_json(self) -> list[Any]:
        row: list[Any] = [self.t, self.header.hex(), self.length, self.dt, self.response.hex() if self.response is not None else None]
        if self.extra:
            row.append(self.extra)
        return row

    @classmethod
    def from_json(cls, row: Any, line: int) -> "Exchange":
        if not isinstance(row, list) or len(row) not in (5, 6):
            raise TraceFormatError(f"line {line}: an exchange must be an array of 5 or 6 items")
        t, req, length, dt, rsp = row[:5]
        extra = row[5] if len(row) == 6 else {}
        try:
            if not isinstance(extra, dict):
                raise ValueError("extras must be an object")
            return cls(
                _finite(t),
                bytes.fromhex(req),
                _count(length),
                None if dt is None else _finite(dt),
                None if rsp is None else bytes.fromhex(rsp),
                extra,
            )
        except (TypeError, ValueError, OverflowError) as exc:
            raise TraceFormatError(f"line {line}: {exc}") from None


@dataclass
class TraceHeader:
    stage: str
    client: str
    server: str
    packet: str
    request_id: int
    response_id: int
    functional_id: int | None
    started: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = {
            "format": FORMAT,
            "version": VERSION,
            "stage": self.stage,
            "client": self.client,
            "server": self.server,
            "packet": self.packet,
            "request_id": self.request_id,
            "response_id": self.response_id,
            "functional_id": self.functional_id,
            "started": round(self.started, 6),
            "columns": COLUMNS,
        }
        out.update(self.extra)
        return out


@dataclass
class Trace:
    header: TraceHeader
    exchanges: list[Exchange]
    trailer: dict[str, Any] | None = None

    def to_text(self) -> str:
        lines = [json.dumps(self.header.to_json(), separators=(",", ":"))]
        lines += [json.dumps(e.to_json(), separators=(",", ":")) for e in self.exchanges]
        if self.trailer is not None:
            lines.append(json.dumps(self.trailer, separators=(",", ":")))
        return "\n".join(lines) + "\n"


class TraceRecorder:
    """Collects exchanges as a UDS client makes them; thread-safe enough for one client
    plus one bus listener (appends and attribute writes only)."""

    def __init__(self, header: TraceHeader, clock: Callable[[], float] = time.time) -> None:
        self.header = header
        self.clock = clock
        self.exchanges: list[Exchange] = []
        self.tester_present: list[float] = []

    def _now(self) -> float:
        return _ms(self.clock() - self.header.started)

    @property
    def current(self) -> Exchange | None:
        return self.exchanges[-1] if self.exchanges else None

    def request(self, payload: bytes, **extra: Any) -> Exchange:
        header = request_header(payload, self.header.stage)
        exchange = Exchange(self._now(), header, len(payload), extra={k: v for k, v in extra.items() if v is not None})
        self.exchanges.append(exchange)
        return exchange

    def sent(self) -> None:
        """The request is on the bus (blocking ISO-TP send returned): response times count from here."""
        if self.current is not None:
            self.current.sent_at = self.clock()

    def _since_sent(self, exchange: Exchange) -> float:
        start = exchange.sent_at if exchange.sent_at is not None else self.header.started + exchange.t / 1000.0
        return _ms(self.clock() - start)

    def not_sent(self, error: str) -> None:
        if self.current is not None:
            self.current.extra.update(sent=False, err=error)

    def response(self, payload: bytes, can_id: int | None = None) -> None:
        exchange = self.current
        if exchange is None:
            return
        dt = self._since_sent(exchange)
        if self.header.stage == "link" and payload[:1] == b"\x76" and len(payload) > 2:
            # a block of a file the client reads (a result, a trace): its data is never recorded
            exchange.extra["rlen"] = len(payload)
            payload = payload[:2]
        payload = payload[:_MAX_RESPONSE]
        if len(payload) >= 3 and payload[0] == 0x7F and payload[2] == 0x78:
            exchange.extra.setdefault("pend", []).append(dt)
            return
        if exchange.response is not None:
            exchange.extra.setdefault("more", []).append([dt, payload.hex()])
            return
        exchange.dt, exchange.response = dt, payload
        if can_id is not None and can_id != self.header.response_id:
            exchange.extra["rid"] = can_id

    def late(self, payload: bytes) -> None:
        """A response that arrived after the client stopped waiting for it."""
        exchange = self.current
        if exchange is None:
            return
        dt = self._since_sent(exchange)
        exchange.extra.setdefault("late", []).append([dt, payload[:_MAX_RESPONSE].hex()])

    def unmatched(self, payload: bytes) -> None:
        """A response to another (earlier) request, received while waiting for this one's: dropped."""
        exchange = self.current
        if exchange is None:
            return
        exchange.extra.setdefault("other", []).append([self._since_sent(exchange), payload[:_MAX_RESPONSE].hex()])

    def stray(self, can_id: int, data: bytes) -> None:
        exchange = self.current
        if exchange is None:
            return
        dt = self._since_sent(exchange)
        exchange.extra.setdefault("stray", []).append([dt, can_id, data.hex()])

    def functional_tester_present(self) -> None:
        """A functional TesterPresent (3E 80, no response expected) went out on the segment."""
        self.tester_present.append(self._now())

    @contextmanager
    def step(self, name: str) -> Iterator[list[Exchange]]:
        """The exchanges recorded inside get ``x.step`` = ``name`` (also when it raises); yields
        the list of them, filled when the block ends."""
        first = len(self.exchanges)
        made: list[Exchange] = []
        try:
            yield made
        finally:
            made.extend(self.exchanges[first:])
            for exchange in made:
                exchange.extra["step"] = name

    def note(self, error: str) -> None:
        if self.current is not None:
            self.current.extra["err"] = error

    def trace(self, result: str | None = None) -> Trace:
        trailer: dict[str, Any] | None = None
        if result:
            trailer = {"end": True, "exchanges": len(self.exchanges), "result": result}
            if self.tester_present:
                trailer["tester_present"] = list(self.tester_present)
        return Trace(self.header, list(self.exchanges), trailer)


def _finite(value: Any) -> float:
    """A time in a trace: a finite number (JSON's 1e999 is infinity, which no clock shows)."""
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{value!r} is not a finite number")
    return number


def _count(value: Any) -> int:
    """A length or a CAN id in a trace: a whole number from 0 on, of a size a bus can carry."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()) \
            or not 0 <= value < 2**32:
        raise ValueError(f"{value!r} is not a whole number from 0 to 2**32")
    return int(value)


def parse_trace(text: str, source: str = "<trace>") -> Trace:
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise TraceFormatError(f"{source}: empty trace")
    try:
        head = json.loads(lines[0])
    except (json.JSONDecodeError, RecursionError):
        raise TraceFormatError(f"{source}: line 1 is not a JSON trace header") from None
    if not isinstance(head, dict) or head.get("format") != FORMAT:
        raise TraceFormatError(f"{source}: not a {FORMAT} file")
    if head.get("version") != VERSION:
        raise TraceFormatError(f"{source}: trace format version {head.get('version')!r} is not supported (this vota reads {VERSION})")
    known = {"format", "version", "stage", "client", "server", "packet", "request_id", "response_id", "functional_id", "started", "columns"}
    try:
        header = TraceHeader(
            str(head["stage"]), str(head["client"]), str(head["server"]), str(head.get("packet", head["server"])),
            _count(head["request_id"]), _count(head["response_id"]),
            None if head.get("functional_id") is None else _count(head["functional_id"]),
            _finite(head["started"]), {k: v for k, v in head.items() if k not in known},
        )
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise TraceFormatError(f"{source}: bad trace header ({exc})") from None
    body = lines[1:]
    try:
        rows = json.loads("[" + ",".join(body) + "]")  # one parse for the whole trace (fast path)
    except (json.JSONDecodeError, RecursionError):
        rows = None
    if rows is None or len(rows) != len(body):
        rows = []  # find the line that is broken, for the message
        for number, line in enumerate(body, start=2):
            try:
                rows.append(json.loads(line))
            except (json.JSONDecodeError, RecursionError):
                raise TraceFormatError(f"{source}: line {number} is not JSON (truncated or garbage)") from None
    exchanges: list[Exchange] = []
    trailer = None
    fromhex = bytes.fromhex
    for number, row in enumerate(rows, start=2):
        if type(row) is list and len(row) == 5 and type(row[1]) is str and type(row[4]) is str:
            t, n, d = row[0], row[2], row[3]  # the common record: a request and its response, no extras;
            # checked inline (x - x == 0 is false for infinity and NaN); anything else goes the long way
            if type(n) is int and 0 <= n < 2**32 and (type(t) is int or type(t) is float and t - t == 0) \
                    and (d is None or type(d) is int or type(d) is float and d - d == 0):
                try:
                    exchanges.append(Exchange(float(t), fromhex(row[1]), n, None if d is None else float(d), fromhex(row[4])))
                    continue
                except ValueError:  # not hex
                    pass
        if isinstance(row, dict) and row.get("end"):
            trailer = row
            continue
        exchanges.append(Exchange.from_json(row, number))
    return Trace(header, exchanges, trailer)
