"""Campaigns from removable media: a directory (a mounted USB stick) with a signed campaign and
its packages, for a workshop or a vehicle without coverage.

The directory::

    vota-campaign.json      the signed campaign envelope, as the cloud publishes it
    packages/<name>         each package the campaign names

``vota campaign export`` (the cloud side) writes one: every package is checked against the
campaign's size and SHA-256 before it is written, the campaign last. ``vota campaign import``
(the vehicle side) hands one to the TBOX: the envelope passes the same first checks as one that
came over MQTT (form, signatures with the role's threshold, VIN, validity, ECUs), the packages
are copied off the media (it may be pulled out then), and the campaign becomes a record in state
``received`` - one rename, so the TBOX never sees half of it. From there it is the same state
machine as an online campaign: verified again with the inventory (anti-rollback), each
package checked against the signed digest as it is taken from the copy instead of downloaded,
deployed, installed, its results and traces reported through the outbox, which sends them when
the vehicle is next online. An offline campaign is never checked less strictly than an online one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from agent.adapters.storage import atomic_write_bytes, atomic_write_json
from agent.core.campaign import MAX_ENVELOPE, PAYLOAD_TYPE
from agent.core.roles import open_envelope
from agent.errors import UsageError
from agent.protocol.files import PARTIAL_SUFFIXES, is_name
from tbox.campaign_state import CampaignRecord
from tbox.media import check_directory, copy_exact, read_bounded

__all__ = ["CAMPAIGN_FILE", "PACKAGES", "MEDIA", "export_campaign", "import_campaign", "package_names"]

CAMPAIGN_FILE = "vota-campaign.json"
PACKAGES = "packages"
MEDIA = "media"  # in a campaign's record: the packages copied off the media
ORIGIN = "origin.json"


def package_names(envelope: bytes) -> list[dict[str, Any]]:
    """The packages an envelope's campaign names (read, not verified: that is the TBOX's)."""
    try:
        payload, _ = open_envelope(envelope, PAYLOAD_TYPE, MAX_ENVELOPE, "campaign")
        doc = json.loads(payload)
        packages = doc["packages"]
        if not isinstance(packages, list) or not all(isinstance(p, dict) and is_name(p.get("name")) for p in packages):
            raise ValueError("packages must be a list of objects with a plain file name")
        return packages
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError) as exc:
        raise UsageError(f"not a signed campaign: {exc}") from None


def export_campaign(envelope: bytes, packages_dir: Path, out: Path) -> list[str]:
    """Write the media directory ``out``; the package names written."""
    written = []
    for p in package_names(envelope):
        name = str(p["name"])
        try:
            data = (packages_dir / name).read_bytes()
        except OSError as exc:
            raise UsageError(f"{packages_dir / name}: cannot read package ({exc.strerror})") from None
        if len(data) != p.get("size") or hashlib.sha256(data).hexdigest() != p.get("sha256"):
            raise UsageError(f"{packages_dir / name}: not the package the campaign signs (size or SHA-256)")
        atomic_write_bytes(out / PACKAGES / name, data)
        written.append(name)
    atomic_write_bytes(out / CAMPAIGN_FILE, envelope)
    return written


def import_campaign(media: Path, campaigns_dir: Path, check: Callable[[bytes], Any], *, follow_links: bool = False,
                    reserve: int = 0, beat: Callable[[], None] = lambda: None) -> CampaignRecord:
    """The campaign on ``media`` as a new record (state ``received``) in ``campaigns_dir``.
    ``check``: the first checks of an arriving campaign (raises ``CampaignRejected``). The media
    is read as hostile (``tbox/media.py``): regular files only, the envelope within its limit,
    each package copied only when it has its signed size, and only when the packages fit on the
    TBOX's storage with ``reserve`` bytes to spare; nothing is left behind when it is refused."""
    envelope = read_bounded(media / CAMPAIGN_FILE, MAX_ENVELOPE, follow_links)
    key = hashlib.sha256(envelope).hexdigest()[:24]  # as for a campaign that came over MQTT
    target = campaigns_dir / key
    if (target / "state.json").exists():
        raise UsageError(f"this campaign is already known to the TBOX ({target})")
    check(envelope)
    packages = package_names(envelope)
    check_directory(media / PACKAGES, follow_links)
    campaigns_dir.mkdir(parents=True, exist_ok=True)
    need = sum(int(p.get("size") or 0) for p in packages)
    free = shutil.disk_usage(campaigns_dir).free
    if need + reserve > free:
        raise UsageError(f"storage: the packages need {need >> 20} MiB and {reserve >> 20} MiB must stay free, "
                         f"{free >> 20} MiB are free")
    staging = campaigns_dir.parent / "import" / key
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for p in packages:
            name = str(p["name"])
            source = media / PACKAGES / name
            if name.endswith(PARTIAL_SUFFIXES) or not os.path.lexists(source):
                raise UsageError(f"{source}: the package is not on the media")
            copy_exact(source, staging / MEDIA / name, int(p.get("size") or 0), follow_links, beat)
        record = CampaignRecord(key, staging)
        atomic_write_bytes(record.envelope_path, envelope)
        atomic_write_json(staging / ORIGIN, {"from": "media", "path": str(media.resolve()), "imported": time.time()})
        record.save()  # state "received"
        os.rename(staging, target)  # the TBOX sees the whole campaign or none of it
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return CampaignRecord.load(target)
