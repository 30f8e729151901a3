"""Flashing several ECUs: ECUs on different segments in parallel, ECUs on one segment one
after another; each ECU gets its flash result (D3: failed at the first negative or missing
response, with the step) and its header-only flash interaction trace (D2).

Each segment's jobs go to one ``SegmentFlasher``: ``InThread`` runs ``EcuFlasher`` in a thread of
this process, holding each ECU while it flashes it; ``InProcess`` lends the whole segment to a
worker process (``gateway/segment_worker.py``), so that segments flashed at the same time do not
share one interpreter lock. ``gateway.segment_workers`` chooses (``auto``: processes when more
than one segment flashes).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from agent.adapters.storage import atomic_write_json, atomic_write_text, best_effort
from agent.adapters.uds_sequence import iso_time
from agent.core.config import VehicleConfig
from agent.core.faults import FaultSpec
from agent.core.trace import TraceRecorder, parse_trace
from agent.errors import FlashError, UsageError
from gateway.buses import Buses, TesterPresentKeeper
from gateway.flash import EcuFlasher, flash_header
from gateway.jobs import FlashHooks, FlashJob, FlashResult, Progress
from gateway.segment_worker import SegmentWorker

__all__ = ["FlashRun", "SegmentFlasher", "InThread", "InProcess", "flash_all", "unfinished"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FlashRun:
    """How one flash of several ECUs runs: who hears of its progress, what stops it (setting
    ``stop``, or an interrupt in the calling thread, cancels at the next request: the ECUs being
    flashed get a ``failed`` result with the reason ``cancelled``), the client faults injected,
    what an install journals (``hooks``), and whether it writes its own ``summary.json``."""

    progress: Progress | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    faults: tuple[FaultSpec, ...] = ()
    hooks: FlashHooks = FlashHooks()
    summary: bool = True


def unfinished(config: VehicleConfig, job: FlashJob, step: str, reason: str, trace: str | None = None) -> tuple[FlashResult, str]:
    """The result and trace of a job that did not end on its own: its package never came (no
    trace), or its worker was lost (its trace so far); the reason noted in the trace."""
    if trace:
        parsed = parse_trace(trace)
        recorder = TraceRecorder(parsed.header)
        recorder.exchanges = parsed.exchanges
    else:
        recorder = TraceRecorder(flash_header(config.ecu(job.ecu), job))
    recorder.note(reason)
    result = FlashResult.of(job, failed_step=step, reason=reason, started=iso_time(recorder.header.started))
    return result, recorder.trace("failed").to_text()


class SegmentFlasher(Protocol):
    """Flashes the jobs of one segment, one after another."""

    def flash(self, job: FlashJob) -> tuple[FlashResult, str]:
        """The job's result and its trace text."""

    def close(self) -> None: ...


class InThread:
    """A segment flashed in this process: its bus shared with the gateway's other work, each ECU
    held while it is flashed, functional TesterPresent kept going."""

    def __init__(self, config: VehicleConfig, owner: Buses, name: str, functional: int, run: FlashRun) -> None:
        self.config, self.owner, self.run = config, owner, run
        self.segment = owner.segment(name)
        self.keeper = TesterPresentKeeper(self.segment, functional, config.gateway.tester_present_ms / 1000.0)
        self.keeper.__enter__()

    def flash(self, job: FlashJob) -> tuple[FlashResult, str]:
        run = self.run
        with self.owner.ecu(job.ecu, "flash"):
            flasher = EcuFlasher(self.segment, self.config.ecu(job.ecu), self.config.gateway, job, run.progress, run.stop,
                                 list(run.faults), run.hooks.step)
            self.keeper.recorder = flasher.recorder
            try:
                result = flasher.run()
            finally:
                self.keeper.recorder = None
        return result, flasher.trace_text(result.result)

    def close(self) -> None:
        self.keeper.__exit__(None, None, None)


class InProcess:
    """A segment lent to a worker process for the whole flash; a worker lost on the way (dead or
    stuck: its job fails) is replaced for the next job."""

    def __init__(self, config: VehicleConfig, owner: Buses, name: str, functional: int, run: FlashRun) -> None:
        self.config, self.name, self.functional, self.run = config, name, functional, run
        self.held = contextlib.ExitStack()
        self.held.enter_context(owner.lend(name, "flash"))
        try:  # started now: it gets ready while the first job's package may still be on its way
            self.worker = SegmentWorker(config, name, functional, list(run.faults))
        except BaseException:
            self.held.close()
            raise

    def flash(self, job: FlashJob) -> tuple[FlashResult, str]:
        if not self.worker.usable:
            self.worker.close()
            self.worker = SegmentWorker(self.config, self.name, self.functional, list(self.run.faults))
        return self.worker.flash(job, self.run.progress, self.run.stop, self.run.hooks.step,
                                 lambda j, step, reason, trace: unfinished(self.config, j, step, reason, trace))

    def close(self) -> None:
        try:
            self.worker.close()
        finally:
            self.held.close()


def flash_all(config: VehicleConfig, jobs: list[FlashJob], out_dir: str | Path, run: FlashRun | None = None,
              buses: Buses | None = None) -> list[FlashResult]:
    """Flash every job; write ``<ecu>.trace.jsonl``, ``<ecu>.result.json`` (and ``summary.json``).

    ``buses``: the gateway's segments and ECU locks (each ECU is held while it is flashed);
    without it the flash opens its own and closes them at the end."""
    if len({j.ecu for j in jobs}) != len(jobs):
        raise UsageError("an ECU is named twice in one flash")
    flash = _Flash(config, Path(out_dir), run or FlashRun(), buses if buses is not None else Buses(config))
    try:
        flash.all(jobs)
    finally:
        if buses is None:
            flash.owner.shutdown()
    ordered = [flash.results[j.ecu] for j in jobs if j.ecu in flash.results]
    if flash.run.summary:  # one flash on its own; gateway/install.py writes the campaign's summary itself
        atomic_write_json(flash.out / "summary.json",
                          {"schema": "vota-flash-summary/1", "results": [r.to_json() for r in ordered]})
    return ordered


class _Flash:
    def __init__(self, config: VehicleConfig, out: Path, run: FlashRun, owner: Buses) -> None:
        self.config, self.out, self.run, self.owner = config, out, run, owner
        self.results: dict[str, FlashResult] = {}

    def all(self, jobs: list[FlashJob]) -> None:
        by_segment: dict[str, list[FlashJob]] = {}
        for job in jobs:
            by_segment.setdefault(self.config.ecu(job.ecu).segment, []).append(job)
        mode = self.config.gateway.segment_workers
        kind = InProcess if mode == "process" or (mode == "auto" and len(by_segment) > 1) else InThread
        errors: list[BaseException] = []
        finished = threading.Semaphore(0)

        def segment(name: str, seg_jobs: list[FlashJob]) -> None:
            try:
                functional = self.config.ecu(seg_jobs[0].ecu).functional_id  # TesterPresent goes there
                flasher: SegmentFlasher = kind(self.config, self.owner, name, functional, self.run)
                try:
                    for job in seg_jobs:
                        self._one(flasher, job)
                finally:
                    flasher.close()
            except BaseException as exc:  # noqa: BLE001 - reported after every segment ended
                errors.append(exc)
            finally:
                finished.release()

        threads = [threading.Thread(target=segment, args=item, name=f"flash-{item[0]}") for item in by_segment.items()]
        _run_all(threads, finished, self.run.stop)
        if errors:
            raise errors[0]

    def _one(self, flasher: SegmentFlasher, job: FlashJob) -> None:
        """One job: once its package is here (a pipelined install), flashed; or failed at
        ``package_arrival`` when it never came."""
        if job.awaited is not None:
            try:
                if self.run.hooks.ready is None:
                    raise FlashError("package_arrival", "the package was not deployed")
                if self.run.progress:
                    self.run.progress(job.ecu, "package_arrival", 0, job.size)
                job = self.run.hooks.ready(job)
            except FlashError as exc:
                log.warning("%s: %s", job.ecu, exc.reason)
                self._record(job, *unfinished(self.config, job, exc.step, exc.reason))
                return
        self._record(job, *flasher.flash(job))

    def _record(self, job: FlashJob, result: FlashResult, trace: str) -> None:
        trace_path = self.out / f"{job.ecu}.trace.jsonl"
        best_effort(lambda: atomic_write_text(trace_path, trace), f"{job.ecu}: its flash trace")  # evidence: a full
        result.trace_bytes = len(trace.encode())  # disk does not turn the flash's result into another one
        result.trace_file = trace_path.name
        result.trace_fraction = round(result.trace_bytes / max(1, job.size), 5)
        best_effort(lambda: atomic_write_json(self.out / f"{job.ecu}.result.json", result.to_json()), f"{job.ecu}: its result")
        self.results[job.ecu] = result
        if self.run.hooks.result:
            self.run.hooks.result(result)
        if self.run.progress:
            self.run.progress(job.ecu, "done" if result.result == "success" else "failed", result.bytes_transferred, job.size)


def _run_all(threads: list[threading.Thread], finished: threading.Semaphore, stop: threading.Event) -> None:
    for t in threads:
        t.start()
    # Wait on a semaphore, not Thread.join: an interrupt inside join() can leave the
    # thread looking finished while it still writes its results.
    pending = len(threads)
    try:
        while pending:
            if finished.acquire(timeout=0.2):
                pending -= 1
    except BaseException:
        stop.set()
        while pending:
            finished.acquire()
            pending -= 1
        raise
    for t in threads:
        t.join()
