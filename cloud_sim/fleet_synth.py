"""A synthetic fleet for the fleet analytics' tests and benchmark: many vehicles made from a
few real ones (collector stores of bench runs with injected faults).

A template is one campaign of a real vehicle's store. Each synthetic vehicle is one template
under a new VIN, its campaign renamed
to one of the fleet's campaigns and its times moved by a whole number of hours: the messages
the fleet diagnosis reads (events, results, inventory) rewritten, the traces hard-linked
under their new names (copied where links are not possible). The collector's own files
(trace parts, its verdicts) are left out. ``manifest.json`` in the store says which template
each vehicle came from, so a test can count what the diagnosis must find.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

__all__ = ["make_fleet", "finished_campaigns"]


def finished_campaigns(vehicle: Path) -> list[str]:
    """The ids of a vehicle's finished campaigns in its store, oldest first."""
    found = []
    for path in sorted((vehicle / "messages" / "events").glob("*.json")):
        body = json.loads(path.read_text()).get("body") or {}
        if body.get("event") == "finished":
            found.append(str(body["campaign_id"]))
    return found


def _rename(text: str, old: str, new: str) -> str:
    return text.replace(old, new)


def _vehicle(template: Path, cid: str, target: Path, vin: str, campaign: str, shift: float) -> None:
    old_vin = template.name
    for kind in ("events", "results", "inventory"):
        src = template / "messages" / kind
        if not src.is_dir():
            continue
        dst = target / "messages" / kind
        dst.mkdir(parents=True)
        for path in src.glob(f"*{cid}*.json"):
            doc: dict[str, Any] = json.loads(path.read_text())
            if (doc.get("body") or {}).get("campaign_id") != cid:
                continue
            doc = json.loads(_rename(json.dumps(doc), cid, campaign))
            doc["vin"] = vin
            if isinstance(doc.get("ts"), (int, float)):
                doc["ts"] = round(doc["ts"] + shift, 3)
            (dst / _rename(path.name, cid, campaign)).write_text(json.dumps(doc).replace(old_vin, vin))
    traces = target / "traces"
    traces.mkdir(parents=True)
    for path in (template / "traces").glob(f"{cid}.*"):
        new = traces / _rename(path.name, cid, campaign)
        try:
            os.link(path, new)
        except OSError:
            shutil.copyfile(path, new)


def make_fleet(templates: dict[str, tuple[Path, str]], weights: dict[str, float], store: Path, vehicles: int,
               campaigns: list[str], days: int = 14, seed: int = 1) -> dict[str, Any]:
    """``vehicles`` vehicles under ``store``, each drawn from ``templates`` (name: a vehicle's
    directory in a store and one of its campaigns) by ``weights``, with a campaign drawn from ``campaigns`` and its time
    spread over ``days``; the manifest (vehicle -> template, campaign) is returned and written."""
    rnd = random.Random(seed)
    names = sorted(templates)
    store.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"seed": seed, "vehicles": {}}
    for i in range(vehicles):
        name = rnd.choices(names, [weights.get(n, 1.0) for n in names])[0]
        vin, campaign = f"LSYN{i:013d}", rnd.choice(campaigns)
        _vehicle(*templates[name], store / vin, vin, campaign, 3600.0 * rnd.randrange(days * 24) - days * 86400)
        manifest["vehicles"][vin] = {"template": name, "campaign": campaign}
    (store / "manifest.json").write_text(json.dumps(manifest))
    return manifest
