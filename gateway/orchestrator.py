"""Flashing several ECUs: ECUs on different segments in parallel, ECUs on one segment one
after another; each ECU gets its flash result (D3: failed at the first negative or missing
response, with the step) and its header-only flash interaction trace (D2)."""

from __future__ import annotations

import datetime as _dt
import logging
import threading
from pathlib import Path

from agent.adapters.storage import atomic_write_json, atomic_write_text
from agent.core.config import EcuConfig, VehicleConfig
from agent.core.faults import FaultSpec
from agent.core.trace import TraceRecorder
from agent.errors import FlashError, UsageError
from gateway.buses import Buses, TesterPresentKeeper
from gateway.flash import EcuFlasher, flash_header
from gateway.jobs import FlashHooks, FlashJob, FlashResult, Progress
from gateway.segment_worker import SegmentWorker

__all__ = ["flash_all"]

log = logging.getLogger(__name__)


def not_arrived(ecu: EcuConfig, job: FlashJob, error: FlashError) -> tuple[FlashResult, str]:
    """The result and (empty) trace of a job whose package did not arrive: nothing was sent to the ECU."""
    recorder = TraceRecorder(flash_header(ecu, job))
    recorder.note(error.reason)
    started = _dt.datetime.fromtimestamp(recorder.header.started, _dt.timezone.utc).isoformat(timespec="seconds")
    result = FlashResult.of(job, failed_step=error.step, reason=error.reason, started=started)
    return result, recorder.trace("failed").to_text()


def flash_all(
    config: VehicleConfig,
    jobs: list[FlashJob],
    out_dir: str | Path,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    faults: list[FaultSpec] | None = None,
    buses: Buses | None = None,
    summary: bool = True,
    hooks: FlashHooks | None = None,
) -> list[FlashResult]:
    """Flash every job; write ``<ecu>.trace.jsonl``, ``<ecu>.result.json``, ``summary.json``.

    ``buses``: the gateway's segments and ECU locks (each ECU is held while it is flashed);
    without it the flash opens its own and closes them at the end.

    Setting ``stop`` (or an interrupt in the calling thread) cancels at the next request;
    the ECUs being flashed get a ``failed`` result with the reason ``cancelled``.
    """
    out = Path(out_dir)
    stop = stop or threading.Event()
    by_segment: dict[str, list[FlashJob]] = {}
    for job in jobs:
        ecu = config.ecu(job.ecu)
        by_segment.setdefault(ecu.segment, []).append(job)
    if len({j.ecu for j in jobs}) != len(jobs):
        raise UsageError("an ECU is named twice in one flash")
    results: dict[str, FlashResult] = {}
    own = buses is None
    owner = buses if buses is not None else Buses(config)

    mode = config.gateway.segment_workers
    in_processes = mode == "process" or (mode == "auto" and len(by_segment) > 1)

    def record(job: FlashJob, result: FlashResult, trace: str) -> None:
        trace_path = out / f"{job.ecu}.trace.jsonl"
        atomic_write_text(trace_path, trace)
        result.trace_bytes = len(trace.encode())
        result.trace_file = trace_path.name
        result.trace_fraction = round(result.trace_bytes / max(1, job.size), 5)
        atomic_write_json(out / f"{job.ecu}.result.json", result.to_json())
        results[job.ecu] = result
        if hooks and hooks.result:
            hooks.result(result)
        if progress:
            progress(job.ecu, "done" if result.result == "success" else "failed", result.bytes_transferred, job.size)

    def ready(job: FlashJob) -> FlashJob | tuple[FlashResult, str]:
        """The job once its package is here (a pipelined install), or the result of one that never came."""
        if job.awaited is None:
            return job
        if hooks is None or hooks.ready is None:
            return not_arrived(config.ecu(job.ecu), job, FlashError("package_arrival", "the package was not deployed"))
        if progress:
            progress(job.ecu, "package_arrival", 0, job.size)
        try:
            return hooks.ready(job)
        except FlashError as exc:
            log.warning("%s: %s", job.ecu, exc.reason)
            return not_arrived(config.ecu(job.ecu), job, exc)

    def run_segment(name: str, seg_jobs: list[FlashJob]) -> None:
        functional = config.ecu(seg_jobs[0].ecu).functional_id
        if in_processes:  # this segment's flashing in a process of its own (gateway/segment_worker.py)
            with owner.lend(name, "flash"), \
                    SegmentWorker(config, name, functional, faults, bool(hooks and hooks.step)) as worker:
                for job in seg_jobs:
                    arrived = ready(job)
                    if isinstance(arrived, tuple):
                        record(job, *arrived)
                        continue
                    result, trace = worker.flash(arrived, progress, stop, hooks.step if hooks else None)
                    record(arrived, result, trace)
            return
        segment = owner.segment(name)
        period = config.gateway.tester_present_ms / 1000.0
        with TesterPresentKeeper(segment, functional, period) as keeper:
            for job in seg_jobs:
                arrived = ready(job)
                if isinstance(arrived, tuple):
                    record(job, *arrived)
                    continue
                job = arrived
                with owner.ecu(job.ecu, "flash"):
                    flasher = EcuFlasher(segment, config.ecu(job.ecu), config.gateway, job, progress, stop, faults,
                                         hooks.step if hooks else None)
                    keeper.recorder = flasher.recorder
                    result = flasher.run()
                    keeper.recorder = None
                record(job, result, flasher.recorder.trace(result.result).to_text())

    errors: list[BaseException] = []
    finished = threading.Semaphore(0)

    def guarded(name: str, seg_jobs: list[FlashJob]) -> None:
        try:
            run_segment(name, seg_jobs)
        except BaseException as exc:  # noqa: BLE001 - reported after join
            errors.append(exc)
        finally:
            finished.release()

    threads = [threading.Thread(target=guarded, args=item, name=f"flash-{item[0]}") for item in by_segment.items()]
    try:
        _run_all(threads, finished, stop)
    finally:
        if own:
            owner.shutdown()
    if errors:
        raise errors[0]
    ordered = [results[j.ecu] for j in jobs if j.ecu in results]
    if summary:  # one flash on its own; gateway/install.py writes the campaign's summary itself
        atomic_write_json(out / "summary.json", {"schema": "vota-flash-summary/1", "results": [r.to_json() for r in ordered]})
    return ordered


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
