"""The estimated install time, told to the cloud before an install starts (how long the car will
be unusable; the preconditions' energy check judges the charge against it), from what the
vehicle's installs took before (``<state_dir>/rates.json``) or the segment's configured limits
(``agent/core/preconditions.py``: ``estimate_install``).

What is learned from each install, and used by the next estimate: per ECU, the rate its image
went at (image bytes, or the delta's, over the time from the first TransferData to the transfer
exit's answer), kept per transfer method too (``plain``, a compression method, ``delta``), and
the rest of its flash (sessions, erase, checks, reset, version reads: its flash time less the
transfer); per activation mode, the time the install took beyond its flashes (the activation
phase, commits, the gateway's own checks), per ECU.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from agent.adapters.storage import atomic_write_json
from agent.core.campaign import Campaign
from agent.core.config import TboxConfig
from agent.core.preconditions import Estimate, install_kind
from tbox.campaign_state import CampaignRecord
from tbox.ports import CloudPort

__all__ = ["InstallRates", "EstimateFn"]

# (jobs as (ECU, bytes on the bus, install order), activation, pipelined, what was measured) -> Estimate
EstimateFn = Callable[[list[tuple[str, int, int]], str, bool, dict[str, Any]], Estimate]
INSTALL = "_install"  # the key of the per-activation-mode figures in rates.json (ECU names are names)


class InstallRates:
    def __init__(self, tbox: TboxConfig, cloud: CloudPort, estimate: EstimateFn | None) -> None:
        self.cloud, self.estimate = cloud, estimate
        self.file = Path(tbox.state_dir) / "rates.json"
        self._asked: dict[str, tuple[list[tuple[str, int, int]], str, bool]] = {}  # campaign -> what its estimate was of

    def report_estimate(self, record: CampaignRecord, campaign: Campaign, jobs: list[tuple[str, int, int]],
                        pipelined: bool) -> None:
        """The estimate, once per campaign, kept in its record and told to the cloud."""
        self._asked[campaign.campaign_id] = (jobs, campaign.activation, pipelined)
        if self.estimate is None or record.times.estimated_install_s is not None:
            return
        estimate = self.estimate(jobs, campaign.activation, pipelined, self.measured())
        record.times.estimated_install_s = round(estimate.install_s, 1)
        record.times.estimated_recovery_s = round(estimate.recovery_s, 1)
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

    def measured(self) -> dict[str, Any]:
        """What the estimate may use: ``{ECU: {"bytes_per_s", "other_s"}, "_install": {mode: s per ECU}}``
        (anything not as written is left out: the configured figures stand in)."""
        out: dict[str, Any] = {}
        for ecu, v in self._stored().items():
            if ecu == INSTALL and isinstance(v, dict):
                out[INSTALL] = {str(m): float(x) for m, x in v.items() if isinstance(x, (int, float)) and x >= 0}
            elif isinstance(v, dict) and isinstance(v.get("bytes_per_s"), (int, float)) and v["bytes_per_s"] > 0:
                other = v.get("other_s")
                out[str(ecu)] = {"bytes_per_s": float(v["bytes_per_s"]),
                                 **({"other_s": float(other)} if isinstance(other, (int, float)) and other >= 0 else {})}
        return out

    def learn(self, results: list[dict[str, Any]], campaign_id: str | None = None, install_s: float | None = None) -> None:
        """Each ECU flashed: its rate and the rest of its flash; and, given how long the install of
        ``campaign_id`` took, the time beyond its flashes, per ECU (see the module)."""
        stored = self._stored()
        learned: dict[str, Any] = {}
        for r in results:
            try:
                seconds, sent = float(r.get("transfer_s") or 0), int(r.get("bytes_transferred") or 0)
                full = r.get("image_sent", "full") == "full"
                size = int(r["image_size"]) if full else sent
                duration = float(r.get("duration_s") or 0)
            except (TypeError, ValueError, KeyError):
                continue
            if r.get("result") == "success" and seconds > 0.05 and sent > 0 and isinstance(r.get("ecu"), str):
                method = "delta" if not full else str(r.get("compression") or "plain")
                before: dict[str, Any] = stored[r["ecu"]] if isinstance(stored.get(r["ecu"]), dict) else {}
                methods: dict[str, Any] = before["methods"] if isinstance(before.get("methods"), dict) else {}
                learned[r["ecu"]] = {"bytes_per_s": round(size / seconds, 1), "other_s": round(max(0.0, duration - seconds), 3),
                                     "methods": {**methods, method: round(size / seconds, 1)}, "measured": round(time.time())}
        asked = self._asked.pop(campaign_id, None) if campaign_id else None
        if learned and asked is not None and install_s and self.estimate is not None:
            jobs, activation, pipelined = asked
            merged = {**self.measured(), **{e: {k: v[k] for k in ("bytes_per_s", "other_s")} for e, v in learned.items()}}
            if all(e in merged for e, _, _ in jobs):  # every ECU's flash known: the rest is the install's own
                flashes = self.estimate(jobs, "per_ecu", False, {**merged, INSTALL: {"per_ecu": 0.0}}).install_s
                modes = dict(stored.get(INSTALL) or {}) if isinstance(stored.get(INSTALL), dict) else {}
                modes[install_kind(activation, pipelined)] = round(max(0.0, install_s - flashes) / max(1, len(jobs)), 3)
                learned[INSTALL] = modes
        if learned:
            atomic_write_json(self.file, {**stored, **learned})
