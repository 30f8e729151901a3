"""Per-ECU progress lines for ``vota flash``: redrawn in place on a terminal, plain
lines (at step changes and every 25 %) when the output is a file or a pipe."""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

__all__ = ["ProgressBoard"]


class ProgressBoard:
    def __init__(self, ecus: list[str], stream: TextIO | None = None, enabled: bool = True) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and self.stream.isatty()
        self.ecus = ecus
        self.state = {e: ("waiting", 0, 0) for e in ecus}
        self._lock = threading.Lock()
        self._drawn = False
        self._last_quarter: dict[str, int] = {}
        self._last_draw = 0.0
        self.width = max((len(e) for e in ecus), default=4)

    def __call__(self, ecu: str, step: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        with self._lock:
            previous = self.state.get(ecu, ("", 0, 0))[0]
            self.state[ecu] = (step, done, total)
            if self.tty:
                now = time.monotonic()
                if step != previous or now - self._last_draw > 0.1:
                    self._redraw()
                    self._last_draw = now
            else:
                quarter = (4 * done // total) if total else 0
                if step != previous or (step == "transfer_data" and quarter != self._last_quarter.get(ecu)):
                    self._last_quarter[ecu] = quarter
                    self.stream.write(self._line(ecu) + "\n")
                    self.stream.flush()

    def _line(self, ecu: str) -> str:
        step, done, total = self.state[ecu]
        fraction = done / total if total else 0.0
        bar = "#" * int(fraction * 30)
        return f"{ecu:<{self.width}} [{bar:<30}] {fraction * 100:5.1f}% {done // 1024:>6} KiB  {step}"

    def _redraw(self) -> None:
        if self._drawn:
            self.stream.write(f"\x1b[{len(self.ecus)}F")
        for ecu in self.ecus:
            self.stream.write("\x1b[2K" + self._line(ecu) + "\n")
        self.stream.flush()
        self._drawn = True

    def finish(self) -> None:
        if self.tty:
            with self._lock:
                self._redraw()
