"""One install as it runs (``gateway/install.py`` says what it does): its plan, what it reaches
out through (``InstallPorts``), its results so far and its journal, and the work it does on the
ECUs: flashing (whole, or staging only) and the activation-phase actions, each journaled before
it is done."""

from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from agent.adapters.storage import atomic_write_json, best_effort, storage_fault
from agent.adapters.trace_files import write_trace
from agent.adapters.uds_client import client_fault_counter
from agent.core.config import VehicleConfig
from agent.core.faults import FaultSpec
from agent.core.trace import TraceRecorder
from agent.errors import VotaError
from gateway.activation import ActionResult, EcuAction
from gateway.buses import Buses
from gateway.inventory import EcuImages, read_images
from gateway.jobs import FlashHooks, FlashJob, FlashResult, Progress
from gateway.journal import InstallJournal
from gateway.orchestrator import FlashRun, flash_all
from gateway.plan import InstallPlan

log = logging.getLogger(__name__)

__all__ = ["InstallInterrupted", "InstallPorts", "InstallRun", "trace_name", "PHASE_OF"]

PHASE_OF = {"activate": "activated", "rollback": "rolled_back", "discard": "discarded", "commit": "committed"}


class InstallInterrupted(VotaError):
    """The gateway is stopping: the install ends where it is, its journal as it was before the
    step that was cut off, and goes on at the next start."""


@dataclass(frozen=True)
class InstallPorts:
    """What an install reaches out through: the segments and ECU locks, the gateway's stop, who
    hears of its progress, the client faults injected (benches, tests); for a pipelined install
    the package of a job once it arrived (``gateway/arrivals.py``); the vehicle's state read from an
    ECU (``gateway/vehicle_state.py``: None while that ECU is busy), and who is told when the
    install waits for it (the check) and goes on (None); ``cancel``: set when the TBOX cancelled
    the campaign (``cancelled`` says why): the install goes back as it does when an ECU fails."""

    buses: Buses
    stop: threading.Event
    progress: Progress | None = None
    faults: tuple[FaultSpec, ...] = ()
    ready: Callable[[FlashJob], FlashJob] | None = None
    signals: Callable[[str, float], dict[str, Any] | None] | None = None
    waiting: Callable[[dict[str, Any] | None], None] | None = None
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)
    cancelled: Callable[[], str] = lambda: "cancelled by the TBOX"
    storage_failed: Callable[[str], None] = lambda why: None  # told when the install goes back for the storage
    keep: Callable[[Path, Any, str], None] = lambda path, doc, what: keep_now(path, doc, what)  # a file the TBOX reads
    # the vehicle's RXSWIN set at the install's end, changed when it succeeded (gateway/rxswin.py): {before, after}
    rxswin: Callable[[bool], dict[str, Any] | None] = lambda ok: None


def keep_now(path: Path, doc: Any, what: str) -> None:
    best_effort(lambda: atomic_write_json(path, doc), what)


def trace_name(ecu: str, doing: str) -> str:
    return f"{ecu}.trace.jsonl" if doing in ("stage", "flash") else f"{ecu}.{doing}.trace.jsonl"


@dataclass
class InstallRun:
    """One install (first run or resumed): its inputs, its results so far, its journal."""

    config: VehicleConfig
    plan: InstallPlan
    out: Path
    ports: InstallPorts
    journal: InstallJournal
    resumed: bool
    results: dict[str, FlashResult]

    def __post_init__(self) -> None:
        self.action_faults = client_fault_counter(self.ports.faults, "activate")  # across this install's actions

    @property
    def stop(self) -> threading.Event:
        return self.ports.stop

    storage: str | None = None  # the gateway's storage failed: the install goes back

    @property
    def cancelled(self) -> str | None:
        """Why the install goes back, when the TBOX cancelled it or the storage failed."""
        if self.storage is not None:
            return self.storage
        return self.ports.cancelled() if self.ports.cancel.is_set() else None

    def storage_failed(self, fault: str) -> None:
        """A write the install depends on failed: it goes back (as if cancelled), journaling what it can."""
        if self.storage is None:
            log.error("install %s: the gateway's storage failed (%s): it goes back", self.plan.campaign_id, fault)
            self.storage = f"storage: {fault}"
            self.journal.tolerant = True
            self.ports.storage_failed(self.storage)
            self.ports.cancel.set()

    def guarded(self, write: Callable[[], object]) -> None:
        """A journal write from a flash's hooks: a storage fault turns the install back instead of
        ending the flash's thread."""
        try:
            write()
        except OSError as exc:
            fault = storage_fault(exc)
            if fault is None:
                raise
            self.storage_failed(fault)

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
        self.guarded(lambda: self.journal.record(result))

    def not_started(self, jobs: list[FlashJob], why: str) -> None:
        """A result for each of ``jobs`` that has none yet: not started, and why."""
        for job in jobs:
            self.results.setdefault(job.ecu, FlashResult.of(job, failed_step="not_started", reason=why))

    def images(self, ecu: str) -> EcuImages:
        return read_images(self.config, self.ports.buses, ecu)

    def journaling(self, doing: str) -> FlashHooks:
        """Hooks that journal each step of ``doing`` with the trace so far (kept if the gateway dies)."""

        def step(ecu: str, step: str, recorder: TraceRecorder) -> None:
            self.guarded(lambda: self.journal.step(ecu, doing, step))
            best_effort(lambda: write_trace(self.out / trace_name(ecu, doing), recorder), f"{ecu}: its {doing} trace")

        def result(r: FlashResult) -> None:
            phase = ("staged" if doing == "stage" else "committed") if r.result == "success" else None
            self.set(dataclasses.replace(r, phase=phase))

        return FlashHooks(step, result, self.ports.ready)

    def flash_whole(self, jobs: list[FlashJob]) -> None:
        """The whole sequence, reset included (per_ecu, single-bank ECUs); after a restart an ECU
        found running its new image is not flashed again."""
        todo = []
        for job in jobs:
            # a delta cannot apply to the image it makes: an ECU already running it (a second round
            # after another ECU refused its delta) is done
            if (self.resumed or job.delta is not None) and self.images(job.ecu).runs(job.version, job.on_ecu_sha256):
                self.set(FlashResult.of(job, "success", version_after=job.version, phase="committed",
                                        reason="found running this image when the install "
                                               + ("resumed" if self.resumed else "started")))
            else:
                todo.append(job)
        self.flash(todo, "flash")

    def flash(self, jobs: list[FlashJob], doing: str, cancel: threading.Event | None = None) -> None:
        """Flash (``doing`` flash) or stage ``jobs``; ``cancel``: what stops it (the gateway's stop by default)."""
        if jobs:
            p = self.ports
            flash_all(self.config, jobs, self.out, FlashRun(p.progress, cancel or p.stop, p.faults, self.journaling(doing),
                                                            summary=False), p.buses)

    def act(self, ecu: str, action: str, expect: tuple[str, str | None] | None) -> ActionResult:
        """Run one activation-phase action on an ECU, journaled, and note it in the ECU's result."""
        why = None if action in ("activate", "commit") else self.journal.why
        hooks = self.journaling(action)
        with self.ports.buses.ecu(ecu, action) as segment:
            done = EcuAction(segment, self.config.ecu(ecu), self.config.gateway, action, expect=expect, stop=self.stop,
                             on_step=hooks.step, fault_counter=self.action_faults).run(self.out)
        r = self.results[ecu]
        phase = PHASE_OF[action]
        if done.result != "success":
            if action == "rollback" and done.nrc == 0x22:  # nothing to go back to: it never ran the new image
                self.set(dataclasses.replace(r, phase="rolled_back" if r.phase == "activated" else r.phase))
                return done
            phase = f"{action}_failed"
        note = {"action": action, "result": done.result, "reason": done.reason or why, "trace_file": done.trace_file}
        r = dataclasses.replace(r, phase=r.phase if action == "activate" else phase, actions=[*r.actions, note],
                                version_after=done.version_after or r.version_after)
        if done.result != "success" and action != "activate" and r.result == "success":  # its first failure
            r = dataclasses.replace(r, result="failed", failed_step=f"{action}: {done.failed_step}", reason=done.reason,
                                    nrc=done.nrc)
        self.set(r)
        return done
