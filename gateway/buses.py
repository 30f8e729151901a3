"""The gateway's CAN segments, each opened once and owned here, and one lock per ECU.

Everything the gateway does on an ECU (flash it, store or show owner content, read its versions)
takes that ECU's lock, so no two conversations with one ECU ever run at once; work on different
ECUs, and on different segments, goes on in parallel over the same segment objects.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

from agent.adapters.canbus import Segment
from agent.core.config import VehicleConfig
from agent.errors import VotaError

__all__ = ["Buses", "EcuBusy"]


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
        (None: as long as it takes), then EcuBusy."""
        lock = self._ecu_locks[name]
        if not lock.acquire(timeout=-1 if wait is None else wait):
            raise EcuBusy(name, self._holders.get(name, "other work"))
        self._holders[name] = what
        try:
            yield self.segment(self.config.ecus[name].segment)
        finally:
            self._holders.pop(name, None)
            lock.release()

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
