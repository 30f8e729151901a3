"""What a diagnosis takes and gives: one stage input per package or ECU, findings, the verdict."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from udsoncan import Response

from agent.core.diagnosis.rules import SCHEMA
from agent.core.trace import Exchange, Trace

__all__ = ["Finding", "StageInput", "Verdict", "nrc_name", "record"]


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
    step: str | None = None  # the exchange's step outside the programming sequence (x.step), if named


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
    # a failure no finding explains: what failed, and why the evidence does not show it
    unexplained: dict[str, Any] | None = None
    # a campaign the vehicle's state never let install (its preconditions, within its window):
    # the stage it waited in, the unmet conditions and the values read
    vehicle_state: dict[str, Any] | None = None

    @property
    def cause(self) -> str | None:
        if self.findings:
            return self.findings[0].cause
        if self.vehicle_state is not None:
            return "preconditions_not_met"
        return "unexplained" if self.unexplained is not None else None

    def to_json(self) -> dict[str, Any]:
        first = self.findings[0] if self.findings else None
        state = self.vehicle_state
        return {
            "schema": SCHEMA,
            "campaign_id": self.campaign_id,
            "mode": self.mode,
            "abnormal_packages": self.abnormal,
            "stage": self.stage if state is None or first else state["stage"],
            "cause": self.cause,
            "side": first.side if first else "vehicle" if state is not None else None,
            "unit": first.unit if first else ",".join(sorted(state["unmet"])) if state is not None else None,
            "findings": [asdict(f) for f in self.findings],
            "unanalysed": self.unanalysed,
            "unexplained": self.unexplained,
            **({"vehicle_state": state} if state is not None else {}),
        }


def nrc_name(code: int) -> str:
    name = Response.Code.get_name(code)
    return name if name else f"0x{code:02X}"


def record(index: int, e: Exchange) -> dict[str, Any]:
    out: dict[str, Any] = {"index": index, "t": e.t, "request": e.header.hex(), "length": e.length, "dt": e.dt,
                           "response": e.response.hex() if e.response is not None else None}
    if e.extra:
        out["x"] = e.extra
    return out
