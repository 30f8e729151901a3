"""The vehicle's update log (UN R156 7.2: records of every update): every campaign's lifecycle as
the TBOX reported it (received, checks with their values, preconditions, each state, each
package's and ECU's result, failures with their diagnosis, the final versions), appended to a
hash-chained log signed by the vehicle's report key.

One JSON object per line (``update-log.jsonl`` in the TBOX's state directory)::

    {"seq": 7, "ts": 1796524027.9, "id": "c-42.finished", "type": "events", "campaign_id": "c-42",
     "body": {...}, "prev": "<sha256 of line 6 as written>", "sig": "<Ed25519 over the line without sig>"}

``prev`` links each entry to the exact bytes of the one before, so an entry changed, removed or
moved breaks the chain at the next line; ``sig`` (when the vehicle has a report key) makes a
rewritten chain detectable without trusting the file. Appends are whole lines, fsynced; a line
cut by a kill is dropped when the log is opened again (it was never acknowledged); a full disk
keeps entries in memory and writes them at the next append. Bounded: past ``max_entries`` the
oldest half goes, and the file starts with a signed ``pruned`` entry carrying the sequence
number and digest of the last entry removed, so the rest still verifies. A report the TBOX
repeats (the same message id) is logged once.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.adapters.storage import atomic_write_bytes

__all__ = ["UpdateLog", "verify_log", "verify_log_data", "LOG_FILE"]

log = logging.getLogger(__name__)

LOG_FILE = "update-log.jsonl"
ZERO = "0" * 64


def _canonical(entry: dict[str, Any]) -> bytes:
    return json.dumps({k: v for k, v in entry.items() if k != "sig"}, sort_keys=True, separators=(",", ":")).encode()


def _line(entry: dict[str, Any], key: Ed25519PrivateKey | None) -> bytes:
    if key is not None:
        entry = {**entry, "sig": base64.b64encode(key.sign(_canonical(entry))).decode()}
    return json.dumps(entry, sort_keys=True, separators=(",", ":")).encode() + b"\n"


class UpdateLog:
    def __init__(self, path: str | os.PathLike[str], key: Ed25519PrivateKey | None, max_entries: int = 20_000) -> None:
        self.path, self.key, self.max_entries = Path(path), key, max(2, max_entries)
        self._lock = threading.Lock()
        self._pending: list[bytes] = []  # lines a full disk did not take yet
        self._seen: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.seq, self.last, self.count = 0, ZERO, 0
        self._open()

    def _open(self) -> None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        whole, _, torn = data.rpartition(b"\n")
        if torn:  # a line cut by a kill: never acknowledged, dropped
            log.warning("%s: a cut-off last entry (%d bytes) dropped", self.path, len(torn))
            with open(self.path, "r+b") as handle:
                handle.truncate(len(whole) + 1 if whole else 0)
                os.fsync(handle.fileno())
        for raw in (whole.split(b"\n") if whole else []):
            try:
                entry = json.loads(raw)
            except ValueError:
                continue
            self.count += 1
            self.seq = int(entry.get("seq", self.seq))
            self.last = hashlib.sha256(raw + b"\n").hexdigest()
            if isinstance(entry.get("id"), str):
                self._remember(entry["id"])

    def _remember(self, msg_id: str) -> None:
        self._seen[msg_id] = None
        while len(self._seen) > 4096:
            self._seen.popitem(last=False)

    def append(self, kind: str, msg_id: str, body: dict[str, Any]) -> None:
        """Log one report (once per message id)."""
        with self._lock:
            if msg_id in self._seen:
                return
            self._remember(msg_id)
            self.seq += 1
            entry = {"seq": self.seq, "ts": round(time.time(), 3), "id": msg_id, "type": kind,
                     "campaign_id": body.get("campaign_id"), "body": body, "prev": self.last}
            line = _line(entry, self.key)
            self.last = hashlib.sha256(line).hexdigest()
            self._pending.append(line)
            self._flush()

    def _flush(self) -> None:
        """The pending lines appended whole, or not at all: a full disk may take part of a write,
        and what it took is cut off again (truncating needs no room) before the lines are kept
        for the next append."""
        data = b"".join(self._pending)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            log.warning("%s: %d entries not written yet (%s)", self.path, len(self._pending), exc.strerror or exc)
            return
        size = os.fstat(fd).st_size
        try:
            done = 0
            while done < len(data):
                done += os.write(fd, data[done:])
            os.fsync(fd)
        except OSError as exc:  # a full disk: kept here, written with the next entry
            try:
                os.ftruncate(fd, size)
                os.fsync(fd)
            except OSError:
                pass  # a torn line left: dropped when the log is opened again
            log.warning("%s: %d entries not written yet (%s)", self.path, len(self._pending), exc.strerror or exc)
            return
        finally:
            os.close(fd)
        self.count += len(self._pending)
        self._pending.clear()
        if self.count > self.max_entries:
            self._prune()

    def _prune(self) -> None:
        """The oldest half removed; a signed ``pruned`` entry names the last one removed."""
        try:
            lines = self.path.read_bytes().splitlines(keepends=True)
            keep = lines[len(lines) // 2:]
            gone = json.loads(lines[len(lines) // 2 - 1])
            marker = {"seq": int(gone["seq"]), "type": "pruned", "ts": round(time.time(), 3),
                      "pruned": {"through_seq": int(gone["seq"]), "digest": hashlib.sha256(lines[len(lines) // 2 - 1]).hexdigest()}}
            atomic_write_bytes(self.path, _line(marker, self.key) + b"".join(keep))
            self.count = len(keep) + 1
        except (OSError, ValueError, KeyError, IndexError) as exc:
            log.warning("%s: not pruned (%s)", self.path, exc)


def _check(entry: Any, raw: bytes, number: int, prev: str | None, seq: int | None,
           key: Ed25519PublicKey | None) -> str | None:
    """Why one line breaks the log (None: it holds)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("seq"), int):
        return "not a log entry"
    if key is not None:
        try:
            key.verify(base64.b64decode(str(entry.get("sig"))), _canonical(entry))
        except (InvalidSignature, ValueError):
            return "the signature does not verify: the entry was changed, or not written by this vehicle"
    if entry.get("type") == "pruned" and number == 1:
        return None
    if number == 1 and entry.get("prev") != ZERO:
        return "the log does not begin with its first entry nor a signed pruned entry: its head was removed"
    if prev is not None and entry.get("prev") != prev:
        return "does not link to the entry before it: an entry before it was changed, removed or moved"
    if seq is not None and entry["seq"] != seq + 1:
        return f"sequence {entry['seq']} after {seq}: an entry was removed or moved"
    return None


def verify_log(path: str | os.PathLike[str], key: Ed25519PublicKey | None) -> dict[str, Any]:
    """Check a log offline: ``{"ok", "entries", "first_seq", "last_seq", "campaigns", "broken"}``;
    ``broken`` names the first line that does not hold (its number, sequence and why)."""
    return verify_log_data(Path(path).read_bytes(), key)


def verify_log_data(data: bytes, key: Ed25519PublicKey | None) -> dict[str, Any]:
    """``verify_log`` of a log's bytes (one carried in an evidence pack)."""
    prev: str | None = None
    seq: int | None = None
    first: int | None = None
    count, campaigns = 0, set[str]()
    for number, raw in enumerate(data.splitlines(keepends=True), 1):
        try:
            entry: Any = json.loads(raw)
            why = _check(entry, raw, number, prev, seq, key)
        except ValueError:
            entry, why = None, "not a JSON entry" + ("" if raw.endswith(b"\n") else " (cut off)")
        if why is not None:
            return {"ok": False, "entries": count, "first_seq": first, "last_seq": seq, "campaigns": sorted(campaigns),
                    "broken": {"line": number, "seq": entry.get("seq") if isinstance(entry, dict) else None, "why": why}}
        if entry.get("type") == "pruned" and number == 1:
            prev, seq, first = (entry.get("pruned") or {}).get("digest"), entry["seq"], entry["seq"] + 1
            continue
        prev, seq = hashlib.sha256(raw).hexdigest(), entry["seq"]
        first = first if first is not None else seq
        count += 1
        if entry.get("campaign_id"):
            campaigns.add(str(entry["campaign_id"]))
    return {"ok": True, "entries": count, "first_seq": first, "last_seq": seq, "campaigns": sorted(campaigns), "broken": None}
