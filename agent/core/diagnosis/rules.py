"""The diagnosis rules: validation data and cause mapping, parsed from YAML data (``rules.yaml``
beside this module is the default), every error naming its key."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

from agent.errors import ConfigError, TraceFormatError

__all__ = ["SCHEMA", "CAUSES", "DOIP_CAUSES", "DOIP_CHECKS", "REQUEST_CHECKS", "RESPONSE_CHECKS", "ServiceRule",
           "StageRules", "Rules", "parse_rules", "with_profile"]

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
# DoIP's own failures on a deploy link over DoIP (x.doip in the trace, docs/doip.md)
DOIP_CAUSES = ("routing_activation_refused", "diagnostic_message_nack", "alive_check_timeout", "doip_connection_failure")
# the check each is found by, its cause and side; the refusal codes that are the other side's
# doing are the same checks with "_server" (agent/protocol/doip.py says whose each code is)
DOIP_CHECKS = {
    "doip.activation": ("routing_activation_refused", "client"),
    "doip.activation_server": ("routing_activation_refused", "server"),
    "doip.nack": ("diagnostic_message_nack", "client"),
    "doip.nack_server": ("diagnostic_message_nack", "server"),
    "doip.alive_check": ("alive_check_timeout", "client"),
    "doip.connection": ("doip_connection_failure", "server"),
}
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
    initial: str = "start"  # the flow's state before the first request
    packet_states: frozenset[str] = frozenset()  # the flow states in which the packet service carries a packet id


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
        initial = str(d.get("initial", "start"))
        if initial not in flow:
            raise ConfigError(source, f"{where}.initial", f"the flow has no state {initial!r}")
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
            initial=initial,
            packet_states=_packet_states(packet, flow, where, source),
        )
    except ConfigError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise ConfigError(source, where, f"invalid stage rules ({type(exc).__name__}: {exc})") from None


def _packet_states(packet: Any, flow: Mapping[str, Any], where: str, source: str) -> frozenset[str]:
    if not packet:
        return frozenset()
    states = packet.get("in")
    if not isinstance(states, list) or not states:
        raise ConfigError(source, f"{where}.packet.in", "name the flow states in which the packet id is carried")
    unknown = [s for s in states if s not in flow]
    if unknown:
        raise ConfigError(source, f"{where}.packet.in", f"the flow has no state {unknown[0]!r}")
    return frozenset(str(s) for s in states)


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
        known = DOIP_CAUSES if str(key).startswith("doip.") else CAUSES
        if not isinstance(value, Mapping) or value.get("cause") not in known or value.get("side") not in ("client", "server"):
            raise ConfigError(source, f"causes.{key}", f"needs a cause out of {', '.join(known)} and side client/server")
        causes[str(key)] = (str(value["cause"]), str(value["side"]))
    for key, mapped in DOIP_CHECKS.items():  # rules written before the deploy link had DoIP
        causes.setdefault(key, mapped)
    missing = [f"{side}.{c}" for side, names in (("request", REQUEST_CHECKS), ("response", RESPONSE_CHECKS))
               for c in names if f"{side}.{c}" not in causes]
    if missing:
        raise ConfigError(source, "causes", f"no cause for {', '.join(missing)}")
    stages = {str(n): _stage(str(n), d, source) for n, d in (data.get("stages") or {}).items()}
    for needed in ("deploy", "flash"):
        if needed not in stages:
            raise ConfigError(source, f"stages.{needed}", "missing")
    return Rules(request, response, causes, stages)


def with_profile(stage: StageRules, declared: Any) -> StageRules:
    """The flash stage's rules for a trace whose header declares its flash profile (a sequence the
    project did not define: agent/core/flash_profile.py ``profile_flow``): the profile's state
    machine instead of the built-in one; its services and sub-functions legal besides the rules'."""
    try:
        flow: dict[str, list[tuple[bytes, str]]] = {}
        for state, moves in dict(declared["flow"]).items():
            pairs = [(bytes.fromhex(str(k)), str(v)) for k, v in dict(moves).items()]
            flow[str(state)] = sorted(pairs, key=lambda p: -len(p[0]))
        services = dict(stage.services)
        for sid_hex, subs in dict(declared["subfunctions"]).items():
            sid, legal = int(str(sid_hex), 16), frozenset(int(v) for v in subs)
            rule = services.get(sid)
            if rule is None:
                services[sid] = ServiceRule((1, 4095), (1, 4095), legal or None, 1 if legal else 0)
            elif rule.subfunctions is not None and legal:
                services[sid] = replace(rule, subfunctions=rule.subfunctions | legal)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise TraceFormatError(f"the header's flash profile cannot be read ({type(exc).__name__}: {exc})") from None
    unknown = sorted({t for moves in flow.values() for _, t in moves} - set(flow))
    if "start" not in flow or unknown:
        raise TraceFormatError(f"the header's flash profile flow has no state {(unknown or ['start'])[0]!r}")
    return replace(stage, flow=flow, services=services, initial="start")
