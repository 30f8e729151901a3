"""Fleet failure analytics (``vota fleet diagnose``): every failed campaign of every vehicle in a
cloud store diagnosed, on every core, into one table of findings and a fleet summary.

A store is the collector's (``<store>/<vin>/messages/...``, ``<store>/<vin>/traces/``). Each
vehicle is one unit of work for a process pool (the rules are loaded once per worker). The
output directory holds ``findings.jsonl`` (one row per failed campaign: vehicle, campaign,
stage, side, unit, step, cause, NRC, packet, the failed ECU's software before and after, the
failure and its time) and ``summary.md``; ``done.json`` remembers the campaigns diagnosed, so a
second run diagnoses only what is new and the summary covers them all.
"""

from __future__ import annotations

import collections
import datetime as _dt
import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Iterable

from agent.adapters.diagnosis_files import inputs_from_store, load_rules
from agent.adapters.storage import atomic_write_bytes, atomic_write_json
from agent.core.diagnosis import diagnose
from agent.errors import UsageError

__all__ = ["fleet_diagnose", "vehicle_rows", "summary_markdown"]

_RULES: Any = None


def _messages(vehicle: Path, kind: str) -> Iterable[dict[str, Any]]:
    for path in sorted((vehicle / "messages" / kind).glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and isinstance(doc.get("body"), dict):
            yield doc


def vehicle_rows(vehicle: Path, skip: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """One row per failed campaign of one vehicle's store (campaign ids in ``skip`` left out)."""
    global _RULES
    if _RULES is None:
        _RULES = load_rules()
    vin = vehicle.name
    results: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for doc in _messages(vehicle, "results"):
        results[str(doc["body"].get("campaign_id"))].append(doc["body"])
    rows = []
    for doc in _messages(vehicle, "events"):
        body = doc["body"]
        cid = body.get("campaign_id")
        if body.get("event") != "finished" or body.get("outcome") != "failed" or not isinstance(cid, str) or cid in skip:
            continue
        failure = body.get("failure") if isinstance(body.get("failure"), dict) else {}
        verdict = diagnose(inputs_from_store(results[cid], vehicle / "traces", cid), _RULES, "first", cid, failure).to_json()
        first = (verdict.get("findings") or [{}])[0]
        unit = first.get("package") if first.get("stage") in ("flash", "activate") else None
        ecu = next((r.get("result") or {} for r in results[cid] if r.get("stage") == "flash" and r.get("ecu") == unit), {})
        rows.append({
            "vin": vin, "campaign_id": cid, "at": _iso(doc.get("ts")), "failure_stage": failure.get("stage"),
            "failure_reason": failure.get("reason"), "stage": verdict.get("stage"), "cause": verdict.get("cause"),
            "side": verdict.get("side"), "unit": verdict.get("unit"), "package": first.get("package"),
            "step": first.get("step"), "request": first.get("request"), "nrc": first.get("nrc"),
            "nrc_name": first.get("nrc_name"), "packet": first.get("packet"),
            "software_before": ecu.get("version_before"), "software_after": ecu.get("version_after"),
        })
    return rows


def _iso(ts: Any) -> str | None:
    if not isinstance(ts, (int, float)):
        return None
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).isoformat(timespec="seconds")


def _work(args: tuple[str, list[str]]) -> list[dict[str, Any]]:
    return vehicle_rows(Path(args[0]), frozenset(args[1]))


def fleet_diagnose(store: str | Path, out: str | Path, workers: int | None = None) -> dict[str, Any]:
    """Diagnose what is new in ``store`` into ``out``; the figures of this run."""
    root, target = Path(store), Path(out)
    if not root.is_dir():
        raise UsageError(f"{root}: not a cloud store (a directory of <VIN>/messages/)")
    vehicles = sorted(p for p in root.iterdir() if (p / "messages").is_dir())
    target.mkdir(parents=True, exist_ok=True)
    done_path = target / "done.json"
    try:
        done: dict[str, list[str]] = json.loads(done_path.read_text())
    except (OSError, ValueError):
        done = {}
    tasks = [(str(v), done.get(v.name, [])) for v in vehicles]
    workers = max(1, workers or os.cpu_count() or 1)
    if workers == 1:
        found = [_work(t) for t in tasks]
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            found = list(pool.map(_work, tasks, chunksize=max(1, len(tasks) // (workers * 8) or 1)))
    new = [row for rows in found for row in rows]
    table = target / "findings.jsonl"
    with open(table, "a", encoding="utf-8") as handle:  # rows of earlier runs stay; done.json is written after
        for row in new:
            handle.write(json.dumps(row, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    for row in new:
        done.setdefault(row["vin"], []).append(row["campaign_id"])
    atomic_write_json(done_path, done)
    rows = [json.loads(line) for line in table.read_text().splitlines() if line.strip()]
    atomic_write_bytes(target / "summary.md", summary_markdown(rows, len(vehicles)).encode())
    return {"vehicles": len(vehicles), "new_failures": len(new), "failures": len(rows), "workers": workers}


def summary_markdown(rows: list[dict[str, Any]], vehicles: int) -> str:
    """Counts per campaign, ECU, cause, step and NRC, the largest clusters of identical findings,
    failures per day (failed campaigns only: one waiting for its preconditions is no failure)."""
    out = [f"# Fleet diagnosis: {len(rows)} failed campaigns on {len({r['vin'] for r in rows})} of {vehicles} vehicles", ""]

    def section(title: str, key: Any) -> None:
        counts = collections.Counter(key(r) for r in rows)
        out.extend([f"## {title}", "", "| value | failures | share |", "| --- | ---: | ---: |"])
        for value, n in counts.most_common(15):
            out.append(f"| {value} | {n} | {100.0 * n / max(1, len(rows)):.1f} % |")
        out.append("")

    section("By campaign", lambda r: r["campaign_id"])
    section("By unit (ECU, package, link state)", lambda r: f"{r['stage']}: {r['unit']} ({r['side']})")
    section("By cause", lambda r: r["cause"])
    section("By step", lambda r: r["step"] or "(the programming sequence)")
    section("By NRC", lambda r: f"0x{r['nrc']:02X} {r['nrc_name']}" if isinstance(r.get("nrc"), int) else "none")
    section("Clusters of identical findings (cause, unit, request, NRC)",
            lambda r: f"{r['cause']} at {r['unit']} `{r['request']}` {r['nrc_name'] or ''}".strip())
    section("Per day", lambda r: (r.get("at") or "unknown")[:10])
    return "\n".join(out)
