"""A campaign's type-approval evidence (UN R156 7.2, ISO 24089), summarised from the entries of
the vehicle's update log: pure (entries in, the summary out). The pack that carries it is
``agent/adapters/evidence_pack.py``; docs/type-approval.md maps each clause to what evidences it.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

__all__ = ["CLAUSES", "summarize"]

# (clause, what it asks of the vehicle, where the pack evidences it). Clause numbers as in UN R156's
# original series and ISO 24089:2023 (clause 8: vehicle and ECU requirements); an approval under
# another edition maps the same topics.
CLAUSES: tuple[tuple[str, str, str], ...] = (
    ("R156 7.2.1.1; ISO 24089 8 (software identification)",
     "an RXSWIN per approval, readable through an electronic interface, protected against unauthorised change",
     "summary.json rxswin (before, after, as read from the gateway's DID); campaign/campaign.signed.json"),
    ("R156 7.2.1.2; ISO 24089 8 (software version information)",
     "the software versions of the ECUs before and after the update",
     "summary.json versions (before: the inventory, after: read back from the ECUs)"),
    ("R156 7.2.2.1.1; ISO 24089 8 (update failure, recovery)",
     "a failed update restores the previous version or reaches a safe state",
     "summary.json outcome, failure, results (each ECU's phase: rolled_back, discarded), diagnosis; campaign/flash/"),
    ("R156 7.2.2.1.2 (energy)",
     "the vehicle has the energy to complete the update, including recovery",
     "summary.json estimate (install_s, recovery_s), preconditions (values at each check)"),
    ("R156 7.2.2.1.3 (safe state)",
     "safety-relevant updates only in a safe state; the vehicle's state checked before and during the update",
     "summary.json preconditions (phase, met, unmet, values)"),
    ("R156 7.2.2.2; ISO 24089 8 (user information before the update)",
     "purpose, changed functions, expected duration, unavailable functions, instructions",
     "summary.json shown (each HMI state with the time it was shown), information"),
    ("R156 7.2.2.3 (user information after the update)",
     "the user is told of success or failure",
     "summary.json shown (succeeded or failed, with the action to take)"),
    ("R156 7.2.2.4 (user consent, preconditions)",
     "the update is executed only when the prerequisites hold and, where asked, the user consented",
     "summary.json consent (given, by, at), preconditions"),
    ("R156 7.1.1.x records; ISO 24089 records",
     "a record of every update, its checks and its outcome",
     "update-log.jsonl (the whole hash-chained, signed log), campaign-log.jsonl (this campaign's entries)"),
)


def summarize(entries: Iterable[Mapping[str, Any]], campaign_id: str) -> dict[str, Any]:
    """What the campaign's log entries say, arranged by what the regulation asks."""
    out: dict[str, Any] = {"campaign_id": campaign_id, "states": [], "preconditions": [], "shown": [], "consent": [],
                           "results": [], "estimate": None, "information": None, "versions": {"before": None,
                                                                                             "after": None},
                           "rxswin": None, "outcome": None, "failure": None, "diagnosis": None, "first_seq": None,
                           "last_seq": None}
    for entry in entries:
        if entry.get("campaign_id") != campaign_id:
            continue
        body, at, kind = dict(entry.get("body") or {}), entry.get("ts"), entry.get("type")
        out["first_seq"] = out["first_seq"] if out["first_seq"] is not None else entry.get("seq")
        out["last_seq"] = entry.get("seq")
        event = body.get("event")
        if kind == "inventory":
            out["versions"]["before"] = {e.get("ecu"): e.get("software_version") for e in body.get("ecus") or []
                                         if isinstance(e, dict)}
            if out["rxswin"] is None and isinstance(body.get("rxswin"), dict):
                out["rxswin"] = {"before": body["rxswin"], "after": None}
        elif kind == "results" and body.get("stage") == "diagnosis":
            out["diagnosis"] = body.get("verdict")
        elif kind == "results":
            result = dict(body.get("result") or {})
            out["results"].append({"stage": body.get("stage"), "unit": body.get("ecu") or body.get("package"),
                                   "result": result.get("result"), "phase": result.get("phase"),
                                   "failed_step": result.get("failed_step"), "nrc": result.get("nrc"), "at": at})
        elif event == "state":
            out["states"].append({"state": body.get("state"), "at": at})
        elif event == "preconditions":
            out["preconditions"].append({k: body.get(k) for k in ("phase", "met", "unmet", "values")} | {"at": at})
        elif event == "hmi":
            out["shown"].append({k: v for k, v in body.items() if k not in ("event", "campaign_id")} | {"at": at})
            if body.get("information") and out["information"] is None and body.get("state") != "succeeded":
                out["information"] = body["information"]
        elif event == "consent":
            out["consent"].append({"given": body.get("given"), "by": body.get("by"), "at": at})
        elif event == "estimate":
            out["estimate"] = {k: v for k, v in body.items() if k not in ("event", "campaign_id")}
        elif event == "finished":
            out["outcome"], out["failure"] = body.get("outcome"), body.get("failure")
            out["versions"]["after"] = {e: (v or {}).get("software_version")
                                        for e, v in dict(body.get("versions") or {}).items()}
            if isinstance(body.get("rxswin"), dict):
                out["rxswin"] = body["rxswin"]
            out["cause"] = body.get("cause")
    return out
