"""The TBOX's campaign runner: one handler per campaign state, each returning the next state.

The state is persisted (``tbox/campaign_state.py``) before its handler runs, so a runner built
anew on the same state directory (after a kill, a reboot) resumes where the last one stopped.
Everything outside the TBOX is behind two ports (``tbox/ports.py``): the cloud and the gateway.

What a handler's error means is told by its class (``agent/errors.py``):

- ``TryLater`` (network down, gateway busy or unreachable): the same handler runs again after a
  back-off (``retry_delay_ms`` doubling up to ``retry_max_delay_ms``), at most ``max_retries``
  times in a row; then the campaign fails with ``retries_exhausted``. These retries are not
  entries: the state is entered once.
- ``CampaignFailure`` (a ``Refused``): the campaign ends ``failed`` with that stage and reason.
- the loop guard counts entries into a state across restarts only: a state entered more than
  ``max_attempts`` times (the TBOX killed or crashing there again and again) fails the campaign
  with ``loop_guard``. Waiting is no loop: for the owner's confirmation, or for an install the
  gateway runs on its own (``installing`` counts only once the gateway said it is over).
- anything else is a programming error: it is logged with its traceback and the campaign fails
  with ``internal_error``; it is never retried.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as _dt
import functools
import hashlib
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.adapters.storage import atomic_write_bytes, atomic_write_json
from agent.core.campaign import Campaign, CampaignRejected, Package, compare_versions, verify_campaign
from agent.core.config import PreconditionsConfig, TboxConfig
from agent.core.preconditions import Estimate, Gate, unmet
from agent.core.roles import Role
from agent.errors import Refused, TryLater, VotaError
from agent.protocol.files import is_name
from agent.protocol.link import InstallJob, InstallManifest, InstallStatus, encode_manifest
from tbox.campaign_state import TERMINAL, CampaignRecord
from tbox.download import download, take_verified
from tbox.offline import MEDIA, ORIGIN
from tbox.ports import CloudPort, Fetch, GatewayPort
from tbox.reports import CampaignReports

__all__ = ["CampaignRunner", "CampaignFailure", "LOCAL_CAMPAIGN"]

log = logging.getLogger(__name__)

LOCAL_CAMPAIGN = "campaign.local.json"  # a campaign the TBOX made itself from a verified content item
PROGRESS_INTERVAL_S = 1.0  # at most one progress event a second per download, deploy or install
WAITING = ("awaiting_install",)  # states that wait for the owner: entering them again is no loop
LINKED = ("received", "deploying", "deployed", "installing")  # states whose gateway exchanges are traced (link/)


class CampaignFailure(Refused):
    """A handler's way to end the campaign: reported with its stage, reason and evidence."""

    def __init__(self, stage: str, reason: str, detail: str, **extra: Any) -> None:
        super().__init__(reason, detail, **extra)
        self.failure = {"stage": stage, "reason": reason, "detail": detail, **extra}


class CampaignRunner:
    def __init__(self, tbox: TboxConfig, ecus: set[str], cloud: CloudPort, gateway: GatewayPort,
                 trusted: Role | Mapping[str, Ed25519PublicKey], *, now: Callable[[], _dt.datetime],
                 stop: threading.Event | None = None, fetch: Fetch | None = None,
                 beat: Callable[[], None] | None = None, entered: Callable[[CampaignRecord], None] | None = None,
                 key_chain: Callable[[], list[bytes]] | None = None,
                 estimate: Callable[[list[tuple[str, int, int]], str, bool, dict[str, float]], Estimate] | None = None,
                 signals: Callable[[], dict[str, Any]] | None = None) -> None:
        self.tbox, self.ecus, self.cloud, self.gateway = tbox, ecus, cloud, gateway
        self.trusted = Role.of(trusted)  # the campaign role; replaced when a signed key list is taken
        self.key_chain = key_chain or list
        self.estimate = estimate  # the install time a campaign will take (agent/core/preconditions.py)
        self.signals = signals  # the vehicle's state, read from the preconditions ECU
        self._checked: dict[str, float] = {}  # campaign -> when its preconditions were last read
        self._said: dict[str, str] = {}  # campaign -> the unmet conditions last reported
        self.now = now
        # slow retrieval (Uptane): a download below the minimum rate, or too long, is cut off and resumed later
        self.fetch = fetch or functools.partial(download, min_rate=tbox.download_min_rate,
                                                rate_window_s=tbox.download_rate_window_s,
                                                max_time_s=tbox.download_max_time_s)
        self.stop = stop or threading.Event()
        self.beat = beat or (lambda: None)
        self.entered = entered or (lambda record: None)  # called once a state is persisted (tests kill here)
        self.campaigns_dir = Path(tbox.state_dir) / "campaigns"
        self._seen: set[tuple[str, str]] = set()  # (campaign, state) this runner has entered or resumed
        self.activity = "no campaign open"  # one line on what the runner does, for systemd's STATUS=

    # ---- the loop -----------------------------------------------------------------------------
    @property
    def reports(self) -> CampaignReports:
        return CampaignReports(self.cloud, self.gateway)  # the ports as they are now (the daemon sets them at start)

    def records(self) -> list[CampaignRecord]:
        if not self.campaigns_dir.exists():
            return []
        records = [CampaignRecord.load(d) for d in sorted(self.campaigns_dir.iterdir()) if (d / "state.json").exists()]
        return sorted(records, key=lambda r: r.path.stat().st_mtime)

    def step(self) -> bool:
        """Advance every open campaign as far as it goes now; True when any of them moved."""
        progressed = False
        open_records = [r for r in self.records() if r.state not in TERMINAL]
        if not open_records:
            self.activity = "no campaign open"
        for record in open_records:
            if self.stop.is_set():
                break
            progressed |= self.advance(record)
        return progressed

    def advance(self, record: CampaignRecord) -> bool:
        """Run the campaign until it ends or waits; False when it waits without having moved."""
        handlers: dict[str, Callable[[CampaignRecord], str | None]] = {
            "received": self._received, "verified": lambda r: "downloading", "downloading": self._downloading,
            "downloaded": lambda r: "deploying", "deploying": self._deploying, "deployed": self._deployed,
            "awaiting_install": self._awaiting_install, "installing": self._installing,
            "done": self._finished, "failed": self._finished,
        }
        moved = False
        while record.state not in TERMINAL and not self.stop.is_set():
            self.beat()
            state = record.state
            self.activity = f"campaign {record.campaign_id or record.key}: {state}"
            if (record.key, state) not in self._seen:  # a new state, or one resumed after a restart
                # waiting for the owner, or for an install the gateway runs on its own, is no loop
                waiting = state in WAITING or (state == "installing" and not record.install_ended)
                if record.entries.get(state, 0) >= self.tbox.max_attempts and state not in ("done", "failed") and not waiting:
                    self._fail(record, CampaignFailure(state, "loop_guard", f"state {state} entered {record.entries[state]} times"))
                    continue
                if not waiting or record.entries.get(state, 0) == 0:
                    record.enter(state)
                    self._event(record, state)
                self._seen.add((record.key, state))
                self.entered(record)
            nxt = self._run(record, handlers[state])
            if nxt is None:  # waiting (a confirm command), stopping, or backing off
                return moved
            record.state = nxt
            if nxt in TERMINAL:
                record.enter(nxt)
            else:  # persisted now: a state entered before (back to waiting) is not entered again below
                record.save()
            moved = True
        return moved

    def _run(self, record: CampaignRecord, handler: Callable[[CampaignRecord], str | None]) -> str | None:
        """The handler's next state; transient problems are retried here with back-off."""
        state = record.state
        retries = 0
        while True:
            try:
                with self.gateway.traced(record.dir / "link", state) if state in LINKED else contextlib.nullcontext():
                    return handler(record)
            except CampaignFailure as failure:
                self._fail(record, failure)
                return record.state
            except (TryLater, OSError) as exc:  # OSError: the TBOX's own storage, worth another try too
                if self.stop.is_set():
                    return None  # checkpointed: the state is entered again after the restart
                retries += 1
                if retries > self.tbox.max_retries:
                    self._fail(record, CampaignFailure(state, "retries_exhausted", f"{retries - 1} retries: {exc}"))
                    return record.state
                delay = min(self.tbox.retry_max_delay_s, self.tbox.retry_delay_s * 2 ** (retries - 1))
                log.warning("%s %s: %s; retry %d of %d in %.1f s", record.campaign_id or record.key, state, exc, retries,
                            self.tbox.max_retries, delay)
                self._report_retry(record, state, retries, str(exc))
                self.stop.wait(delay)
                self.beat()
            except Exception as exc:  # noqa: BLE001 - a programming error: surfaced, never retried
                log.exception("%s %s: internal error", record.campaign_id or record.key, state)
                self._fail(record, CampaignFailure(state, "internal_error", f"{type(exc).__name__}: {exc}"))
                return record.state

    def _report_retry(self, record: CampaignRecord, state: str, retry: int, reason: str) -> None:
        cid = record.campaign_id or record.key
        self.cloud.report("events", {"event": "retry", "campaign_id": record.campaign_id, "state": state,
                                     "retry": retry, "of": self.tbox.max_retries, "reason": reason},
                          msg_id=f"{cid}.retry.{state}.{record.entries.get(state, 0)}.{retry}")

    def _event(self, record: CampaignRecord, state: str, **extra: Any) -> None:
        cid = record.campaign_id or record.key
        count = record.entries.get(state, 1)
        self.cloud.report("events", {"event": "state", "campaign_id": record.campaign_id, "state": state,
                                     "attempt": count, **extra}, msg_id=f"{cid}.state.{state}.{count}")

    def _fail(self, record: CampaignRecord, failure: CampaignFailure) -> None:
        record.failure = failure.failure
        record.outcome = "failed"
        record.state = "failed"
        record.save()

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

    # ---- campaigns --------------------------------------------------------------------------
    def campaign(self, record: CampaignRecord) -> Campaign:
        """The campaign, verified again from its stored envelope (pure and cheap). Expiry was
        checked when it arrived: a campaign that expires while it runs is finished."""
        local = record.dir / LOCAL_CAMPAIGN
        if local.exists():  # made by this TBOX from a content item whose bundle it verified
            doc = json.loads(local.read_text())
            packages = tuple(Package(**p) for p in doc["packages"])
            now = self.now()
            return Campaign(doc["campaign_id"], self.tbox.vin, now, now + _dt.timedelta(days=1), doc["install"], packages, doc)
        try:
            return verify_campaign(record.envelope_path.read_bytes(), self.trusted, vin=self.tbox.vin,
                                   now=self.now(), check_time=False)
        except CampaignRejected as exc:
            raise CampaignFailure("verify", exc.reason, str(exc)) from None

    def start_local_campaign(self, campaign_id: str, ecu: str, version: str, data: bytes,
                             proof: dict[str, Any] | None = None) -> None:
        """A ``software`` content item as a campaign through deploy -> flash (C1); ``proof`` is the
        signed bundle manifest and the item, which the gateway checks before it flashes."""
        key = "local-" + hashlib.sha256(campaign_id.encode()).hexdigest()[:18]
        directory = self.campaigns_dir / key
        if (directory / "state.json").exists():
            return
        name = f"{campaign_id}.bin"
        atomic_write_bytes(directory / "packages" / name, data)
        package = {"name": name, "ecu": ecu, "version": version, "url": "", "size": len(data),
                   "sha256": hashlib.sha256(data).hexdigest()}
        atomic_write_json(directory / LOCAL_CAMPAIGN, {"campaign_id": campaign_id, "install": "immediate",
                                                         "packages": [package], "proof": proof})
        record = CampaignRecord(key, directory)
        record.packages = {name: {"ecu": ecu, "version": version, "downloaded": True}}
        record.save()

    def campaign_outcome(self, campaign_id: str) -> dict[str, Any] | None:
        for record in self.records():
            if record.campaign_id == campaign_id and record.state in TERMINAL:
                return {"outcome": record.outcome, "failure": record.failure, "cause": (record.failure or {}).get("cause")}
        return None

    def confirm(self, campaign_id: str) -> bool:
        """The owner confirmed the install of an open campaign; False when there is none."""
        for record in self.records():
            if record.campaign_id == campaign_id and record.state not in TERMINAL:
                record.confirmed = True
                record.save()
                log.info("install of %s confirmed", record.campaign_id)
                return True
        return False

    # ---- states -----------------------------------------------------------------------------
    def _received(self, record: CampaignRecord) -> str:
        inventory = self.gateway.inventory()  # D11: versions before the campaign (TryLater when unreachable)
        self._inventory_evidence(record, inventory)
        installed = {e["ecu"]: e["software_version"] for e in inventory if e.get("software_version")}
        try:
            if (record.dir / LOCAL_CAMPAIGN).exists():
                campaign = self.campaign(record)
                for p in campaign.packages:  # the same downgrade rules as for the cloud's campaigns
                    current = installed.get(p.ecu)
                    if not current:
                        raise CampaignRejected("unknown_version", f"{p.ecu}: its installed version could not be read, "
                                                                  f"so a downgrade cannot be ruled out", campaign.campaign_id)
                    if compare_versions(p.version, current) < 0:
                        raise CampaignRejected("downgrade", f"{p.ecu}: {p.version} is older than the installed {current}",
                                               campaign.campaign_id)
            else:
                campaign = verify_campaign(record.envelope_path.read_bytes(), self.trusted, vin=self.tbox.vin,
                                           now=self.now(), installed=installed, known_ecus=self.ecus)
        except CampaignRejected as exc:
            record.campaign_id = exc.campaign_id
            self.reject("campaign", exc.reason, str(exc), record.key, exc.campaign_id)
            raise CampaignFailure("verify", exc.reason, str(exc)) from None
        duplicate = [r for r in self.records() if r.campaign_id == campaign.campaign_id and r.key != record.key]
        if duplicate:
            self.reject("campaign", "duplicate", f"campaign {campaign.campaign_id} is already known", record.key,
                        campaign.campaign_id)
            record.outcome = "duplicate"
            return "reported"
        record.campaign_id = campaign.campaign_id
        record.packages = {p.name: {"ecu": p.ecu, "version": p.version, **record.packages.get(p.name, {})}
                           for p in campaign.packages}
        self._choose_images(record, campaign, inventory)
        record.save()
        self.cloud.report("inventory", {"campaign_id": campaign.campaign_id, "ecus": inventory},
                          msg_id=f"{campaign.campaign_id}.inventory")
        origin = record.dir / ORIGIN
        if origin.exists():  # imported from removable media: the cloud hears it when the vehicle is next online
            self.cloud.report("events", {"event": "imported", "campaign_id": campaign.campaign_id,
                                         **json.loads(origin.read_text())}, msg_id=f"{campaign.campaign_id}.imported")
        return "verified"

    def _choose_images(self, record: CampaignRecord, campaign: Campaign, inventory: list[dict[str, Any]]) -> None:
        """For each package that carries a delta: the delta when the inventory says its ECU runs the
        delta's base (F1A0), else the full image; the choice and why are reported. (An ECU that
        refuses the delta all the same gets the full image in a second round: ``_delta_fallback``.)"""
        running = {e.get("ecu"): e.get("image_sha256") for e in inventory}
        chosen: dict[str, dict[str, str]] = {}
        for p in campaign.packages:
            entry = record.packages[p.name]
            if p.delta is None or "image" in entry:
                continue
            if (record.dir / MEDIA).is_dir():  # the media carries full images
                entry.update(image="full", why="an offline campaign: the full image came on the media")
                chosen[p.name] = {"image": entry["image"], "why": entry["why"]}
                continue
            sha = running.get(p.ecu)
            if sha == p.delta.base_sha256:
                entry.update(image="delta", why=f"{p.ecu} runs the delta's base {p.delta.base_version}")
            else:
                seen = f"runs {sha[:16]}" if isinstance(sha, str) and sha else "did not tell its image digest (F1A0)"
                entry.update(image="full", why=f"{p.ecu} {seen}, not the delta's base {p.delta.base_version} "
                                               f"({p.delta.base_sha256[:16]})")
            chosen[p.name] = {"image": entry["image"], "why": entry["why"]}
        if chosen:
            self._report_images(record, chosen, 0)

    def _report_images(self, record: CampaignRecord, chosen: dict[str, Any], round_: int) -> None:
        """The ``images`` event: per package, ``image`` (delta or full) and ``why``."""
        cid = record.campaign_id
        self.cloud.report("events", {"event": "images", "campaign_id": cid, "round": round_, "packages": chosen},
                          msg_id=f"{cid}.images.{round_}")

    @staticmethod
    def _file(p: Package, entry: dict[str, Any]) -> tuple[str, str, int, str]:
        """What goes to the gateway for a package: (name, url, size, SHA-256) of the delta or the image."""
        if p.delta is not None and entry.get("image") == "delta":
            return p.delta.name, p.delta.url, p.delta.size, p.delta.sha256
        return p.name, p.url, p.size, p.sha256

    def _inventory_evidence(self, record: CampaignRecord, inventory: list[dict[str, Any]]) -> None:
        """The gateway's trace of each ECU whose identification it could not read completely, kept
        in ``link/`` as ``inventory-<ecu>``: what explains a campaign refused for an unknown version."""
        for entry in inventory:
            ecu, trace_file = entry.get("ecu"), entry.get("trace_file")
            if not entry.get("errors") or not isinstance(trace_file, str) or not isinstance(ecu, str) or not is_name(ecu):
                continue
            try:
                trace = self.gateway.read_file(trace_file)
                result = json.loads(self.gateway.read_file(trace_file.replace(".trace.jsonl", ".result.json")))
            except (TryLater, ValueError) as exc:
                log.warning("the inventory trace of %s is not available: %s", ecu, exc)
                continue
            if not isinstance(result, dict):
                continue
            name = f"inventory-{ecu}"
            atomic_write_bytes(record.dir / "link" / f"{name}.link.trace.jsonl", trace)
            atomic_write_json(record.dir / "link" / f"{name}.link.result.json",
                              {**result, "name": name, "trace_file": f"{name}.link.trace.jsonl"})

    @staticmethod
    def package_path(record: CampaignRecord, name: str) -> Path:
        return record.dir / "packages" / name

    def _downloading(self, record: CampaignRecord) -> str | None:
        campaign = self.campaign(record)
        for p in campaign.packages:
            entry = record.packages.setdefault(p.name, {})
            if entry.get("downloaded"):
                continue

            name, url, size, sha256 = self._file(p, entry)
            progress = self._progress(campaign.campaign_id, "download", package=name)
            try:
                if (record.dir / MEDIA).is_dir():  # an offline campaign: the packages came on the media
                    info = take_verified(record.dir / MEDIA / name, self.package_path(record, name), size, sha256,
                                         progress=progress)
                else:
                    info = self.fetch(url, self.package_path(record, name), size, sha256, progress=progress,
                                      should_stop=self.stop.is_set)
            except TryLater:
                raise  # the network: back off and resume the download (HTTP ranges)
            except VotaError as exc:
                raise CampaignFailure("download", "package_refused", str(exc), package=name) from None
            entry.update(downloaded=True, resumed_from=info.resumed_from)
            record.save()
            log.info("downloaded %s (%d bytes, resumed from %d)", name, size, info.resumed_from)
        return "downloaded"

    def _deploying(self, record: CampaignRecord) -> str | None:
        campaign = self.campaign(record)
        out = record.dir / "deploy"
        self._report_estimate(record, campaign)  # before the install starts (it may start here)
        if self._pipelined(record, campaign) and not record.install_started:
            # the install starts first and each ECU is flashed as soon as its package is on the
            # gateway, while the next one is deployed (gateway/arrivals.py)
            self._send_manifest(record, campaign, arriving=True)
            self._start_install(record)
        for p in sorted(campaign.packages, key=lambda p: p.order):  # install order: what is flashed first comes first
            entry = record.packages[p.name]
            if entry.get("deploy") == "success":
                continue
            resume = bool(entry.get("deploy_started"))
            entry["deploy_started"] = True
            record.save()
            boot = self.gateway.boot_id()
            name, _, _, sha256 = self._file(p, entry)
            result = self.gateway.deploy(name, self.package_path(record, name), sha256, out, resume=resume,
                                         progress=self._progress(campaign.campaign_id, "deploy", package=name))
            if result.reason == "cancelled":
                return None  # SIGTERM: checkpointed; the deploy resumes after restart
            if result.result != "success" and result.nrc is None and self._restarted(boot):
                n = entry["deploy_interruptions"] = int(entry.get("deploy_interruptions", 0)) + 1
                record.save()
                self.reports.deploy_interrupted(record, result, out, n)
                raise TryLater(f"{name}: the gateway restarted during its deploy ({result.failed_step}: {result.reason})")
            entry["deploy"] = result.result
            record.save()
            self.reports.stage(record, "deploy", name, result.to_json(), out / f"{name}.deploy.trace.jsonl",
                               {"package": name})
            if result.result != "success":  # D4: a failed deploy ends the campaign here
                raise CampaignFailure("deploy", "deploy_failed", f"{name}: {result.failed_step}: {result.reason}",
                                      package=name, packet=result.failed_packet)
        return "deployed"

    def _restarted(self, boot: bytes) -> bool:
        """After a deploy broke off without an answer: did the gateway restart under it? (A gateway
        that does not answer yet is taken as restarting: retried, within the retry budget.)"""
        try:
            return self.gateway.boot_id() != boot
        except TryLater:
            return True

    def _pipelined(self, record: CampaignRecord, campaign: Campaign) -> bool:
        # with preconditions the install waits for them once everything is on the gateway
        return (self.tbox.pipeline and not (record.dir / LOCAL_CAMPAIGN).exists() and not self._with_preconditions
                and (campaign.install == "immediate" or record.confirmed))

    @property
    def _with_preconditions(self) -> bool:
        return self.tbox.preconditions.ecu is not None and self.signals is not None

    def _conditions(self, campaign: Campaign) -> PreconditionsConfig:
        """The vehicle's preconditions with the campaign's signed overrides (agent/core/campaign.py)."""
        return dataclasses.replace(self.tbox.preconditions, **dict(campaign.preconditions or {}))

    def _window_end(self, record: CampaignRecord, campaign: Campaign) -> float:
        """When the campaign's install window ends (epoch seconds): ``window_s`` after it first waited
        for its preconditions (now, if it never did), and never past its expiry."""
        since = record.times.get("waiting_since", time.time())
        return min(since + self._conditions(campaign).window_s, campaign.expires.timestamp())

    def _report_unmet(self, record: CampaignRecord, bad: dict[str, Any], values: dict[str, Any],
                      **where: Any) -> None:
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

    def _deployed(self, record: CampaignRecord) -> str:
        campaign = self.campaign(record)
        # sent now, unless it went before the packages (pipelined) or goes when the install starts
        # (with preconditions: it carries the install window, known then)
        if not (self._pipelined(record, campaign) and record.install_started) and not self._with_preconditions:
            self._send_manifest(record, campaign, arriving=False)
        return "awaiting_install"

    def _send_manifest(self, record: CampaignRecord, campaign: Campaign, arriving: bool) -> None:
        """The install manifest to the gateway: the jobs, and the signed documents it verifies them against."""
        local = record.dir / LOCAL_CAMPAIGN
        # what the gateway verifies the install against before it erases anything (gateway/verify.py)
        proof = dict((json.loads(local.read_text()).get("proof") or {}) if local.exists()
                     else {"campaign": base64.b64encode(record.envelope_path.read_bytes()).decode()})
        chain = self.key_chain()
        if chain:  # the key lists taken since the configuration's: the gateway follows them
            proof["keys"] = [base64.b64encode(k).decode() for k in chain]
        jobs = tuple(InstallJob(p.ecu, p.name, p.version, p.order, delta=p.delta.name if p.delta is not None
                                and record.packages[p.name].get("image") == "delta" else None)
                     for p in campaign.packages)
        gate = None
        if self._with_preconditions:  # checked again by the gateway while it stages and before each activation
            gate = Gate(self._conditions(campaign), record.times.get("estimated_install_s", 0.0),
                        self._window_end(record, campaign)).to_json()
        manifest = InstallManifest(campaign.campaign_id, jobs, campaign.activation, proof, arriving, gate)
        name = f"install-{campaign.campaign_id}.json"
        path = record.dir / name
        atomic_write_bytes(path, encode_manifest(manifest))
        result = self.gateway.deploy(name, path, hashlib.sha256(path.read_bytes()).hexdigest(), record.dir / "deploy")
        if result.result != "success":
            raise TryLater(f"install manifest: {result.failed_step}: {result.reason}")

    def _awaiting_install(self, record: CampaignRecord) -> str | None:
        campaign = self.campaign(record)
        if campaign.install == "immediate" or record.confirmed:
            return "installing" if self._preconditions_hold(record, campaign) else None
        return None  # wait for the confirm command

    def _report_estimate(self, record: CampaignRecord, campaign: Campaign) -> None:
        """The estimated install time (how long the car will be unusable), told before it starts."""
        if self.estimate is None or "estimated_install_s" in record.times:
            return
        jobs = [(p.ecu, self._file(p, record.packages[p.name])[2], p.order) for p in campaign.packages]  # bytes on the bus
        estimate = self.estimate(jobs, campaign.activation, self._pipelined(record, campaign), self._measured())
        record.times["estimated_install_s"] = round(estimate.install_s, 1)
        record.save()
        self.cloud.report("events", {"event": "estimate", "campaign_id": campaign.campaign_id, **estimate.to_json()},
                          msg_id=f"{campaign.campaign_id}.estimate")

    @property
    def _rates_file(self) -> Path:
        return Path(self.tbox.state_dir) / "rates.json"

    def _rates(self) -> dict[str, Any]:
        """``rates.json`` as stored: ECU -> {"bytes_per_s", "measured"}; empty when none yet or unreadable."""
        try:
            doc = json.loads(self._rates_file.read_text())
        except (OSError, ValueError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def _measured(self) -> dict[str, float]:
        """Bytes a second each ECU's image went at when it was last flashed (the estimate's rates)."""
        try:
            return {str(e): float(v["bytes_per_s"]) for e, v in self._rates().items()}
        except (ValueError, TypeError, KeyError):
            return {}  # not what was written: the configured rates

    def _learn_rates(self, results: list[dict[str, Any]]) -> None:
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
            atomic_write_json(self._rates_file, {**self._rates(), **learned})

    def _preconditions_hold(self, record: CampaignRecord, campaign: Campaign) -> bool:
        """The vehicle can finish the install now (``tbox.preconditions``). While it cannot, the
        campaign waits here, reads the signals again every ``recheck_s`` and reports each new set
        of unmet conditions with their values; past ``window_s`` (or the campaign's expiry) it
        fails with reason ``preconditions`` and the last values."""
        if not self._with_preconditions:
            return True
        assert self.signals is not None
        cfg, key = self._conditions(campaign), record.key
        if time.monotonic() - self._checked.get(key, -1e9) < cfg.recheck_s:
            return False
        self._checked[key] = time.monotonic()
        values = self.signals()
        install_s = record.times.get("estimated_install_s", 0.0)
        bad = unmet(cfg, values, install_s)
        cid = campaign.campaign_id
        if not bad:
            again = int(record.times.get("staging_stopped", 0))  # told again after each stop of staging
            self.cloud.report("events", {"event": "preconditions", "campaign_id": cid, "met": True, "values": values},
                              msg_id=f"{cid}.preconditions.met" + (f".{again}" if again else ""))
            return True
        record.times.setdefault("waiting_since", time.time())
        record.save()
        self._report_unmet(record, bad, values)
        if time.time() >= self._window_end(record, campaign):
            raise CampaignFailure("awaiting_install", "preconditions", "; ".join(bad.values()), unmet=bad, values=values)
        self.activity = f"campaign {cid}: waiting for " + ", ".join(bad)
        return False

    def _progress(self, campaign_id: str, stage: str, **where: Any) -> Callable[[int, int], None]:
        """A progress callback for one download, deploy or install: feeds the worker's heartbeat
        at every call and tells the cloud (done, total) at most once a second, and once done."""
        last = [0.0, -1.0]  # when the cloud was last told, and how far
        unit = "ECUs" if stage == "install" else "bytes"

        def progress(done: int, total: int) -> None:
            self.beat()
            self.activity = " ".join([f"campaign {campaign_id}: {stage}", *map(str, where.values()), f"{done} of {total} {unit}"])
            finished = done >= total and done != last[1]
            if finished or time.monotonic() - last[0] >= PROGRESS_INTERVAL_S:
                last[0], last[1] = time.monotonic(), done
                self.cloud.report("events", {"event": "progress", "campaign_id": campaign_id, "stage": stage, **where,
                                             "done": done, "total": total},
                                  msg_id=".".join([campaign_id, "progress", stage, *map(str, where.values()), str(done)]))

        return progress

    def _installing(self, record: CampaignRecord) -> str | None:
        cid = record.campaign_id
        assert cid is not None
        status, _, _ = self.gateway.install_status(cid)
        if status in (InstallStatus.NONE, InstallStatus.REFUSED) or (status == InstallStatus.FAILED and not record.install_started):
            self._start_install(record)
        progress = self._progress(cid, "install")

        def polling(done: int, total: int) -> bool:  # at every status poll: progress; True when stopping
            progress(done, total)
            return self.stop.is_set()

        status = self.gateway.wait_install(cid, self.tbox.install_timeout_s, should_stop=polling,
                                           waiting=self._gateway_waits(record))
        if self.stop.is_set():
            return None  # checkpointed: after restart the TBOX asks the gateway again
        if not record.install_ended:
            record.install_ended = True  # from here on a restart in this state counts for the loop guard
            record.times["install_ended"] = time.time()
            record.save()
        try:
            summary = json.loads(self.gateway.read_file(f"{cid}/summary.json"))
            results = list(summary["results"])
        except (ValueError, KeyError, TypeError) as exc:
            raise TryLater(f"{cid}/summary.json from the gateway is not readable ({exc})") from None
        record.versions = summary.get("final_versions") if isinstance(summary.get("final_versions"), dict) else None
        record.interruptions = summary.get("interruptions") or None
        record.revertible = summary.get("revertible") if isinstance(summary.get("revertible"), bool) else None
        self._learn_rates(results)
        held = summary.get("preconditions")
        if status != InstallStatus.SUCCEEDED and isinstance(held, dict) and held.get("met") is False:
            return self._held(record, results, held)
        if status != InstallStatus.SUCCEEDED and self._delta_fallback(record, results):
            return "downloading"  # the full image for the ECUs that refused their delta, then install again
        failed = self.reports.install_results(record, results)
        if failed or status != InstallStatus.SUCCEEDED:
            raise CampaignFailure("flash", "flash_failed", "; ".join(failed) or "install failed on the gateway")
        record.outcome = "success"
        record.save()
        return "done"

    def _gateway_waits(self, record: CampaignRecord) -> Callable[[bool], None]:
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
                check = json.loads(self.gateway.read_file(f"{cid}/preconditions.json"))
                bad, values = dict(check["unmet"]), dict(check["values"])
            except (TryLater, ValueError, KeyError, TypeError):
                return  # asked again at the next interval
            self.activity = f"campaign {cid}: staged, waiting for " + ", ".join(bad)
            self._report_unmet(record, bad, values, phase="activate")

        return waiting

    def _held(self, record: CampaignRecord, results: list[dict[str, Any]], held: dict[str, Any]) -> str:
        """The gateway stopped the install for the vehicle's state. Stopped while staging (nothing
        activated, everything staged discarded): the campaign waits for its preconditions again,
        within its window. Turned back before or between activations: the campaign fails with
        reason ``preconditions``, the ECUs' results (rolled back, discarded) reported."""
        campaign = self.campaign(record)
        cid = campaign.campaign_id
        bad: dict[str, Any] = held["unmet"] if isinstance(held.get("unmet"), dict) else {}
        values: dict[str, Any] = held["values"] if isinstance(held.get("values"), dict) else {}
        phase = str(held.get("phase"))
        record.times.setdefault("waiting_since", time.time())
        window_open = time.time() < self._window_end(record, campaign)
        if phase == "stage" and window_open and self._with_preconditions:
            n = int(record.times.get("staging_stopped", 0)) + 1
            record.times["staging_stopped"] = n
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
        self.reports.install_results(record, results)
        raise CampaignFailure("install", "preconditions", "; ".join(map(str, bad.values())) or "preconditions",
                              unmet=bad, values=values, phase=phase)

    def _start_install(self, record: CampaignRecord) -> None:
        cid = record.campaign_id
        assert cid is not None
        if self._with_preconditions:  # with the install window, known now
            self._send_manifest(record, self.campaign(record), arriving=False)
        record.install_started = True  # first: a TBOX killed right after starting it does not start it twice
        record.times["install_began"] = time.time()
        record.save()
        try:
            self.gateway.start_install(f"install-{cid}.json")
        except TryLater:
            if self.gateway.install_status(cid)[0] != InstallStatus.REFUSED:
                raise
            raise CampaignFailure("install", "install_refused", self._refusal(cid)) from None

    def _delta_fallback(self, record: CampaignRecord, results: list[dict[str, Any]]) -> bool:
        """An ECU refused its delta (it does not run the base after all, takes no deltas, or the
        patch made another image) and its full image was not on the gateway: that package goes
        again as the full image, the others as they were, and the install runs once more (an ECU
        found already running its new image is not flashed again). Once per package."""
        campaign = self.campaign(record)
        by_ecu = {p.ecu: p for p in campaign.packages}
        refused: dict[str, dict[str, Any]] = {}
        for r in results:
            p = by_ecu.get(r.get("ecu"))  # type: ignore[arg-type]
            if p is None or r.get("result") == "success" or not r.get("delta_refused"):
                continue
            entry = record.packages[p.name]
            if entry.get("image") != "delta":
                continue
            entry.update(image="full", why=f"the ECU refused the delta: {r['delta_refused']}")
            for key in ("downloaded", "deploy", "deploy_started", "resumed_from"):
                entry.pop(key, None)
            refused[p.name] = {"image": "full", "why": entry["why"], "result": r}
        if not refused:
            return False
        log.warning("%s: %s refused the delta; the full image goes instead", record.campaign_id,
                    ", ".join(r["result"]["ecu"] for r in refused.values()))
        record.install_started = record.install_ended = False
        record.save()
        self._report_images(record, refused, 1)
        return True

    def _refusal(self, cid: str) -> str:
        """Why the gateway refused to install (it keeps the reason in the campaign's install.json)."""
        try:
            return str(json.loads(self.gateway.read_file(f"{cid}/install.json")).get("error") or "refused by the gateway")
        except (TryLater, ValueError, AttributeError):
            return "refused by the gateway (reason not readable)"

    def _diagnose(self, record: CampaignRecord) -> dict[str, Any] | None:
        """D10 in the vehicle: analyse the campaign's own results and traces."""
        from agent.adapters.diagnosis_files import load_inputs, load_rules
        from agent.core.diagnosis import diagnose

        try:
            inputs, _, problems = load_inputs(record.dir)
        except VotaError:  # nothing deployed or flashed: the verdict says the traces cannot show it
            inputs, problems = [], []
        verdict = diagnose(inputs, load_rules(), "first", record.campaign_id, record.failure)
        verdict.unanalysed.extend(problems)
        return verdict.to_json()

    def _finished(self, record: CampaignRecord) -> str:
        cid = record.campaign_id or record.key
        body: dict[str, Any] = {"event": "finished", "campaign_id": record.campaign_id, "outcome": record.outcome or "failed",
                                "failure": record.failure, "versions": record.versions}
        if record.interruptions:
            body["interruptions"] = record.interruptions
        if record.revertible is not None:
            body["revertible"] = record.revertible
        if "estimated_install_s" in record.times:  # told before, against what it took
            body["estimated_install_s"] = record.times["estimated_install_s"]
            if "install_began" in record.times and "install_ended" in record.times:
                body["install_s"] = round(record.times["install_ended"] - record.times["install_began"], 1)
        if record.outcome != "success" and record.campaign_id:
            self.reports.link_failures(record)
        if self.tbox.diagnose and record.outcome != "success" and record.campaign_id:
            verdict = self._diagnose(record)
            if verdict is not None:
                self.cloud.report("results", {"campaign_id": cid, "stage": "diagnosis", "verdict": verdict},
                                  msg_id=f"{cid}.diagnosis")
                body["cause"] = verdict.get("cause")
                if record.failure is not None:
                    record.failure["cause"] = verdict.get("cause")
        self.cloud.report("events", body, msg_id=f"{cid}.finished")
        return "reported"
