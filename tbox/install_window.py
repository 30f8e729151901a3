"""The install window: whether the vehicle can take an install now (``tbox.preconditions``, with a
campaign's signed overrides), judged on the vehicle's state as the preconditions ECU reports it.

While the preconditions do not hold the campaign waits in ``awaiting_install``, reads the signals
again every ``recheck_s`` and reports each new set of unmet conditions with their values; past
``window_s`` after it first waited (never past the campaign's expiry) it fails with reason
``preconditions``. The gateway checks the same conditions itself while it stages and before each
activation (``Gate``, sent in the install manifest); when it holds or stops the install, this
policy reports it and decides: wait again (staging stopped, window still open) or fail.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from typing import Any, Callable

from agent.core.campaign import Campaign
from agent.core.config import PreconditionsConfig, TboxConfig
from agent.core.preconditions import Gate, tightest, unmet
from agent.errors import TryLater
from tbox.campaign_state import CampaignRecord
from tbox.engine import CampaignFailure, Status
from tbox.ports import CloudPort, GatewayPort
from tbox.reports import CampaignReports

__all__ = ["InstallWindow"]

log = logging.getLogger(__name__)


class InstallWindow:
    def __init__(self, tbox: TboxConfig, cloud: CloudPort, signals: Callable[[], dict[str, Any]] | None, status: Status,
                 safety_relevant: frozenset[str] = frozenset()) -> None:
        self.tbox, self.cloud, self.signals, self.status = tbox, cloud, signals, status
        self.safety_relevant = safety_relevant  # ECUs installed only in the safe state
        self._checked: dict[str, float] = {}  # campaign -> when its preconditions were last read
        self._said: dict[str, str] = {}  # campaign -> the unmet conditions last reported

    @property
    def enabled(self) -> bool:
        return self.tbox.preconditions.ecu is not None and self.signals is not None

    def conditions(self, campaign: Campaign) -> PreconditionsConfig:
        """The vehicle's preconditions with the campaign's signed overrides (agent/core/campaign.py),
        which tighten them only (a loosening campaign was refused when it arrived: ``loosened``), and
        the safe state whenever a safety-relevant ECU is in the campaign."""
        asked = dataclasses.replace(self.tbox.preconditions, **dict(campaign.preconditions or {}))
        return tightest(self.tbox.preconditions, asked, safe_state=any(p.ecu in self.safety_relevant for p in campaign.packages))

    def end(self, record: CampaignRecord, campaign: Campaign) -> float:
        """When the campaign's install window ends (epoch seconds): ``window_s`` after it first waited
        for its preconditions (now, if it never did), and never past its expiry."""
        since = record.times.waiting_since if record.times.waiting_since is not None else time.time()
        return min(since + self.conditions(campaign).window_s, campaign.expires.timestamp())

    def gate(self, record: CampaignRecord, campaign: Campaign) -> dict[str, Any] | None:
        """What the gateway checks again while it stages and before each activation (None: nothing)."""
        if not self.enabled:
            return None
        return Gate(self.conditions(campaign), _energy_s(record), self.end(record, campaign)).to_json()

    def holds(self, record: CampaignRecord, campaign: Campaign) -> bool:
        """The vehicle can finish the install now; while it cannot, the campaign waits (see the module)."""
        if not self.enabled:
            return True
        assert self.signals is not None
        cfg, key = self.conditions(campaign), record.key
        if time.monotonic() - self._checked.get(key, -1e9) < cfg.recheck_s:
            return False
        self._checked[key] = time.monotonic()
        values = self.signals()
        bad = unmet(cfg, values, _energy_s(record))
        cid = campaign.campaign_id
        if not bad:
            again = record.times.staging_stopped  # told again after each stop of staging
            self.cloud.report("events", {"event": "preconditions", "campaign_id": cid, "met": True, "values": values},
                              msg_id=f"{cid}.preconditions.met" + (f".{again}" if again else ""))
            return True
        if record.times.waiting_since is None:
            record.times.waiting_since = time.time()
        record.save()
        self.report_unmet(record, bad, values)
        if time.time() >= self.end(record, campaign):
            raise CampaignFailure("awaiting_install", "preconditions", "; ".join(bad.values()), unmet=bad, values=values)
        self.status.line = f"campaign {cid}: waiting for " + ", ".join(bad)
        return False

    def report_unmet(self, record: CampaignRecord, bad: dict[str, Any], values: dict[str, Any], **where: Any) -> None:
        """A ``preconditions`` event for a set of unmet conditions, once per set (and phase)."""
        cid, said = record.campaign_id, json.dumps(bad, sort_keys=True)
        tag = ".".join(map(str, where.values()))
        if self._said.get(record.key) == tag + said:
            return
        self._said[record.key] = tag + said
        self.cloud.report("events", {"event": "preconditions", "campaign_id": cid, **where, "met": False, "unmet": bad,
                                     "values": values},
                          msg_id=".".join([str(cid), "preconditions", *([tag] if tag else []),
                                           hashlib.sha256(said.encode()).hexdigest()[:12]]))
        log.info("%s waits for its preconditions: %s", cid, "; ".join(map(str, bad.values())))

    def gateway_waits(self, record: CampaignRecord, gateway: GatewayPort) -> Callable[[bool], None]:
        """Told at every status poll whether the gateway holds the staged install for the vehicle's
        preconditions: each new set of unmet conditions (from its ``preconditions.json``) is reported,
        and that they hold once it goes on."""
        cid = record.campaign_id
        was = [False, -1e9]  # waiting at the last poll; when the gateway's file was last read

        def waiting(now: bool) -> None:
            if not now:
                if was[0]:
                    self.cloud.report("events", {"event": "preconditions", "campaign_id": cid, "phase": "activate",
                                                 "met": True}, msg_id=f"{cid}.preconditions.activate.met")
                was[0] = False
                return
            was[0] = True
            if time.monotonic() - was[1] < self.tbox.preconditions.recheck_s:
                return
            was[1] = time.monotonic()
            try:
                check = json.loads(gateway.read_file(f"{cid}/preconditions.json"))
                bad, values = dict(check["unmet"]), dict(check["values"])
            except (TryLater, ValueError, KeyError, TypeError):
                return  # asked again at the next interval
            self.status.line = f"campaign {cid}: staged, waiting for " + ", ".join(bad)
            self.report_unmet(record, bad, values, phase="activate")

        return waiting

    def held(self, record: CampaignRecord, campaign: Campaign, results: list[dict[str, Any]], held: dict[str, Any],
             reports: CampaignReports) -> str:
        """The gateway stopped the install for the vehicle's state. Stopped while staging (nothing
        activated, everything staged discarded): the campaign waits for its preconditions again,
        within its window. Turned back before or between activations: the campaign fails with
        reason ``preconditions``, the ECUs' results (rolled back, discarded) reported."""
        cid = campaign.campaign_id
        bad: dict[str, Any] = held["unmet"] if isinstance(held.get("unmet"), dict) else {}
        values: dict[str, Any] = held["values"] if isinstance(held.get("values"), dict) else {}
        phase = str(held.get("phase"))
        if record.times.waiting_since is None:
            record.times.waiting_since = time.time()
        window_open = time.time() < self.end(record, campaign)
        if phase == "stage" and window_open and self.enabled:
            record.times.staging_stopped += 1
            n = record.times.staging_stopped
            record.install_started = record.install_ended = False
            record.save()
            stopped = {str(r.get("ecu")): str(r.get("phase") or r.get("failed_step")) for r in results}
            self.cloud.report("events", {"event": "preconditions", "campaign_id": cid, "phase": "stage", "met": False,
                                         "staging": "stopped", "unmet": bad, "values": values, "ecus": stopped},
                              msg_id=f"{cid}.preconditions.stage.{n}")
            log.warning("%s: staging stopped, the preconditions no longer hold: %s", cid, "; ".join(bad.values()))
            self._said[record.key] = json.dumps(bad, sort_keys=True)  # said with the stop
            self._checked[record.key] = time.monotonic()
            return "awaiting_install"
        reports.install_results(record, results)
        raise CampaignFailure("install", "preconditions", "; ".join(map(str, bad.values())) or "preconditions",
                              unmet=bad, values=values, phase=phase)


def _energy_s(record: CampaignRecord) -> float:
    """The time the charge is judged against: the estimated install and the way back from a late failure."""
    return (record.times.estimated_install_s or 0.0) + (record.times.estimated_recovery_s or 0.0)
