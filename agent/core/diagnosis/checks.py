"""The checks of one trace, exchange by exchange, in the rules' order (D6, D7)."""

from __future__ import annotations

from agent.core.diagnosis.model import Finding, nrc_name, record
from agent.core.diagnosis.rules import Rules, StageRules, with_profile
from agent.core.trace import Exchange, Trace
from agent.protocol.doip import ACTIVATION_REFUSALS, DIAGNOSTIC_NACKS

__all__ = ["check_trace"]


class _Checker:
    """Walks one trace, keeping the protocol state the flow and length checks need."""

    def __init__(self, trace: Trace, rules: Rules, stage: StageRules, name: str, mode: str) -> None:
        self.trace, self.rules, self.stage, self.name, self.mode = trace, rules, stage, name, mode
        h = trace.header
        self.client, self.server = h.client, h.server
        self.request_ids = stage.request_ids or frozenset({h.request_id})
        self.response_ids = stage.response_ids or frozenset({h.response_id})
        self.state = stage.initial
        self.block: int | None = None
        self.expected = stage.counter_start
        self.last: int | None = None
        self.next_packet = 0
        # transfer accounting: the size the open transfer announced (0x34 memorySize, 0x38
        # fileSizeCompressed) and the TransferData bytes accepted so far (a repeated block once)
        self.announced: int | None = None
        self.transferred = 0
        p = stage.packet
        self.data_offset = p[1] + p[2] if p else 2  # SID, counter[, packet id]: what precedes a block's data
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
        context = [record(i, x) for i, x in enumerate(self.trace.exchanges[lo:hi], start=lo)]
        self.findings.append(Finding(
            stage=self.trace.header.stage, package=self.name, unit=unit, side=side, cause=cause, check=check,
            index=index, request=e.header.hex(), packet=self._packet(e), detail=detail, nrc=nrc,
            nrc_name=nrc_name(nrc) if nrc is not None else None, context=context,
            step=str(e.extra["step"]) if "step" in e.extra else None))

    def _move(self, header: bytes) -> str | None:
        for prefix in self.stage.anywhere:
            if header.startswith(prefix):
                return self.state
        for prefix, target in self.stage.flow.get(self.state, []):
            if header.startswith(prefix):
                return target
        return None

    def _transferring(self) -> bool:
        """The state is the one in which TransferData blocks go out."""
        sid = self.stage.counter_service
        return sid is not None and self._in_transfer(sid)

    def _in_transfer(self, sid: int) -> bool:
        return sid == self.stage.counter_service and any(
            p[:1] == bytes((sid,)) for p, t in self.stage.flow.get(self.state, []) if t == self.state)

    # -- the link's own failure (DoIP)
    def link(self, i: int, e: Exchange) -> bool:
        """A failure DoIP itself reported for this exchange (``x.doip``), recorded; False when none."""
        said = e.extra.get("doip")
        if not isinstance(said, dict):
            return False
        found = _doip_failure(said, self.client, self.server)
        if found is None:
            return False
        self._fail(i, e, *found)
        return True

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
        if p and sid == p[0] and self.state in self.stage.packet_states and len(e.header) < p[1] + p[2]:
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
        if self._new_block(e) and self.announced is not None:
            total = self.transferred + max(e.length - self.data_offset, 0)
            if total > self.announced:
                announced, self.announced = self.announced, None  # said once; this transfer is no longer counted
                return (f"TransferData past the announced size: {total} bytes with this block, "
                        f"{announced} announced by 0x{self.stage.block_length_from:02X}")
        return None

    def _new_block(self, e: Exchange) -> bool:
        """A TransferData block of the open transfer that is not a repeat of the last one."""
        return self._in_transfer(e.header[0]) and len(e.header) >= 2 and e.header[1] == self.expected

    def _req_flow(self, e: Exchange) -> str | None:
        target = self._move(e.header)
        if target is None:
            return f"0x{e.header.hex()} is not allowed in state '{self.state}' of the {self.trace.header.stage} sequence"
        sid = e.header[0]
        if (self.announced is not None and sid != self.stage.counter_service and target != self.state
                and self.transferred < self.announced and self._transferring()):
            return (f"0x{e.header.hex()} ends the transfer after {self.transferred} of the {self.announced} bytes "
                    f"announced by 0x{self.stage.block_length_from:02X}")
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
        """Record the first failed response check (later ones would only repeat it). An
        exchange the client asked again (``x.retried``) is not judged: its last attempt is; nor
        is a negative answer its step accepts (``x.tolerated``)."""
        if e.extra.get("retried") or e.extra.get("tolerated"):
            return
        for check in self.rules.response_checks:
            if e.response is None and check in ("format", "type") or (
                    e.response is None and check == "match" and not e.extra.get("other")):
                continue  # nothing arrived to look at
            problem = getattr(self, f"_rsp_{check}")(e)
            if problem:
                text, nrc = problem if isinstance(problem, tuple) else (problem, None)
                self._fail(i, e, f"response.{check}", text, nrc)
                return

    def _rsp_validity(self, e: Exchange) -> str | None:
        if e.response is None and not e.extra.get("late") and not e.extra.get("stray") and not e.extra.get("other"):
            return f"no response from {self.server}" + (f" ({e.extra['err']})" if "err" in e.extra else "")
        return None

    def _rsp_time(self, e: Exchange) -> str | None:
        s = self.stage
        if e.response is None:
            late = e.extra.get("late")
            if late:  # after a 0x78 response-pending the client waits P2*, else P2
                gave_up = f"P2* {s.p2_star_ms:.0f} ms" if e.extra.get("pend") else f"P2 {s.p2_ms:.0f} ms"
                return f"the response came after {late[0][0]} ms, when the client had given up ({gave_up})"
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
        full = e.extra.get("rlen") if e.extra else None  # a response recorded without its data: its real length
        size = full if type(full) is int else len(r)
        if size < low or (limit is not None and size > limit):
            return f"response of {size} bytes ({r[:8].hex()}); legal for 0x{e.header[0] + 0x40:02X}: {low}..{limit}"
        return None

    def _rsp_type(self, e: Exchange) -> tuple[str, int] | None:
        r = e.response
        assert r is not None
        if r[0] == 0x7F and r[1] == e.header[0]:
            return f"negative response 0x{r[2]:02X} ({nrc_name(r[2])}) to 0x{e.header[0]:02X}", r[2]
        return None

    def _rsp_match(self, e: Exchange) -> str | None:
        r = e.response
        sid = e.header[0]
        if r is None:  # only answers to other services came (the client dropped them and gave up)
            _, data = e.extra["other"][0]
            return f"the only answer, {data}, is for another service than 0x{sid:02X}"
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
                self.transferred += max(e.length - self.data_offset, 0)
                if isinstance(self._packet(e), int):
                    self.next_packet += 1
        if target is not None:
            if target != self.state and sid != self.stage.counter_service:
                self.expected, self.last = self.stage.counter_start, None
                if sid != self.stage.block_length_from:
                    self.announced = None  # the transfer is over
            self.state = target

    def _negotiated(self, e: Exchange, r: bytes) -> None:
        self.announced, self.transferred = _announced(e.header), 0
        if e.header[:1] == b"\x34" and len(e.header) > 1 and e.header[1] >> 4:
            # a compressed download: memorySize is the image's; the bytes TransferData carries are
            # what the client recorded (x.csize), else they are not known and not counted
            packed = e.extra.get("csize") if e.extra else None
            self.announced = packed if type(packed) is int else None
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
                    self.transferred = position
        except (IndexError, ValueError):
            self.block = None


def _code(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _doip_failure(said: dict[str, object], client: str, server: str) -> tuple[str, str] | None:
    """(check, detail) for what a DoIP channel recorded of its failure, or None (the client
    closed it itself: the exchange is judged as any other)."""
    act, nack, closed = _code(said.get("act")), _code(said.get("nack")), said.get("closed")
    if act is not None:
        meaning, side = ACTIVATION_REFUSALS.get(act, ("reserved", "client"))
        return ("doip.activation" if side == "client" else "doip.activation_server",
                f"{server}'s DoIP entity refused routing activation: code 0x{act:02X} ({meaning})")
    if nack is not None:
        meaning, side = DIAGNOSTIC_NACKS.get(nack, ("reserved", "server"))
        return ("doip.nack" if side == "client" else "doip.nack_server",
                f"{server}'s DoIP entity refused the diagnostic message: code 0x{nack:02X} ({meaning})")
    if _code(said.get("gnack")) is not None:
        return "doip.nack", f"{server}'s DoIP entity refused the message's header: generic NACK 0x{said['gnack']:02X}"
    if closed == "alive_check":
        return "doip.alive_check", f"{client} did not answer {server}'s alive check in time: the entity closed the connection"
    if closed == "peer":
        return "doip.connection", f"{server}'s DoIP entity closed the connection"
    if said.get("conn") == "tls":
        return "doip.connection", f"the TLS handshake with {server}'s DoIP entity failed (certificates, CA)"
    if said.get("conn") == "unreachable":
        return "doip.connection", f"{server}'s DoIP entity could not be reached (TCP connection refused or timed out)"
    if said.get("timeout") == "ack":
        return "doip.connection", f"{server}'s DoIP entity did not acknowledge the diagnostic message within 2 s"
    return None


def _announced(header: bytes) -> int | None:
    """The bytes a RequestDownload (0x34: memorySize) or a RequestFileTransfer that writes
    (0x38 add/replace/resume: fileSizeCompressed) announces; None when the header does not say."""
    try:
        if header[0] == 0x34:
            size_len, addr_len = header[2] >> 4, header[2] & 0x0F
            start = 3 + addr_len
            if size_len and len(header) >= start + size_len:
                return int.from_bytes(header[start : start + size_len], "big")
        elif header[0] == 0x38 and header[1] in (0x01, 0x03, 0x06):
            path_len = int.from_bytes(header[2:4], "big")
            at = 4 + path_len + 1  # the path, the dataFormatIdentifier
            n = header[at]
            end = at + 1 + 2 * n
            if n and len(header) >= end:
                return int.from_bytes(header[at + 1 + n : end], "big")
    except IndexError:
        return None
    return None


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
        total = c.transferred + e.length - c.data_offset
        if c.announced is not None and total > c.announced:
            return False  # past the announced size: the full checks say so
        if self.packet is not None:
            if c.state not in c.stage.packet_states or int.from_bytes(h[self.packet[1]:self.header_length], "big") != c.next_packet:
                return False
            c.next_packet += 1
        c.transferred = total
        c.last, c.expected = counter, (counter + 1) & 0xFF
        return True


def check_trace(trace: Trace, rules: Rules, name: str, mode: str = "first") -> list[Finding]:
    """Every finding in one trace (``first``: at most one)."""
    stage = rules.stages.get(trace.header.stage)
    if stage is None:
        raise ValueError(f"no rules for stage {trace.header.stage!r}")
    if trace.header.stage == "flash" and "profile" in trace.header.extra:
        stage = with_profile(stage, trace.header.extra["profile"])
    checker = _Checker(trace, rules, stage, name, mode)
    fast = _FastTransfer(checker)
    for i, e in enumerate(trace.exchanges):
        if fast.passes(e):  # the common TransferData block: every check inline, same result
            continue
        if "doip" in e.extra and checker.link(i, e):  # the link failed, not the request or its answer
            if mode == "first":
                break
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
