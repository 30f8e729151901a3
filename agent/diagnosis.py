"""Root-cause diagnosis of a failed upgrade (D5-D9). Pure: results, traces and rules in,
a verdict out; no files, no sockets, no clock.

For every exchange of an abnormal package's trace the checks run in a fixed order
(``rules.checks``): the request's validity, identifier, format, length and flow, then the
response's validity, time, identifier, format, type and match. A failed check maps to a
cause and a side (``rules.causes``). Mode ``first`` stops at the first failure (the seed's
order: request 1, response 1, request 2, ...); mode ``all`` reports every failure. A
failed request check ends the checks of that exchange: how a server answers an illegal
request (not at all, or with an NRC) is no failure of the server.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from udsoncan import Response

from agent.errors import ConfigError
from agent.trace import Exchange, Trace

__all__ = [
    "CAUSES",
    "Rules",
    "StageRules",
    "Finding",
    "Verdict",
    "StageInput",
    "parse_rules",
    "check_trace",
    "diagnose",
    "render_markdown",
    "SCHEMA",
]

SCHEMA = "vota-diagnosis/1"
CAUSES = (
    "request_not_sent",
    "illegal_request_sender",
    "illegal_request_format",
    "illegal_request_length",
    "illegal_request_flow",
    "response_not_sent",
    "response_timeout",
    "illegal_responder",
    "illegal_response_format",
    "negative_response",
    "unmatched_response",
)
REQUEST_CHECKS = ("validity", "identifier", "format", "length", "flow")
RESPONSE_CHECKS = ("validity", "time", "identifier", "format", "type", "match")


# ---- rules ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServiceRule:
    request_length: tuple[int, int | None]  # None: the negotiated block length
    response_length: tuple[int, int | None]
    subfunctions: frozenset[int] | None
    echo: int


@dataclass(frozen=True)
class StageRules:
    services: dict[int, ServiceRule]
    flow: dict[str, list[tuple[bytes, str]]]
    anywhere: tuple[bytes, ...]
    p2_ms: float
    p2_star_ms: float
    request_ids: frozenset[int] | None
    response_ids: frozenset[int] | None
    block_length_from: int | None
    counter_service: int | None
    counter_start: int
    packet: tuple[int, int, int] | None  # service, offset, size
    context: int


@dataclass(frozen=True)
class Rules:
    request_checks: tuple[str, ...]
    response_checks: tuple[str, ...]
    causes: dict[str, tuple[str, str]]  # "request.flow" -> (cause, side)
    stages: dict[str, StageRules]


def _hex(value: Any, where: str, source: str) -> bytes:
    try:
        return bytes.fromhex(str(value))
    except ValueError:
        raise ConfigError(source, where, f"{value!r} is not hex") from None


def _length(value: Any, where: str, source: str) -> tuple[int, int | None]:
    if not isinstance(value, list) or len(value) != 2 or not isinstance(value[0], int):
        raise ConfigError(source, where, "expected [min, max] (max may be 'block')")
    high = value[1]
    if high == "block":
        return value[0], None
    if not isinstance(high, int) or high < value[0]:
        raise ConfigError(source, where, "expected [min, max] with max >= min, or 'block'")
    return value[0], high


def _stage(name: str, d: Mapping[str, Any], source: str) -> StageRules:
    where = f"stages.{name}"
    try:
        services = {}
        for key, s in d["services"].items():
            sid = _hex(key, f"{where}.services", source)
            if len(sid) != 1:
                raise ConfigError(source, f"{where}.services.{key}", "a service id is one byte of hex")
            subs = s.get("subfunctions")
            services[sid[0]] = ServiceRule(
                _length(s["request_length"], f"{where}.services.{key}.request_length", source),
                _length(s["response_length"], f"{where}.services.{key}.response_length", source),
                frozenset(int(v) for v in subs) if subs is not None else None,
                int(s.get("echo", 0)),
            )
        flow: dict[str, list[tuple[bytes, str]]] = {}
        for state, moves in d["flow"].items():
            pairs = [(_hex(k, f"{where}.flow.{state}", source), str(v)) for k, v in moves.items()]
            flow[str(state)] = sorted(pairs, key=lambda p: -len(p[0]))
            for _, target in pairs:
                if target not in d["flow"]:
                    raise ConfigError(source, f"{where}.flow.{state}", f"goes to unknown state {target!r}")
        if "start" not in flow:
            raise ConfigError(source, f"{where}.flow", "needs a 'start' state")
        timing = d.get("timing", {})
        counter = d.get("counter")
        packet = d.get("packet")
        ids = d.get("request_ids"), d.get("response_ids")
        return StageRules(
            services=services,
            flow=flow,
            anywhere=tuple(_hex(a, f"{where}.anywhere", source) for a in d.get("anywhere", [])),
            p2_ms=float(timing.get("p2_ms", 1000)),
            p2_star_ms=float(timing.get("p2_star_ms", 5000)),
            request_ids=frozenset(int(i) for i in ids[0]) if ids[0] is not None else None,
            response_ids=frozenset(int(i) for i in ids[1]) if ids[1] is not None else None,
            block_length_from=_hex(d["block_length_from"], f"{where}.block_length_from", source)[0]
            if d.get("block_length_from") else None,
            counter_service=_hex(counter["service"], f"{where}.counter", source)[0] if counter else None,
            counter_start=int(counter.get("start", 1)) if counter else 1,
            packet=(_hex(packet["service"], f"{where}.packet", source)[0], int(packet["offset"]), int(packet["size"]))
            if packet else None,
            context=int(d.get("context", 3)),
        )
    except ConfigError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise ConfigError(source, where, f"invalid stage rules ({type(exc).__name__}: {exc})") from None


def parse_rules(data: Any, source: str = "<rules>") -> Rules:
    if not isinstance(data, Mapping) or data.get("version") != 1:
        raise ConfigError(source, "version", "expected validation data version 1")
    checks = data.get("checks", {})
    request = tuple(checks.get("request", REQUEST_CHECKS))
    response = tuple(checks.get("response", RESPONSE_CHECKS))
    if sorted(request) != sorted(REQUEST_CHECKS) or sorted(response) != sorted(RESPONSE_CHECKS):
        raise ConfigError(source, "checks", f"must order exactly {REQUEST_CHECKS} and {RESPONSE_CHECKS}")
    causes = {}
    for key, value in data.get("causes", {}).items():
        if not isinstance(value, Mapping) or value.get("cause") not in CAUSES or value.get("side") not in ("client", "server"):
            raise ConfigError(source, f"causes.{key}", f"needs a cause out of {', '.join(CAUSES)} and side client/server")
        causes[str(key)] = (str(value["cause"]), str(value["side"]))
    missing = [f"{side}.{c}" for side, names in (("request", REQUEST_CHECKS), ("response", RESPONSE_CHECKS))
               for c in names if f"{side}.{c}" not in causes]
    if missing:
        raise ConfigError(source, "causes", f"no cause for {', '.join(missing)}")
    stages = {str(n): _stage(str(n), d, source) for n, d in (data.get("stages") or {}).items()}
    for needed in ("deploy", "flash"):
        if needed not in stages:
            raise ConfigError(source, f"stages.{needed}", "missing")
    return Rules(request, response, causes, stages)


# ---- findings and verdicts ------------------------------------------------------------------
@dataclass
class Finding:
    stage: str
    package: str
    unit: str
    side: str
    cause: str
    check: str
    index: int
    request: str
    packet: int | str | None
    detail: str
    nrc: int | None = None
    nrc_name: str | None = None
    context: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class StageInput:
    """One package's (deploy) or ECU's (flash) result and its trace, as far as they exist."""

    stage: str
    name: str  # the package (deploy) or the ECU (flash)
    result: Mapping[str, Any]
    trace: Trace | None
    trace_error: str | None = None


@dataclass
class Verdict:
    mode: str
    abnormal: list[str]
    stage: str | None
    findings: list[Finding]
    unanalysed: list[dict[str, str]]
    campaign_id: str | None = None

    @property
    def cause(self) -> str | None:
        return self.findings[0].cause if self.findings else None

    def to_json(self) -> dict[str, Any]:
        first = self.findings[0] if self.findings else None
        return {
            "schema": SCHEMA,
            "campaign_id": self.campaign_id,
            "mode": self.mode,
            "abnormal_packages": self.abnormal,
            "stage": self.stage,
            "cause": first.cause if first else None,
            "side": first.side if first else None,
            "unit": first.unit if first else None,
            "findings": [asdict(f) for f in self.findings],
            "unanalysed": self.unanalysed,
        }


def _nrc_name(code: int) -> str:
    name = Response.Code.get_name(code)
    return name if name else f"0x{code:02X}"


def _record(index: int, e: Exchange) -> dict[str, Any]:
    out: dict[str, Any] = {"index": index, "t": e.t, "request": e.header.hex(), "length": e.length, "dt": e.dt,
                           "response": e.response.hex() if e.response is not None else None}
    if e.extra:
        out["x"] = e.extra
    return out


class _Checker:
    """Walks one trace, keeping the protocol state the flow and length checks need."""

    def __init__(self, trace: Trace, rules: Rules, stage: StageRules, name: str, mode: str) -> None:
        self.trace, self.rules, self.stage, self.name, self.mode = trace, rules, stage, name, mode
        h = trace.header
        self.client, self.server = h.client, h.server
        self.request_ids = stage.request_ids or frozenset({h.request_id})
        self.response_ids = stage.response_ids or frozenset({h.response_id})
        self.state = "start"
        self.block: int | None = None
        self.expected = stage.counter_start
        self.last: int | None = None
        self.next_packet = 0
        self.findings: list[Finding] = []

    # -- helpers
    def _packet(self, e: Exchange) -> int | str | None:
        p = self.stage.packet
        if p and e.header[:1] == bytes((p[0],)) and len(e.header) >= p[1] + p[2]:
            return int.from_bytes(e.header[p[1] : p[1] + p[2]], "big")
        return None if self.trace.header.stage == "deploy" else self.trace.header.packet

    def _fail(self, index: int, e: Exchange, check: str, detail: str, nrc: int | None = None) -> None:
        cause, side = self.rules.causes[check]
        unit = (self.client if side == "client" else self.server)
        lo, hi = max(0, index - self.stage.context), index + self.stage.context + 1
        context = [_record(i, x) for i, x in enumerate(self.trace.exchanges[lo:hi], start=lo)]
        self.findings.append(Finding(
            stage=self.trace.header.stage, package=self.name, unit=unit, side=side, cause=cause, check=check,
            index=index, request=e.header.hex(), packet=self._packet(e), detail=detail, nrc=nrc,
            nrc_name=_nrc_name(nrc) if nrc is not None else None, context=context))

    def _move(self, header: bytes) -> str | None:
        for prefix in self.stage.anywhere:
            if header.startswith(prefix):
                return self.state
        for prefix, target in self.stage.flow.get(self.state, []):
            if header.startswith(prefix):
                return target
        return None

    def _in_transfer(self, sid: int) -> bool:
        return sid == self.stage.counter_service and any(
            p[:1] == bytes((sid,)) for p, t in self.stage.flow.get(self.state, []) if t == self.state)

    # -- request checks
    def request(self, i: int, e: Exchange) -> str | None:
        """The first failed request check (recorded), or None."""
        failed = None
        for check in self.rules.request_checks:
            problem = getattr(self, f"_req_{check}")(e)
            if problem:
                self._fail(i, e, f"request.{check}", problem)
                failed = failed or check
                if self.mode == "first":
                    return failed
                break  # later request checks would only repeat the same problem
        return failed

    def _req_validity(self, e: Exchange) -> str | None:
        if not e.sent:
            return f"the request was never sent ({e.extra.get('err', 'no reason recorded')})"
        return None

    def _req_identifier(self, e: Exchange) -> str | None:
        can_id = int(e.extra.get("id", self.trace.header.request_id))
        if can_id not in self.request_ids:
            legal = ", ".join(f"0x{i:X}" for i in sorted(self.request_ids))
            return f"sent from CAN id 0x{can_id:X}; legal for {self.client} -> {self.server}: {legal}"
        return None

    def _req_format(self, e: Exchange) -> str | None:
        if not e.header:
            return "empty request"
        sid = e.header[0]
        rule = self.stage.services.get(sid)
        if rule is None:
            return f"service 0x{sid:02X} is not part of the {self.trace.header.stage} protocol"
        if rule.subfunctions is not None:
            if len(e.header) < 2:
                return f"service 0x{sid:02X} without its sub-function"
            if e.header[1] & 0x7F not in rule.subfunctions:
                return f"sub-function 0x{e.header[1]:02X} is not legal for service 0x{sid:02X}"
        p = self.stage.packet
        if p and sid == p[0] and self.state == "receiving" and len(e.header) < p[1] + p[2]:
            return f"TransferData header of {len(e.header)} bytes has no deploy packet id"
        if sid == self.stage.counter_service and len(e.header) < 2:
            return "TransferData without its block sequence counter"
        return None

    def _req_length(self, e: Exchange) -> str | None:
        rule = self.stage.services.get(e.header[0])
        if rule is None:
            return None
        low, high = rule.request_length
        limit = high if high is not None else self.block
        if e.length < low or (limit is not None and e.length > limit):
            bound = f"{low}..{limit}" if limit is not None else f"at least {low}"
            why = " (the negotiated maxNumberOfBlockLength)" if high is None and limit is not None else ""
            return f"request of {e.length} bytes; legal for 0x{e.header[0]:02X}: {bound}{why}"
        return None

    def _req_flow(self, e: Exchange) -> str | None:
        target = self._move(e.header)
        if target is None:
            return f"0x{e.header.hex()} is not allowed in state '{self.state}' of the {self.trace.header.stage} sequence"
        sid = e.header[0]
        if self._in_transfer(sid) and len(e.header) >= 2:
            counter = e.header[1]
            if counter != self.expected and counter != self.last:
                return f"block sequence counter 0x{counter:02X}, expected 0x{self.expected:02X}"
            packet = self._packet(e)
            if isinstance(packet, int) and counter == self.expected and packet != self.next_packet:
                return f"deploy packet {packet}, expected {self.next_packet}"
        return None

    # -- response checks
    def response(self, i: int, e: Exchange) -> None:
        """Record the first failed response check (later ones would only repeat it)."""
        for check in self.rules.response_checks:
            if e.response is None and check in ("format", "type", "match"):
                continue  # nothing arrived to look at
            problem = getattr(self, f"_rsp_{check}")(e)
            if problem:
                text, nrc = problem if isinstance(problem, tuple) else (problem, None)
                self._fail(i, e, f"response.{check}", text, nrc)
                return

    def _rsp_validity(self, e: Exchange) -> str | None:
        if e.response is None and not e.extra.get("late") and not e.extra.get("stray"):
            return f"no response from {self.server}" + (f" ({e.extra['err']})" if "err" in e.extra else "")
        return None

    def _rsp_time(self, e: Exchange) -> str | None:
        s = self.stage
        if e.response is None:
            late = e.extra.get("late")
            if late:
                return f"the response came after {late[0][0]} ms, when the client had given up (P2 {s.p2_ms:.0f} ms)"
            return None
        marks = list(e.extra.get("pend", [])) + [e.dt]
        previous = 0.0
        for n, mark in enumerate(marks):
            if mark is None:
                continue
            limit = s.p2_ms if n == 0 else s.p2_star_ms
            if mark - previous > limit:
                what = "response" if n == len(marks) - 1 else "0x78 response-pending"
                after = "the request" if n == 0 else "the previous 0x78"
                return f"{what} {mark - previous:.1f} ms after {after}; limit {limit:.0f} ms"
            previous = mark
        return None

    def _rsp_identifier(self, e: Exchange) -> str | None:
        if e.response is None:
            stray = e.extra.get("stray")
            if stray:
                _, can_id, data = stray[0]
                legal = ", ".join(f"0x{i:X}" for i in sorted(self.response_ids))
                return f"the answer {data} came from CAN id 0x{can_id:X}; legal for {self.server}: {legal}"
            return None
        rid = e.extra.get("rid")
        if rid is not None and int(rid) not in self.response_ids:
            return f"response from CAN id 0x{int(rid):X}"
        return None

    def _rsp_format(self, e: Exchange) -> str | None:
        r = e.response
        assert r is not None
        if not r:
            return "empty response"
        if r[0] == 0x7F:
            return None if len(r) == 3 else f"negative response of {len(r)} bytes ({r.hex()}); it must be 7F SID NRC"
        rule = self.stage.services.get(e.header[0])
        if rule is None:
            return None
        low, high = rule.response_length
        limit = high if high is not None else self.block
        if len(r) < low or (limit is not None and len(r) > limit):
            return f"response of {len(r)} bytes ({r[:8].hex()}); legal for 0x{e.header[0] + 0x40:02X}: {low}..{limit}"
        return None

    def _rsp_type(self, e: Exchange) -> tuple[str, int] | None:
        r = e.response
        assert r is not None
        if r[0] == 0x7F and r[1] == e.header[0]:
            return f"negative response 0x{r[2]:02X} ({_nrc_name(r[2])}) to 0x{e.header[0]:02X}", r[2]
        return None

    def _rsp_match(self, e: Exchange) -> str | None:
        r = e.response
        assert r is not None
        sid = e.header[0]
        if r[0] == 0x7F:
            return f"negative response for service 0x{r[1]:02X} answers a 0x{sid:02X} request" if r[1] != sid else None
        if r[0] != (sid + 0x40) & 0xFF:
            return f"response SID 0x{r[0]:02X} does not answer service 0x{sid:02X} (expected 0x{sid + 0x40:02X})"
        rule = self.stage.services.get(sid)
        echo = rule.echo if rule else 0
        want = bytearray(e.header[1 : 1 + echo])
        if want and rule and rule.subfunctions is not None:
            want[0] &= 0x7F  # the suppress-positive-response bit is not echoed
        got = r[1 : 1 + echo]
        if bytes(want) != got[: len(want)]:
            return f"response echoes {got.hex()}, the request was {bytes(want).hex()}"
        return None

    # -- state
    def advance(self, e: Exchange) -> None:
        """Follow the client's sequence: every request that went out and was not refused moves
        the state machine (the order the client keeps is what the flow check judges)."""
        r = e.response
        if not e.sent or not e.header or (r is not None and r[:1] == b"\x7f"):
            return
        target = self._move(e.header)
        sid = e.header[0]
        if sid == self.stage.block_length_from and r is not None and r[:1] == bytes(((sid + 0x40) & 0xFF,)):
            self._negotiated(e, r)
        if self._in_transfer(sid) and len(e.header) >= 2:
            counter = e.header[1]
            if counter == self.expected:
                self.last, self.expected = counter, (counter + 1) & 0xFF
                if isinstance(self._packet(e), int):
                    self.next_packet += 1
        if target is not None:
            if target != self.state and sid != self.stage.counter_service:
                self.expected, self.last = self.stage.counter_start, None
            self.state = target

    def _negotiated(self, e: Exchange, r: bytes) -> None:
        try:
            if r[0] == 0x74:  # RequestDownload: lengthFormatIdentifier, maxNumberOfBlockLength
                n = r[1] >> 4
                self.block = int.from_bytes(r[2 : 2 + n], "big")
            elif r[0] == 0x78 and len(r) >= 3:  # RequestFileTransfer: mode, LFID, max length, DFI[, position]
                n = r[2]
                self.block = int.from_bytes(r[3 : 3 + n], "big")
                self.next_packet = 0
                if r[1] == 0x06 and len(r) >= 4 + n + 8 and self.stage.packet:
                    position = int.from_bytes(r[4 + n : 12 + n], "big")
                    payload = self.block - self.stage.packet[1] - self.stage.packet[2]
                    self.next_packet = position // payload if payload > 0 else 0
        except (IndexError, ValueError):
            self.block = None


class _FastTransfer:
    """Most records of a trace are TransferData blocks answered in time. This checks such a
    record with a few comparisons (the same rules as the full checks) and leaves every other
    record, and any doubt, to them."""

    def __init__(self, c: _Checker) -> None:
        st = c.stage
        self.c = c
        self.sid = st.counter_service
        rule = st.services.get(self.sid) if self.sid is not None else None
        self.enabled = rule is not None and c.trace.header.request_id in c.request_ids \
            and c.trace.header.response_id in c.response_ids and rule.response_length[0] <= 2 and rule.echo == 1
        self.min_length = rule.request_length[0] if rule else 0
        self.max_length = rule.request_length[1] if rule else None
        self.packet = st.packet if st.packet and st.packet[0] == self.sid else None
        self.header_length = self.packet[1] + self.packet[2] if self.packet else 2
        self.answer = (self.sid + 0x40) & 0xFF if self.sid is not None else -1
        self.states = {s for s, moves in st.flow.items() for prefix, target in moves
                       if target == s and prefix == bytes((self.sid,))} if self.sid is not None else set()
        self.p2 = st.p2_ms

    def passes(self, e: Exchange) -> bool:
        c = self.c
        h, r = e.header, e.response
        if not self.enabled or e.extra or r is None or len(h) != self.header_length or len(r) != 2 or h[0] != self.sid:
            return False
        limit = self.max_length if self.max_length is not None else c.block
        if c.state not in self.states or limit is None or not self.min_length <= e.length <= limit:
            return False
        counter = h[1]
        if counter != c.expected or r[0] != self.answer or r[1] != counter or e.dt is None or e.dt > self.p2:
            return False
        if self.packet is not None:
            if c.state != "receiving" or int.from_bytes(h[2:6], "big") != c.next_packet:
                return False
            c.next_packet += 1
        c.last, c.expected = counter, (counter + 1) & 0xFF
        return True


def check_trace(trace: Trace, rules: Rules, name: str, mode: str = "first") -> list[Finding]:
    """Every finding in one trace (``first``: at most one)."""
    stage = rules.stages.get(trace.header.stage)
    if stage is None:
        raise ValueError(f"no rules for stage {trace.header.stage!r}")
    checker = _Checker(trace, rules, stage, name, mode)
    fast = _FastTransfer(checker)
    for i, e in enumerate(trace.exchanges):
        if fast.passes(e):  # the common TransferData block: every check inline, same result
            continue
        failed = checker.request(i, e)
        if failed and mode == "first":
            break
        if e.sent and not failed:  # how a server answers an illegal request is no failure of its own
            before = len(checker.findings)
            checker.response(i, e)
            if mode == "first" and len(checker.findings) > before:
                break
        checker.advance(e)
    return checker.findings


def diagnose(inputs: list[StageInput], rules: Rules, mode: str = "first", campaign_id: str | None = None) -> Verdict:
    """D5: a failed deploy -> the deploy traces of the failed packages only; otherwise the flash
    traces of every failed ECU, one after another; nothing failed -> no abnormal package."""
    if mode not in ("first", "all"):
        raise ValueError("mode must be first or all")
    deploy_failed = [i for i in inputs if i.stage == "deploy" and i.result.get("result") != "success"]
    flash_failed = [i for i in inputs if i.stage == "flash" and i.result.get("result") != "success"]
    chosen, stage = (deploy_failed, "deploy") if deploy_failed else ((flash_failed, "flash") if flash_failed else ([], None))
    findings: list[Finding] = []
    unanalysed: list[dict[str, str]] = []
    for item in chosen:
        if item.trace is None:
            unanalysed.append({"stage": item.stage, "name": item.name, "reason": item.trace_error or "no trace"})
            continue
        try:
            found = check_trace(item.trace, rules, item.name, mode)
        except ValueError as exc:
            unanalysed.append({"stage": item.stage, "name": item.name, "reason": str(exc)})
            continue
        if not found:
            unanalysed.append({"stage": item.stage, "name": item.name,
                               "reason": "the result is failed but every exchange passed the checks"})
        findings.extend(found)
    return Verdict(mode, [i.name for i in chosen], stage, findings, unanalysed, campaign_id)


# ---- the human report ---------------------------------------------------------------------------
def render_markdown(verdict: Verdict) -> str:
    lines = [f"# Upgrade diagnosis{f' of campaign {verdict.campaign_id}' if verdict.campaign_id else ''}", ""]
    if not verdict.abnormal:
        lines += ["No abnormal package: every deploy and flash result is a success.", ""]
        return "\n".join(lines)
    lines += [f"Abnormal in the **{verdict.stage}** stage: {', '.join(verdict.abnormal)} (mode `{verdict.mode}`).", ""]
    for f in verdict.findings:
        where = f"deploy packet {f.packet}" if f.stage == "deploy" and f.packet is not None else (
            f"ECU {f.packet}" if f.stage == "flash" else f"package {f.package}")
        nrc = f" 0x{f.nrc:02X} {f.nrc_name}" if f.nrc is not None else ""
        lines += [
            f"## `{f.cause}`{nrc}",
            "",
            f"- **{f.side} side at fault: {f.unit}** ({f.package}, {where}, request #{f.index} `{f.request}`)",
            f"- failed check: `{f.check}`: {f.detail}",
            "",
            "```",
        ]
        for rec in f.context:
            marker = ">>" if rec["index"] == f.index else "  "
            rsp = rec["response"] or "(none)"
            dt = f"{rec['dt']} ms" if rec["dt"] is not None else ""
            extra = " ".join(f"{k}={v}" for k, v in (rec.get("x") or {}).items() if k in ("late", "stray", "sent", "id", "pend"))
            lines.append(f"{marker} #{rec['index']:<5} {rec['request']:<24} {rec['length']:>6} B  ->  {rsp:<16} {dt:>10} {extra}".rstrip())
            if rec["index"] == f.index:
                lines.append(f"   ^ {f.check} failed: {f.cause}")
        lines += ["```", ""]
    for u in verdict.unanalysed:
        lines.append(f"- not analysed: {u['stage']} {u['name']}: {u['reason']}")
    return "\n".join(lines) + "\n"
