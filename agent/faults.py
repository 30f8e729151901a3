"""Fault injection specs, shared by the ECU simulator and (later) the client side.

A spec is one string, the same on the command line and in YAML::

    [STAGE:]TARGET:SERVICE[#N[+]]:ACTION[=ARG]

``STAGE`` is ``flash`` (default) or ``deploy``; ``TARGET`` the ECU name (or ``*``);
``SERVICE`` a UDS service id in hex (``36`` or ``0x36``); ``#N`` the N-th request of that
service only, ``#N+`` the N-th and every later one, nothing = every one. Server-side
actions: ``drop``, ``delay=MS``, ``wrong_id[=CANID]``, ``malformed``, ``nrc=CODE``,
``mismatch``.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.errors import UsageError

__all__ = ["FaultSpec", "parse_fault", "SERVER_ACTIONS", "FaultCounter"]

SERVER_ACTIONS = ("drop", "delay", "wrong_id", "malformed", "nrc", "mismatch")
STAGES = ("flash", "deploy")
_NEEDS_ARG = {"delay", "nrc"}


@dataclass(frozen=True)
class FaultSpec:
    stage: str
    target: str
    service: int
    occurrence: int | None
    and_later: bool
    action: str
    arg: int | None = None
    text: str = ""

    def matches(self, service: int, count: int) -> bool:
        if service != self.service:
            return False
        if self.occurrence is None:
            return True
        return count >= self.occurrence if self.and_later else count == self.occurrence

    def applies_to(self, stage: str, target: str) -> bool:
        return self.stage == stage and self.target in ("*", target)


def _number(text: str, what: str, spec: str) -> int:
    try:
        return int(text, 16) if what == "service" else int(text, 0)
    except ValueError:
        raise UsageError(f"fault spec {spec!r}: {what} {text!r} is not a number") from None


def parse_fault(spec: str) -> FaultSpec:
    parts = spec.strip().split(":")
    if len(parts) == 4:
        stage, target, service_part, action_part = parts
    elif len(parts) == 3:
        stage, (target, service_part, action_part) = "flash", parts
    else:
        raise UsageError(f"fault spec {spec!r}: expected [STAGE:]TARGET:SERVICE[#N[+]]:ACTION[=ARG]")
    if stage not in STAGES:
        raise UsageError(f"fault spec {spec!r}: stage {stage!r} is not one of {', '.join(STAGES)}")
    if not target:
        raise UsageError(f"fault spec {spec!r}: the target (ECU name) is empty")
    occurrence: int | None = None
    and_later = False
    if "#" in service_part:
        service_part, occ = service_part.split("#", 1)
        if occ.endswith("+"):
            and_later, occ = True, occ[:-1]
        occurrence = _number(occ, "occurrence", spec)
        if occurrence < 1:
            raise UsageError(f"fault spec {spec!r}: occurrence counts from 1")
    service = _number(service_part.lower().removeprefix("0x"), "service", spec)
    if not 0 < service < 0x100:
        raise UsageError(f"fault spec {spec!r}: service 0x{service:X} is not a UDS service id")
    action, _, arg_text = action_part.partition("=")
    if action not in SERVER_ACTIONS:
        raise UsageError(f"fault spec {spec!r}: action {action!r} is not one of {', '.join(SERVER_ACTIONS)}")
    arg: int | None = None
    if arg_text:
        arg = _number(arg_text, "argument", spec)
    elif action in _NEEDS_ARG:
        raise UsageError(f"fault spec {spec!r}: {action} needs a value ({action}=...)")
    if action == "nrc" and arg is not None and not 0 < arg < 0x100:
        raise UsageError(f"fault spec {spec!r}: NRC must be 0x01..0xFF")
    return FaultSpec(stage, target, service, occurrence, and_later, action, arg, spec.strip())


class FaultCounter:
    """Counts requests per service and returns the fault (if any) due for this one."""

    def __init__(self, specs: list[FaultSpec]) -> None:
        self.specs = specs
        self.counts: dict[int, int] = {}

    def next(self, service: int) -> FaultSpec | None:
        count = self.counts.get(service, 0) + 1
        self.counts[service] = count
        for spec in self.specs:
            if spec.matches(service, count):
                return spec
        return None
