"""The campaign states around the install (the graph heads ``tbox/engine.py``): the manifest to
the gateway, waiting for the owner and the vehicle, the install followed to its end, and the
campaign finished: results, link failures and the in-vehicle diagnosis reported."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import time
from typing import Any

from agent.adapters.storage import atomic_write_bytes
from agent.core.campaign import Campaign
from agent.errors import TryLater, VotaError
from agent.protocol.link import InstallJob, InstallManifest, InstallStatus, encode_manifest
from tbox.campaign_source import source_of
from tbox.campaign_state import CampaignRecord
from tbox.cancel import cancel_install, deliver_pending
from tbox.engine import CampaignFailure
from tbox.states import Collaborators, ecu_progress_reporter, progress_reporter

__all__ = ["deployed", "awaiting_install", "installing", "start_install", "finished"]

log = logging.getLogger(__name__)


def deployed(c: Collaborators, record: CampaignRecord) -> str:
    campaign = c.campaign(record)
    # sent now, unless it went before the packages (pipelined) or goes when the install starts
    # (with preconditions: it carries the install window, known then)
    if not (c.pipelined(record, campaign) and record.install_started) and not c.window.enabled:
        _send_manifest(c, record, campaign, arriving=False)
    return "awaiting_install"


def awaiting_install(c: Collaborators, record: CampaignRecord) -> str | None:
    campaign = c.campaign(record)
    if campaign.install == "immediate" or record.confirmed:
        return "installing" if c.window.holds(record, campaign) else None
    return None  # wait for the confirm command


def _send_manifest(c: Collaborators, record: CampaignRecord, campaign: Campaign, arriving: bool) -> None:
    """The install manifest to the gateway: the jobs, and the signed documents it verifies them against."""
    proof = source_of(record).proof()  # what the gateway verifies the install against (gateway/verify.py)
    chain = c.key_chain()
    if chain:  # the key lists taken since the configuration's: the gateway follows them
        proof["keys"] = [base64.b64encode(k).decode() for k in chain]
    jobs = tuple(InstallJob(p.ecu, p.name, p.version, p.order, delta=p.delta.name if p.delta is not None
                            and record.packages[p.name].image == "delta" else None)
                 for p in campaign.packages)
    # with preconditions, checked again by the gateway while it stages and before each activation
    manifest = InstallManifest(campaign.campaign_id, jobs, campaign.activation, proof, arriving, c.window.gate(record, campaign))
    name = f"install-{campaign.campaign_id}.json"
    path = record.dir / name
    atomic_write_bytes(path, encode_manifest(manifest))
    result = c.gateway.deploy(name, path, hashlib.sha256(path.read_bytes()).hexdigest(), record.dir / "deploy")
    if result.result != "success" and result.nrc in (0x70, 0x72):  # the gateway has no room for it (tbox/ deploy.min_free_mib)
        raise CampaignFailure("deploy", "deploy_failed", f"install manifest: {result.failed_step}: {result.reason}",
                              package=name)
    if result.result != "success":
        raise TryLater(f"install manifest: {result.failed_step}: {result.reason}")


def start_install(c: Collaborators, record: CampaignRecord, pipelined: Campaign | None = None) -> None:
    """The install started on the gateway; a refusal ends the campaign with the gateway's reason.
    ``pipelined``: the campaign whose packages are yet to be deployed (its manifest goes first,
    ``arriving``: each ECU is flashed once its package is on the gateway, gateway/arrivals.py)."""
    cid = record.campaign_id
    assert cid is not None
    deliver_pending(c)  # a failed campaign's install that could not be cancelled then would refuse this one
    if pipelined is not None:
        _send_manifest(c, record, pipelined, arriving=True)
    elif c.window.enabled:  # with the install window, known now
        _send_manifest(c, record, c.campaign(record), arriving=False)
    record.install_started = True  # first: a TBOX killed right after starting it does not start it twice
    record.times.install_began = time.time()
    record.save()
    try:
        c.gateway.start_install(f"install-{cid}.json")
    except TryLater:
        if c.gateway.install_status(cid)[0] != InstallStatus.REFUSED:
            raise
        raise CampaignFailure("install", "install_refused", _refusal(c, cid)) from None


def _refusal(c: Collaborators, cid: str) -> str:
    """Why the gateway refused to install (it keeps the reason in the campaign's install.json)."""
    try:
        return str(json.loads(c.gateway.read_file(f"{cid}/install.json")).get("error") or "refused by the gateway")
    except (TryLater, ValueError, AttributeError):
        return "refused by the gateway (reason not readable)"


def installing(c: Collaborators, record: CampaignRecord) -> str | None:
    """The install followed on the gateway to its end (started here unless it runs already), then
    its results read back and reported; a staging stopped for the vehicle's state waits again, a
    refused delta goes as the full image in a second round."""
    cid = record.campaign_id
    assert cid is not None
    status, _, _ = c.gateway.install_status(cid)
    if status in (InstallStatus.NONE, InstallStatus.REFUSED) or (status == InstallStatus.FAILED and not record.install_started):
        start_install(c, record)
    progress, bytes_per_ecu = progress_reporter(c, cid, "install"), ecu_progress_reporter(c, cid)

    def polling(done: int, total: int) -> bool:  # at every status poll: progress; True when stopping
        progress(done, total)
        if done < total:
            bytes_per_ecu()
        return bool(c.stop.is_set())

    status = c.gateway.wait_install(cid, c.tbox.install_timeout_s, should_stop=polling,
                                    waiting=c.window.gateway_waits(record, c.gateway))
    if c.stop.is_set():
        return None  # checkpointed: after restart the TBOX asks the gateway again
    if not record.install_ended:
        record.install_ended = True  # from here on a restart in this state counts for the loop guard
        record.times.install_ended = time.time()
        record.save()
    try:
        summary = json.loads(c.gateway.read_file(f"{cid}/summary.json"))
        results = list(summary["results"])
    except (ValueError, KeyError, TypeError) as exc:
        raise TryLater(f"{cid}/summary.json from the gateway is not readable ({exc})") from None
    record.versions = summary.get("final_versions") if isinstance(summary.get("final_versions"), dict) else None
    record.interruptions = summary.get("interruptions") or None
    record.revertible = summary.get("revertible") if isinstance(summary.get("revertible"), bool) else None
    record.rxswin = summary.get("rxswin") if isinstance(summary.get("rxswin"), dict) else None
    began, ended = record.times.install_began, record.times.install_ended
    took = ended - began if began is not None and ended is not None else None
    c.rates.learn(results, cid, took if status == InstallStatus.SUCCEEDED else None)
    held = summary.get("preconditions")
    campaign = c.campaign(record)
    if status != InstallStatus.SUCCEEDED and isinstance(held, dict) and held.get("met") is False:
        return c.window.held(record, campaign, results, held, c.reports)
    if status != InstallStatus.SUCCEEDED and c.images.fall_back(record, campaign, results):
        return "downloading"  # the full image for the ECUs that refused their delta, then install again
    failed = c.reports.install_results(record, results)
    if failed or status != InstallStatus.SUCCEEDED:
        raise CampaignFailure("flash", "flash_failed", "; ".join(failed) or "install failed on the gateway")
    record.outcome = "success"
    record.save()
    return "done"


def finished(c: Collaborators, record: CampaignRecord) -> str:
    """The campaign's end, told once: outcome, failure and its cause (D10: diagnosed in the
    vehicle when ``tbox.diagnose``), the versions the ECUs run, the estimate against what it took."""
    cid = record.campaign_id or record.key
    body: dict[str, Any] = {"event": "finished", "campaign_id": record.campaign_id, "outcome": record.outcome or "failed",
                            "failure": record.failure, "versions": record.versions}
    if record.interruptions:
        body["interruptions"] = record.interruptions
    if record.revertible is not None:
        body["revertible"] = record.revertible
    if record.rxswin is not None:
        body["rxswin"] = record.rxswin
    cancelled = cancel_install(c, record)  # a failed campaign's install on the gateway ends too
    if cancelled is not None:
        body["cancel"] = cancelled
    times = record.times
    if times.estimated_install_s is not None:  # told before, against what it took
        body["estimated_install_s"] = times.estimated_install_s
        if times.install_began is not None and times.install_ended is not None:
            body["install_s"] = round(times.install_ended - times.install_began, 1)
    if record.outcome != "success" and record.campaign_id:
        c.reports.link_failures(record)
    if c.tbox.diagnose and record.outcome != "success" and record.campaign_id:
        verdict = _diagnose(record)
        c.cloud.report("results", {"campaign_id": cid, "stage": "diagnosis", "verdict": verdict}, msg_id=f"{cid}.diagnosis")
        body["cause"] = verdict.get("cause")
        if record.failure is not None:
            record.failure["cause"] = verdict.get("cause")
    c.cloud.report("events", body, msg_id=f"{cid}.finished")
    return "reported"


def _diagnose(record: CampaignRecord) -> dict[str, Any]:
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
