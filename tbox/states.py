"""One handler per campaign state (the graph heads ``tbox/engine.py``), with their collaborators
named: the two ports (cloud, gateway: ``tbox/ports.py``), the package fetch, the campaigns as
verified (``tbox/campaign_source.py``), and the policies: the install window
(``tbox/install_window.py``), the estimate and measured rates (``tbox/rates.py``) and the image
choice (``tbox/images.py``). What the install states do is in ``tbox/install_states.py``."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

from agent.adapters.storage import atomic_write_bytes, atomic_write_json, free_bytes
from agent.core.campaign import Campaign, CampaignRejected
from agent.core.config import TboxConfig
from agent.core.preconditions import loosened
from agent.core.rxswin import mismatch
from agent.errors import TryLater, VotaError
from agent.protocol.files import is_name
from agent.protocol.images import sniff
from tbox.campaign_source import VerifiedCampaigns, source_of
from tbox.campaign_state import CampaignRecord, PackageEntry
from tbox.download import take_verified
from tbox.engine import CampaignFailure, Status
from tbox.images import ImageChoice, file_for
from tbox.install_window import InstallWindow
from tbox.ports import CloudPort, Fetch, GatewayPort
from tbox.rates import InstallRates
from tbox.reports import CampaignReports

__all__ = ["Collaborators", "PROGRESS_INTERVAL_S", "progress_reporter", "received", "downloading", "deploying",
           "package_path"]

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 1.0  # at most one progress event a second per download, deploy or install
ECU_PROGRESS_S = 2.0  # how often the TBOX asks the gateway for each ECU's bytes during an install


class Collaborators:
    """What the state handlers work with; the gateway port is replaced when the daemon starts."""

    def __init__(self, tbox: TboxConfig, ecus: set[str], cloud: CloudPort, gateway: GatewayPort, campaigns: VerifiedCampaigns,
                 *, fetch: Fetch, window: InstallWindow, rates: InstallRates, images: ImageChoice, status: Status,
                 stop: Any, beat: Callable[[], None], key_chain: Callable[[], list[bytes]],
                 records: Callable[[], list[CampaignRecord]], reject: Callable[..., None],
                 retired: Callable[[str], bool] = lambda campaign_id: False) -> None:
        self.tbox, self.ecus, self.cloud, self.gateway, self.campaigns = tbox, ecus, cloud, gateway, campaigns
        self.fetch, self.window, self.rates, self.images, self.status = fetch, window, rates, images, status
        self.stop, self.beat, self.key_chain, self.records, self.reject = stop, beat, key_chain, records, reject
        self.retired = retired  # a campaign id the TBOX ran long ago (tbox/retention.py)

    @property
    def reports(self) -> CampaignReports:
        return CampaignReports(self.cloud, self.gateway)  # the ports as they are now

    def campaign(self, record: CampaignRecord) -> Campaign:
        """The campaign, as verified for this runner (failed ``verify`` if it no longer verifies)."""
        try:
            return self.campaigns.of(record)
        except CampaignRejected as exc:
            raise CampaignFailure("verify", exc.reason, str(exc)) from None

    def pipelined(self, record: CampaignRecord, campaign: Campaign) -> bool:
        """The install starts before the packages are deployed (with preconditions it waits for them
        once everything is on the gateway; a local campaign's one package is here already)."""
        return (self.tbox.pipeline and source_of(record).kind == "signed" and not self.window.enabled
                and (campaign.install == "immediate" or record.confirmed)
                and not any(_container(package_path(record, p.name)) for p in campaign.packages))


def progress_reporter(c: Collaborators, campaign_id: str, stage: str, **where: Any) -> Callable[[int, int], None]:
    """A progress callback for one download, deploy or install: feeds the worker's heartbeat at
    every call and tells the cloud (done, total) at most once a second, and once done."""
    last = [0.0, -1.0]  # when the cloud was last told, and how far
    unit = "ECUs" if stage == "install" else "bytes"

    def progress(done: int, total: int) -> None:
        c.beat()
        c.status.line = " ".join([f"campaign {campaign_id}: {stage}", *map(str, where.values()), f"{done} of {total} {unit}"])
        finished = done >= total and done != last[1]
        if finished or time.monotonic() - last[0] >= PROGRESS_INTERVAL_S:
            last[0], last[1] = time.monotonic(), done
            c.cloud.report("events", {"event": "progress", "campaign_id": campaign_id, "stage": stage, **where,
                                      "done": done, "total": total},
                           msg_id=".".join([campaign_id, "progress", stage, *map(str, where.values()), str(done)]))

    return progress


def ecu_progress_reporter(c: Collaborators, campaign_id: str) -> Callable[[], None]:
    """While the install runs, asked at every status poll: each ECU's step and bytes, read from
    the gateway every ECU_PROGRESS_S, told to the cloud as ``progress`` events of stage
    ``install`` naming the ECU (what changed since the last, and once done)."""
    last: list[float] = [-1e9]
    told: dict[str, tuple[str, int]] = {}

    def poll() -> None:
        if time.monotonic() - last[0] < ECU_PROGRESS_S:
            return
        last[0] = time.monotonic()
        for ecu, (step, done, total) in sorted(c.gateway.install_progress(campaign_id).items()):
            if told.get(ecu) == (step, done):
                continue
            told[ecu] = (step, done)
            c.cloud.report("events", {"event": "progress", "campaign_id": campaign_id, "stage": "install", "ecu": ecu,
                                      "step": step, "done": done, "total": total},
                           msg_id=f"{campaign_id}.progress.install.{ecu}.{step}.{done}")

    return poll


def _container(path: Path) -> bool:
    """An image container (Intel HEX, S-record, VBF): the digest the ECU will report is known only
    from the whole file, so its install waits until every package is on the gateway."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return sniff(head) != "binary"


def package_path(record: CampaignRecord, name: str) -> Path:
    return record.dir / "packages" / name


def received(c: Collaborators, record: CampaignRecord) -> str:
    """The inventory (D11) read, the campaign verified against it (no downgrade, every ECU tells
    its version), the image of each package chosen; a campaign known already is a duplicate."""
    if record.campaign_id is None:
        record.campaign_id = c.campaigns.identify(record)
    inventory = c.gateway.inventory()  # TryLater when unreachable
    _inventory_evidence(c, record, inventory)
    installed = {e["ecu"]: e["software_version"] for e in inventory if e.get("software_version")}
    try:
        campaign = c.campaigns.arrived(record, installed, c.ecus)
    except CampaignRejected as exc:
        record.campaign_id = exc.campaign_id
        c.reject("campaign", exc.reason, str(exc), record.key, exc.campaign_id)
        raise CampaignFailure("verify", exc.reason, str(exc)) from None
    loose = loosened(c.tbox.preconditions, campaign.preconditions or {})
    if loose:  # the vehicle's own preconditions are a floor no signature can lower
        why = "preconditions may be tightened, never loosened: " + "; ".join(f"{k}: {v}" for k, v in sorted(loose.items()))
        record.campaign_id = campaign.campaign_id
        c.reject("campaign", "malformed", why, record.key, campaign.campaign_id)
        raise CampaignFailure("verify", "malformed", why)
    if c.retired(campaign.campaign_id) or any(r.campaign_id == campaign.campaign_id and r.key != record.key
                                              for r in c.records()):
        c.reject("campaign", "duplicate", f"campaign {campaign.campaign_id} is already known", record.key, campaign.campaign_id)
        record.outcome = "duplicate"
        return "reported"
    rxswin = c.gateway.rxswin()  # TryLater when unreachable
    wrong = mismatch(campaign.rxswin, rxswin) if campaign.rxswin and rxswin is not None else None
    if wrong is not None:  # the gateway refuses it too: nothing is downloaded for it
        record.campaign_id = campaign.campaign_id
        c.reject("campaign", "rxswin", wrong, record.key, campaign.campaign_id)
        raise CampaignFailure("verify", "rxswin", wrong)
    record.campaign_id = campaign.campaign_id
    for p in campaign.packages:
        entry = record.packages.setdefault(p.name, PackageEntry())
        entry.ecu, entry.version = p.ecu, p.version
    source = source_of(record)
    c.images.choose(record, campaign, inventory, offline=source.media is not None)
    record.save()
    c.cloud.report("inventory", {"campaign_id": campaign.campaign_id, "ecus": inventory,
                                 **({"rxswin": rxswin} if rxswin is not None else {})},
                   msg_id=f"{campaign.campaign_id}.inventory")
    origin = source.origin()
    if origin is not None:  # imported from removable media: the cloud hears it when the vehicle is next online
        c.cloud.report("events", {"event": "imported", "campaign_id": campaign.campaign_id, **origin},
                       msg_id=f"{campaign.campaign_id}.imported")
    return "verified"


def _inventory_evidence(c: Collaborators, record: CampaignRecord, inventory: list[dict[str, Any]]) -> None:
    """The gateway's trace of each ECU whose identification it could not read completely, kept
    in ``link/`` as ``inventory-<ecu>``: what explains a campaign refused for an unknown version."""
    for entry in inventory:
        ecu, trace_file = entry.get("ecu"), entry.get("trace_file")
        if not entry.get("errors") or not isinstance(trace_file, str) or not isinstance(ecu, str) or not is_name(ecu):
            continue
        try:
            trace = c.gateway.read_file(trace_file)
            result = json.loads(c.gateway.read_file(trace_file.replace(".trace.jsonl", ".result.json")))
        except (TryLater, ValueError) as exc:
            log.warning("the inventory trace of %s is not available: %s", ecu, exc)
            continue
        if not isinstance(result, dict):
            continue
        name = f"inventory-{ecu}"
        atomic_write_bytes(record.dir / "link" / f"{name}.link.trace.jsonl", trace)
        atomic_write_json(record.dir / "link" / f"{name}.link.result.json",
                          {**result, "name": name, "trace_file": f"{name}.link.trace.jsonl"})


def downloading(c: Collaborators, record: CampaignRecord) -> str:
    """Each package not downloaded yet: fetched (resumed with HTTP ranges after a break), or taken
    from the removable media it came on; checked against the signed size and digest."""
    campaign = c.campaign(record)
    media = source_of(record).media
    if media is None:
        _room_for(c, record, campaign)
    for p in campaign.packages:
        entry = record.packages.setdefault(p.name, PackageEntry(p.ecu, p.version))
        if entry.downloaded:
            continue
        name, url, size, sha256 = file_for(p, entry)
        progress = progress_reporter(c, campaign.campaign_id, "download", package=name)
        try:
            if media is not None:  # an offline campaign: the packages came on the media
                info = take_verified(media / name, package_path(record, name), size, sha256, progress=progress)
            else:
                info = c.fetch(url, package_path(record, name), size, sha256, progress=progress, should_stop=c.stop.is_set)
        except TryLater:
            raise  # the network: back off and resume the download (HTTP ranges)
        except VotaError as exc:
            raise CampaignFailure("download", "package_refused", str(exc), package=name) from None
        entry.downloaded, entry.resumed_from = True, info.resumed_from
        record.save()
        log.info("downloaded %s (%d bytes, resumed from %d)", name, size, info.resumed_from)
    return "downloaded"


def _room_for(c: Collaborators, record: CampaignRecord, campaign: Campaign) -> None:
    """Before a byte is downloaded: the packages still to come fit on the TBOX's storage with
    ``tbox.min_free_mib`` to spare, else the campaign ends with reason ``storage`` at once,
    instead of failing halfway on a full disk."""
    need = 0
    for p in campaign.packages:
        entry = record.packages.get(p.name)
        if entry is not None and entry.downloaded:
            continue
        name, _, size, _ = file_for(p, entry or PackageEntry(p.ecu, p.version))
        part = package_path(record, name + ".part")
        need += max(0, size - (part.stat().st_size if part.exists() else 0))
    reserve = c.tbox.min_free_mib << 20
    free = free_bytes(record.dir)
    if need + reserve > free:
        raise CampaignFailure("download", "storage", f"the packages need {_mib(need)} MiB and {c.tbox.min_free_mib} MiB "
                                                     f"must stay free on the TBOX, {_mib(free)} MiB are free")


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f}"


def deploying(c: Collaborators, record: CampaignRecord, start_install: Callable[[CampaignRecord, Campaign], None]) -> str | None:
    """Each package to the gateway, in install order (D1, D3, D4); a deploy cut off by a gateway
    restart is resumed (TryLater), a failed one ends the campaign. Pipelined: the install starts
    first (``start_install``) and each ECU is flashed once its package is on the gateway."""
    campaign = c.campaign(record)
    out = record.dir / "deploy"
    jobs = [(p.ecu, file_for(p, record.packages[p.name])[2], p.order) for p in campaign.packages]  # bytes on the bus
    c.rates.report_estimate(record, campaign, jobs, c.pipelined(record, campaign))  # before the install starts
    if c.pipelined(record, campaign) and not record.install_started:
        start_install(record, campaign)
    for p in sorted(campaign.packages, key=lambda p: p.order):  # install order: what is flashed first comes first
        entry = record.packages[p.name]
        if entry.deploy == "success":
            continue
        resume = entry.deploy_started
        entry.deploy_started = True
        record.save()
        boot = c.gateway.boot_id()
        name, _, _, sha256 = file_for(p, entry)
        result = c.gateway.deploy(name, package_path(record, name), sha256, out, resume=resume,
                                  progress=progress_reporter(c, campaign.campaign_id, "deploy", package=name))
        if result.reason == "cancelled":
            return None  # SIGTERM: checkpointed; the deploy resumes after restart
        if result.result != "success" and result.nrc is None and _restarted(c, boot):
            entry.deploy_interruptions += 1
            record.save()
            c.reports.deploy_interrupted(record, result, out, entry.deploy_interruptions)
            raise TryLater(f"{name}: the gateway restarted during its deploy ({result.failed_step}: {result.reason})")
        entry.deploy = result.result
        record.save()
        c.reports.stage(record, "deploy", name, result.to_json(), out / f"{name}.deploy.trace.jsonl", {"package": name})
        if result.result != "success":  # D4: a failed deploy ends the campaign here
            raise CampaignFailure("deploy", "deploy_failed", f"{name}: {result.failed_step}: {result.reason}",
                                  package=name, packet=result.failed_packet)
    return "deployed"


def _restarted(c: Collaborators, boot: bytes) -> bool:
    """After a deploy broke off without an answer: did the gateway restart under it? (A gateway
    that does not answer yet is taken as restarting: retried, within the retry budget.)"""
    try:
        return c.gateway.boot_id() != boot
    except TryLater:
        return True
