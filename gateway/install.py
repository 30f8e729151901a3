"""How the gateway installs a campaign: install-order groups one after another (the ECUs of a
group in parallel across segments, by turns within one), and either

- ``per_ecu``: each ECU flashed and reset onto its new image on its own, as it finishes; a
  failed group ends the install (later groups may depend on it), or
- ``atomic``: two phases, so that the vehicle ends on the whole new set or the whole old one.
  Stage: every ECU gets its image into its inactive bank, checked and consistent, and is not
  switched to it. If any ECU fails to stage, every staged image is discarded. Activate: in
  install order, each ECU is told to run its staged image and reset, and what it runs is read
  back; if one fails, those already activated are rolled back in reverse order (and checked
  again) and the rest discarded. Commit: every ECU confirms its new image. An ECU with a single
  flash bank cannot be staged: it is flashed in place after every other ECU was activated (if
  it fails, the others are rolled back; it cannot be), and the install is not fully revertible.

Each ECU's result says how far it got (``phase``: staged, activated, committed, discarded,
rolled_back); only the ECU that failed carries ``result: failed``.

Everything is journaled (gateway/journal.py) before it is done. ``install(..., resume=True)``
goes on from the journal after the gateway was killed: each ECU is asked what it runs and holds
staged, an ECU found staged with this image is not flashed again, one interrupted in its
programming sequence is flashed again from the erase, activation goes on (or rollback, discard
and commit are finished, each asked again: they are idempotent on the ECU). The trace of the
interrupted piece of work is kept as ``<ecu>.<work>.interrupted-<attempt>.trace.jsonl`` and
named in that ECU's result, and the summary lists the interruptions.

The pieces: ``gateway/install_run.py`` (one install's state, its flashing and actions),
``gateway/install_phases.py`` (the phases), ``gateway/install_gate.py`` (the preconditions).

Preconditions (``InstallPlan.gate``, from the manifest the TBOX sends): the vehicle's state is
read from the ECU that reports it (gateway/vehicle_state.py) before each install-order group and
every ``recheck_s`` while the ECUs stage, whenever that ECU is free (while it or its segment is
being flashed it cannot answer: the check waits until it can). A condition that fails while
staging cancels the flash under way and discards everything staged: nothing is activated, and
the summary's ``preconditions`` says why (the TBOX waits for them again). Before the first
activation the install waits, staged, while they do not hold (``waiting`` is told, and the
gateway reports status 0x05), until they do or the campaign's install window ends (then
everything staged is discarded). One that fails between activations turns the install back as a
failed activation does: the ECUs activated are rolled back, the rest discarded. Without
``atomic`` activation the check is made before each install-order group, the first one waiting.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from agent.adapters.storage import storage_fault
from agent.core.config import VehicleConfig
from gateway.install_phases import atomic, per_ecu
from gateway.install_run import InstallInterrupted, InstallPorts, InstallRun, trace_name
from gateway.inventory import collect_versions
from gateway.jobs import FlashResult
from gateway.journal import InstallJournal
from gateway.plan import InstallPlan

__all__ = ["InstallPlan", "InstallPorts", "InstallInterrupted", "install"]

log = logging.getLogger(__name__)


def install(config: VehicleConfig, plan: InstallPlan, out: Path, ports: InstallPorts,
            resume: bool = False) -> tuple[bool, list[FlashResult]]:
    """(everything installed, one result per job in the campaign's order); writes summary.json with
    what every ECU of the campaign runs at the end (``final_versions``). ``resume``: go on from the
    journal in ``out`` (a gateway restarted in the middle of this install)."""
    out.mkdir(parents=True, exist_ok=True)
    journal = InstallJournal.load(out) if resume else None
    resumed = journal is not None
    if journal is None:
        journal = InstallJournal.create(out, plan.campaign_id, plan.activation, [job.ecu for _, job in plan.jobs])
    else:
        _keep_interrupted(out, journal)
    run = InstallRun(config, plan, out, ports, journal, resumed, journal.results() if resumed else {})
    if journal.phase == "done":
        ok = journal.doc.get("outcome") == "success"
        rxswin = _rxswin(run, ok)
    else:
        ok = _phases(run)
        if run.stop.is_set():
            raise InstallInterrupted(f"install {plan.campaign_id} stopped in its {journal.phase} phase")
        rxswin = _rxswin(run, ok)  # with the commit: before the journal says done
        run.guarded(lambda: journal.finish(ok))
    run.not_started([job for _, job in plan.jobs], "not reached")  # a kill before its result was journaled
    ordered = [_with_notes(run.results[job.ecu], journal) for _, job in plan.jobs]
    final = {e["ecu"]: {"software_version": e.get("software_version"), "image_sha256": e.get("image_sha256")}
             for e in collect_versions(config, [job.ecu for _, job in plan.jobs], buses=ports.buses)}  # read back, not assumed
    single = [job.ecu for _, job in plan.jobs if config.ecu(job.ecu).banks == 1]
    ports.keep(out / "summary.json", {"schema": "vota-flash-summary/1", "campaign_id": plan.campaign_id,
                                             "activation": plan.activation, "results": [r.to_json() for r in ordered],
                                             "final_versions": final, "interruptions": journal.interruptions,
                                             "revertible": plan.activation == "atomic" and not single,
                                             "single_bank": single, "preconditions": journal.held,
                                             "cancelled": run.cancelled, "rxswin": rxswin}, "the install summary")
    return ok, ordered


def _rxswin(run: InstallRun, ok: bool) -> dict[str, Any] | None:
    """The vehicle's RXSWIN changed with a successful install (gateway/rxswin.py); its writing
    waits for the storage (every ECU committed: there is no going back), or for the gateway's
    stop (then the resumed install writes it)."""
    while True:
        try:
            return run.ports.rxswin(ok)
        except OSError as exc:
            log.error("install %s: the RXSWIN set cannot be written (%s): trying again", run.plan.campaign_id,
                      storage_fault(exc) or exc)
            if run.stop.wait(1.0):
                raise InstallInterrupted(f"install {run.plan.campaign_id} stopped before its RXSWIN was written") from None


def _phases(run: InstallRun) -> bool:
    """The install's phases; when a write it depends on fails (the storage full, read-only,
    failing), the install goes back from where it is, as for a cancel, journaling what it can."""
    go = atomic if run.plan.activation == "atomic" else per_ecu
    try:
        return go(run)
    except OSError as exc:
        fault = storage_fault(exc)
        if fault is None or run.stop.is_set():
            raise
        run.storage_failed(fault)
        return go(run) and False


def _keep_interrupted(out: Path, journal: InstallJournal) -> None:
    """A resumed install: note where it stopped; keep the trace of the work that was cut off."""
    note = journal.resumed()
    attempt = note["attempt"]
    for ecu, entry in journal.doc["ecus"].items():
        doing, step = entry.get("doing"), entry.get("step")
        if not doing:
            continue
        source = out / trace_name(ecu, doing)
        kept = f"{ecu}.{doing}.interrupted-{attempt}.trace.jsonl"
        if source.exists():
            source.replace(out / kept)
        journal.note(ecu, {"action": "interrupted", "id": f"interrupted-{attempt}", "during": doing, "step": step,
                           "result": "interrupted", "reason": f"the gateway stopped during {doing} at {step}",
                           "trace_file": kept if (out / kept).exists() else None})


def _with_notes(result: FlashResult, journal: InstallJournal) -> FlashResult:
    notes = journal.notes(result.ecu)
    return dataclasses.replace(result, actions=[*notes, *result.actions]) if notes else result
