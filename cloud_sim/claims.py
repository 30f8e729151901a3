"""Each report stored once, by however many collectors share the store (an MQTT 5 shared
subscription spreads the reports over them; a vehicle that was not acknowledged in time sends
one again, maybe to another collector; a collector restarts and the broker hands it again).

The store itself decides, atomically: a report is written in full to a temporary file beside
its final place, then claimed by a hard link ``<store>/<vin>/ids/<id>`` to that file
(``link(2)`` fails when the name exists: exactly one collector wins), then renamed into
place. A collector killed between the claim and the rename leaves the temporary file, still
linked to its claim; the next start moves it into place (or removes an unclaimed one).
"""

from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

__all__ = ["ReportClaims", "safe_id"]

_TMP = ".claim-"
_STALE_S = 30.0  # a temporary file older than this belongs to no collector at work any more


def safe_id(msg_id: str) -> str:
    return "".join(ch for ch in msg_id if ch.isalnum() or ch in "._-")[:120]  # a file name has its limits


class ReportClaims:
    def __init__(self, store: Path) -> None:
        self.store = store
        self._seq = itertools.count(int(time.time() * 1000) % 10**9)  # names that differ from another collector's

    def stored_ids(self) -> Iterator[tuple[str, str]]:
        """(VIN, id) of every report stored: claimed, or stored before claims (``<seq>-<id>.json``)."""
        if not self.store.is_dir():
            return
        for claim in self.store.glob("*/ids/*"):
            yield claim.parts[-3], claim.name
        for f in self.store.glob("*/messages/*/*.json"):
            yield f.parts[-4], f.stem.partition("-")[2]

    def store_once(self, vin: str, kind: str, msg_id: str, doc: dict[str, Any]) -> bool:
        """Write ``doc`` as ``<vin>/messages/<kind>/<seq>-<id>.json`` unless a report with this id
        was claimed already (by this collector or another): True when this call stored it."""
        name = safe_id(msg_id)
        folder = self.store / vin / "messages" / kind
        claims = self.store / vin / "ids"
        folder.mkdir(parents=True, exist_ok=True)
        claims.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"{_TMP}{name}.{os.getpid()}.{next(self._seq)}"
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(doc, handle)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, claims / name)
        except FileExistsError:
            tmp.unlink()
            return False
        self._place(tmp, folder, name)
        return True

    def _place(self, tmp: Path, folder: Path, name: str) -> None:
        try:
            os.replace(tmp, folder / f"{next(self._seq):010d}-{name}.json")
        except FileNotFoundError:
            pass  # another collector's start found it left behind and placed it
        dirfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)

    def recover(self) -> int:
        """At start: reports claimed by a collector that stopped before placing them are placed;
        unclaimed leftovers removed. The number placed."""
        placed = 0
        if not self.store.is_dir():
            return placed
        for tmp in self.store.glob(f"*/messages/*/{_TMP}*"):
            try:
                if time.time() - tmp.stat().st_mtime < _STALE_S:
                    continue  # maybe another collector's, about to be placed
                name = tmp.name[len(_TMP):].rsplit(".", 2)[0]
                claim = tmp.parents[2] / "ids" / name
                if claim.exists() and os.path.samefile(claim, tmp):
                    self._place(tmp, tmp.parent, name)
                    placed += 1
                else:
                    tmp.unlink()
            except OSError:
                continue
        return placed
