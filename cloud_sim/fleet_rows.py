"""One vehicle's rows of the fleet tables (cloud_sim/fleet.py): read from its directory of a
collector's store and diagnosed with the same library and rules as ``vota diagnose``.

Three kinds of row:

- ``findings``: one per failed campaign: the verdict's first finding (stage, cause, side,
  unit, step, request, NRC, packet), the failure as the vehicle reported it, the failed
  ECU's part number, supplier software and software before/after, the campaign's times;
- ``campaigns``: one per finished campaign, whatever its outcome (the denominators of the
  fleet's failure rates), with how long it waited for its preconditions and for which;
- ``waiting``: one per campaign that has not finished and waits for its preconditions now.
"""

from __future__ import annotations

import collections
import datetime as _dt
import json
from pathlib import Path
from typing import Any, Iterable

from agent.adapters.diagnosis_files import inputs_from_store, load_rules
from agent.core.diagnosis import diagnose

__all__ = ["vehicle_rows", "iso"]

_RULES: Any = None


def iso(ts: Any) -> str | None:
    """An epoch time as ISO 8601 UTC (None for anything else)."""
    if not isinstance(ts, (int, float)) or ts != ts or abs(ts) > 1e11:
        return None
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).isoformat(timespec="seconds")


def _ts(doc: dict[str, Any]) -> float:
    ts = doc.get("ts")
    return float(ts) if isinstance(ts, (int, float)) else 0.0


def _messages(vehicle: Path, kind: str) -> Iterable[dict[str, Any]]:
    for path in sorted((vehicle / "messages" / kind).glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and isinstance(doc.get("body"), dict) and isinstance(doc["body"].get("campaign_id"), str):
            yield doc


class _Campaign:
    """What one vehicle's store says about one campaign."""

    def __init__(self) -> None:
        self.first_ts: float | None = None
        self.finished: dict[str, Any] | None = None
        self.finished_ts: Any = None
        self.results: list[dict[str, Any]] = []
        self.inventory: dict[str, dict[str, Any]] = {}
        self.deferred = 0  # sets of unmet preconditions reported
        self.deferred_by: set[str] = set()
        self.first_deferred: float | None = None
        self.waiting = False  # the last preconditions event said unmet

    def seen(self, ts: Any) -> None:
        if isinstance(ts, (int, float)) and (self.first_ts is None or ts < self.first_ts):
            self.first_ts = float(ts)

    def precondition(self, body: dict[str, Any], ts: Any) -> None:
        if body.get("met") is True:
            self.waiting = False
            return
        self.waiting = True
        self.deferred += 1
        unmet = body.get("unmet")
        if isinstance(unmet, dict):
            self.deferred_by.update(str(k) for k in unmet)
        if isinstance(ts, (int, float)) and (self.first_deferred is None or ts < self.first_deferred):
            self.first_deferred = float(ts)


def _campaigns(vehicle: Path) -> dict[str, _Campaign]:
    found: dict[str, _Campaign] = collections.defaultdict(_Campaign)
    for kind in ("events", "results", "inventory"):
        for doc in sorted(_messages(vehicle, kind), key=_ts):
            body, ts = doc["body"], doc.get("ts")
            c = found[body["campaign_id"]]
            c.seen(ts)
            if kind == "results":
                c.results.append(body)
            elif kind == "inventory":
                ecus = body.get("ecus") if isinstance(body.get("ecus"), list) else []
                c.inventory.update({str(e.get("ecu")): e for e in ecus if isinstance(e, dict)})
            elif body.get("event") == "finished" and body.get("outcome") in ("success", "failed"):
                c.finished, c.finished_ts = body, ts
            elif body.get("event") == "preconditions":
                c.precondition(body, ts)
    return found


def _campaign_row(vin: str, cid: str, c: _Campaign) -> dict[str, Any]:
    body = c.finished or {}
    failure: dict[str, Any] = body["failure"] if isinstance(body.get("failure"), dict) else {}
    waited = (c.finished_ts - c.first_deferred) if c.first_deferred is not None and isinstance(c.finished_ts, (int, float)) else None
    return {"vin": vin, "campaign_id": cid, "outcome": body.get("outcome", "waiting"), "started_at": iso(c.first_ts),
            "finished_at": iso(c.finished_ts), "failure_stage": failure.get("stage"), "failure_reason": failure.get("reason"),
            "deferrals": c.deferred, "deferred_by": ",".join(sorted(c.deferred_by)) or None,
            "first_deferred_at": iso(c.first_deferred), "waited_s": round(waited, 1) if waited is not None else None}


def _finding_row(vin: str, cid: str, c: _Campaign, vehicle: Path) -> dict[str, Any]:
    assert c.finished is not None
    failure: dict[str, Any] = c.finished["failure"] if isinstance(c.finished.get("failure"), dict) else {}
    verdict = diagnose(inputs_from_store(c.results, vehicle / "traces", cid), _RULES, "first", cid, failure).to_json()
    first = (verdict.get("findings") or [{}])[0]
    unit = first.get("package") if first.get("stage") in ("flash", "activate") else None
    ecu = next((r.get("result") or {} for r in c.results if r.get("stage") == "flash" and r.get("ecu") == unit), {})
    inv = c.inventory.get(str(unit), {}) if unit else {}
    return {
        "vin": vin, "campaign_id": cid, "started_at": iso(c.first_ts), "finished_at": iso(c.finished_ts),
        "failure_stage": failure.get("stage"), "failure_reason": failure.get("reason"),
        "stage": verdict.get("stage"), "cause": verdict.get("cause"), "side": verdict.get("side"),
        "unit": verdict.get("unit"), "package": first.get("package"), "step": first.get("step"),
        "request": first.get("request"), "nrc": first.get("nrc"), "nrc_name": first.get("nrc_name"),
        "packet": first.get("packet"), "software_before": ecu.get("version_before") or inv.get("software_version"),
        "software_after": ecu.get("version_after"), "part_number": inv.get("part_number"),
        "supplier_software": inv.get("supplier_software"), "findings": len(verdict.get("findings") or []),
    }


def vehicle_rows(vehicle: Path, skip: frozenset[str] = frozenset()) -> dict[str, list[dict[str, Any]]]:
    """The rows of one vehicle's store; finished campaigns whose ids are in ``skip`` (tabled by an
    earlier run) left out."""
    global _RULES
    if _RULES is None:
        _RULES = load_rules()
    vin = vehicle.name
    out: dict[str, list[dict[str, Any]]] = {"findings": [], "campaigns": [], "waiting": []}
    for cid, c in sorted(_campaigns(vehicle).items()):
        if c.finished is None:
            if c.waiting:
                out["waiting"].append(_campaign_row(vin, cid, c))
            continue
        if cid in skip:
            continue
        out["campaigns"].append(_campaign_row(vin, cid, c))
        if c.finished.get("outcome") == "failed":
            out["findings"].append(_finding_row(vin, cid, c, vehicle))
    return out
