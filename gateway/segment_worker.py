"""One segment's flashing in a process of its own, so that segments flashed at the same time
do not share one interpreter lock (``gateway.segment_workers``).

The gateway keeps everything it owns: the ECU locks (the segment is lent to the worker), the
results, the journal and the progress it reports. The worker opens its own bus on the segment
(the same settings: udp_multicast or SocketCAN), keeps TesterPresent going on it and runs
``EcuFlasher`` exactly as a thread would. Both ends talk over a pipe in typed messages (below),
never bare tuples.

``SegmentWorker`` is the gateway's handle on one worker (uvicorn's supervisor is the model): it
owns the pipe, the health check and the termination. While a job runs it pings the worker every
second; a reader thread in the worker answers at once with how long the flash has made no
progress. A worker that does not answer within ``gateway.worker_pong_s`` (frozen, stopped,
swapping), or whose flash has made no progress for ``gateway.worker_stale_s`` (stuck in a call
that never returns), is killed, and the job it ran ends as a failed result at the step it was in,
with its trace so far. A worker that ends on its own (a crash) is reported the same way. The
worker dies with the gateway (``PR_SET_PDEATHSIG``, and the pipe's end), so a gateway killed and
restarted never finds a worker of its previous life still flashing.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import queue
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Callable

from agent.core.config import VehicleConfig
from agent.core.faults import FaultSpec
from agent.core.trace import TraceRecorder, parse_trace
from gateway.jobs import FlashJob, FlashResult, Progress

__all__ = ["SegmentWorker", "FlashOrder", "Ping", "Pong", "Quit", "ProgressReport", "StepStarted", "Flashed", "Crashed"]

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
PING_INTERVAL_S = 1.0


# ---- the messages: to the worker ---------------------------------------------------------
@dataclass(frozen=True)
class FlashOrder:
    job: FlashJob


@dataclass(frozen=True)
class Ping:
    n: int


@dataclass(frozen=True)
class Quit:
    pass


# ---- and from it -------------------------------------------------------------------------
@dataclass(frozen=True)
class Pong:
    n: int
    idle_s: float  # how long the flash under way has made no progress (0 between jobs)


@dataclass(frozen=True)
class ProgressReport:
    ecu: str
    step: str
    done: int
    total: int


@dataclass(frozen=True)
class StepStarted:
    ecu: str
    step: str
    trace: str  # the trace so far


@dataclass(frozen=True)
class Flashed:
    result: FlashResult
    trace: str


@dataclass(frozen=True)
class Crashed:
    error: str
    traceback: str


# ---- the worker process ------------------------------------------------------------------
def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the pipe's end still stops the worker between ECUs
        pass


class _WorkerSide:
    """The worker's end: a reader thread answers pings at once and queues the orders; the main
    thread flashes. Sends from both threads go through one lock."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.orders: queue.Queue[FlashOrder | Quit] = queue.Queue()
        self.lock = threading.Lock()
        self.busy_since: float | None = None  # the last progress of the flash under way
        threading.Thread(target=self._read, name="worker-pipe", daemon=True).start()

    def send(self, message: Any) -> None:
        with self.lock:
            self.conn.send(message)

    def beat(self) -> None:
        self.busy_since = time.monotonic()

    def _read(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                self.orders.put(Quit())  # the gateway is gone
                return
            if isinstance(message, Ping):
                since = self.busy_since
                self.send(Pong(message.n, 0.0 if since is None else time.monotonic() - since))
            elif isinstance(message, (FlashOrder, Quit)):
                self.orders.put(message)


def _worker(conn: Connection, config: VehicleConfig, segment_name: str, functional_id: int,
            faults: list[FaultSpec], stop: Any, levels: dict[str, int]) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the gateway decides when to stop (the stop event)
    logging.basicConfig(level=levels.pop("", logging.WARNING),
                        format=f"%(asctime)s %(levelname)s flash-{segment_name} %(name)s: %(message)s")
    for name, level in levels.items():  # the gateway's logging as it is (libraries quieted the same way)
        logging.getLogger(name).setLevel(level)
    from agent.adapters.canbus import Segment
    from agent.adapters.capture import close_all, inherit
    from gateway.buses import TesterPresentKeeper
    from gateway.flash import EcuFlasher

    side = _WorkerSide(conn)
    inherit("flash")  # the gateway's --capture: this worker's frames in gw-flash-<segment>
    segment = Segment(config.segments[segment_name])
    try:
        with TesterPresentKeeper(segment, functional_id, config.gateway.tester_present_ms / 1000.0) as keeper:
            while isinstance(order := side.orders.get(), FlashOrder):
                job = order.job

                def progress(ecu: str, step: str, done: int, total: int) -> None:
                    side.beat()
                    side.send(ProgressReport(ecu, step, done, total))

                def on_step(ecu: str, step: str, recorder: TraceRecorder) -> None:
                    side.send(StepStarted(ecu, step, recorder.trace().to_text()))

                side.beat()
                flasher = EcuFlasher(segment, config.ecu(job.ecu), config.gateway, job, progress, stop, faults, on_step)
                keeper.recorder = flasher.recorder
                result = flasher.run()
                keeper.recorder, side.busy_since = None, None
                side.send(Flashed(result, flasher.trace_text(result.result)))
    except BaseException as exc:  # noqa: BLE001 - the gateway reports it
        try:
            side.send(Crashed(f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        except OSError:
            pass
    finally:
        segment.shutdown()
        close_all()  # a spawned process ends with os._exit: no atexit


def _levels() -> dict[str, int]:
    """The levels set on this process's loggers ("" the root's)."""
    levels = {"": logging.getLogger().level}
    for name, logger in logging.root.manager.loggerDict.items():
        if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET:
            levels[name] = logger.level
    return levels


def recorder_of(text: str) -> TraceRecorder:
    """A recorder holding what a worker's trace text holds (for the journal's step hook)."""
    trace = parse_trace(text)
    recorder = TraceRecorder(trace.header)
    recorder.exchanges = trace.exchanges
    return recorder


# ---- the gateway's handle ----------------------------------------------------------------
class SegmentWorker:
    """A worker process for one segment; ``flash`` one job after another, ``close`` at the end.
    After ``flash`` found the worker dead or stuck (``usable`` is False), a new one is needed."""

    def __init__(self, config: VehicleConfig, segment: str, functional_id: int, faults: list[FaultSpec] | None) -> None:
        context = multiprocessing.get_context("spawn")  # never fork a process that runs threads
        self.name = segment
        self.pong_s, self.stale_s = float(config.gateway.worker_pong_s), float(config.gateway.worker_stale_s)
        self.conn, child = context.Pipe()
        self.stop = context.Event()
        self.process = context.Process(
            target=_worker, name=f"vota-flash-{segment}", daemon=True,
            args=(child, config, segment, functional_id, list(faults or []), self.stop, _levels()))
        self.process.start()
        child.close()
        self.usable = True
        self._pings = 0

    def flash(self, job: FlashJob, progress: Progress | None, stop: threading.Event,
              on_step: Callable[[str, str, TraceRecorder], None] | None,
              failed: Callable[[FlashJob, str, str, str | None], tuple[FlashResult, str]]) -> tuple[FlashResult, str]:
        """Flash one job in the worker: (its FlashResult, its trace text). A worker that dies or
        gets stuck meanwhile is killed; ``failed(job, step, reason, trace so far)`` makes the job's result."""
        step, trace = "", None
        try:
            self.conn.send(FlashOrder(job))
        except OSError:  # the worker is gone already
            self.process.join(1)
            return self._give_up(job, step, f"ended (exit code {self.process.exitcode})", trace, failed)
        asked: tuple[int, float] | None = None  # the ping waiting for its pong, and when it went
        next_ping = time.monotonic() + PING_INTERVAL_S
        while True:
            if stop.is_set():
                self.stop.set()
            problem = self._check(asked)
            if problem is not None:
                return self._give_up(job, step, problem, trace, failed)
            if time.monotonic() >= next_ping and asked is None:
                self._pings += 1
                asked, next_ping = (self._pings, time.monotonic()), time.monotonic() + PING_INTERVAL_S
                self.conn.send(Ping(self._pings))
            if not self.conn.poll(0.1):
                continue
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                continue  # seen as a dead worker by the next check
            if isinstance(message, Pong):
                if message.idle_s > self.stale_s:
                    return self._give_up(job, step, f"its flash made no progress for {message.idle_s:.0f} s", trace, failed)
                asked = None if asked is not None and message.n == asked[0] else asked
            elif isinstance(message, ProgressReport):
                step = message.step
                if progress is not None:
                    progress(message.ecu, message.step, message.done, message.total)
            elif isinstance(message, StepStarted):
                step, trace = message.step, message.trace
                if on_step is not None:
                    on_step(message.ecu, message.step, recorder_of(message.trace))
            elif isinstance(message, Flashed):
                return message.result, message.trace
            elif isinstance(message, Crashed):
                log.error("flash worker of segment %s: %s", self.name, message.traceback)
                return self._give_up(job, step, f"failed: {message.error}", trace, failed)

    def _check(self, asked: tuple[int, float] | None) -> str | None:
        if not self.process.is_alive():
            return f"ended (exit code {self.process.exitcode})"
        if asked is not None and time.monotonic() - asked[1] > self.pong_s:
            return f"did not answer for {self.pong_s:.0f} s"
        return None

    def _give_up(self, job: FlashJob, step: str, problem: str, trace: str | None,
                 failed: Callable[[FlashJob, str, str, str | None], tuple[FlashResult, str]]) -> tuple[FlashResult, str]:
        reason = f"the flash worker of segment {self.name} {problem}: stopped"
        log.error("%s: %s", job.ecu, reason)
        self.usable = False
        self.kill()
        return failed(job, step or "worker", reason, trace)

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)

    def close(self) -> None:
        try:
            self.conn.send(Quit())
        except OSError:
            pass
        self.process.join(5)
        if self.process.is_alive():
            self.kill()
        self.conn.close()

    def __enter__(self) -> "SegmentWorker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
