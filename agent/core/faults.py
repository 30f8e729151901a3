"""Fault injection specs, shared by the servers (ECU simulator, deploy server) and the clients.

A spec is one string, the same on the command line and in YAML::

    [STAGE:]TARGET:SERVICE[#N[+]]:ACTION[=ARG]

``STAGE`` is ``flash`` (default), ``deploy``, ``activate`` (client faults in the gateway's
activation-phase actions: activate, commit, discard, rollback; counted across them per ECU) or
``link`` (client faults in the TBOX's calls around the transfers: inventory, install, status,
file reads; counted across them); ``TARGET`` the ECU (flash, activate) or the package (deploy),
``GW`` (link), or ``*``; ``GW`` also names the gateway's deploy server and ``TBOX`` the TBOX's
deploy client; ``SERVICE`` a UDS service id in hex (``36`` or ``0x36``); ``#N`` the N-th
request of that service (to that target) only, ``#N+`` the N-th and every later one,
nothing = every one.

Server-side actions (the ECU in flash, the gateway in deploy): ``drop``, ``delay=MS``,
``pending=MS`` (response-pending 0x78 for MS, then the answer), ``wrong_id[=CANID]``,
``malformed``, ``nrc=CODE`` (the request is carried out and the answer replaced, except for
``nrc=0x21``, busyRepeatRequest, and a request that opens a transfer (34, 35, 38), which are
not carried out at all), ``mismatch``. Client-side actions (the
gateway in flash, the TBOX in deploy): ``not_sent`` (a transmit error), ``from_id[=CANID]``
(sent from a wrong CAN id), ``bad_format``, ``bad_length``, ``skip_counter`` (TransferData
skips a block counter), ``skip_step`` (the request is left out, the sequence goes on),
``corrupt_data`` (TransferData's data inverted, header kept: what a compressed stream damaged
on the way looks like to the ECU).
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.errors import UsageError

__all__ = ["FaultSpec", "parse_fault", "parse_faults", "SERVER_ACTIONS", "CLIENT_ACTIONS", "FaultCounter"]

SERVER_ACTIONS = ("drop", "delay", "pending", "wrong_id", "malformed", "nrc", "mismatch")
CLIENT_ACTIONS = ("not_sent", "from_id", "bad_format", "bad_length", "skip_counter", "skip_step", "corrupt_data")
STAGES = ("flash", "deploy", "activate", "link")  # activate: the gateway's activation-phase actions; link: the TBOX's calls
# what a request can be: ISO 14229-1's request service ids (a profile may send any of them in
# flash), and the services of the deploy link; a fault on anything else would never fire
REQUEST_SERVICES = frozenset({0x10, 0x11, 0x14, 0x19, 0x22, 0x23, 0x24, 0x27, 0x28, 0x29, 0x2A, 0x2C, 0x2E, 0x2F,
                              0x31, 0x34, 0x35, 0x36, 0x37, 0x38, 0x3D, 0x3E, 0x83, 0x84, 0x85, 0x86, 0x87})
DEPLOY_SERVICES = frozenset({0x10, 0x22, 0x27, 0x31, 0x36, 0x37, 0x38, 0x3E})
_NEEDS_ARG = {"delay", "pending", "nrc"}


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

    @property
    def side(self) -> str:
        return "client" if self.action in CLIENT_ACTIONS else "server"

    def applies_to(self, stage: str, target: str, side: str | None = None) -> bool:
        return self.stage == stage and self.target in ("*", target) and (side is None or self.side == side)


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
    on_link = stage in ("deploy", "link")
    if service not in (DEPLOY_SERVICES if on_link else REQUEST_SERVICES):
        what = "one of the deploy link's services" if on_link else "a UDS request service (ISO 14229-1)"
        known = DEPLOY_SERVICES if on_link else REQUEST_SERVICES
        raise UsageError(f"fault spec {spec!r}: service 0x{service:X} is not {what}, so the fault would never fire "
                         f"(one of {' '.join(f'{x:02X}' for x in sorted(known))})")
    action, _, arg_text = action_part.partition("=")
    if action not in SERVER_ACTIONS + CLIENT_ACTIONS:
        raise UsageError(f"fault spec {spec!r}: action {action!r} is not one of {', '.join(SERVER_ACTIONS + CLIENT_ACTIONS)}")
    arg: int | None = None
    if arg_text:
        arg = _number(arg_text, "argument", spec)
    elif action in _NEEDS_ARG:
        raise UsageError(f"fault spec {spec!r}: {action} needs a value ({action}=...)")
    if action == "nrc" and arg is not None and not 0 < arg < 0x100:
        raise UsageError(f"fault spec {spec!r}: NRC must be 0x01..0xFF")
    fault = FaultSpec(stage, target, service, occurrence, and_later, action, arg, spec.strip())
    if fault.side == "server" and stage in SAME_SERVER:
        raise UsageError(f"fault spec {spec!r}: {SAME_SERVER[stage]}")
    return fault


# a server answers every stage alike: its faults are given in the stage it counts them in
SAME_SERVER = {
    "activate": "an ECU answers the activation as it answers the flash: give it as a flash-stage fault (the ECU "
                "counts its requests across staging and activation, e.g. bcm:31#4:nrc=0x22 for the activate routine)",
    "link": "the gateway's deploy server answers the TBOX's calls: give it as a deploy-stage fault "
            "(deploy:GW:31#2:nrc=0x22)",
}


# Which process injects which faults: (stage, side) -> who does it
INJECTED_BY = {
    ("flash", "server"): "the ECU simulator (vota ecu-sim --fault)",
    ("flash", "client"): "the gateway (vota gateway --fault, vota flash --fault)",
    ("deploy", "server"): "the gateway (vota gateway --fault)",
    ("deploy", "client"): "the TBOX (vota tbox --fault, vota deploy --fault)",
    ("activate", "client"): "the gateway (vota gateway --fault)",
    ("link", "client"): "the TBOX (vota tbox --fault)",
}
ROLES = {
    "ecu-sim": {("flash", "server")},
    "gateway": {("deploy", "server"), ("flash", "client"), ("activate", "client")},
    "flash": {("flash", "client")},
    "tbox": {("deploy", "client"), ("link", "client")},
    "deploy": {("deploy", "client")},
    "bench": set(INJECTED_BY),
}


def parse_faults(texts: list[str], process: str, ecus: list[str]) -> list[FaultSpec]:
    """The specs ``process`` is given, each checked to be one it can apply: a fault for another
    process, or for an ECU it does not have, is refused with the reason (it would do nothing)."""
    out = []
    for text in texts:
        f = parse_fault(text)
        if (f.stage, f.side) not in ROLES[process]:
            raise UsageError(f"fault spec {f.text!r}: a {f.side}-side {f.stage} fault ({f.action}) is injected by "
                             f"{INJECTED_BY[(f.stage, f.side)]}, not by vota {process}")
        if f.stage in ("flash", "activate") and f.target != "*" and f.target not in ecus:
            raise UsageError(f"fault spec {f.text!r}: no ECU {f.target!r} here (ECUs: {', '.join(ecus) or 'none'})")
        out.append(f)
    return out


class FaultCounter:
    """Counts, per spec, the requests of its service to its target, and returns the fault (if
    any) due for this request. ``scope`` names the current target (e.g. the package being
    deployed); specs for ``*`` or one of ``always`` apply whatever it is."""

    def __init__(self, specs: list[FaultSpec], always: tuple[str, ...] = ("*",)) -> None:
        self.specs = specs
        self.always = always
        self.counts: dict[int, int] = {}

    def next(self, service: int, scope: str | None = None) -> FaultSpec | None:
        due = None
        for i, spec in enumerate(self.specs):
            if spec.service != service or (spec.target not in self.always and spec.target != scope):
                continue
            self.counts[i] = self.counts.get(i, 0) + 1
            if due is None and spec.matches(service, self.counts[i]):
                due = spec
        return due
