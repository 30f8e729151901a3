"""Which image goes to the gateway for each package of a campaign: the delta the campaign carries
when the inventory says its ECU runs the delta's base (F1A0), else the full image; an ECU that
refuses its delta all the same gets the full image in a second round. Every choice is reported
(``images`` event: per package, ``image`` delta or full, and ``why``)."""

from __future__ import annotations

import logging
from typing import Any

from agent.core.campaign import Campaign, Package
from tbox.campaign_state import CampaignRecord, PackageEntry
from tbox.ports import CloudPort

__all__ = ["ImageChoice", "file_for"]

log = logging.getLogger(__name__)


def file_for(p: Package, entry: PackageEntry) -> tuple[str, str, int, str]:
    """What goes to the gateway for a package: (name, url, size, SHA-256) of the delta or the image."""
    if p.delta is not None and entry.image == "delta":
        return p.delta.name, p.delta.url, p.delta.size, p.delta.sha256
    return p.name, p.url, p.size, p.sha256


class ImageChoice:
    def __init__(self, cloud: CloudPort) -> None:
        self.cloud = cloud

    def choose(self, record: CampaignRecord, campaign: Campaign, inventory: list[dict[str, Any]], offline: bool) -> None:
        """For each package that carries a delta and has no choice yet: delta or full image, and why."""
        running = {e.get("ecu"): e.get("image_sha256") for e in inventory}
        chosen: dict[str, dict[str, Any]] = {}
        for p in campaign.packages:
            entry = record.packages[p.name]
            if p.delta is None or entry.image is not None:
                continue
            if offline:  # the media carries full images
                entry.image, entry.why = "full", "an offline campaign: the full image came on the media"
            elif running.get(p.ecu) == p.delta.base_sha256:
                entry.image, entry.why = "delta", f"{p.ecu} runs the delta's base {p.delta.base_version}"
            else:
                sha = running.get(p.ecu)
                seen = f"runs {sha[:16]}" if isinstance(sha, str) and sha else "did not tell its image digest (F1A0)"
                entry.image, entry.why = "full", (f"{p.ecu} {seen}, not the delta's base {p.delta.base_version} "
                                                  f"({p.delta.base_sha256[:16]})")
            chosen[p.name] = {"image": entry.image, "why": entry.why}
        if chosen:
            self.report(record, chosen, 0)

    def fall_back(self, record: CampaignRecord, campaign: Campaign, results: list[dict[str, Any]]) -> bool:
        """An ECU refused its delta (it does not run the base after all, takes no deltas, or the
        patch made another image) and its full image was not on the gateway: that package goes
        again as the full image, the others as they were, and the install runs once more (an ECU
        found already running its new image is not flashed again). Once per package. True when
        there is such a second round."""
        by_ecu = {p.ecu: p for p in campaign.packages}
        refused: dict[str, dict[str, Any]] = {}
        for r in results:
            p = by_ecu.get(r.get("ecu"))  # type: ignore[arg-type]
            if p is None or r.get("result") == "success" or not r.get("delta_refused"):
                continue
            entry = record.packages[p.name]
            if entry.image != "delta":
                continue
            entry.image, entry.why = "full", f"the ECU refused the delta: {r['delta_refused']}"
            entry.start_over()
            refused[p.name] = {"image": "full", "why": entry.why, "result": r}
        if not refused:
            return False
        log.warning("%s: %s refused the delta; the full image goes instead", record.campaign_id,
                    ", ".join(r["result"]["ecu"] for r in refused.values()))
        record.install_started = record.install_ended = False
        record.save()
        self.report(record, refused, 1)
        return True

    def report(self, record: CampaignRecord, chosen: dict[str, Any], round_: int) -> None:
        cid = record.campaign_id
        self.cloud.report("events", {"event": "images", "campaign_id": cid, "round": round_, "packages": chosen},
                          msg_id=f"{cid}.images.{round_}")
