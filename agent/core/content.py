"""Owner-customised OTA content (C1-C8): the bundle format, the trust platform's signing and
encryption, the vehicle's verification, and the schedule. Pure: bytes, keys and ``now`` in,
verified objects out; no files, no clock.

A bundle is an uncompressed tar archive::

    manifest.json        the manifest (the exact bytes that are signed)
    manifest.sig.json    {"keyid": "<16 hex>", "sig": "<base64 Ed25519 over 'vota-content-v1\\n' + manifest>"}
                         or {"signatures": [{"keyid", "sig"}, ...]} (a threshold of the content role)
    items/<file>         one file per item (the ciphertext, for encrypted items)

The manifest::

    {"format": "vota-content", "version": 1, "bundle_id": "dlp-520", "bundle_version": 3,
     "owner": "owner-42", "title": "20 May projection", "vin": "LVOTA..." (encrypted bundles),
     "config": {"mode": "night", "start": "2026-05-20T00:00:00", "expiry": "2026-05-21T00:00:00",
                "tz": "Asia/Shanghai", "window": "19:00-23:00"},
     "items": [{"id": "heart", "class": "resource", "target": "dlp_headlamp", "file": "items/heart.bin",
                "size": 4096, "sha256": "<hex of the file in the archive>", "policy": "auto",
                "config": {...per-item override...},
                "encryption": {"alg": "AES-256-GCM", "nonce": "<b64>", "plain_size": 4000,
                               "plain_sha256": "<hex>", "key": {"alg": "X25519-HKDF-SHA256-A256GCM",
                               "epk": "<b64>", "nonce": "<b64>", "wrapped": "<b64>"}}}]}
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import hashlib
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass
from typing import Any, Iterable, Mapping
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from agent.core import strict_json
from agent.core.roles import Role, SignatureProblem, check_signatures, key_id
from agent.errors import VotaError
from agent.protocol.files import is_name

__all__ = [
    "BundleRejected", "Bundle", "Item", "Schedule", "CLASSES", "POLICIES", "MODES",
    "encrypt_item", "decrypt_item", "build_bundle", "sign_bundle", "pack_archive", "read_archive", "verify_bundle", "verify_manifest",
    "check_item", "parse_schedule",
]

FORMAT, VERSION = "vota-content", 1
_DOMAIN = b"vota-content-v1\n"
_KEY_INFO = b"vota-content-key"
CLASSES = ("application", "resource", "software")
POLICIES = ("auto", "manual", "never")
MODES = ("day", "night", "any")
_WINDOW = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")
SLACK = 64 * 1024  # archive overhead allowed beyond the declared item sizes


class BundleRejected(VotaError):
    REASONS = ("malformed", "unsigned", "untrusted_key", "bad_signature", "threshold", "wrong_vehicle", "expired", "rollback",
               "digest_mismatch", "unsafe_path", "too_large", "cannot_decrypt")

    def __init__(self, reason: str, message: str, bundle_id: str | None = None) -> None:
        assert reason in self.REASONS
        self.reason, self.bundle_id = reason, bundle_id
        super().__init__(f"bundle rejected ({reason}): {message}")


# ---- schedule (C4) ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Schedule:
    mode: str
    start: _dt.datetime | None
    expiry: _dt.datetime | None
    tz: ZoneInfo
    window: tuple[_dt.time, _dt.time] | None

    def state(self, now: _dt.datetime, night: bool) -> str:
        """``waiting`` (not yet, or outside its window / day-night mode), ``active`` or ``expired``."""
        if self.expiry is not None and now >= self.expiry:
            return "expired"
        if self.start is not None and now < self.start:
            return "waiting"
        if self.mode == "night" and not night or self.mode == "day" and night:
            return "waiting"
        if self.window is not None:
            local = now.astimezone(self.tz).time()
            begin, end = self.window
            inside = begin <= local < end if begin < end else (local >= begin or local < end)
            if not inside:
                return "waiting"
        return "active"


def _when(value: Any, tz: ZoneInfo, field: str) -> _dt.datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise BundleRejected("malformed", f"{field} must be an ISO 8601 time")
    try:
        parsed = _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise BundleRejected("malformed", f"{field} {value!r} is not an ISO 8601 time") from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=tz)  # local time of the bundle's zone


def parse_schedule(config: Mapping[str, Any], override: Mapping[str, Any] | None = None) -> Schedule:
    merged = {**config, **(override or {})}
    unknown = sorted(set(merged) - {"mode", "start", "expiry", "tz", "window"})
    if unknown:
        raise BundleRejected("malformed", f"unknown configuration parameter {unknown[0]!r}")
    mode = merged.get("mode", "any")
    if mode not in MODES:
        raise BundleRejected("malformed", f"mode must be one of {', '.join(MODES)}")
    try:
        tz = ZoneInfo(str(merged.get("tz", "UTC")))
    except (ZoneInfoNotFoundError, ValueError):
        raise BundleRejected("malformed", f"unknown time zone {merged.get('tz')!r}") from None
    window = None
    if merged.get("window") is not None:
        m = _WINDOW.match(str(merged["window"]))
        if not m:
            raise BundleRejected("malformed", f"window {merged['window']!r} is not HH:MM-HH:MM")
        window = (_dt.time(int(m[1]), int(m[2])), _dt.time(int(m[3]), int(m[4])))
    start, expiry = _when(merged.get("start"), tz, "start"), _when(merged.get("expiry"), tz, "expiry")
    if start and expiry and expiry <= start:
        raise BundleRejected("malformed", "expiry must be after start")
    return Schedule(mode, start, expiry, tz, window)


# ---- encryption (C7) ---------------------------------------------------------------------------
def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: Any) -> bytes:
    return base64.b64decode(str(text), validate=True)


def _kek(shared: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_KEY_INFO).derive(shared)


def encrypt_item(plain: bytes, vehicle: X25519PublicKey, random: Any = os.urandom,
                 content_key: bytes | None = None, nonce: bytes | None = None) -> tuple[bytes, dict[str, Any]]:
    """AES-256-GCM with a fresh content key (or the given one, to share an item with another
    vehicle: the same ciphertext, the key wrapped again), wrapped for the vehicle's X25519 key."""
    content_key, nonce = content_key or random(32), nonce or random(12)
    ciphertext = AESGCM(content_key).encrypt(nonce, plain, None)
    ephemeral = X25519PrivateKey.generate()
    key_nonce = random(12)
    wrapped = AESGCM(_kek(ephemeral.exchange(vehicle))).encrypt(key_nonce, content_key, None)
    epk = ephemeral.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    meta = {"alg": "AES-256-GCM", "nonce": _b64(nonce), "plain_size": len(plain),
            "plain_sha256": hashlib.sha256(plain).hexdigest(),
            "key": {"alg": "X25519-HKDF-SHA256-A256GCM", "epk": _b64(epk), "nonce": _b64(key_nonce), "wrapped": _b64(wrapped)}}
    return ciphertext, meta


def decrypt_item(ciphertext: bytes, meta: Mapping[str, Any], vehicle: X25519PrivateKey) -> bytes:
    try:
        key = meta["key"]
        epk = X25519PublicKey.from_public_bytes(_unb64(key["epk"]))
        content_key = AESGCM(_kek(vehicle.exchange(epk))).decrypt(_unb64(key["nonce"]), _unb64(key["wrapped"]), None)
        plain = AESGCM(content_key).decrypt(_unb64(meta["nonce"]), ciphertext, None)
    except (InvalidTag, KeyError, TypeError, ValueError, binascii.Error):
        raise BundleRejected("cannot_decrypt", "the item cannot be decrypted with this vehicle's key") from None
    if hashlib.sha256(plain).hexdigest() != meta.get("plain_sha256") or len(plain) != meta.get("plain_size"):
        raise BundleRejected("digest_mismatch", "the decrypted item does not match its digest")
    return plain


# ---- building and signing (the trust platform) ---------------------------------------------------
def pack_archive(members: Mapping[str, bytes]) -> bytes:
    """An uncompressed tar of ``members`` (name -> bytes), in order; names are not checked."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def build_bundle(spec: Mapping[str, Any], files: Mapping[str, bytes], vehicle: X25519PublicKey | None = None,
                 vin: str | None = None, keys: Mapping[str, tuple[bytes, bytes]] | None = None) -> bytes:
    """An unsigned bundle. ``spec`` is the manifest without sizes and digests; items with
    ``"encrypt": true`` are encrypted for ``vehicle`` (then ``vin`` is written too), with the
    content key and nonce from ``keys`` when given (the trust platform sharing an item)."""
    manifest = {k: v for k, v in spec.items() if k != "items"}
    manifest.update(format=FORMAT, version=VERSION)
    members: dict[str, bytes] = {}
    items = []
    for item in spec.get("items", []):
        entry = {k: v for k, v in item.items() if k not in ("source", "encrypt")}
        data = files[item["id"]]
        if item.get("encrypt"):
            if vehicle is None:
                raise BundleRejected("malformed", f"item {item['id']} is to be encrypted but no vehicle key was given")
            key, nonce = (keys or {}).get(item["id"], (None, None))
            data, entry["encryption"] = encrypt_item(data, vehicle, content_key=key, nonce=nonce)
            manifest["vin"] = vin
        entry["file"] = f"items/{item['id']}.bin"
        entry["size"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
        members[entry["file"]] = data
        items.append(entry)
    manifest["items"] = items
    body = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    _parse_manifest(body)  # refuse to build what a vehicle would refuse to read
    return pack_archive({"manifest.json": body, **members})


def sign_bundle(bundle: bytes, key: Ed25519PrivateKey | Iterable[Ed25519PrivateKey]) -> bytes:
    """The bundle with ``manifest.sig.json``: one signature per key (``{"keyid", "sig"}`` for one
    key, ``{"signatures": [...]}`` for several), adding to the signatures already there."""
    members = read_archive(bundle, limit=len(bundle) + SLACK)
    manifest = members.get("manifest.json")
    if manifest is None:
        raise BundleRejected("malformed", "no manifest.json in the bundle")
    _parse_manifest(manifest)
    signers = [key] if isinstance(key, Ed25519PrivateKey) else list(key)
    entries = [{"keyid": key_id(k.public_key()), "sig": _b64(k.sign(_DOMAIN + manifest))} for k in signers]
    if "manifest.sig.json" in members:
        entries = _signatures(members["manifest.sig.json"]) + entries
    doc: dict[str, Any] = entries[0] if len(entries) == 1 else {"signatures": entries}
    members["manifest.sig.json"] = json.dumps(doc).encode()
    return pack_archive(members)


# ---- reading and verifying (the vehicle) -----------------------------------------------------------
MAX_MEMBERS = 1000  # a manifest, its signature and the items: far fewer in any real bundle


def read_archive(data: bytes, limit: int) -> dict[str, bytes]:
    """The archive's regular files; refuses paths outside it, links, devices, and more than
    ``limit`` bytes of content."""
    members: dict[str, bytes] = {}
    total = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for info in tar:
                if len(members) >= MAX_MEMBERS:
                    raise BundleRejected("too_large", f"more than {MAX_MEMBERS} archive members")
                name = info.name
                parts = name.split("/")
                if name.startswith("/") or ".." in parts or "\\" in name or not name:
                    raise BundleRejected("unsafe_path", f"archive member {name!r} points outside the bundle")
                if not info.isfile():
                    raise BundleRejected("unsafe_path", f"archive member {name!r} is not a regular file")
                total += info.size
                if total > limit:
                    raise BundleRejected("too_large", f"archive content exceeds {limit} bytes")
                handle = tar.extractfile(info)
                members[name] = handle.read() if handle is not None else b""
    except tarfile.TarError as exc:
        raise BundleRejected("malformed", f"not a bundle archive ({exc})") from None
    return members


@dataclass(frozen=True)
class Item:
    id: str
    cls: str
    target: str
    file: str
    size: int
    sha256: str
    policy: str
    schedule: Schedule
    encryption: Mapping[str, Any] | None
    raw: Mapping[str, Any]


@dataclass(frozen=True)
class Bundle:
    bundle_id: str
    bundle_version: int
    owner: str
    title: str
    vin: str | None
    items: tuple[Item, ...]
    manifest: bytes
    files: Mapping[str, bytes]

    def item_data(self, item: Item, vehicle: X25519PrivateKey | None) -> bytes:
        data = self.files[item.file]
        if item.encryption is None:
            return data
        if vehicle is None:
            raise BundleRejected("cannot_decrypt", f"item {item.id} is encrypted and this vehicle has no key", self.bundle_id)
        return decrypt_item(data, item.encryption, vehicle)


def _parse_manifest(body: bytes) -> dict[str, Any]:
    try:
        doc = strict_json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BundleRejected("malformed", f"manifest.json is not JSON{strict_json.why(exc)}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise BundleRejected("malformed", f"the manifest must be {FORMAT} version {VERSION}")
    bid = doc.get("bundle_id")
    if not is_name(bid):
        raise BundleRejected("malformed", "bundle_id must be a short name")
    known = {"format", "version", "bundle_id", "bundle_version", "owner", "title", "vin", "config", "items"}
    if set(doc) - known:
        raise BundleRejected("malformed", f"unknown manifest field {sorted(set(doc) - known)[0]!r}", bid)
    if not isinstance(doc.get("bundle_version"), int) or isinstance(doc.get("bundle_version"), bool):
        raise BundleRejected("malformed", "bundle_version must be an integer", bid)
    items = doc.get("items")
    if not isinstance(items, list) or not items:
        raise BundleRejected("malformed", "a bundle needs at least one item", bid)
    config = doc.get("config", {})
    if not isinstance(config, dict):
        raise BundleRejected("malformed", "config must be an object", bid)
    parse_schedule(config)
    ids = set()
    for item in items:
        if not isinstance(item, dict):
            raise BundleRejected("malformed", "every item must be an object", bid)
        iid = item.get("id")
        if not is_name(iid) or iid in ids:
            raise BundleRejected("malformed", f"item id {iid!r} is missing, not a short name or used twice", bid)
        ids.add(iid)
        if item.get("class") not in CLASSES or item.get("policy", "auto") not in POLICIES:
            raise BundleRejected("malformed", f"item {iid}: class must be {'/'.join(CLASSES)}, policy {'/'.join(POLICIES)}", bid)
        if not isinstance(item.get("target"), str) or not item["target"]:
            raise BundleRejected("malformed", f"item {iid}: no target", bid)
        if "file" in item and (not isinstance(item["file"], str) or not item["file"].startswith("items/")
                               or not is_name(item["file"][len("items/"):])):
            raise BundleRejected("unsafe_path", f"item {iid}: file {item['file']!r} is not items/<name>", bid)
        if "size" in item and (not isinstance(item["size"], int) or item["size"] < 0):
            raise BundleRejected("malformed", f"item {iid}: size must be a non-negative integer", bid)
        parse_schedule(config, item.get("config"))
    return doc


def _signatures(sig_doc: bytes) -> list[Any]:
    """The signature entries of ``manifest.sig.json``: one ``{"keyid", "sig"}`` or ``{"signatures": [...]}``."""
    doc = strict_json.loads(sig_doc)
    if isinstance(doc, dict) and isinstance(doc.get("signatures"), list):
        return list(doc["signatures"])
    if isinstance(doc, dict) and "keyid" in doc:
        return [doc]
    raise ValueError("no signature entries")


def verify_manifest(
    body: bytes,
    sig_doc: bytes | None,
    trusted: Role | Mapping[str, Ed25519PublicKey],
    *,
    vin: str,
    now: _dt.datetime,
    installed: Mapping[str, int] | None = None,
) -> Bundle:
    """The signed manifest alone (what a cloud offer carries): signed by a trusted key, for
    this vehicle (when it is encrypted for one), not expired, newer than the installed
    version of the same bundle id. The returned bundle has no files yet: each item's file
    is checked with ``check_item`` when it arrives."""
    doc = _parse_manifest(body)
    bid = doc["bundle_id"]
    if sig_doc is None:
        raise BundleRejected("unsigned", "the bundle carries no signature", bid)
    try:
        signatures = _signatures(sig_doc)
    except (ValueError, RecursionError):
        raise BundleRejected("malformed", "manifest.sig.json is not a signature", bid) from None
    try:
        check_signatures(signatures, _DOMAIN + body, Role.of(trusted))
    except SignatureProblem as exc:
        raise BundleRejected(exc.reason, str(exc), bid) from None
    if doc.get("vin") not in (None, vin):
        raise BundleRejected("wrong_vehicle", f"the bundle is for {doc['vin']}", bid)
    previous = (installed or {}).get(bid)
    if previous is not None and doc["bundle_version"] <= previous:
        raise BundleRejected("rollback", f"version {doc['bundle_version']} is not newer than the installed {previous}", bid)
    config = doc.get("config", {})
    items = []
    for item in doc["items"]:
        if item.get("policy", "auto") != "never" and not isinstance(item.get("sha256"), str):
            raise BundleRejected("malformed", f"item {item['id']}: no sha256", bid)
        items.append(Item(item["id"], item["class"], item["target"], str(item.get("file", "")), int(item.get("size", 0)),
                          str(item.get("sha256", "")), item.get("policy", "auto"), parse_schedule(config, item.get("config")),
                          item.get("encryption"), item))
    if all(i.schedule.expiry is not None and now >= i.schedule.expiry for i in items):
        raise BundleRejected("expired", "every item of the bundle has expired", bid)
    return Bundle(bid, doc["bundle_version"], str(doc.get("owner", "")), str(doc.get("title", "")), doc.get("vin"),
                  tuple(items), body, {})


def check_item(bundle_id: str, item: Item, content: bytes) -> None:
    """An item's file as the signed manifest declares it (size first, then SHA-256)."""
    if len(content) != item.size:
        raise BundleRejected("too_large" if len(content) > item.size else "digest_mismatch",
                             f"item {item.id}: {len(content)} bytes, declared {item.size}", bundle_id)
    if hashlib.sha256(content).hexdigest() != item.sha256:
        raise BundleRejected("digest_mismatch", f"item {item.id}: the digest does not match the manifest", bundle_id)


def verify_bundle(
    data: bytes,
    trusted: Role | Mapping[str, Ed25519PublicKey],
    *,
    vin: str,
    now: _dt.datetime,
    installed: Mapping[str, int] | None = None,
    max_size: int | None = None,
) -> Bundle:
    """A whole bundle archive the vehicle may run: the manifest as ``verify_manifest``
    checks it, every item's size and digest as declared, nothing outside the archive."""
    limit = max_size if max_size is not None else len(data) + SLACK
    members = read_archive(data, limit)
    body = members.get("manifest.json")
    if body is None:
        raise BundleRejected("malformed", "no manifest.json in the bundle")
    bundle = verify_manifest(body, members.get("manifest.sig.json"), trusted, vin=vin, now=now, installed=installed)
    bid = bundle.bundle_id
    for item in bundle.items:
        if item.policy == "never":
            continue
        content = members.get(item.file)
        if content is None:
            raise BundleRejected("malformed", f"item {item.id}: {item.file!r} is not in the archive", bid)
        check_item(bid, item, content)
    declared = sum(i.size for i in bundle.items)
    content_bytes = sum(len(v) for k, v in members.items() if k.startswith("items/"))
    if content_bytes > declared + SLACK:
        raise BundleRejected("too_large", f"{content_bytes} bytes of items, {declared} declared", bid)
    return Bundle(bid, bundle.bundle_version, bundle.owner, bundle.title, bundle.vin, bundle.items, body, members)
