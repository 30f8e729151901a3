"""Packages that arrive while their install runs (a pipelined campaign).

The TBOX may start an install before every package is on the gateway, so that an ECU is
flashed while the next package is still on the backbone. The install manifest then says
``arriving``; it is verified as ever (the signed campaign, the jobs, the packages already
here), and each job whose file is not here yet waits for it just before its ECU is flashed:
the file must be the one the signed campaign names (size and SHA-256) before anything of that
ECU is erased. Nothing else changes: install order, staging and all-or-nothing activation
hold as for packages deployed first (single-bank ECUs are flashed after every other ECU is
staged, so after every package arrived).

A package that does not come fails its job at step ``package_arrival``: when nothing of this
install's packages was deployed for ``gateway.arrival_idle_s`` (the deploy server writes
``<name>.part`` as blocks arrive, so a deploy in progress is activity; another campaign's deploys
are not), when the file that came is not the signed one, or at once when the TBOX cancels the
campaign (``cancel``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import time
from pathlib import Path

from agent.errors import FlashError
from gateway.jobs import Awaited, DeltaImage, FlashJob

__all__ = ["Arrivals", "STEP"]

STEP = "package_arrival"


class Arrivals:
    def __init__(self, package_dir: Path, idle_s: float, stop: threading.Event, awaited: list[str],
                 cancel: threading.Event | None = None, poll_s: float = 0.1) -> None:
        self.dir, self.idle_s, self.stop, self.poll_s = package_dir, idle_s, stop, poll_s
        self.cancel = cancel or threading.Event()
        self.names = [n for name in awaited for n in (name, f"{name}.part")]  # this install's packages only

    def _last_activity(self) -> float:
        newest = 0.0
        for name in self.names:
            try:
                newest = max(newest, (self.dir / name).stat().st_mtime)
            except OSError:
                continue
        return newest

    def ready(self, job: FlashJob) -> FlashJob:
        """``job`` with its file read and checked, once it is here; FlashError when it does not come."""
        awaited: Awaited | None = job.awaited
        if awaited is None:
            return job
        path = self.dir / awaited.file
        since = time.time()
        wrong = False
        while True:
            if path.is_file():
                data = path.read_bytes()
                if len(data) == awaited.size and hashlib.sha256(data).hexdigest() == awaited.sha256:
                    break
                wrong = True  # another file of that name (an earlier deploy): the one on its way replaces it
            idle = time.time() - max(since, self._last_activity())
            if idle > self.idle_s:
                what = "is not the signed one (size or SHA-256)" if wrong else "did not arrive"
                raise FlashError(STEP, f"{awaited.file} {what}: nothing was deployed for {self.idle_s:.0f} s")
            if self.cancel.is_set() or self.stop.wait(self.poll_s):
                raise FlashError(STEP, "cancelled")
        if awaited.delta_base is not None:
            delta = DeltaImage(data, awaited.delta_base, awaited.image_size, awaited.image_sha256, awaited.image_crc32,
                               awaited.file)
            return dataclasses.replace(job, delta=delta, awaited=None)
        return dataclasses.replace(job, image=data, awaited=None)
