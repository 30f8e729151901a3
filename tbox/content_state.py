"""The persisted state of owner content on the TBOX, typed like ``CampaignRecord``.

``<state_dir>/content/bundles/<id>-v<version>/state.json`` (schema 1, written atomically) holds
one ``BundleRecord``: the bundle's status and one ``ItemRecord`` per item. The JSON layout is
the one earlier versions wrote, so state kept across an upgrade of the TBOX reads back.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.adapters.storage import atomic_write_json
from agent.errors import VotaError

__all__ = ["BundleRecord", "ItemRecord", "load_records", "write_inbox", "SCHEMA", "RUNNING", "ENDED"]

SCHEMA = 1
RUNNING = ("offered", "scheduled", "active")
ENDED = ("expired", "declined", "failed", "superseded")


@dataclass
class ItemRecord:
    status: str = "offered"  # offered, scheduled, active, installing, expired, declined, failed, superseded
    policy: str = "auto"  # auto, manual, never
    accepted: bool = False  # the owner confirmed it (manual) or asked for it (never)
    changes: int = 0  # reports made: the last part of each report's id
    ran: bool = False  # started at least once: what it left behind is undone at its expiry
    reason: str | None = None  # why it failed
    retries: int = 0  # executor actions tried again in a row (back-off)
    revert_pending: bool = False  # an undo its ECU did not answer yet
    delivered: bool = False  # resource items: the ECU holds the material
    campaign_id: str | None = None  # software items: the campaign that installs it

    @property
    def wanted(self) -> bool:
        """Still to be downloaded and run: not declined, and not ``never`` unless asked for."""
        return (self.policy != "never" or self.accepted) and self.status != "declined"

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"status": self.status, "policy": self.policy, "accepted": self.accepted,
                               "changes": self.changes}
        optional = {"ran": self.ran, "reason": self.reason, "retries": self.retries, "revert_pending": self.revert_pending,
                    "delivered": self.delivered, "campaign_id": self.campaign_id}
        doc.update({k: v for k, v in optional.items() if v})
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "ItemRecord":
        return cls(status=str(doc["status"]), policy=str(doc.get("policy", "auto")), accepted=bool(doc.get("accepted")),
                   changes=int(doc.get("changes", 0)), ran=bool(doc.get("ran")), reason=doc.get("reason"),
                   retries=int(doc.get("retries", 0)), revert_pending=bool(doc.get("revert_pending")),
                   delivered=bool(doc.get("delivered")), campaign_id=doc.get("campaign_id"))


@dataclass
class BundleRecord:
    dir: Path
    bundle_id: str
    version: int
    title: str = ""
    owner: str = ""
    status: str = "offered"  # offered, requested, downloaded, failed, superseded
    changes: int = 0
    urls: dict[str, str] = field(default_factory=dict)
    items: dict[str, ItemRecord] = field(default_factory=dict)
    reopened: bool = False  # downloaded, then an item set never to download was asked for
    reason: str | None = None
    detail: str | None = None

    @property
    def path(self) -> Path:
        return self.dir / "state.json"

    def item_file(self, item_id: str) -> Path:
        return self.dir / "items" / f"{item_id}.bin"

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"schema": SCHEMA, "bundle_id": self.bundle_id, "version": self.version, "title": self.title,
                               "owner": self.owner, "status": self.status, "changes": self.changes, "urls": self.urls,
                               "items": {k: v.to_json() for k, v in self.items.items()}}
        optional = {"reopened": self.reopened, "reason": self.reason, "detail": self.detail}
        doc.update({k: v for k, v in optional.items() if v})
        return doc

    def save(self) -> None:
        atomic_write_json(self.path, self.to_json())

    @classmethod
    def load(cls, directory: Path) -> "BundleRecord":
        path = directory / "state.json"
        try:
            doc = json.loads(path.read_text())
            if doc.get("schema") != SCHEMA:
                raise ValueError(f"schema {doc.get('schema')!r}")
            return cls(dir=directory, bundle_id=str(doc["bundle_id"]), version=int(doc["version"]),
                       title=str(doc.get("title", "")), owner=str(doc.get("owner", "")), status=str(doc["status"]),
                       changes=int(doc.get("changes", 0)), urls=dict(doc.get("urls") or {}),
                       items={str(k): ItemRecord.from_json(v) for k, v in doc["items"].items()},
                       reopened=bool(doc.get("reopened")), reason=doc.get("reason"), detail=doc.get("detail"))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise VotaError(f"{path}: unreadable content state ({exc})") from None


def load_records(state_dir: str | Path) -> list[BundleRecord]:
    """Every bundle the TBOX knows, by bundle id and version (``vota content list``)."""
    records = [BundleRecord.load(p.parent) for p in (Path(state_dir) / "content" / "bundles").glob("*/state.json")]
    return sorted(records, key=lambda r: (r.bundle_id, r.version))


def write_inbox(state_dir: str | Path, command: dict[str, Any]) -> Path:
    """Hand a command to the running TBOX (``vota content accept|decline``)."""
    inbox = Path(state_dir) / "content" / "inbox"
    path = inbox / f"{time.time_ns()}.json"
    atomic_write_json(path, command)
    return path
