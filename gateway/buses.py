"""The gateway's CAN segments, each opened once and owned here, and one lock per ECU.

Everything the gateway does on an ECU (flash it, store or show owner content, read its versions)
takes that ECU's lock, so no two conversations with one ECU ever run at once; work on different
ECUs, and on different segments, goes on in parallel over the same segment objects. A segment
flashed by a worker process is lent to it whole (``lend``): its ECUs held, this process's bus
on it closed until the flash is over.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Callable, Iterator

from agent.adapters.canbus import Segment
from agent.core.config import VehicleConfig
from agent.core.trace import TraceRecorder
from agent.errors import VotaError

log = logging.getLogger(__name__)

__all__ = ["Buses", "EcuBusy", "TesterPresentKeeper", "WAIT_SLICE_S"]

WAIT_SLICE_S = 1.0  # how often work waiting for an ECU says so (``Buses.on_wait``)


class EcuBusy(VotaError):
    """The ECU is taken by other work (``holder`` says which) for longer than the caller waits."""

    def __init__(self, ecu: str, holder: str) -> None:
        super().__init__(f"{ecu} is busy ({holder})")
        self.ecu, self.holder = ecu, holder


class Buses:
    def __init__(self, config: VehicleConfig) -> None:
        self.config = config
        self._segments: dict[str, Segment] = {}
        self._lock = threading.Lock()
        self._ecu_locks = {name: threading.Lock() for name in config.ecus}
        self._holders: dict[str, str] = {}
        self._waiting: dict[str, int] = {}  # work waiting for each ECU (a tester gives way to it: gateway/doip_routing.py)
        self._pinned: set[str] = set()  # segments whose bus must stay open (the deploy server listens on it)
        # told every WAIT_SLICE_S while work waits for an ECU other work holds (ECU, holder): the
        # install keeps its heartbeat (a DoIP tester programming an ECU is waited for, not killed)
        self.on_wait: Callable[[str, str], None] = lambda ecu, holder: None

    def pin(self, name: str) -> None:
        """Keep this process's bus on segment ``name`` open, also while the segment is lent."""
        self._pinned.add(name)

    def segment(self, name: str) -> Segment:
        """The segment's one bus object, opened on first use."""
        with self._lock:
            segment = self._segments.get(name)
            if segment is None:
                segment = self._segments[name] = Segment(self.config.segments[name])
            return segment

    @contextlib.contextmanager
    def ecu(self, name: str, what: str, wait: float | None = None) -> Iterator[Segment]:
        """Hold ``name`` for ``what``; yields its segment. ``wait``: seconds to wait for the ECU
        (None: as long as it takes), then EcuBusy; 0: at once, and never ahead of work waiting for it."""
        lock = self._ecu_locks[name]
        if wait == 0 and self.wanted(name):  # who does not wait does not jump the queue of those who do
            raise EcuBusy(name, self._holders.get(name, "other work waiting"))
        if not lock.acquire(blocking=False):
            with self._lock:
                self._waiting[name] = self._waiting.get(name, 0) + 1
            try:
                if wait == 0 or not self._acquire(lock, name, wait):
                    raise EcuBusy(name, self._holders.get(name, "other work"))
            finally:
                with self._lock:
                    self._waiting[name] -= 1
        self._holders[name] = what
        try:
            yield self.segment(self.config.ecus[name].segment)
        finally:
            self._holders.pop(name, None)
            lock.release()

    def _acquire(self, lock: threading.Lock, name: str, wait: float | None) -> bool:
        deadline = None if wait is None else time.monotonic() + wait
        while True:
            left = WAIT_SLICE_S if deadline is None else min(WAIT_SLICE_S, max(0.0, deadline - time.monotonic()))
            if lock.acquire(timeout=left):
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            self.on_wait(name, self._holders.get(name, "other work"))

    @contextlib.contextmanager
    def lend(self, segment: str, what: str) -> Iterator[None]:
        """Every ECU of ``segment`` held for ``what``, and this process's bus on it closed, while a
        worker process drives the segment on a bus of its own (gateway/segment_worker.py): a bus
        left open here would decode every frame of the flash in this process, for nothing. Other
        work on the segment's ECUs waits (or is told the ECU is busy); the bus opens again on
        its next use."""
        names = sorted(n for n, e in self.config.ecus.items() if e.segment == segment)
        with contextlib.ExitStack() as held:
            for name in names:
                held.enter_context(self.ecu(name, what))
            with self._lock:
                open_segment = None if segment in self._pinned else self._segments.pop(segment, None)
            if open_segment is not None:
                open_segment.shutdown()
            yield

    def wanted(self, name: str) -> bool:
        """Other work waits for the ECU now."""
        return self._waiting.get(name, 0) > 0

    def busy(self, name: str) -> str | None:
        """What holds the ECU now, if anything."""
        return self._holders.get(name)

    def shutdown(self) -> None:
        with self._lock:
            segments, self._segments = list(self._segments.values()), {}
        for segment in segments:
            segment.shutdown()

    def __enter__(self) -> "Buses":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


class TesterPresentKeeper:
    """Sends functional TesterPresent (3E 80, no response) on a segment while it flashes."""

    def __init__(self, segment: Segment, can_id: int, period: float) -> None:
        self.segment, self.can_id, self.period = segment, can_id, period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"tp-{segment.config.name}", daemon=True)
        self.sent = 0
        self.recorder: TraceRecorder | None = None  # the trace of the ECU being flashed

    def __enter__(self) -> "TesterPresentKeeper":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.segment.send_frame(self.can_id, b"\x02\x3e\x80")
                self.sent += 1
                recorder = self.recorder
                if recorder is not None:
                    recorder.functional_tester_present()
            except Exception:  # noqa: BLE001 - a missed TesterPresent is not fatal
                log.debug("TesterPresent send failed", exc_info=True)
