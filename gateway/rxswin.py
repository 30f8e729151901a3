"""The vehicle's RXSWIN set (UN R156 7.2, ``agent/core/rxswin.py``), kept by the gateway.

The approvals and their factory values are the configuration's (``approvals``); what signed
campaigns changed since is ``<results>/rxswin.json``, replaced atomically::

    {"schema": "vota-rxswin/1", "values": {"R10": "R10-VOTA-0002", ...},
     "history": [{"campaign_id": "c-7", "at": "...", "changes": {"R10": {"before": "...", "after": "..."}}}]}

Only an install the gateway verified changes it, and only as the install ends in success: after
every ECU committed, before the journal says done (a gateway killed in between writes it again
when the install resumes: the same values). A failed or cancelled install, rolled back or
discarded, leaves it as it was. A campaign whose "before" values are not the vehicle's is
refused before anything is erased. Testers read it on ``gateway.rxswin_did`` (the deploy
server); a WriteDataByIdentifier to it is refused.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import threading
from pathlib import Path
from typing import Any

from agent.adapters.storage import atomic_write_json
from agent.core.config import VehicleConfig
from agent.core.rxswin import Change, encode_did, mismatch, value_problem
from agent.errors import InstallRefused

__all__ = ["RxswinSet", "RXSWIN_FILE"]

log = logging.getLogger(__name__)

RXSWIN_FILE = "rxswin.json"
SCHEMA = "vota-rxswin/1"
MAX_HISTORY = 256


class RxswinSet:
    def __init__(self, config: VehicleConfig, results_dir: Path) -> None:
        self.config, self.path = config, results_dir / RXSWIN_FILE
        self._lock = threading.Lock()

    def _read(self) -> dict[str, Any]:
        """The file as written (an empty record when there is none yet); ValueError when it is damaged."""
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {"schema": SCHEMA, "values": {}, "history": []}
        except (OSError, ValueError) as exc:
            raise ValueError(f"{self.path} is not readable ({exc})") from None
        values = doc.get("values") if isinstance(doc, dict) else None
        if (doc.get("schema") != SCHEMA or not isinstance(values, dict) or not isinstance(doc.get("history"), list)
                or any(value_problem(v) for v in values.values())):
            raise ValueError(f"{self.path} is not a {SCHEMA} record")
        return dict(doc)

    def current(self) -> dict[str, str]:
        """{regulation: RXSWIN} in the order of the configured approvals; ValueError when the
        record is damaged (never silently the factory values)."""
        values = self._read()["values"]
        return {a.regulation: str(values.get(a.regulation, a.rxswin)) for a in self.config.approvals}

    def did_value(self) -> bytes:
        return encode_did(self.current())

    def check(self, campaign_id: str, changes: tuple[Change, ...], ecus: list[str]) -> None:
        """InstallRefused unless the campaign's "before" values are the vehicle's, and each
        approval it changes covers an ECU it installs."""
        if not changes:
            return
        try:
            current = self.current()
        except ValueError as exc:
            raise InstallRefused(f"RXSWIN: the vehicle's record cannot be read, so no campaign changes it ({exc})",
                                 campaign_id) from None
        wrong = mismatch(changes, current)
        if wrong is not None:
            raise InstallRefused(wrong, campaign_id)
        for regulation, _, _ in changes:
            covers = next(a.ecus for a in self.config.approvals if a.regulation == regulation)
            if not set(covers) & set(ecus):
                raise InstallRefused(f"RXSWIN: the campaign changes {regulation}'s but installs none of the ECUs it "
                                     f"covers ({', '.join(covers)})", campaign_id)

    def settle(self, campaign_id: str, changes: tuple[Change, ...], ok: bool) -> dict[str, Any] | None:
        """At the end of an install: its changes made when it succeeded (idempotent: a resumed
        install makes them again); {"before", "after"} for the summary. None: no approvals."""
        if not self.config.approvals:
            return None
        with self._lock:
            try:
                doc = self._read()
            except ValueError as exc:
                log.error("RXSWIN: %s", exc)
                return {"error": str(exc)}
            before = self.current()
            done = next((h for h in doc["history"] if isinstance(h, dict) and h.get("campaign_id") == campaign_id), None)
            if done is not None and isinstance(done.get("changes"), dict):  # made before a restart
                before = {**before, **{r: c["before"] for r, c in done["changes"].items() if isinstance(c, dict)}}
            elif ok and changes:
                at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")
                doc["values"] = {**doc["values"], **{r: after for r, _, after in changes}}
                entry = {"campaign_id": campaign_id, "at": at,
                         "changes": {r: {"before": b, "after": a} for r, b, a in changes}}
                doc["history"] = [*doc["history"], entry][-MAX_HISTORY:]
                atomic_write_json(self.path, doc)  # raises: the install is not done until this is written
                log.info("RXSWIN changed by %s: %s", campaign_id,
                         ", ".join(f"{r} {b} -> {a}" for r, b, a in changes))
            return {"before": before, "after": self.current()}
