"""How the gateway installs a campaign: install-order groups one after another (the ECUs of a
group in parallel across segments, by turns within one), and either

- ``per_ecu``: each ECU flashed and reset onto its new image on its own, as it finishes; a
  failed group ends the install (later groups may depend on it), or
- ``atomic``: two phases, so that the vehicle ends on the whole new set or the whole old one.
  Stage: every ECU gets its image into its inactive bank, checked and consistent, and is not
  switched to it. If any ECU fails to stage, every staged image is discarded. Activate: in
  install order, each ECU is told to run its staged image and reset, and what it runs is read
  back; if one fails, those already activated are rolled back in reverse order (and checked
  again) and the rest discarded. Commit: every ECU confirms its new image.

Each ECU's result says how far it got (``phase``: staged, activated, committed, discarded,
rolled_back); only the ECU that failed carries ``result: failed``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from agent.adapters.storage import atomic_write_json
from agent.core.config import VehicleConfig
from agent.core.faults import FaultSpec
from gateway.activation import ActionResult, EcuAction
from gateway.buses import Buses
from gateway.flash import FlashJob, FlashResult, Progress, flash_all
from gateway.inventory import collect_versions

__all__ = ["InstallPlan", "install"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InstallPlan:
    campaign_id: str
    jobs: tuple[tuple[int, FlashJob], ...]  # (install order, job), in the campaign's order
    activation: str = "per_ecu"

    def groups(self) -> list[list[FlashJob]]:
        orders = sorted({order for order, _ in self.jobs})
        return [[job for order, job in self.jobs if order == o] for o in orders]


def _not_started(job: FlashJob, why: str) -> FlashResult:
    return FlashResult(job.ecu, "failed", job.version, len(job.image), hashlib.sha256(job.image).hexdigest(),
                       failed_step="not_started", reason=why)


def install(config: VehicleConfig, plan: InstallPlan, out: Path, *, buses: Buses, progress: Progress | None = None,
            stop: threading.Event | None = None, faults: list[FaultSpec] | None = None) -> tuple[bool, list[FlashResult]]:
    """(everything installed, one result per job in the campaign's order); writes summary.json with
    what every ECU of the campaign runs at the end (``final_versions``)."""
    stop = stop or threading.Event()
    if plan.activation == "atomic":
        ok, results = _atomic(config, plan, out, buses, progress, stop, faults)
    else:
        ok, results = _per_ecu(config, plan, out, buses, progress, stop, faults)
    ordered = [results[job.ecu] for _, job in plan.jobs]
    final = {e["ecu"]: {"software_version": e.get("software_version"), "image_sha256": e.get("image_sha256")}
             for e in collect_versions(config, [job.ecu for _, job in plan.jobs], buses=buses)}  # read back, not assumed
    atomic_write_json(out / "summary.json", {"schema": "vota-flash-summary/1", "campaign_id": plan.campaign_id,
                                             "activation": plan.activation, "results": [r.to_json() for r in ordered],
                                             "final_versions": final})
    return ok, ordered


def _per_ecu(config: VehicleConfig, plan: InstallPlan, out: Path, buses: Buses, progress: Progress | None,
             stop: threading.Event, faults: list[FaultSpec] | None) -> tuple[bool, dict[str, FlashResult]]:
    results: dict[str, FlashResult] = {}
    for group in plan.groups():
        if any(r.result != "success" for r in results.values()):
            results.update({j.ecu: _not_started(j, "an earlier install group failed") for j in group})
            continue
        for r in flash_all(config, group, out, progress=progress, stop=stop, faults=faults, buses=buses, summary=False):
            results[r.ecu] = dataclasses.replace(r, phase="committed" if r.result == "success" else None)
    return all(r.result == "success" for r in results.values()), results


def _atomic(config: VehicleConfig, plan: InstallPlan, out: Path, buses: Buses, progress: Progress | None,
            stop: threading.Event, faults: list[FaultSpec] | None) -> tuple[bool, dict[str, FlashResult]]:
    results: dict[str, FlashResult] = {}
    jobs = {job.ecu: job for _, job in plan.jobs}
    # ---- stage
    for group in plan.groups():
        if any(r.result != "success" for r in results.values()):
            results.update({j.ecu: _not_started(j, "an ECU failed to stage") for j in group})
            continue
        staging = [dataclasses.replace(j, stage_only=True) for j in group]
        for r in flash_all(config, staging, out, progress=progress, stop=stop, faults=faults, buses=buses, summary=False):
            results[r.ecu] = dataclasses.replace(r, phase="staged" if r.result == "success" else None)
    staged = [e for e in jobs if results[e].phase == "staged"]
    if len(staged) != len(jobs):
        culprit = next(r for r in results.values() if r.result != "success" and r.failed_step != "not_started")
        why = f"{culprit.ecu} failed to stage at {culprit.failed_step}"
        touched = [e for e in jobs if results[e].failed_step != "not_started"]
        for ecu in reversed(touched):  # the culprit too: no half-written image is left behind
            _act(config, buses, results, ecu, "discard", out, why)
        return False, results
    # ---- activate, in install order
    activated: list[str] = []
    for ecu in [job.ecu for _, job in sorted(plan.jobs, key=lambda oj: oj[0])]:
        job = jobs[ecu]
        done = _act(config, buses, results, ecu, "activate", out, None, (job.version, hashlib.sha256(job.image).hexdigest()))
        if done.result == "success":
            results[ecu] = dataclasses.replace(results[ecu], phase="activated", version_after=done.version_after)
            activated.append(ecu)
            continue
        r = results[ecu]
        results[ecu] = dataclasses.replace(r, result="failed", failed_step=f"activate: {done.failed_step}",
                                           reason=done.reason, nrc=done.nrc)
        why = f"{ecu} failed to activate at {done.failed_step}"
        for back in [ecu, *reversed(activated)]:  # the failing one too: it may run its new image on trial
            before = results[back].version_before
            _act(config, buses, results, back, "rollback", out, why, (before, None) if before else None)
        for rest in [e for e in staged if e not in activated and e != ecu]:
            _act(config, buses, results, rest, "discard", out, why)
        _act(config, buses, results, ecu, "discard", out, why)
        return False, results
    # ---- commit
    for ecu in activated:
        _act(config, buses, results, ecu, "commit", out, None)
    return True, results


def _act(config: VehicleConfig, buses: Buses, results: dict[str, FlashResult], ecu: str, action: str, out: Path,
         why: str | None, expect: tuple[str, str | None] | None = None) -> ActionResult:
    """Run one activation-phase action on an ECU and note it in the ECU's result."""
    with buses.ecu(ecu, action) as segment:
        done = EcuAction(segment, config.ecu(ecu), config.gateway, action, expect=expect).run(out)
    r = results[ecu]
    phase = {"activate": "activated", "rollback": "rolled_back", "discard": "discarded", "commit": "committed"}[action]
    if done.result != "success":
        if action == "rollback" and done.nrc == 0x22:
            return done  # nothing to go back to: it never ran the new image
        log.warning("%s: %s failed: %s", ecu, action, done.reason)
        phase = f"{action}_failed"
    note = {"action": action, "result": done.result, "reason": done.reason or why, "trace_file": done.trace_file}
    results[ecu] = dataclasses.replace(r, phase=r.phase if action == "activate" else phase, actions=[*r.actions, note],
                                       version_after=done.version_after or r.version_after)
    return done
