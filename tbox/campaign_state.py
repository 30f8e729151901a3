"""The persisted life of one campaign on the TBOX (Mender-style state machine storage).

``campaigns/<key>/state.json`` holds the state (stable names, schema version) and what has
been achieved so far; it is written atomically *before* each state's handler runs, so a
restart resumes where the TBOX stopped. ``entries`` counts how often each state was
entered: the loop guard. Each package has a typed entry (``PackageEntry``: how far its download
and deploy got, which image goes), the campaign's times are typed too (``CampaignTimes``); on
disk both are objects with only the keys that are set.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from agent.adapters.storage import atomic_write_json
from agent.errors import VotaError

__all__ = ["CampaignRecord", "PackageEntry", "CampaignTimes", "STATES", "TERMINAL", "SCHEMA"]

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


def _set_only(doc: dict[str, Any], defaults: Any) -> dict[str, Any]:
    """``doc`` without the fields that still have their default value."""
    return {k: v for k, v in doc.items() if v != getattr(defaults, k)}


def _known(cls: type, doc: Any) -> dict[str, Any]:
    """The keys of ``doc`` that are fields of ``cls`` (a record written by another version keeps its readable part)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in dict(doc or {}).items() if k in names}


@dataclass
class PackageEntry:
    """How far one package of a campaign got on this TBOX."""

    ecu: str = ""
    version: str = ""
    image: str | None = None  # delta | full: what goes to the gateway (a package that carries a delta)
    why: str | None = None  # ... and why
    downloaded: bool = False
    resumed_from: int = 0  # the byte its (last) download resumed at
    deploy_started: bool = False  # a deploy began: the next one resumes (RequestFileTransfer ResumeFile)
    deploy: str | None = None  # success | failed, once its deploy ended
    deploy_interruptions: int = 0  # deploys cut off by a gateway restart

    def to_json(self) -> dict[str, Any]:
        return _set_only(asdict(self), _NO_ENTRY)

    @classmethod
    def from_json(cls, doc: Any) -> "PackageEntry":
        return cls(**_known(cls, doc))

    def start_over(self) -> None:
        """Download and deploy again (the full image instead of a refused delta)."""
        self.downloaded, self.resumed_from, self.deploy_started, self.deploy = False, 0, False, None


_NO_ENTRY = PackageEntry()


@dataclass
class CampaignTimes:
    """Epoch seconds and estimates of a campaign's install."""

    waiting_since: float | None = None  # it first waited for its preconditions: the install window starts
    install_began: float | None = None
    install_ended: float | None = None
    estimated_install_s: float | None = None  # told to the cloud before the install
    estimated_recovery_s: float | None = None  # the way back if it fails late: the charge must cover it too
    staging_stopped: int = 0  # times the gateway stopped staging for the vehicle's state

    def to_json(self) -> dict[str, Any]:
        return _set_only(asdict(self), _NO_TIMES)

    @classmethod
    def from_json(cls, doc: Any) -> "CampaignTimes":
        known = {k: v for k, v in _known(cls, doc).items() if v is not None}
        stopped = int(known.pop("staging_stopped", 0))
        return cls(**{k: float(v) for k, v in known.items()}, staging_stopped=stopped)


_NO_TIMES = CampaignTimes()


@dataclass
class CampaignRecord:
    key: str  # directory name: the envelope's digest prefix until the campaign is verified
    dir: Path
    state: str = "received"
    campaign_id: str | None = None
    entries: dict[str, int] = field(default_factory=dict)
    packages: dict[str, PackageEntry] = field(default_factory=dict)
    confirmed: bool = False
    install_started: bool = False
    install_ended: bool = False  # the gateway said the install is over (its results are being collected)
    outcome: str | None = None  # success | failed
    failure: dict[str, Any] | None = None
    versions: dict[str, Any] | None = None  # what the campaign's ECUs run at its end, read back by the gateway
    interruptions: list[Any] | None = None  # where the gateway was stopped in the middle of the install
    revertible: bool | None = None  # false: an ECU of the campaign has a single flash bank (no way back)
    cancel: dict[str, Any] | None = None  # the failed campaign's install cancelled on the gateway (tbox/cancel.py)
    rxswin: dict[str, Any] | None = None  # the vehicle's RXSWIN set before and after the install (gateway/rxswin.py)
    times: CampaignTimes = field(default_factory=CampaignTimes)

    @property
    def envelope_path(self) -> Path:
        return self.dir / "campaign.signed.json"

    @property
    def path(self) -> Path:
        return self.dir / "state.json"

    def save(self) -> None:
        atomic_write_json(self.path, {
            "schema": SCHEMA, "key": self.key, "state": self.state, "campaign_id": self.campaign_id,
            "entries": self.entries, "packages": {n: e.to_json() for n, e in self.packages.items()},
            "confirmed": self.confirmed,
            "install_started": self.install_started, "install_ended": self.install_ended, "outcome": self.outcome, "failure": self.failure,
            "versions": self.versions, "interruptions": self.interruptions,
            "revertible": self.revertible, "times": self.times.to_json(),
            **({"cancel": self.cancel} if self.cancel is not None else {}),
            **({"rxswin": self.rxswin} if self.rxswin is not None else {}),
        })

    @classmethod
    def load(cls, directory: Path) -> "CampaignRecord":
        path = directory / "state.json"
        try:
            doc = json.loads(path.read_text())
            if doc.get("schema") != SCHEMA or doc.get("state") not in STATES:
                raise ValueError(f"schema {doc.get('schema')!r}, state {doc.get('state')!r}")
            return cls(key=doc["key"], dir=directory, state=doc["state"], campaign_id=doc.get("campaign_id"),
                       entries=dict(doc.get("entries", {})),
                       packages={str(n): PackageEntry.from_json(e) for n, e in dict(doc.get("packages") or {}).items()},
                       confirmed=bool(doc.get("confirmed")), install_started=bool(doc.get("install_started")),
                       install_ended=bool(doc.get("install_ended")),
                       outcome=doc.get("outcome"), failure=doc.get("failure"), versions=doc.get("versions"),
                       interruptions=doc.get("interruptions"), revertible=doc.get("revertible"),
                       times=CampaignTimes.from_json(doc.get("times")),
                       cancel=doc["cancel"] if isinstance(doc.get("cancel"), dict) else None,
                       rxswin=doc["rxswin"] if isinstance(doc.get("rxswin"), dict) else None)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise VotaError(f"{path}: unreadable campaign state ({exc})") from None

    def enter(self, state: str) -> int:
        """Persist the state before its handler runs; returns how often it was entered."""
        assert state in STATES
        self.state = state
        self.entries[state] = self.entries.get(state, 0) + 1
        self.save()
        return self.entries[state]
