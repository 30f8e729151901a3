"""The gateway flashes only what a trusted party signed (Uptane's full verification, done by
the gateway itself rather than taken on the TBOX's word).

Any node on the TBOX-gateway link can deploy files and start an install; so before anything
is erased, every job of an install manifest is checked against the signed documents the
manifest carries (``proof``): a campaign signed by a threshold of the campaign role's keys
(the configured ones, or those of the newest key list taken) for this vehicle,
whose packages are exactly the jobs (ECU, file name, version, order, activation) and whose
digests and sizes are those of the deployed files (a delta's too: the patch is the signed one,
and the image it makes is the package's, checked by the ECU against the signed digest); or, for a software item of owner content,
the bundle manifest signed by a trusted content key, the item for that ECU at that version,
and the image's digest (the plaintext digest the manifest signs for encrypted items).
Whether an image is older than what the ECU runs is checked per ECU when it is flashed
(``FlashJob.guard_rollback``). A campaign past its expiry (the gateway's own clock, five minutes'
slack) starts no install; one that started before goes on after a restart. Pure: no I/O.
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import hashlib
from dataclasses import dataclass, field
from typing import Any, Mapping

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.core.campaign import CampaignRejected, Package, verify_campaign
from agent.core.content import BundleRejected, verify_manifest
from agent.core.roles import Role
from agent.core.rxswin import Change
from agent.errors import InstallRefused
from agent.protocol.link import InstallManifest

__all__ = ["Trust", "Approved", "check_install"]

# Signatures are checked for any time (the validity period below, with the gateway's own clock).
_NO_EXPIRY = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)
CLOCK_SLACK = _dt.timedelta(minutes=5)  # the gateway's clock against the TBOX's network time


@dataclass(frozen=True)
class Trust:
    """The VIN and the roles in force (a plain key map is a role with a threshold of one)."""

    vin: str | None
    campaign_keys: Role | Mapping[str, Ed25519PublicKey] = field(default_factory=dict)
    content_keys: Role | Mapping[str, Ed25519PublicKey] = field(default_factory=dict)
    now: _dt.datetime | None = None  # the gateway's clock: a campaign past its expiry starts no install (None: not checked)


@dataclass(frozen=True)
class Approved:
    """An install whose every job is what a trusted party signed; by ECU, the signed packages
    whose delta is to be sent, and every signed package (a pipelined install checks the
    packages still on their way against them when they arrive)."""

    deltas: Mapping[str, Package] = field(default_factory=dict)
    packages: Mapping[str, Package] = field(default_factory=dict)
    rxswin: tuple[Change, ...] = ()  # the RXSWIN values the signed campaign changes


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise ValueError(f"{what} is missing")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what} is not base64") from None


def _image_matches(image: bytes, size: int, sha256: str) -> bool:
    return len(image) == size and hashlib.sha256(image).hexdigest() == sha256


def _refused(why: str, manifest: InstallManifest) -> InstallRefused:
    return InstallRefused(why, manifest.campaign_id)


def check_install(manifest: InstallManifest, images: Mapping[str, bytes], trust: Trust, ecus: set[str]) -> Approved:
    """Approved when every job is what a trusted party signed for this vehicle; else InstallRefused
    says why not."""
    if not trust.vin:
        raise _refused("the gateway knows no VIN to check signed campaigns against (tbox.vin or gateway.vin)",
                       manifest)
    proof = manifest.proof or {}
    try:
        if "campaign" in proof:
            return _check_campaign(manifest, images, trust, ecus, _b64(proof["campaign"], "proof.campaign"))
        if "content" in proof and isinstance(proof["content"], dict):
            return _check_content(manifest, images, trust, proof["content"])
    except ValueError as exc:
        raise _refused(f"not signed: {exc}", manifest) from None
    raise _refused("not signed: the install manifest carries no signed campaign or content manifest", manifest)


def _check_campaign(manifest: InstallManifest, images: Mapping[str, bytes], trust: Trust, ecus: set[str],
                    envelope: bytes) -> Approved:
    if not Role.of(trust.campaign_keys).keys:
        raise _refused("the gateway has no trusted campaign keys (gateway.trusted_keys or tbox.trusted_keys)",
                       manifest)
    assert trust.vin is not None
    try:
        campaign = verify_campaign(envelope, trust.campaign_keys, vin=trust.vin, now=_NO_EXPIRY, known_ecus=ecus,
                                   check_time=False)
    except CampaignRejected as exc:
        raise _refused(f"not signed: {exc}", manifest) from None
    if trust.now is not None and trust.now > campaign.expires + CLOCK_SLACK:
        raise _refused(f"expired: the signed campaign expired at {campaign.expires.isoformat()} (the gateway's clock: "
                       f"{trust.now.isoformat(timespec='seconds')})", manifest)
    if campaign.campaign_id != manifest.campaign_id:
        raise _refused(f"the signed campaign is {campaign.campaign_id}, the manifest names {manifest.campaign_id}",
                       manifest)
    if campaign.activation != manifest.activation:
        raise _refused(f"the signed campaign activates {campaign.activation}, the manifest {manifest.activation}", manifest)
    signed = {(p.ecu, p.name, p.version, p.order) for p in campaign.packages}
    asked = {(j.ecu, j.package, j.version, j.order) for j in manifest.jobs}
    if asked != signed:  # no job added, none left out (mix-and-match, partial bundle)
        extra, missing = sorted(asked - signed), sorted(signed - asked)
        raise _refused(f"the jobs are not the signed campaign's packages (not signed: {extra}, left out: {missing})",
                       manifest)
    jobs = {j.ecu: j for j in manifest.jobs}
    arriving = manifest.arriving  # what is not here yet (or not yet replaced) is checked when it arrives
    for p in campaign.packages:
        job, full = jobs[p.ecu], images.get(p.name)
        if full is not None and not _image_matches(full, p.size, p.sha256) and not arriving:
            raise _refused(f"{p.name}: the deployed file is not the signed package (size or SHA-256)", manifest)
        if job.delta is not None:
            if p.delta is None or job.delta != p.delta.name:
                raise _refused(f"{job.delta}: not the signed campaign's delta for {p.ecu}", manifest)
            if not _image_matches(images.get(job.delta, b""), p.delta.size, p.delta.sha256) and not arriving:
                raise _refused(f"{job.delta}: the deployed file is not the signed delta (size or SHA-256)", manifest)
        elif full is None and not arriving:
            raise _refused(f"package {p.name!r} was not deployed", manifest)
    return Approved({p.ecu: p for p in campaign.packages if p.delta is not None and jobs[p.ecu].delta is not None},
                    {p.ecu: p for p in campaign.packages}, campaign.rxswin)


def _check_content(manifest: InstallManifest, images: Mapping[str, bytes], trust: Trust, proof: dict[str, Any]) -> Approved:
    keys = trust.content_keys if Role.of(trust.content_keys).keys else trust.campaign_keys
    if not Role.of(keys).keys:
        raise _refused("the gateway has no trusted content keys", manifest)
    assert trust.vin is not None
    body, signature = _b64(proof.get("manifest"), "proof.content.manifest"), _b64(proof.get("signature"), "proof.content.signature")
    try:
        bundle = verify_manifest(body, signature, keys, vin=trust.vin, now=_NO_EXPIRY)
    except BundleRejected as exc:
        raise _refused(f"not signed: {exc}", manifest) from None
    item = next((i for i in bundle.items if i.id == proof.get("item")), None)
    if item is None or item.cls != "software":
        raise _refused(f"the signed bundle {bundle.bundle_id} has no software item {proof.get('item')!r}", manifest)
    if len(manifest.jobs) != 1:
        raise _refused("a content item installs on one ECU", manifest)
    job = manifest.jobs[0]
    if job.delta is not None or manifest.arriving:
        raise _refused("a content item installs a full image, deployed before its install", manifest)
    if (job.ecu, job.version) != (item.target, item.raw.get("version")):
        raise _refused(f"the signed item installs {item.raw.get('version')!r} on {item.target}, "
                       f"the manifest {job.version!r} on {job.ecu}", manifest)
    image = images.get(job.package, b"")
    meta = item.encryption
    matches = (_image_matches(image, int(meta.get("plain_size", -1)), str(meta.get("plain_sha256"))) if meta
               else _image_matches(image, item.size, item.sha256))
    if not matches:
        raise _refused(f"{job.package}: the deployed file is not the signed item {item.id} (size or SHA-256)", manifest)
    return Approved()
