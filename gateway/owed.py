"""Discards an ended install still owes.

An install that goes back discards what it staged; an ECU that does not answer then (asleep,
unplugged, its power cut mid-campaign) keeps the staged image of a campaign that failed. The
gateway remembers it (``<results>/owed-discards.json``, written atomically) and discards it once
the ECU answers: before the next install, before the next inventory, and every
``gateway.owed_retry_s`` while no install runs. A later install that stages or flashes that ECU
settles it too (it is asked first).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, Iterable

from agent.adapters.storage import atomic_write_json, best_effort
from agent.core.config import VehicleConfig
from gateway.activation import EcuAction
from gateway.buses import Buses
from gateway.jobs import FlashResult

__all__ = ["OwedDiscards", "OWED_FILE"]

log = logging.getLogger(__name__)

OWED_FILE = "owed-discards.json"
LEFT_STAGED = ("staged", "discard_failed")  # an install that ended with an ECU in one of these owes its discard


class OwedDiscards:
    def __init__(self, config: VehicleConfig, buses: Buses, results_dir: Path, stop: threading.Event) -> None:
        self.config, self.buses, self.results_dir, self.stop = config, buses, results_dir, stop
        self.path = results_dir / OWED_FILE
        self._lock = threading.Lock()
        self.owed: dict[str, dict[str, Any]] = self._load()

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            doc = json.loads(self.path.read_text())
            return {str(e): dict(v) for e, v in dict(doc["ecus"]).items() if str(e) in self.config.ecus}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}

    def _save(self) -> None:
        best_effort(lambda: atomic_write_json(self.path, {"ecus": self.owed}), "the discards owed")

    def note(self, campaign: str, ok: bool, results: Iterable[FlashResult]) -> None:
        """An install ended: the ECUs it left staged are owed a discard (none when it succeeded)."""
        with self._lock:
            for r in results:
                if not ok and r.phase in LEFT_STAGED and self.config.ecu(r.ecu).banks != 1:
                    self.owed[r.ecu] = {"campaign": campaign, "since": round(time.time(), 3)}
                    log.warning("%s keeps the staged image of %s (%s): its discard is owed", r.ecu, campaign, r.phase)
                elif r.ecu in self.owed and r.phase is not None:  # staged, activated or discarded anew since
                    del self.owed[r.ecu]
            self._save()

    def settle(self) -> list[str]:
        """Discard on every ECU owed one that answers now; the ECUs settled."""
        with self._lock:
            owed = dict(self.owed)
        settled = []
        for ecu, entry in owed.items():
            if self.stop.is_set():
                break
            with self.buses.ecu(ecu, "discard") as segment:
                out = self.results_dir / str(entry.get("campaign") or "owed")
                done = EcuAction(segment, self.config.ecu(ecu), self.config.gateway, "discard", stop=self.stop).run(out)
            if done.result == "success":
                settled.append(ecu)
                log.info("%s: the staged image of %s is discarded (owed since the install ended)", ecu, entry.get("campaign"))
        if settled:
            with self._lock:
                for ecu in settled:
                    self.owed.pop(ecu, None)
                self._save()
        return settled

    def __bool__(self) -> bool:
        return bool(self.owed)
