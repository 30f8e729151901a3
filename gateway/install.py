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

import contextlib
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from agent.adapters.storage import atomic_write_json
from agent.adapters.trace_files import write_trace
from agent.core.config import VehicleConfig
from agent.core.faults import FaultSpec
from agent.core.preconditions import Gate
from agent.core.trace import TraceRecorder
from agent.errors import VotaError
from gateway.activation import ActionResult, EcuAction
from gateway.buses import Buses
from gateway.inventory import EcuImages, collect_versions, read_images
from gateway.jobs import FlashHooks, FlashJob, FlashResult, Progress
from gateway.journal import InstallJournal
from gateway.orchestrator import flash_all

__all__ = ["InstallPlan", "InstallInterrupted", "install"]

log = logging.getLogger(__name__)

class InstallInterrupted(VotaError):
    """The gateway is stopping: the install ends where it is, its journal as it was before the
    step that was cut off, and goes on at the next start."""


PHASE_OF = {"activate": "activated", "rollback": "rolled_back", "discard": "discarded", "commit": "committed"}


@dataclass(frozen=True)
class InstallPlan:
    campaign_id: str
    jobs: tuple[tuple[int, FlashJob], ...]  # (install order, job), in the campaign's order
    activation: str = "per_ecu"
    # a pipelined install: waits for a job's package just before its ECU is flashed (gateway/arrivals.py)
    ready: Callable[[FlashJob], FlashJob] | None = None
    gate: Gate | None = None  # the vehicle's state the install needs (checked as the module says)

    def groups(self) -> list[list[FlashJob]]:
        orders = sorted({order for order, _ in self.jobs})
        return [[job for order, job in self.jobs if order == o] for o in orders]

    def in_order(self) -> list[FlashJob]:
        return [job for _, job in sorted(self.jobs, key=lambda oj: oj[0])]


def _sha(job: FlashJob) -> str:
    return job.sha256


def _not_started(job: FlashJob, why: str) -> FlashResult:
    return FlashResult.of(job, failed_step="not_started", reason=why)


@dataclass
class _Install:
    """One install (first run or resumed): its inputs, its results so far, its journal."""

    config: VehicleConfig
    plan: InstallPlan
    out: Path
    buses: Buses
    progress: Progress | None
    stop: threading.Event
    faults: list[FaultSpec] | None
    journal: InstallJournal
    resumed: bool
    results: dict[str, FlashResult]
    # the vehicle's state from an ECU (gateway/vehicle_state.py; None while it is busy), and who is
    # told when the install waits for it (the check) and goes on (None)
    signals: Callable[[str, float], dict[str, Any] | None] | None = None
    waiting: Callable[[dict[str, Any] | None], None] | None = None

    @property
    def jobs(self) -> dict[str, FlashJob]:
        return {job.ecu: job for _, job in self.plan.jobs}

    def single(self, ecu: str) -> bool:
        """A single-bank ECU: flashed in place, last, never staged or rolled back."""
        return self.config.ecu(ecu).banks == 1

    def staging(self) -> list[str]:
        return [e for e in self.jobs if not self.single(e)]

    def set(self, result: FlashResult) -> None:
        if self.stop.is_set():  # what was cut off by the stop is not a result: it is done again on resume
            raise InstallInterrupted(f"install {self.plan.campaign_id} stopped at {result.ecu}")
        self.results[result.ecu] = result
        self.journal.record(result)

    def not_started(self, jobs: list[FlashJob], why: str) -> None:
        """A result for each of ``jobs`` that has none yet: not started, and why."""
        for job in jobs:
            self.results.setdefault(job.ecu, _not_started(job, why))

    def images(self, ecu: str) -> EcuImages:
        return read_images(self.config, self.buses, ecu)

    def journaling(self, doing: str) -> FlashHooks:
        """Hooks that journal each step of ``doing`` with the trace so far (kept if the gateway dies)."""

        def step(ecu: str, step: str, recorder: TraceRecorder) -> None:
            self.journal.step(ecu, doing, step)
            write_trace(self.out / _trace_name(ecu, doing), recorder)

        def result(r: FlashResult) -> None:
            phase = ("staged" if doing == "stage" else "committed") if r.result == "success" else None
            self.set(dataclasses.replace(r, phase=phase))

        return FlashHooks(step, result, self.plan.ready)

    def flash_whole(self, jobs: list[FlashJob]) -> None:
        """The whole sequence, reset included (per_ecu, single-bank ECUs); after a restart an ECU
        found running its new image is not flashed again."""
        todo = []
        for job in jobs:
            # a delta cannot apply to the image it makes: an ECU already running it (a second round
            # after another ECU refused its delta) is done
            if (self.resumed or job.delta is not None) and self.images(job.ecu).runs(job.version, _sha(job)):
                self.set(FlashResult.of(job, "success", version_after=job.version,
                                     phase="committed", reason="found running this image when the install "
                                                               + ("resumed" if self.resumed else "started")))
            else:
                todo.append(job)
        self.flash(todo, "flash")

    def flash(self, jobs: list[FlashJob], doing: str) -> None:
        if jobs:
            with self.watching(doing == "stage") as cancel:
                flash_all(self.config, jobs, self.out, progress=self.progress, stop=cancel, faults=self.faults,
                          buses=self.buses, summary=False, hooks=self.journaling(doing))

    # ---- preconditions ------------------------------------------------------------------
    def check(self, phase: str, wait: float = 0.5) -> dict[str, Any] | None:
        """The preconditions now: a check (``met``, ``unmet``, ``values``, ``phase``, ``at``), or
        None when there are none or the ECU that reports them is busy."""
        gate = self.plan.gate
        if gate is None or self.signals is None:
            return None
        values = self.signals(gate.conditions.ecu or "", wait)
        if values is None:
            return None
        bad = gate.unmet(values)
        return {"phase": phase, "met": not bad, "unmet": bad, "values": values, "at": round(time.time(), 3)}

    def unmet(self, phase: str, wait: float = 0.5) -> dict[str, Any] | None:
        """The check, when the preconditions are known not to hold now."""
        check = self.check(phase, wait)
        return check if check is not None and not check["met"] else None

    @contextlib.contextmanager
    def watching(self, staging: bool) -> Iterator[threading.Event]:
        """The event that cancels a flash: the gateway stopping, and while staging under a gate
        the preconditions failing (checked every ``recheck_s``; the check is journaled)."""
        if not staging or self.plan.gate is None:
            yield self.stop
            return
        cancel, done = threading.Event(), threading.Event()
        every = self.plan.gate.conditions.recheck_s

        def watch() -> None:
            due = time.monotonic() + every
            while not done.wait(0.1):
                if self.stop.is_set():
                    cancel.set()
                    return
                if time.monotonic() < due:
                    continue
                check = self.unmet("stage")
                due = time.monotonic() + every
                if check is not None:
                    log.warning("preconditions no longer hold while staging: %s; staging stops",
                                "; ".join(check["unmet"].values()))
                    self.journal.hold(check)
                    cancel.set()
                    return

        watcher = threading.Thread(target=watch, name="preconditions", daemon=True)
        watcher.start()
        try:
            yield cancel
        finally:
            done.set()
            watcher.join()

    def wait_for_gate(self, phase: str) -> bool:
        """Before the first activation (or the first ECU flashed in place): True once the
        preconditions hold; False when the install window ended first (the check journaled)."""
        gate = self.plan.gate
        if gate is None or self.signals is None:
            return True
        told: dict[str, str] | None = None
        while True:
            check = self.check(phase, wait=5.0)
            if check is not None and check["met"]:
                if told is not None and self.waiting is not None:
                    self.waiting(None)
                    log.info("preconditions hold: the install goes on")
                return True
            if check is not None:
                if time.time() >= gate.until:
                    self.journal.hold(check)
                    return False
                if check["unmet"] != told:
                    told = check["unmet"]
                    log.info("the install waits for its preconditions: %s", "; ".join(told.values()))
                if self.waiting is not None:  # at every check: the waiting install is alive
                    self.waiting(check)
            if self.stop.wait(gate.conditions.recheck_s):
                raise InstallInterrupted(f"install {self.plan.campaign_id} stopped waiting for its preconditions")


def _trace_name(ecu: str, doing: str) -> str:
    return f"{ecu}.trace.jsonl" if doing in ("stage", "flash") else f"{ecu}.{doing}.trace.jsonl"


def install(config: VehicleConfig, plan: InstallPlan, out: Path, *, buses: Buses, progress: Progress | None = None,
            stop: threading.Event | None = None, faults: list[FaultSpec] | None = None, resume: bool = False,
            signals: Callable[[str, float], dict[str, Any] | None] | None = None,
            waiting: Callable[[dict[str, Any] | None], None] | None = None) -> tuple[bool, list[FlashResult]]:
    """(everything installed, one result per job in the campaign's order); writes summary.json with
    what every ECU of the campaign runs at the end (``final_versions``). ``resume``: go on from the
    journal in ``out`` (a gateway restarted in the middle of this install). ``signals(ecu, wait)``
    reads the vehicle's state for ``plan.gate``; ``waiting`` is told when the install waits for it."""
    out.mkdir(parents=True, exist_ok=True)
    journal = InstallJournal.load(out) if resume else None
    resumed = journal is not None
    if journal is None:
        journal = InstallJournal.create(out, plan.campaign_id, plan.activation, [job.ecu for _, job in plan.jobs])
    else:
        _keep_interrupted(out, journal)
    run = _Install(config, plan, out, buses, progress, stop or threading.Event(), faults, journal, resumed,
                   journal.results() if resumed else {}, signals, waiting)
    if journal.phase == "done":
        ok = journal.doc.get("outcome") == "success"
    else:
        ok = _atomic(run) if plan.activation == "atomic" else _per_ecu(run)
        if run.stop.is_set():
            raise InstallInterrupted(f"install {plan.campaign_id} stopped in its {journal.phase} phase")
        journal.finish(ok)
    run.not_started([job for _, job in plan.jobs], "not reached")  # a kill before its result was journaled
    ordered = [_with_notes(run.results[job.ecu], journal) for _, job in plan.jobs]
    final = {e["ecu"]: {"software_version": e.get("software_version"), "image_sha256": e.get("image_sha256")}
             for e in collect_versions(config, [job.ecu for _, job in plan.jobs], buses=buses)}  # read back, not assumed
    single = [job.ecu for _, job in plan.jobs if config.ecu(job.ecu).banks == 1]
    atomic_write_json(out / "summary.json", {"schema": "vota-flash-summary/1", "campaign_id": plan.campaign_id,
                                             "activation": plan.activation, "results": [r.to_json() for r in ordered],
                                             "final_versions": final, "interruptions": journal.interruptions,
                                             "revertible": plan.activation == "atomic" and not single,
                                             "single_bank": single, "preconditions": journal.held})
    return ok, ordered


def _keep_interrupted(out: Path, journal: InstallJournal) -> None:
    """A resumed install: note where it stopped; keep the trace of the work that was cut off."""
    note = journal.resumed()
    attempt = note["attempt"]
    for ecu, entry in journal.doc["ecus"].items():
        doing, step = entry.get("doing"), entry.get("step")
        if not doing:
            continue
        source = out / _trace_name(ecu, doing)
        kept = f"{ecu}.{doing}.interrupted-{attempt}.trace.jsonl"
        if source.exists():
            source.replace(out / kept)
        journal.note(ecu, {"action": "interrupted", "id": f"interrupted-{attempt}", "during": doing, "step": step,
                           "result": "interrupted", "reason": f"the gateway stopped during {doing} at {step}",
                           "trace_file": kept if (out / kept).exists() else None})


def _with_notes(result: FlashResult, journal: InstallJournal) -> FlashResult:
    notes = journal.notes(result.ecu)
    return dataclasses.replace(result, actions=[*notes, *result.actions]) if notes else result


def _per_ecu(run: _Install) -> bool:
    for n, group in enumerate(run.plan.groups()):
        if any(r.result != "success" for r in run.results.values()) or run.journal.held is not None:
            run.not_started(group, "an earlier install group failed" if run.journal.held is None else _held(run))
            continue
        todo = [job for job in group if job.ecu not in run.results]  # not finished before an interruption
        if todo and not _gate(run, first=n == 0 or len(run.results) == 0, phase="flash"):
            run.not_started(group, _held(run))
            continue
        run.flash_whole(todo)
    return all(r.result == "success" for r in run.results.values()) and run.journal.held is None


def _gate(run: _Install, first: bool, phase: str) -> bool:
    """Before a step that changes what a vehicle runs: the first waits for the preconditions (within
    the install window), a later one goes on only if they hold now. False: the check is journaled."""
    if run.plan.gate is None:
        return True
    if first:
        return run.wait_for_gate(phase)
    check = run.unmet(phase, wait=5.0)
    if check is None:
        return True
    log.warning("preconditions no longer hold before %s: %s", phase, "; ".join(check["unmet"].values()))
    run.journal.hold(check)
    return False


def _held(run: _Install) -> str:
    held = run.journal.held or {}
    return "preconditions: " + "; ".join((held.get("unmet") or {}).values())


def _atomic(run: _Install) -> bool:
    if run.journal.phase == "stage":
        _stage(run)
    if run.journal.phase == "activate" and _nothing_activated(run) and not _gate(run, first=True, phase="activate"):
        run.journal.set_phase("discard", _held(run))
    if run.journal.phase == "activate":
        _activate(run)
    if run.journal.phase == "flash_last":
        _flash_last(run)
    if run.journal.phase == "rollback":
        _roll_back(run)
    if run.journal.phase == "discard":
        _discard(run)
        return False
    if run.journal.phase == "commit":
        for job in run.plan.in_order():
            if run.results[job.ecu].phase != "committed" and not run.single(job.ecu):
                _act(run, job.ecu, "commit", None)
        return all(r.phase == "committed" for r in run.results.values())
    return False


def _stage(run: _Install) -> None:
    """Every ECU gets its image staged, group after group; then the journal says activate, or
    (an ECU failed to stage) discard."""
    for group in run.plan.groups():
        group = [j for j in group if not run.single(j.ecu)]
        if any(r.result != "success" for r in run.results.values()):
            run.not_started(group, "an ECU failed to stage")
            continue
        todo = []
        for job in group:
            done = run.results.get(job.ecu)
            if done is not None and done.result != "success":
                continue  # failed before the interruption
            if run.resumed:  # the journal says where it got to; the ECU says what it holds
                images = run.images(job.ecu)
                if images.holds_staged(job.version, _sha(job)):
                    if done is None or done.phase != "staged":
                        run.set(FlashResult.of(job, "success",
                                            version_before=images.version, phase="staged",
                                            reason="found staged when the install resumed"))
                    continue
            elif done is not None:
                continue
            todo.append(dataclasses.replace(job, stage_only=True))
        if todo and run.journal.held is None and _gate(run, first=False, phase="stage"):  # else journaled: it stops
            run.flash(todo, "stage")
        if run.journal.held is not None:
            _stop_staging(run)
            return
    if all(run.results.get(e) is not None and run.results[e].phase == "staged" for e in run.staging()):
        run.journal.set_phase("activate")
        return
    culprit = next(r for r in run.results.values() if r.result != "success" and r.failed_step != "not_started")
    run.not_started([j for j in run.plan.in_order() if run.single(j.ecu)], "an ECU failed to stage")
    run.journal.set_phase("discard", f"{culprit.ecu} failed to stage at {culprit.failed_step}", culprit.ecu)


def _nothing_activated(run: _Install) -> bool:
    """No ECU was told to run its new image yet (after a restart: none is found running it)."""
    if any(r.phase == "activated" for r in run.results.values()):
        return False
    if not run.resumed or run.plan.gate is None:
        return True
    return not any(run.images(j.ecu).runs(j.version, _sha(j)) for j in run.plan.in_order() if not run.single(j.ecu))


def _stop_staging(run: _Install) -> None:
    """The preconditions failed while staging: what was cut off, and what was not reached, say so;
    everything staged is discarded (nothing was activated)."""
    why = _held(run)
    for r in list(run.results.values()):
        if r.result != "success" and r.reason == "cancelled":
            run.set(dataclasses.replace(r, reason=f"staging stopped: {why}"))
    run.not_started([j for j in run.plan.in_order()], why)
    run.journal.set_phase("discard", why)


def _activate(run: _Install) -> None:
    """In install order: each ECU runs its staged image and says so; the first that does not
    turns the install back (journal: rollback)."""
    for job in run.plan.in_order():
        ecu = job.ecu
        if run.single(ecu) or run.results[ecu].phase == "activated":
            continue
        if run.resumed and run.images(ecu).runs(job.version, _sha(job)):  # the reset was done before the kill
            run.set(dataclasses.replace(run.results[ecu], phase="activated", version_after=job.version))
            continue
        if any(r.phase == "activated" for r in run.results.values()) and not _gate(run, first=False, phase="activate"):
            run.journal.set_phase("rollback", _held(run))  # as a failed activation: back to the old set
            return
        done = _act(run, ecu, "activate", (job.version, _sha(job)))
        if done.result == "success":
            run.set(dataclasses.replace(run.results[ecu], phase="activated", version_after=done.version_after))
            continue
        r = run.results[ecu]
        run.set(dataclasses.replace(r, result="failed", failed_step=f"activate: {done.failed_step}",
                                    reason=done.reason, nrc=done.nrc))
        run.journal.set_phase("rollback", f"{ecu} failed to activate at {done.failed_step}", ecu)
        return
    run.journal.set_phase("flash_last" if any(run.single(e) for e in run.jobs) else "commit")


def _flash_last(run: _Install) -> None:
    """The single-bank ECUs, flashed in place once every other ECU runs its new image (on trial):
    if one fails, the others go back (it cannot)."""
    if not _gate(run, first=not any(r.phase == "activated" for r in run.results.values()), phase="flash_last"):
        run.not_started([j for j in run.plan.in_order() if run.single(j.ecu)], _held(run))
        run.journal.set_phase("rollback", _held(run))
        return
    for group in run.plan.groups():
        run.flash_whole([j for j in group if run.single(j.ecu) and (
            j.ecu not in run.results or run.results[j.ecu].failed_step == "not_started")])  # not done before an interruption
        failed = [r for e, r in run.results.items() if run.single(e) and r.result != "success"]
        if failed:
            culprit = failed[0]
            run.not_started([j for j in run.plan.in_order() if run.single(j.ecu)], f"{culprit.ecu} failed")
            run.journal.set_phase("rollback", f"{culprit.ecu} (a single flash bank) failed at {culprit.failed_step}",
                                  culprit.ecu)
            return
    run.journal.set_phase("commit")


def _roll_back(run: _Install) -> None:
    """Back to the old set: the failed ECU and those activated, in reverse order; then discard."""
    order = [job.ecu for job in run.plan.in_order()]
    culprit = run.journal.culprit
    back = [e for e in reversed(order) if run.results[e].phase == "activated" and e != culprit]
    for ecu in [e for e in (culprit,) if e and not run.single(e)] + back:  # the failing one too: it may run its new image on trial
        r = run.results[ecu]
        if r.phase == "rolled_back":
            continue  # done before the interruption
        before = r.version_before
        _act(run, ecu, "rollback", (before, None) if before else None)
    run.journal.set_phase("discard")


def _discard(run: _Install) -> None:
    """Nothing staged is left behind: every ECU this install touched, the culprit last."""
    culprit = run.journal.culprit
    touched = [e for e in run.staging() if e in run.results and run.results[e].failed_step != "not_started"]
    for ecu in [e for e in reversed(touched) if e != culprit] + [e for e in (culprit,) if e in touched]:
        r = run.results[ecu]
        discarded = any(a.get("action") == "discard" and a.get("result") == "success" for a in r.actions)
        if not discarded and (r.phase != "rolled_back" or ecu == culprit):  # a rolled-back ECU holds nothing staged
            _act(run, ecu, "discard", None)


def _act(run: _Install, ecu: str, action: str, expect: tuple[str, str | None] | None) -> ActionResult:
    """Run one activation-phase action on an ECU, journaled, and note it in the ECU's result."""
    why = None if action in ("activate", "commit") else run.journal.why
    hooks = run.journaling(action)
    with run.buses.ecu(ecu, action) as segment:
        done = EcuAction(segment, run.config.ecu(ecu), run.config.gateway, action, expect=expect, stop=run.stop,
                         on_step=hooks.step).run(run.out)
    r = run.results[ecu]
    phase = PHASE_OF[action]
    if done.result != "success":
        if action == "rollback" and done.nrc == 0x22:  # nothing to go back to: it never ran the new image
            run.set(dataclasses.replace(r, phase="rolled_back" if r.phase == "activated" else r.phase))
            return done
        log.warning("%s: %s failed: %s", ecu, action, done.reason)
        phase = f"{action}_failed"
    note = {"action": action, "result": done.result, "reason": done.reason or why, "trace_file": done.trace_file}
    run.set(dataclasses.replace(r, phase=r.phase if action == "activate" else phase, actions=[*r.actions, note],
                                version_after=done.version_after or r.version_after))
    return done
