"""``vota evidence CAMPAIGN --store DIR --vin VIN``: a campaign's evidence gathered from the cloud's
store (every report the vehicle sent about it, each as stored with the vehicle's signature, its
traces, the cloud's diagnosis) into the pack of ``agent/adapters/evidence_pack.py``, signed with
the key of whoever makes it (the OEM's). ``vota evidence --verify PACK --vehicle-key PUB`` checks
each report's signature too."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from agent.core.evidence import summarize
from agent.errors import UsageError
from agent.protocol.files import is_name

__all__ = ["gather_store"]

KINDS = ("events", "results", "inventory")


def gather_store(store: Path, vin: str, campaign_id: str) -> dict[str, bytes]:
    """The pack's files for ``campaign_id`` of ``vin``; UsageError when the store has no report of it."""
    if not is_name(vin) or not (store / vin).is_dir():
        raise UsageError(f"{store}: no vehicle {vin!r}")
    if not is_name(campaign_id):
        raise UsageError(f"{campaign_id!r} is not a campaign id")
    lines: list[bytes] = []
    entries: list[dict[str, Any]] = []
    for kind in KINDS:
        for path in sorted((store / vin / "messages" / kind).glob("*.json")):
            try:
                raw = path.read_bytes()
                doc = json.loads(raw)
            except (OSError, ValueError):
                continue  # one being stored now, or damaged: not evidence
            body = doc.get("body") if isinstance(doc, dict) else None
            if not isinstance(body, dict) or body.get("campaign_id") != campaign_id:
                continue
            lines.append(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode() + b"\n")
            entries.append({"type": kind, "ts": doc.get("ts"), "campaign_id": campaign_id, "body": body,
                            "seq": len(entries) + 1})
    if not entries:
        raise UsageError(f"{store / vin}: no report of campaign {campaign_id!r}")
    entries.sort(key=lambda e: (e["ts"] if isinstance(e["ts"], (int, float)) else 0.0))
    files: dict[str, bytes] = {"reports.jsonl": b"".join(lines)}
    for path in sorted((store / vin / "traces").glob(f"{campaign_id}.*.jsonl")):
        files[f"traces/{path.name}"] = path.read_bytes()
    summary = summarize(entries, campaign_id)
    verdict = store / vin / "diagnosis" / f"{campaign_id}.json"
    if summary["diagnosis"] is None and verdict.is_file():
        summary["diagnosis"] = json.loads(verdict.read_text())
    summary["source"] = "cloud"
    files["summary.json"] = json.dumps(summary, indent=1, sort_keys=True).encode()
    return files
