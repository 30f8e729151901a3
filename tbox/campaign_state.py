"""The persisted life of one campaign on the TBOX (Mender-style state machine storage).

``campaigns/<key>/state.json`` holds the state (stable names, schema version) and what has
been achieved so far; it is written atomically *before* each state's handler runs, so a
restart resumes where the TBOX stopped. ``entries`` counts how often each state was
entered: the loop guard.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.adapters.storage import atomic_write_json
from agent.errors import VotaError

__all__ = ["CampaignRecord", "STATES", "TERMINAL", "SCHEMA"]

SCHEMA = 1
STATES = (
    "received",
    "verified",
    "downloading",
    "downloaded",
    "deploying",
    "deployed",
    "awaiting_install",
    "installing",
    "done",
    "failed",
    "reported",
)
TERMINAL = ("reported",)


@dataclass
class CampaignRecord:
    key: str  # directory name: the envelope's digest prefix until the campaign is verified
    dir: Path
    state: str = "received"
    campaign_id: str | None = None
    entries: dict[str, int] = field(default_factory=dict)
    packages: dict[str, dict[str, Any]] = field(default_factory=dict)
    confirmed: bool = False
    install_started: bool = False
    install_ended: bool = False  # the gateway said the install is over (its results are being collected)
    outcome: str | None = None  # success | failed
    failure: dict[str, Any] | None = None
    versions: dict[str, Any] | None = None  # what the campaign's ECUs run at its end, read back by the gateway
    interruptions: list[Any] | None = None  # where the gateway was stopped in the middle of the install
    revertible: bool | None = None  # false: an ECU of the campaign has a single flash bank (no way back)
    # epoch seconds and estimates: "waiting_since" (preconditions), "install_began", "install_ended",
    # "estimated_install_s"
    times: dict[str, float] = field(default_factory=dict)

    @property
    def envelope_path(self) -> Path:
        return self.dir / "campaign.signed.json"

    @property
    def path(self) -> Path:
        return self.dir / "state.json"

    def save(self) -> None:
        atomic_write_json(self.path, {
            "schema": SCHEMA, "key": self.key, "state": self.state, "campaign_id": self.campaign_id,
            "entries": self.entries, "packages": self.packages, "confirmed": self.confirmed,
            "install_started": self.install_started, "install_ended": self.install_ended, "outcome": self.outcome, "failure": self.failure,
            "versions": self.versions, "interruptions": self.interruptions,
            "revertible": self.revertible, "times": self.times,
        })

    @classmethod
    def load(cls, directory: Path) -> "CampaignRecord":
        path = directory / "state.json"
        try:
            doc = json.loads(path.read_text())
            if doc.get("schema") != SCHEMA or doc.get("state") not in STATES:
                raise ValueError(f"schema {doc.get('schema')!r}, state {doc.get('state')!r}")
            return cls(key=doc["key"], dir=directory, state=doc["state"], campaign_id=doc.get("campaign_id"),
                       entries=dict(doc.get("entries", {})), packages=dict(doc.get("packages", {})),
                       confirmed=bool(doc.get("confirmed")), install_started=bool(doc.get("install_started")),
                       install_ended=bool(doc.get("install_ended")),
                       outcome=doc.get("outcome"), failure=doc.get("failure"), versions=doc.get("versions"),
                       interruptions=doc.get("interruptions"), revertible=doc.get("revertible"),
                       times={k: float(v) for k, v in dict(doc.get("times") or {}).items()})
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise VotaError(f"{path}: unreadable campaign state ({exc})") from None

    def enter(self, state: str) -> int:
        """Persist the state before its handler runs; returns how often it was entered."""
        assert state in STATES
        self.state = state
        self.entries[state] = self.entries.get(state, 0) + 1
        self.save()
        return self.entries[state]
