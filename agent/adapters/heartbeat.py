"""Worker heartbeats for the systemd watchdog: a daemon is alive only while every one of its
workers has shown progress recently, not merely while its threads exist (a worker stuck in a
call that never returns keeps its thread, and must stop the watchdog pings)."""

from __future__ import annotations

import threading
import time
from typing import Callable

__all__ = ["Heartbeats"]


class Heartbeats:
    def __init__(self, max_age_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_age_s, self.clock = max_age_s, clock
        self._beats: dict[str, float] = {}
        self._lock = threading.Lock()

    def beat(self, worker: str) -> None:
        """``worker`` is making progress (call it from every loop turn and progress callback)."""
        with self._lock:
            self._beats[worker] = self.clock()

    def stale(self, max_age_s: float | None = None) -> list[str]:
        """The workers that have not beaten within ``max_age_s`` (default: the one given at creation)."""
        limit = self.max_age_s if max_age_s is None else max_age_s
        now = self.clock()
        with self._lock:
            return sorted(name for name, at in self._beats.items() if now - at > limit)

    def forget(self, worker: str) -> None:
        """``worker`` ended its work normally: no more beats are expected from it."""
        with self._lock:
            self._beats.pop(worker, None)
