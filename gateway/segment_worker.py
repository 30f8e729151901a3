"""One segment's flashing in a process of its own, so that segments flashed at the same time
do not share one interpreter lock (gateway.segment_workers).

The gateway keeps everything it owns: the ECU locks (held while the worker flashes that ECU),
the results, the journal and the progress it reports. The worker opens its own bus on the
segment (the same settings: udp_multicast or SocketCAN), keeps TesterPresent going on it and
runs ``EcuFlasher`` exactly as a thread would; it sends back, over a pipe, each progress call,
each step with the trace so far (for the journal, when the caller journals), and the result
with its trace. Cancellation is an event both processes see. The worker dies with the gateway
(``PR_SET_PDEATHSIG``; and it ends at the pipe's end), so a gateway killed and restarted never
finds a worker of its previous life still flashing.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import signal
import threading
import traceback
from multiprocessing.connection import Connection
from typing import Any, Callable

from agent.core.config import VehicleConfig
from agent.core.faults import FaultSpec
from agent.core.trace import TraceRecorder, parse_trace
from agent.errors import VotaError

__all__ = ["SegmentWorker"]

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the pipe's end still stops the worker between ECUs
        pass


def _worker(conn: Connection, config: VehicleConfig, segment_name: str, functional_id: int,
            faults: list[FaultSpec], stop: Any, steps: bool, levels: dict[str, int]) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the gateway decides when to stop (the stop event)
    logging.basicConfig(level=levels.pop("", logging.WARNING),
                        format=f"%(asctime)s %(levelname)s flash-{segment_name} %(name)s: %(message)s")
    for name, level in levels.items():  # the gateway's logging as it is (libraries quieted the same way)
        logging.getLogger(name).setLevel(level)
    from agent.adapters.canbus import Segment
    from gateway.buses import TesterPresentKeeper
    from gateway.flash import EcuFlasher

    segment = Segment(config.segments[segment_name])
    try:
        with TesterPresentKeeper(segment, functional_id, config.gateway.tester_present_ms / 1000.0) as keeper:
            while True:
                try:
                    message = conn.recv()
                except EOFError:
                    return  # the gateway is gone
                if message[0] != "job":
                    return
                job = message[1]

                def progress(*args: Any) -> None:
                    conn.send(("progress", *args))

                def on_step(ecu: str, step: str, recorder: TraceRecorder) -> None:
                    conn.send(("step", ecu, step, recorder.trace().to_text()))

                flasher = EcuFlasher(segment, config.ecu(job.ecu), config.gateway, job, progress, stop, faults,
                                     on_step if steps else None)
                keeper.recorder = flasher.recorder
                result = flasher.run()
                keeper.recorder = None
                conn.send(("result", result, flasher.recorder.trace(result.result).to_text()))
    except BaseException as exc:  # noqa: BLE001 - the gateway reports it
        try:
            conn.send(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        except OSError:
            pass
    finally:
        segment.shutdown()


def recorder_of(text: str) -> TraceRecorder:
    """A recorder holding what a worker's trace text holds (for the journal's step hook)."""
    trace = parse_trace(text)
    recorder = TraceRecorder(trace.header)
    recorder.exchanges = trace.exchanges
    return recorder


def _levels() -> dict[str, int]:
    """The levels set on this process's loggers ("" the root's)."""
    levels = {"": logging.getLogger().level}
    for name, logger in logging.root.manager.loggerDict.items():
        if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET:
            levels[name] = logger.level
    return levels


class SegmentWorker:
    """A worker process for one segment, for the duration of one ``flash_all``."""

    def __init__(self, config: VehicleConfig, segment: str, functional_id: int, faults: list[FaultSpec] | None,
                 steps: bool) -> None:
        context = multiprocessing.get_context("spawn")  # never fork a process that runs threads
        self.name = segment
        self.conn, child = context.Pipe()
        self.stop = context.Event()
        self.process = context.Process(
            target=_worker, name=f"vota-flash-{segment}", daemon=True,
            args=(child, config, segment, functional_id, list(faults or []), self.stop, steps, _levels()))
        self.process.start()
        child.close()

    def flash(self, job: Any, progress: Callable[..., None] | None, stop: threading.Event,
              on_step: Callable[[str, str, TraceRecorder], None] | None) -> tuple[Any, str]:
        """Flash one job in the worker: (its FlashResult, its trace text)."""
        self.conn.send(("job", job))
        while True:
            if stop.is_set():
                self.stop.set()
            if not self.conn.poll(0.1):
                if not self.process.is_alive():
                    raise VotaError(f"the flash worker of segment {self.name} ended (exit code {self.process.exitcode})")
                continue
            try:
                message = self.conn.recv()
            except EOFError:
                raise VotaError(f"the flash worker of segment {self.name} ended (exit code {self.process.exitcode})") from None
            kind = message[0]
            if kind == "progress" and progress is not None:
                progress(*message[1:])
            elif kind == "step" and on_step is not None:
                on_step(message[1], message[2], recorder_of(message[3]))
            elif kind == "result":
                return message[1], message[2]
            elif kind == "error":
                log.error("flash worker of segment %s: %s", self.name, message[2])
                raise VotaError(f"the flash worker of segment {self.name} failed: {message[1]}")

    def close(self) -> None:
        try:
            self.conn.send(("done",))
        except OSError:
            pass
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(2)
        self.conn.close()

    def __enter__(self) -> "SegmentWorker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
