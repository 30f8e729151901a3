"""The store-and-forward outbox: everything the vehicle must report goes here first.

SQLite in WAL mode; a message leaves only when it was acknowledged (``ack``): by the cloud,
once it stored it, or by the broker where the cloud does not acknowledge. A message the
broker took is marked ``published`` and is sent again when the cloud's acknowledgement does
not follow within the resend time (the broker may lose it: a session wiped, a restart). Each
message has a stable id that travels in its payload, so a message sent twice (a broker
restart between publish and acknowledgement, a TBOX restart) is one message to the cloud.
A database that cannot be written (the disk full, read-only, failing) raises ``StorageError``
(an OSError): the caller waits it out like any other storage fault; nothing stored is lost.
"""

from __future__ import annotations

import contextlib
import errno
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from agent.adapters.storage import StorageError

__all__ = ["Outbox", "OutboxMessage"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    id      TEXT NOT NULL UNIQUE,
    topic   TEXT NOT NULL,
    payload BLOB NOT NULL,
    retain  INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    published REAL
);
"""


@dataclass(frozen=True)
class OutboxMessage:
    seq: int
    id: str
    topic: str
    payload: bytes
    retain: bool


class Outbox:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(outbox)")}
        if "published" not in columns:  # an outbox from before the cloud's acknowledgements
            self._db.execute("ALTER TABLE outbox ADD COLUMN published REAL")

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex

    @contextlib.contextmanager
    def _db_call(self, what: str) -> Iterator[Any]:
        with self._lock:
            try:
                yield self._db
            except sqlite3.Error as exc:
                raise StorageError(errno.ENOSPC if "full" in str(exc) else errno.EIO,
                                   f"outbox {what}: {exc}", str(self.path)) from None

    def put(self, topic: str, payload: bytes, msg_id: str | None = None, retain: bool = False) -> str:
        """Store a message durably (committed before this returns). A known id is ignored."""
        msg_id = msg_id or self.new_id()
        with self._db_call("put") as db:
            db.execute(
                "INSERT OR IGNORE INTO outbox (id, topic, payload, retain, created) VALUES (?, ?, ?, ?, ?)",
                (msg_id, topic, payload, int(retain), time.time()),
            )
        return msg_id

    def pending(self, limit: int = 100, exclude: set[str] | None = None, resend_after: float | None = None) -> list[OutboxMessage]:
        """The messages to send, oldest first: not published yet, or published more than
        ``resend_after`` seconds ago and still not acknowledged."""
        since = time.time() - resend_after if resend_after is not None else -1.0
        with self._db_call("read") as db:
            rows = db.execute(
                "SELECT seq, id, topic, payload, retain FROM outbox WHERE published IS NULL OR published < ? "
                "ORDER BY seq LIMIT ?", (since, limit + len(exclude or ())),
            ).fetchall()
        out = [OutboxMessage(r[0], r[1], r[2], bytes(r[3]), bool(r[4])) for r in rows]
        if exclude:
            out = [m for m in out if m.id not in exclude]
        return out[:limit]

    def published(self, msg_id: str) -> None:
        """The broker took it: kept until the cloud acknowledges it, sent again if it does not."""
        with self._db_call("mark") as db:
            db.execute("UPDATE outbox SET published = ? WHERE id = ?", (time.time(), msg_id))

    def ack(self, msg_id: str) -> None:
        with self._db_call("ack") as db:
            db.execute("DELETE FROM outbox WHERE id = ?", (msg_id,))

    def unpublished(self) -> int:
        """Messages the broker has not taken yet."""
        with self._db_call("count") as db:
            return int(db.execute("SELECT COUNT(*) FROM outbox WHERE published IS NULL").fetchone()[0])

    def compact(self) -> bool:
        """Give back the space of sent messages (months of reports must not grow the file): the
        write-ahead log truncated, the file vacuumed when a quarter or more of it is free pages.
        True when it vacuumed."""
        with self._db_call("compact") as db:
            pages = int(db.execute("PRAGMA page_count").fetchone()[0])
            free = int(db.execute("PRAGMA freelist_count").fetchone()[0])
            vacuum = pages > 64 and free * 4 >= pages
            if vacuum:
                db.execute("VACUUM")
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            return vacuum

    def __len__(self) -> int:
        with self._db_call("count") as db:
            return int(db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
