"""The TBOX's campaign runner: the state engine (``tbox/engine.py``, with the state graph), the
state handlers (``tbox/states.py``, ``tbox/install_states.py``) and the policies they use
(``tbox/install_window.py``, ``tbox/rates.py``, ``tbox/images.py``) put together, and what the
rest of the TBOX asks of campaigns: precheck an arriving one, reject junk, confirm an install,
start a campaign of its own for a software content item, tell a campaign's outcome.

Everything outside the TBOX is behind two ports (``tbox/ports.py``): the cloud and the gateway.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.core.campaign import CampaignRejected, verify_campaign
from agent.core.config import TboxConfig
from agent.core.roles import Role
from agent.errors import VotaError
from tbox import install_states, states
from tbox.campaign_source import LOCAL_CAMPAIGN, VerifiedCampaigns, make_local_campaign
from tbox.campaign_state import TERMINAL, CampaignRecord
from tbox.download import download
from tbox.engine import CampaignEngine, CampaignFailure, Status
from tbox.images import ImageChoice
from tbox.install_window import InstallWindow
from tbox.ports import CloudPort, Fetch, GatewayPort
from tbox.rates import EstimateFn, InstallRates
from tbox.retention import Retention

__all__ = ["CampaignRunner", "CampaignFailure", "LOCAL_CAMPAIGN", "WAITING"]

log = logging.getLogger(__name__)

WAITING = ("awaiting_install",)  # states that wait for the owner: entering them again is no loop
LINKED = ("received", "deploying", "deployed", "installing")  # states whose gateway exchanges are traced (link/)


class CampaignRunner:
    def __init__(self, tbox: TboxConfig, ecus: set[str], cloud: CloudPort, gateway: GatewayPort,
                 trusted: Role | Mapping[str, Ed25519PublicKey], *, now: Callable[[], _dt.datetime],
                 stop: threading.Event | None = None, fetch: Fetch | None = None,
                 beat: Callable[[], None] | None = None, entered: Callable[[CampaignRecord], None] | None = None,
                 key_chain: Callable[[], list[bytes]] | None = None, estimate: EstimateFn | None = None,
                 signals: Callable[[], dict[str, Any]] | None = None,
                 safety_relevant: frozenset[str] = frozenset()) -> None:
        """``safety_relevant``: ECUs installed only in the safe state. ``trusted``: the campaign role
        (replaced when a signed key list is taken); ``fetch``: the package download (slow retrieval
        cut off, Uptane); ``estimate``: the install time a campaign will take; ``signals``: the
        vehicle's state from the preconditions ECU; ``entered``: told once a state is persisted
        (tests kill the runner there)."""
        self.tbox, self.ecus, self.cloud, self.now = tbox, ecus, cloud, now
        self.stop = stop or threading.Event()
        self.status = Status()
        self.campaigns = VerifiedCampaigns(tbox.vin, Role.of(trusted), now)
        fetch = fetch or functools.partial(download, min_rate=tbox.download_min_rate, rate_window_s=tbox.download_rate_window_s,
                                           max_time_s=tbox.download_max_time_s, ca=tbox.package_ca)
        beat = beat or (lambda: None)
        self.engine = CampaignEngine(tbox, cloud, self._handlers(), waits=self._waits, traced=self._traced, stop=self.stop,
                                     beat=beat, entered=entered, status=self.status)
        self.retention = Retention(self.engine.campaigns_dir, tbox.keep_campaigns, tbox.keep_days)
        self.c = states.Collaborators(
            tbox, ecus, cloud, gateway, self.campaigns, fetch=fetch,
            window=InstallWindow(tbox, cloud, signals, self.status, safety_relevant),
            rates=InstallRates(tbox, cloud, estimate), images=ImageChoice(cloud), status=self.status, stop=self.stop,
            beat=beat, key_chain=key_chain or list, records=self.records, reject=self.reject,
            retired=self.retention.known_id)

    def _handlers(self) -> dict[str, Callable[[CampaignRecord], str | None]]:
        c = lambda: self.c  # noqa: E731 - the collaborators are made after the engine
        return {
            "received": lambda r: states.received(c(), r),
            "verified": lambda r: "downloading",
            "downloading": lambda r: states.downloading(c(), r),
            "downloaded": lambda r: "deploying",
            "deploying": lambda r: states.deploying(c(), r, lambda rec, cam: install_states.start_install(c(), rec, cam)),
            "deployed": lambda r: install_states.deployed(c(), r),
            "awaiting_install": lambda r: install_states.awaiting_install(c(), r),
            "installing": lambda r: install_states.installing(c(), r),
            "done": lambda r: install_states.finished(c(), r),
            "failed": lambda r: install_states.finished(c(), r),
        }

    @staticmethod
    def _waits(record: CampaignRecord) -> bool:
        """Waiting for the owner, or for an install the gateway runs on its own, is no loop."""
        return record.state in WAITING or (record.state == "installing" and not record.install_ended)

    def _traced(self, record: CampaignRecord) -> ContextManager[None]:
        if record.state in LINKED:
            return self.c.gateway.traced(record.dir / "link", record.state)
        return contextlib.nullcontext()

    # ---- the ports and keys as they change -----------------------------------------------
    @property
    def gateway(self) -> GatewayPort:
        return self.c.gateway

    @gateway.setter
    def gateway(self, port: GatewayPort) -> None:
        self.c.gateway = port  # the daemon's real client, once its bus is open

    @property
    def trusted(self) -> Role:
        return self.campaigns.trusted

    @trusted.setter
    def trusted(self, role: Role) -> None:
        self.campaigns.trusted = role  # a key list taken: campaigns are verified again with it

    @property
    def activity(self) -> str:
        """One line on what the runner does, for systemd's STATUS=."""
        return self.status.line

    @property
    def campaigns_dir(self) -> Path:
        return self.engine.campaigns_dir

    # ---- running ---------------------------------------------------------------------------
    def records(self) -> list[CampaignRecord]:
        return self.engine.records()

    def step(self) -> bool:
        """Advance every open campaign as far as it goes now, then tidy what ended campaigns
        keep (tbox/retention.py); True when any of them moved."""
        moved = self.engine.step()
        try:
            self.retention.tidy(self.records())
        except OSError as exc:  # the storage: tidied at the next step
            log.warning("campaigns not tidied: %s", exc)
        return moved

    def advance(self, record: CampaignRecord) -> bool:
        return self.engine.advance(record)

    # ---- what the rest of the TBOX asks ----------------------------------------------------
    def reject(self, topic: str, reason: str, detail: str, key: str, campaign_id: str | None = None) -> None:
        log.warning("rejected %s: %s (%s)", topic, reason, detail)
        body = {"event": "rejected", "topic": topic, "reason": reason, "detail": detail, "campaign_id": campaign_id}
        self.cloud.report("events", body, msg_id=f"rejected.{topic}.{key}")

    def precheck(self, envelope: bytes, key: str) -> bool:
        """Before anything of an arriving campaign is kept: its form, signature, vehicle, validity
        and ECUs (what needs the inventory comes later). Junk is reported and forgotten: it is
        not stored to be read again at every restart, and costs no CAN traffic."""
        try:
            verify_campaign(envelope, self.trusted, vin=self.tbox.vin, now=self.now(), known_ecus=self.ecus)
        except CampaignRejected as exc:
            self.reject("campaign", exc.reason, str(exc), key, exc.campaign_id)
            return False
        return True

    def start_local_campaign(self, campaign_id: str, ecu: str, version: str, data: bytes,
                             proof: dict[str, Any] | None = None) -> None:
        """A ``software`` content item as a campaign through deploy -> flash (C1); ``proof`` is the
        signed bundle manifest and the item, which the gateway checks before it flashes."""
        make_local_campaign(self.campaigns_dir, campaign_id, ecu, version, data, proof)

    def campaign_outcome(self, campaign_id: str) -> dict[str, Any] | None:
        for record in self.records():
            if record.campaign_id == campaign_id and record.state in TERMINAL:
                return {"outcome": record.outcome, "failure": record.failure, "cause": (record.failure or {}).get("cause")}
        return None

    def confirm(self, campaign_id: str, by: str = "cloud", accept: bool = True) -> bool:
        """The owner's consent to the install of an open campaign (``by``: cloud, hmi), or its
        postponing (``accept`` false: it stays offered); reported (and so logged); False when
        there is no such campaign."""
        for record in self.records():
            if record.campaign_id == campaign_id and record.state not in TERMINAL:
                if accept:
                    record.confirmed = True
                    record.save()
                log.info("install of %s %s (%s)", record.campaign_id, "confirmed" if accept else "postponed", by)
                n = time.time_ns()
                self.cloud.report("events", {"event": "consent", "campaign_id": campaign_id, "given": accept, "by": by},
                                  msg_id=f"{campaign_id}.consent.{by}.{n}")
                return True
        return False

    def offer(self, campaign_id: str) -> dict[str, Any] | None:
        """What the driver is shown of an open campaign (agent/core/hmi.py): its information, how
        it installs, whether the owner consented; None when it is not open or not verified."""
        for record in self.records():
            if record.campaign_id == campaign_id and record.state not in TERMINAL and record.state != "received":
                try:
                    campaign = self.c.campaign(record)
                except (VotaError, OSError):
                    return None
                return {"information": dict(campaign.information or {}), "install": campaign.install,
                        "confirmed": record.confirmed}
        return None
