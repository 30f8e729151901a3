"""The estimated install time, told to the cloud before an install starts (how long the car will
be unusable; the preconditions' energy check judges the charge against it), from the rate each
ECU was last flashed at (``<state_dir>/rates.json``) or the segment's configured limits
(``agent/core/preconditions.py``: ``estimate_install``)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from agent.adapters.storage import atomic_write_json
from agent.core.campaign import Campaign
from agent.core.config import TboxConfig
from agent.core.preconditions import Estimate
from tbox.campaign_state import CampaignRecord
from tbox.ports import CloudPort

__all__ = ["InstallRates", "EstimateFn"]

# (jobs as (ECU, bytes on the bus, install order), activation, pipelined, measured bytes/s by ECU) -> Estimate
EstimateFn = Callable[[list[tuple[str, int, int]], str, bool, dict[str, float]], Estimate]


class InstallRates:
    def __init__(self, tbox: TboxConfig, cloud: CloudPort, estimate: EstimateFn | None) -> None:
        self.cloud, self.estimate = cloud, estimate
        self.file = Path(tbox.state_dir) / "rates.json"

    def report_estimate(self, record: CampaignRecord, campaign: Campaign, jobs: list[tuple[str, int, int]],
                        pipelined: bool) -> None:
        """The estimate, once per campaign, kept in its record and told to the cloud."""
        if self.estimate is None or record.times.estimated_install_s is not None:
            return
        estimate = self.estimate(jobs, campaign.activation, pipelined, self.measured())
        record.times.estimated_install_s = round(estimate.install_s, 1)
        record.save()
        self.cloud.report("events", {"event": "estimate", "campaign_id": campaign.campaign_id, **estimate.to_json()},
                          msg_id=f"{campaign.campaign_id}.estimate")

    def _stored(self) -> dict[str, Any]:
        """``rates.json`` as stored: ECU -> {"bytes_per_s", "measured"}; empty when none yet or unreadable."""
        try:
            doc = json.loads(self.file.read_text())
        except (OSError, ValueError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def measured(self) -> dict[str, float]:
        """Bytes a second each ECU's image went at when it was last flashed (the estimate's rates)."""
        try:
            return {str(e): float(v["bytes_per_s"]) for e, v in self._stored().items()}
        except (ValueError, TypeError, KeyError):
            return {}  # not what was written: the configured rates

    def learn(self, results: list[dict[str, Any]]) -> None:
        """Each ECU flashed: the rate its image went at (image bytes, or the delta's, over the time from
        the first TransferData to the transfer exit's answer), kept for the next estimate."""
        learned = {}
        for r in results:
            try:
                seconds, sent = float(r.get("transfer_s") or 0), int(r.get("bytes_transferred") or 0)
                size = int(r["image_size"]) if r.get("image_sent", "full") == "full" else sent
            except (TypeError, ValueError, KeyError):
                continue
            if r.get("result") == "success" and seconds > 0.05 and sent > 0 and isinstance(r.get("ecu"), str):
                learned[r["ecu"]] = {"bytes_per_s": round(size / seconds, 1), "measured": round(time.time())}
        if learned:
            atomic_write_json(self.file, {**self._stored(), **learned})
