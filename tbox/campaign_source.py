"""Where a campaign comes from, and the campaign itself as the runner trusts it.

Two sources: a campaign the cloud signed (``campaign.signed.json`` in the campaign's directory;
it may have come on removable media, ``tbox/offline.py``), and a campaign this TBOX made itself
from a ``software`` item of owner content whose bundle it verified (``campaign.local.json``,
C1). ``source_of(record)`` tells which; each knows how it is verified when it arrives (against
the inventory: no downgrade, no ECU that does not tell its version) and what the gateway checks
the install against (``proof``).

``VerifiedCampaigns`` keeps each campaign as verified for the runner's lifetime: the envelope is
read and verified once per runner (a runner built anew after a restart verifies it again), not
in every state.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

from agent.adapters.storage import atomic_write_bytes, atomic_write_json
from agent.core.campaign import Campaign, CampaignRejected, Package, compare_versions, verify_campaign
from agent.core.roles import Role
from tbox.campaign_state import CampaignRecord, PackageEntry
from tbox.offline import MEDIA, ORIGIN

__all__ = ["CampaignSource", "SignedCampaign", "LocalCampaign", "source_of", "make_local_campaign", "VerifiedCampaigns",
           "LOCAL_CAMPAIGN"]

LOCAL_CAMPAIGN = "campaign.local.json"  # a campaign the TBOX made itself from a verified content item


class CampaignSource(Protocol):
    kind: str  # signed | local

    def verify(self, trusted: Role, vin: str, now: _dt.datetime, installed: Mapping[str, str] | None,
               known_ecus: set[str] | None) -> Campaign:
        """The campaign; CampaignRejected when it must not run (with ``installed``: no downgrade)."""

    def proof(self) -> dict[str, Any]:
        """What the gateway verifies the install against (gateway/verify.py)."""

    @property
    def media(self) -> Path | None:
        """Where its packages are when they came on removable media, else None (downloaded)."""

    def origin(self) -> dict[str, Any] | None:
        """Where it was imported from (removable media), told to the cloud."""


class SignedCampaign:
    """A campaign the cloud signed: verified from its envelope like any document it signs."""

    kind = "signed"

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    @property
    def envelope(self) -> Path:
        return self.dir / "campaign.signed.json"

    def verify(self, trusted: Role, vin: str, now: _dt.datetime, installed: Mapping[str, str] | None,
               known_ecus: set[str] | None) -> Campaign:
        # expiry was checked when it arrived: a campaign that expires while it runs is finished
        return verify_campaign(self.envelope.read_bytes(), trusted, vin=vin, now=now, installed=installed,
                               known_ecus=known_ecus, check_time=installed is not None)

    def proof(self) -> dict[str, Any]:
        return {"campaign": base64.b64encode(self.envelope.read_bytes()).decode()}

    @property
    def media(self) -> Path | None:
        return self.dir / MEDIA if (self.dir / MEDIA).is_dir() else None

    def origin(self) -> dict[str, Any] | None:
        path = self.dir / ORIGIN
        return dict(json.loads(path.read_text())) if path.exists() else None


class LocalCampaign:
    """A campaign made by this TBOX from a content item whose bundle it verified: the same
    downgrade rules as the cloud's campaigns; the gateway checks the signed bundle (``proof``)."""

    kind = "local"

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def _doc(self) -> dict[str, Any]:
        return dict(json.loads((self.dir / LOCAL_CAMPAIGN).read_text()))

    def verify(self, trusted: Role, vin: str, now: _dt.datetime, installed: Mapping[str, str] | None,
               known_ecus: set[str] | None) -> Campaign:
        doc = self._doc()
        packages = tuple(Package(**p) for p in doc["packages"])
        campaign = Campaign(doc["campaign_id"], vin, now, now + _dt.timedelta(days=1), doc["install"], packages, doc)
        for p in packages if installed is not None else ():
            current = installed.get(p.ecu)  # type: ignore[union-attr]
            if not current:
                raise CampaignRejected("unknown_version", f"{p.ecu}: its installed version could not be read, "
                                                          f"so a downgrade cannot be ruled out", campaign.campaign_id)
            if compare_versions(p.version, current) < 0:
                raise CampaignRejected("downgrade", f"{p.ecu}: {p.version} is older than the installed {current}",
                                       campaign.campaign_id)
        return campaign

    def proof(self) -> dict[str, Any]:
        return dict(self._doc().get("proof") or {})

    @property
    def media(self) -> Path | None:
        return None

    def origin(self) -> dict[str, Any] | None:
        return None


def source_of(record: CampaignRecord) -> CampaignSource:
    return LocalCampaign(record.dir) if (record.dir / LOCAL_CAMPAIGN).exists() else SignedCampaign(record.dir)


def make_local_campaign(campaigns_dir: Path, campaign_id: str, ecu: str, version: str, data: bytes,
                        proof: dict[str, Any] | None) -> None:
    """A ``software`` content item as a campaign through deploy -> flash (C1), its package already
    here; ``proof`` is the signed bundle manifest and the item. Made once per campaign id."""
    key = "local-" + hashlib.sha256(campaign_id.encode()).hexdigest()[:18]
    directory = campaigns_dir / key
    if (directory / "state.json").exists():
        return
    name = f"{campaign_id}.bin"
    atomic_write_bytes(directory / "packages" / name, data)
    package = {"name": name, "ecu": ecu, "version": version, "url": "", "size": len(data),
               "sha256": hashlib.sha256(data).hexdigest()}
    atomic_write_json(directory / LOCAL_CAMPAIGN, {"campaign_id": campaign_id, "install": "immediate",
                                                     "packages": [package], "proof": proof})
    record = CampaignRecord(key, directory)
    record.packages = {name: PackageEntry(ecu, version, downloaded=True)}
    record.save()


class VerifiedCampaigns:
    """Each record's campaign as verified, kept for the runner's lifetime; verified again once the
    trusted keys change (a key list taken)."""

    def __init__(self, vin: str, trusted: Role, now: Callable[[], _dt.datetime]) -> None:
        self.vin, self.now = vin, now
        self._trusted = trusted
        self._kept: dict[str, Campaign] = {}

    @property
    def trusted(self) -> Role:
        return self._trusted

    @trusted.setter
    def trusted(self, role: Role) -> None:
        self._trusted = role
        self._kept.clear()

    def identify(self, record: CampaignRecord) -> str | None:
        """The campaign's id once its signature and vehicle hold, before anything is read from the
        gateway: a campaign that fails there (the gateway locked out, unreachable) is reported
        under its id. None when it does not verify (refused with the reason later)."""
        try:
            return source_of(record).verify(self._trusted, self.vin, self.now(), None, None).campaign_id
        except CampaignRejected:
            return None

    def arrived(self, record: CampaignRecord, installed: Mapping[str, str], known_ecus: set[str]) -> Campaign:
        """Verified as it arrives, against what the vehicle runs (CampaignRejected when it must not run)."""
        campaign = source_of(record).verify(self._trusted, self.vin, self.now(), installed, known_ecus)
        self._kept[record.key] = campaign
        return campaign

    def of(self, record: CampaignRecord) -> Campaign:
        """The campaign of a record that was verified when it arrived (CampaignRejected if it no longer verifies)."""
        campaign = self._kept.get(record.key)
        if campaign is None:
            campaign = self._kept[record.key] = source_of(record).verify(self._trusted, self.vin, self.now(), None, None)
        return campaign
