"""Upgrade campaigns: the format, signing and verification (pure: bytes and ``now`` in,
a verified ``Campaign`` or a ``CampaignRejected`` with a reason code out; no I/O).

A signed campaign is a JSON envelope whose ``payload`` is the campaign JSON, base64-encoded,
so that the signed bytes are exactly the bytes that travel::

    {"payload_type": "application/vnd.vota.campaign+json",
     "payload": "<base64 of the campaign JSON>",
     "signatures": [{"keyid": "<16 hex>", "sig": "<base64 Ed25519 signature>"}]}

Each signature covers ``b"vota-campaign-v1\\n" + payload``; the campaign is authentic when a
threshold of distinct keys of the ``campaign`` role signed it (``agent/core/roles.py``). The
campaign itself::

    {"format": "vota-campaign", "version": 1, "campaign_id": "c-0001",
     "vin": "LVOTA000000000001", "issued": "2026-11-21T10:00:00Z",
     "expires": "2026-12-31T00:00:00Z", "install": "immediate" | "confirm",
     "packages": [{"name": "vcu-2.0.0.bin", "ecu": "vcu", "version": "2.0.0",
                   "url": "http://.../vcu-2.0.0.bin", "size": 1048576, "sha256": "<hex>",
                   "delta": {"name": "vcu-2.0.0.from-1.0.0.delta", "url": "http://...", "size": 52000,
                             "sha256": "<hex of the patch>", "base_sha256": "<hex of the image it applies to>",
                             "base_version": "1.0.0", "image_crc32": 123456789}}]}

A campaign may carry ``"preconditions": {"min_soc": 50, "charging": "forbidden", ...}``: what the
vehicle's configuration (``tbox.preconditions``) asks before its install, overridden for this
campaign (any of ``OVERRIDABLE``; which ECU reports the state and how often it is read stay the
vehicle's). Signed with the rest, so only a campaign key holder can change them.

A package may carry a delta (``agent/protocol/delta.py``) from the image the ECU runs: the
vehicle sends it when the ECU runs ``base_sha256`` (``image_crc32``, of the new image, is what a
CRC-checking ECU's check memory compares), and the full image otherwise. A package for an ECU
that verifies what it boots carries ``"image_auth": {"security_version": 3, "signature": "<128
hex>"}``: the OEM's signature over the image for that ECU model (``agent/core/image_auth.py``).
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.core import strict_json
from agent.core.hmi import parse_information
from agent.core.image_auth import ImageAuth
from agent.core.roles import Role, SignatureProblem, check_signatures, key_id, open_envelope, sign_envelope
from agent.core.rxswin import Change, parse_changes
from agent.errors import UsageError, VotaError
from agent.protocol.files import PARTIAL_SUFFIXES, is_name

__all__ = [
    "check_requirements",
    "Campaign",
    "Package",
    "Delta",
    "CampaignRejected",
    "sign_campaign",
    "verify_campaign",
    "key_id",
    "load_private_key",
    "load_public_key",
    "compare_versions",
    "PAYLOAD_TYPE",
    "OVERRIDABLE",
]

PAYLOAD_TYPE = "application/vnd.vota.campaign+json"
_DOMAIN = b"vota-campaign-v1\n"
FORMAT = "vota-campaign"
VERSION = 1
MAX_ENVELOPE = 1 << 20
_PACKAGE_KEYS = {"name", "ecu", "version", "url", "size", "sha256"}
_OPTIONAL_KEYS = {"order", "requires", "delta", "image_auth"}
_DELTA_KEYS = {"name", "url", "size", "sha256", "base_sha256", "base_version", "image_crc32"}


class CampaignRejected(VotaError):
    """A campaign the vehicle must not run; ``reason`` is a stable code for the cloud."""

    REASONS = ("malformed", "unsigned", "untrusted_key", "bad_signature", "expired", "not_yet_valid",
               "wrong_vehicle", "downgrade", "unknown_version", "unknown_ecu", "dependency", "threshold", "keys_expired",
               "rxswin")

    def __init__(self, reason: str, message: str, campaign_id: str | None = None) -> None:
        assert reason in self.REASONS
        self.reason = reason
        self.campaign_id = campaign_id
        super().__init__(f"campaign rejected ({reason}): {message}")


@dataclass(frozen=True)
class Delta:
    """A patch from the image with ``base_sha256`` (version ``base_version``) to its package's image."""

    name: str
    url: str
    size: int
    sha256: str
    base_sha256: str
    base_version: str
    image_crc32: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "url": self.url, "size": self.size, "sha256": self.sha256,
                "base_sha256": self.base_sha256, "base_version": self.base_version, "image_crc32": self.image_crc32}


@dataclass(frozen=True)
class Package:
    name: str
    ecu: str
    version: str
    url: str
    size: int
    sha256: str
    order: int = 0  # install order: same order, one group (in parallel across segments); groups one after another
    requires: tuple[tuple[str, str], ...] = ()  # (ECU, minimum version) that must hold once the campaign is in
    delta: Delta | None = None  # a patch to this image from one the ECU may run
    image_auth: ImageAuth | None = None  # the OEM's signature for an ECU that verifies what it boots

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"name": self.name, "ecu": self.ecu, "version": self.version, "url": self.url,
                               "size": self.size, "sha256": self.sha256}
        if self.order:
            doc["order"] = self.order
        if self.requires:
            doc["requires"] = dict(self.requires)
        if self.delta is not None:
            doc["delta"] = self.delta.to_json()
        if self.image_auth is not None:
            doc["image_auth"] = self.image_auth.to_json()
        return doc


@dataclass(frozen=True)
class Campaign:
    campaign_id: str
    vin: str
    issued: _dt.datetime
    expires: _dt.datetime
    install: str
    packages: tuple[Package, ...]
    raw: dict[str, Any]
    activation: str = "per_ecu"  # atomic: every ECU changes together, or none does; per_ecu: each on its own
    preconditions: Mapping[str, Any] | None = None  # this campaign's overrides of tbox.preconditions
    rxswin: tuple[Change, ...] = ()  # (regulation, before, after): the RXSWIN it changes with its commit
    information: Mapping[str, Mapping[str, Any]] | None = None  # per language, what the driver is told (agent/core/hmi.py)

    def to_json(self) -> dict[str, Any]:
        return dict(self.raw)


def load_private_key(pem: bytes, source: str = "key") -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{source}: not a PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UsageError(f"{source}: not an Ed25519 private key")
    return key


def load_public_key(pem: bytes, source: str = "key") -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{source}: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise UsageError(f"{source}: not an Ed25519 public key")
    return key


def sign_campaign(campaign: Mapping[str, Any], key: Ed25519PrivateKey | Iterable[Ed25519PrivateKey]) -> bytes:
    """The signed envelope for a campaign document (validated first), one signature per key."""
    payload = json.dumps(campaign, sort_keys=True, separators=(",", ":")).encode()
    _parse(payload)  # refuse to sign what a vehicle would refuse to read
    return sign_envelope(payload, PAYLOAD_TYPE, _DOMAIN, key)


def _time(value: Any, field: str) -> _dt.datetime:
    if not isinstance(value, str):
        raise CampaignRejected("malformed", f"{field} must be an ISO 8601 time string")
    try:
        parsed = _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise CampaignRejected("malformed", f"{field} {value!r} is not an ISO 8601 time") from None
    if parsed.tzinfo is None:
        raise CampaignRejected("malformed", f"{field} {value!r} has no time zone")
    return parsed


def _parse(payload: bytes) -> Campaign:
    try:
        doc = strict_json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deeply
        raise CampaignRejected("malformed", f"the campaign payload is not JSON{strict_json.why(exc)}") from None
    if not isinstance(doc, dict):
        raise CampaignRejected("malformed", "the campaign must be a JSON object")
    cid = doc.get("campaign_id")
    cid_text = cid if isinstance(cid, str) else None
    if doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise CampaignRejected("malformed", f"format must be {FORMAT} version {VERSION}", cid_text)
    known = {"format", "version", "campaign_id", "vin", "issued", "expires", "install", "packages", "description",
             "activation", "preconditions", "rxswin", "information"}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise CampaignRejected("malformed", f"unknown field {unknown[0]!r}", cid_text)
    if not is_name(cid):
        raise CampaignRejected("malformed", "campaign_id must be a short name (letters, digits, ._+-)")
    vin = doc.get("vin")
    if not isinstance(vin, str) or not vin:
        raise CampaignRejected("malformed", "vin is missing", cid)
    install = doc.get("install", "immediate")
    if install not in ("immediate", "confirm"):
        raise CampaignRejected("malformed", "install must be immediate or confirm", cid)
    packages_doc = doc.get("packages")
    if not isinstance(packages_doc, list) or not packages_doc:
        raise CampaignRejected("malformed", "packages must be a non-empty list", cid)
    packages = []
    for i, p in enumerate(packages_doc):
        where = f"packages[{i}]"
        if not isinstance(p, dict) or not _PACKAGE_KEYS <= set(p) or set(p) - _PACKAGE_KEYS - _OPTIONAL_KEYS:
            raise CampaignRejected("malformed", f"{where} needs name, ecu, version, url, size, sha256 (and may have order, "
                                                f"requires, delta, image_auth), nothing else", cid)
        if not all(isinstance(p[k], str) and p[k] for k in ("name", "ecu", "version", "url", "sha256")):
            raise CampaignRejected("malformed", f"{where}: name, ecu, version, url and sha256 must be strings", cid)
        if not is_name(p["name"]) or p["name"].endswith(PARTIAL_SUFFIXES):
            raise CampaignRejected("malformed", f"{where}.name {p['name']!r} is not a plain file name", cid)
        if not isinstance(p["size"], int) or isinstance(p["size"], bool) or p["size"] <= 0:
            raise CampaignRejected("malformed", f"{where}.size must be a positive integer", cid)
        if not re.fullmatch(r"[0-9a-f]{64}", p["sha256"]):
            raise CampaignRejected("malformed", f"{where}.sha256 must be 64 lower-case hex digits", cid)
        if not p["url"].startswith(("http://", "https://")):
            raise CampaignRejected("malformed", f"{where}.url must be http or https", cid)
        delta = _delta(p["delta"], f"{where}.delta", cid) if "delta" in p else None
        packages.append(Package(p["name"], p["ecu"], p["version"], p["url"], p["size"], p["sha256"],
                                _order(p.get("order", 0), where, cid), _requires(p.get("requires", {}), where, cid), delta,
                                _image_auth(p["image_auth"], f"{where}.image_auth", cid) if "image_auth" in p else None))
    names = [p.name for p in packages] + [p.delta.name for p in packages if p.delta is not None]
    if len(set(names)) != len(names) or len({p.ecu for p in packages}) != len(packages):
        raise CampaignRejected("malformed", "package (and delta) names and target ECUs must be unique", cid)
    issued, expires = _time(doc.get("issued"), "issued"), _time(doc.get("expires"), "expires")
    if expires <= issued:
        raise CampaignRejected("malformed", "expires must be after issued", cid)
    activation = doc.get("activation", "atomic" if len(packages) > 1 else "per_ecu")
    if activation not in ("atomic", "per_ecu"):
        raise CampaignRejected("malformed", "activation must be atomic or per_ecu", cid)
    preconditions = _preconditions(doc["preconditions"], cid) if "preconditions" in doc else None
    rxswin, information = _type_approval(doc, activation, len(packages), cid)
    return Campaign(cid, vin, issued, expires, install, tuple(packages), doc, activation, preconditions, rxswin,
                    information)


def _type_approval(doc: Mapping[str, Any], activation: str, packages: int,
                   cid: str) -> tuple[tuple[Change, ...], dict[str, dict[str, Any]] | None]:
    """The RXSWIN a campaign changes and what the driver is told (UN R156 7.2)."""
    try:
        changes = parse_changes(doc["rxswin"]) if "rxswin" in doc else ()
        information = parse_information(doc["information"]) if "information" in doc else None
    except ValueError as exc:
        raise CampaignRejected("malformed", str(exc), cid) from None
    if changes and activation != "atomic" and packages > 1:  # half installed, it would name software not run
        raise CampaignRejected("malformed", "a campaign that changes an RXSWIN installs atomically (activation: atomic)",
                               cid)
    return changes, information


OVERRIDABLE: dict[str, str | tuple[str, ...]] = {
    "min_soc": "number", "soc_per_minute": "number", "min_battery_mv": "integer", "parked": "bool",
    "ignition_off": "bool", "speed_zero": "bool", "charging": ("allowed", "forbidden"), "window_s": "positive"}


def _preconditions(doc: Any, cid: str) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise CampaignRejected("malformed", "preconditions must be an object", cid)
    for key, value in doc.items():
        kind = OVERRIDABLE.get(key)
        if kind is None:
            raise CampaignRejected("malformed", f"preconditions: {key!r} cannot be set by a campaign "
                                                f"(only {', '.join(sorted(OVERRIDABLE))})", cid)
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1e9
        ok = (value in kind if isinstance(kind, tuple) else
              isinstance(value, bool) if kind == "bool" else
              number and isinstance(value, int) if kind == "integer" else
              number and value > 0 if kind == "positive" else number)
        if not ok:
            wants = {"bool": "true or false", "integer": "an integer, 0 or more", "positive": "a number above 0",
                     "number": "a number, 0 or more"}
            want = " or ".join(kind) if isinstance(kind, tuple) else wants[kind]
            raise CampaignRejected("malformed", f"preconditions.{key} must be {want}", cid)
    return dict(doc)


def _delta(d: Any, where: str, cid: str) -> Delta:
    if not isinstance(d, dict) or set(d) != _DELTA_KEYS:
        raise CampaignRejected("malformed", f"{where} needs {', '.join(sorted(_DELTA_KEYS))}, nothing else", cid)
    if not all(isinstance(d[k], str) and d[k] for k in ("name", "url", "sha256", "base_sha256", "base_version")):
        raise CampaignRejected("malformed", f"{where}: name, url, sha256, base_sha256 and base_version must be strings", cid)
    if not is_name(d["name"]) or d["name"].endswith(PARTIAL_SUFFIXES):
        raise CampaignRejected("malformed", f"{where}.name {d['name']!r} is not a plain file name", cid)
    for key in ("size", "image_crc32"):
        value = d[key]
        if not isinstance(value, int) or isinstance(value, bool) or not (0 < value if key == "size" else 0 <= value < 1 << 32):
            raise CampaignRejected("malformed", f"{where}.{key} must be a {'positive' if key == 'size' else '32-bit'} integer", cid)
    for key in ("sha256", "base_sha256"):
        if not re.fullmatch(r"[0-9a-f]{64}", d[key]):
            raise CampaignRejected("malformed", f"{where}.{key} must be 64 lower-case hex digits", cid)
    if not d["url"].startswith(("http://", "https://")):
        raise CampaignRejected("malformed", f"{where}.url must be http or https", cid)
    return Delta(d["name"], d["url"], d["size"], d["sha256"], d["base_sha256"], d["base_version"], d["image_crc32"])


def _image_auth(doc: Any, where: str, cid: str) -> ImageAuth:
    try:
        return ImageAuth.from_json(doc)
    except ValueError as exc:
        raise CampaignRejected("malformed", f"{where}: {exc}", cid) from None


def _order(value: Any, where: str, cid: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 999:
        raise CampaignRejected("malformed", f"{where}.order must be an integer from 0 to 999", cid)
    return value


def _requires(value: Any, where: str, cid: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and k and isinstance(v, str) and v for k, v in value.items()):
        raise CampaignRejected("malformed", f"{where}.requires must map ECU names to minimum versions", cid)
    return tuple(sorted(value.items()))


def _version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    parts = re.split(r"[.\-+_]", version)
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts)


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1: numeric parts compare as numbers (2.0.10 > 2.0.9)."""
    ka, kb = _version_key(a), _version_key(b)
    return (ka > kb) - (ka < kb)


def verify_campaign(
    envelope: bytes,
    trusted: Role | Mapping[str, Ed25519PublicKey],
    *,
    vin: str,
    now: _dt.datetime,
    installed: Mapping[str, str] | None = None,
    known_ecus: set[str] | None = None,
    check_time: bool = True,
) -> Campaign:
    """Verify a signed campaign for this vehicle at ``now`` against the installed versions.
    ``check_time=False`` skips the validity period (re-reading a campaign already running)."""
    try:
        payload, signatures = open_envelope(envelope, PAYLOAD_TYPE, MAX_ENVELOPE, "campaign")
    except ValueError as exc:
        raise CampaignRejected("malformed", str(exc)) from None
    campaign = _parse(payload)
    cid = campaign.campaign_id
    try:
        check_signatures(signatures, _DOMAIN + payload, Role.of(trusted))
    except SignatureProblem as exc:
        raise CampaignRejected(exc.reason, f"{exc}", cid) from None
    if campaign.vin != vin:
        raise CampaignRejected("wrong_vehicle", f"the campaign is for {campaign.vin}, this vehicle is {vin}", cid)
    role = Role.of(trusted)
    if check_time and role.expires is not None and now >= role.expires:
        raise CampaignRejected("keys_expired", f"the vehicle's key list expired at {role.expires.isoformat()}: "
                                               "send the campaign again once the vehicle has a newer key list", cid)
    if check_time and now >= campaign.expires:
        raise CampaignRejected("expired", f"expired at {campaign.expires.isoformat()}", cid)
    if check_time and now < campaign.issued - _dt.timedelta(minutes=5):
        raise CampaignRejected("not_yet_valid", f"issued in the future ({campaign.issued.isoformat()})", cid)
    for p in campaign.packages:
        if known_ecus is not None and p.ecu not in known_ecus:
            raise CampaignRejected("unknown_ecu", f"package {p.name} targets unknown ECU {p.ecu!r}", cid)
        if installed is None:
            continue
        current = installed.get(p.ecu)
        if not current:  # never skip the downgrade check: an ECU that did not tell its version is not updated
            raise CampaignRejected("unknown_version", f"{p.ecu}: its installed version could not be read, so a "
                                                      f"downgrade cannot be ruled out", cid)
        if compare_versions(p.version, current) < 0:
            raise CampaignRejected("downgrade", f"{p.ecu}: {p.version} is older than the installed {current}", cid)
    if installed is not None:
        check_requirements(campaign, installed)
    return campaign


def check_requirements(campaign: Campaign, installed: Mapping[str, str]) -> None:
    """Every ``requires`` holds for the vehicle as it will be once the campaign is in: the
    campaign's own version of an ECU it updates, else the installed one (read from the ECUs,
    so an ECU that did not answer satisfies nothing). Refused as ``dependency`` otherwise."""
    after = {**installed, **{p.ecu: p.version for p in campaign.packages}}
    for p in campaign.packages:
        for ecu, minimum in p.requires:
            have = after.get(ecu)
            if have is None:
                raise CampaignRejected("dependency", f"{p.name} requires {ecu} >= {minimum}; the version of {ecu} "
                                                     f"is not known", campaign.campaign_id)
            if compare_versions(have, minimum) < 0:
                raise CampaignRejected("dependency", f"{p.name} requires {ecu} >= {minimum}; it would run {have}",
                                       campaign.campaign_id)
