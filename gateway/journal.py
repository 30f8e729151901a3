"""The gateway's install journal: what an install has done so far, on disk, so that a gateway
killed at any line finishes the install when it starts again.

``<results>/<campaign>/journal.json`` is replaced atomically (written, synced, renamed) before
every phase of the install and at every step of every ECU::

    {"schema": "vota-install-journal/1", "campaign_id": "c-1", "activation": "atomic",
     "phase": "stage",            # stage | activate | flash_last | rollback | discard | commit | done
     "why": null,                 # why the install goes back (rollback, discard)
     "culprit": null,             # the ECU whose activation failed
     "attempt": 1,                # 1 + the number of times the install was resumed
     "ecus": {"bms": {"doing": "stage", "step": "transfer_data",   # what runs on it now
                      "result": {...vota-flash-result/1...},      # its result so far
                      "notes": [{"action": "interrupted", ...}]}}, # work cut off by a restart
     "interruptions": [{"attempt": 1, "phase": "stage", "ecus": {"bms": "stage: transfer_data"},
                        "last_write": "...", "resumed": "..."}],
     "preconditions": null,       # the check that stopped or turned back the install (unmet, values)
     "outcome": null}             # success | failed once phase is done

The campaign-level ``phase`` is the decision (go on, or go back); what each ECU holds is read
back from the ECU when the install resumes, never taken from the journal alone.

A journal that cannot be written (the disk full, read-only, failing) raises: nothing goes
forward that is not journaled. Once ``tolerant`` (the install goes back because of it), a write
that fails is logged and the going back goes on (a discard needs no journal to be safe: it is
idempotent on the ECU, and a resumed install reads back what each ECU holds).
"""

from __future__ import annotations

import datetime as _dt
import json
import threading
from pathlib import Path
from typing import Any

from agent.adapters.storage import atomic_write_json, best_effort
from gateway.jobs import FlashResult

__all__ = ["InstallJournal", "PHASES", "JOURNAL_FILE"]

JOURNAL_FILE = "journal.json"
PHASES = ("stage", "activate", "flash_last", "rollback", "discard", "commit", "done")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


class InstallJournal:
    def __init__(self, path: Path, doc: dict[str, Any]) -> None:
        self.path, self.doc = path, doc
        self._lock = threading.Lock()  # ECUs on different segments report steps from their own threads
        self.tolerant = False  # set when the install goes back because the storage failed

    @classmethod
    def create(cls, out: Path, campaign_id: str, activation: str, ecus: list[str]) -> "InstallJournal":
        journal = cls(out / JOURNAL_FILE, {
            "schema": "vota-install-journal/1", "campaign_id": campaign_id, "activation": activation,
            "phase": "stage", "why": None, "culprit": None, "attempt": 1, "outcome": None,
            "ecus": {e: {"doing": None, "step": None, "result": None} for e in ecus},
            "interruptions": [], "updated": _now()})
        journal._save()
        return journal

    @classmethod
    def load(cls, out: Path) -> "InstallJournal | None":
        """The journal of an install in ``out``; None when there is none or it is unusable."""
        try:
            doc = json.loads((out / JOURNAL_FILE).read_text())
        except (OSError, ValueError):
            return None
        if (not isinstance(doc, dict) or doc.get("schema") != "vota-install-journal/1" or doc.get("phase") not in PHASES
                or not isinstance(doc.get("ecus"), dict) or not isinstance(doc.get("interruptions"), list)):
            return None
        return cls(out / JOURNAL_FILE, doc)

    def _save(self) -> None:
        self.doc["updated"] = _now()
        if self.tolerant:
            best_effort(lambda: atomic_write_json(self.path, self.doc), "the install journal")
        else:
            atomic_write_json(self.path, self.doc)

    # ---- reading ------------------------------------------------------------------------
    @property
    def phase(self) -> str:
        return str(self.doc["phase"])

    @property
    def why(self) -> str | None:
        return self.doc.get("why")

    @property
    def culprit(self) -> str | None:
        return self.doc.get("culprit")

    @property
    def interruptions(self) -> list[dict[str, Any]]:
        return list(self.doc["interruptions"])

    def results(self) -> dict[str, FlashResult]:
        """The results recorded so far (ECUs not yet started have none)."""
        out = {}
        for ecu, entry in self.doc["ecus"].items():
            doc = entry.get("result") if isinstance(entry, dict) else None
            if isinstance(doc, dict):
                try:
                    out[ecu] = FlashResult(**doc)
                except TypeError:
                    continue  # written by another version: that ECU is looked at again
        return out

    # ---- writing ------------------------------------------------------------------------
    def set_phase(self, phase: str, why: str | None = None, culprit: str | None = None) -> None:
        assert phase in PHASES
        with self._lock:
            self.doc["phase"] = phase
            if why is not None:
                self.doc["why"] = why
            if culprit is not None:
                self.doc["culprit"] = culprit
            self._save()

    @property
    def held(self) -> dict[str, Any] | None:
        """The preconditions check that stopped or turned back the install, if one did."""
        held = self.doc.get("preconditions")
        return held if isinstance(held, dict) else None

    def hold(self, check: dict[str, Any]) -> None:
        with self._lock:
            self.doc["preconditions"] = check
            self._save()

    def finish(self, ok: bool) -> None:
        with self._lock:
            self.doc["phase"], self.doc["outcome"] = "done", "success" if ok else "failed"
            self._save()

    def step(self, ecu: str, doing: str, step: str) -> None:
        with self._lock:
            entry = self.doc["ecus"].setdefault(ecu, {})
            entry["doing"], entry["step"] = doing, step
            self._save()

    def record(self, result: FlashResult) -> None:
        """An ECU's result after a piece of work on it finished (nothing runs on it now)."""
        with self._lock:
            entry = self.doc["ecus"].setdefault(result.ecu, {})
            entry["doing"], entry["step"], entry["result"] = None, None, result.to_json()
            self._save()

    def note(self, ecu: str, note: dict[str, Any]) -> None:
        """Something that happened to an ECU outside its result (an interruption): reported with it."""
        with self._lock:
            entry = self.doc["ecus"].setdefault(ecu, {})
            entry.setdefault("notes", []).append(note)
            entry["doing"] = entry["step"] = None
            self._save()

    def notes(self, ecu: str) -> list[dict[str, Any]]:
        entry = self.doc["ecus"].get(ecu)
        return list(entry.get("notes") or []) if isinstance(entry, dict) else []

    def resumed(self) -> dict[str, Any]:
        """Note that the install was interrupted and is resumed; returns the note (where it stopped)."""
        with self._lock:
            note = {"attempt": self.doc.get("attempt", 1), "phase": self.doc["phase"],
                    "ecus": {e: f"{v['doing']}: {v.get('step')}" for e, v in self.doc["ecus"].items()
                             if isinstance(v, dict) and v.get("doing")},
                    "last_write": self.doc.get("updated"), "resumed": _now()}
            self.doc["interruptions"].append(note)
            self.doc["attempt"] = int(self.doc.get("attempt", 1)) + 1
            self._save()
            return note
