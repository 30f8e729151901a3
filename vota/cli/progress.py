"""Per-ECU progress lines for ``vota flash`` and ``vota deploy``: percent, bytes, the rate since
the transfer began and the time left at that rate, and a total line when there are several;
redrawn in place on a terminal, plain lines (at step changes and every 25 %) when the output is
a file or a pipe. Our own bar rather than tqdm's or rich's: several lines updated from several
threads, and line-based output for logs, are a few lines here and awkward with theirs."""

from __future__ import annotations

import sys
import threading
import time
from typing import Callable, TextIO

__all__ = ["ProgressBoard"]


class ProgressBoard:
    def __init__(self, ecus: list[str], stream: TextIO | None = None, enabled: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream or sys.stderr
        self.clock = clock
        self._began: dict[str, tuple[float, int]] = {}  # ECU -> (time, bytes) when its transfer began
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
            if ecu not in self._began and done > 0:
                self._began[ecu] = (self.clock(), done)
            if self.tty:
                now = self.clock()
                if step != previous or now - self._last_draw > 0.1:
                    self._redraw()
                    self._last_draw = now
            else:
                quarter = (4 * done // total) if total else 0
                if step != previous or (step == "transfer_data" and quarter != self._last_quarter.get(ecu)):
                    self._last_quarter[ecu] = quarter
                    self.stream.write(self._line(ecu) + "\n")
                    self.stream.flush()

    def _rate(self, ecu: str) -> float | None:
        """Bytes a second since the ECU's transfer began (None: too early to say)."""
        began = self._began.get(ecu)
        done = self.state[ecu][1]
        if began is None or done <= began[1]:
            return None
        elapsed = self.clock() - began[0]
        return (done - began[1]) / elapsed if elapsed > 0.2 else None

    @staticmethod
    def _speed(rate: float | None, left: int) -> str:
        if rate is None or rate <= 0:
            return ""
        eta = int(left / rate + 0.5)
        return f" {rate / 1024:7.1f} KiB/s {eta // 60:3d}:{eta % 60:02d} left" if left > 0 else f" {rate / 1024:7.1f} KiB/s"

    def _line(self, ecu: str) -> str:
        step, done, total = self.state[ecu]
        fraction = done / total if total else 0.0
        bar = "#" * int(fraction * 30)
        speed = self._speed(self._rate(ecu), total - done) if step not in ("done", "failed") else ""
        return f"{ecu:<{self.width}} [{bar:<30}] {fraction * 100:5.1f}% {done // 1024:>6} KiB{speed}  {step}"

    def total_line(self) -> str:
        """All of them: bytes, the summed rate of the transfers under way, the time left at it."""
        done = sum(s[1] for s in self.state.values())
        total = sum(s[2] for s in self.state.values())
        rates = [r for e in self.ecus if (r := self._rate(e)) is not None and self.state[e][1] < self.state[e][2]]
        fraction = done / total if total else 0.0
        speed = self._speed(sum(rates), total - done) if rates else ""
        return f"{'total':<{self.width}} [{'#' * int(fraction * 30):<30}] {fraction * 100:5.1f}% {done // 1024:>6} KiB{speed}"

    def _redraw(self) -> None:
        lines = [self._line(ecu) for ecu in self.ecus] + ([self.total_line()] if len(self.ecus) > 1 else [])
        if self._drawn:
            self.stream.write(f"\x1b[{len(lines)}F")
        for line in lines:
            self.stream.write("\x1b[2K" + line + "\n")
        self.stream.flush()
        self._drawn = True

    def finish(self) -> None:
        if self.tty:
            with self._lock:
                self._redraw()
