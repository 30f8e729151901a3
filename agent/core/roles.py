"""Who may sign what: signing roles with a threshold, and the signed key list that rotates
and revokes their keys (the TUF/Uptane root role, reduced to what a vehicle needs). Pure:
bytes and keys in, a verified ``KeyList`` or a ``KeysRejected`` with a reason out.

A role is a set of trusted Ed25519 keys and a threshold: a document of that role is
authentic when at least ``threshold`` *distinct* trusted keys signed it (one stolen key is
not enough when the threshold is 2). Three roles: ``campaign`` (upgrade campaigns),
``content`` (owner content bundles) and ``root`` (key lists).

The vehicle starts from the roles in its configuration (key list version 0). A key list is
a signed envelope, the same shape as a campaign's::

    {"payload_type": "application/vnd.vota.keys+json", "payload": "<base64 of the list>",
     "signatures": [{"keyid": "<16 hex>", "sig": "<base64 Ed25519 over 'vota-keys-v1\\n' + payload>"}]}

    {"format": "vota-keys", "version": 2, "expires": "2027-03-01T00:00:00Z",
     "keys": {"<keyid>": "<base64 of the raw 32-byte Ed25519 public key>", ...},
     "roles": {"root": {"keyids": [...], "threshold": 2},
               "campaign": {"keyids": [...], "threshold": 2},
               "content": {"keyids": [...], "threshold": 1}}}

A new list replaces the current one when its version is higher and it is signed by a
threshold of the *current* root keys and by a threshold of its *own* root keys (TUF's rule:
the old root vouches for the new one, and the new root proves it holds its keys). A key left
out of the new list is revoked; a list with a lower version is a rollback.

``expires`` (optional, UTC): after it the list still holds (its revocations above all), but
the vehicle refuses campaigns with reason ``keys_expired`` until a newer list arrives. A
vehicle kept away from a revocation cannot go on trusting a revoked key for ever.
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.core import strict_json
from agent.errors import VotaError

__all__ = ["Role", "KeyList", "KeysRejected", "ROLES", "key_id", "check_signatures", "sign_envelope",
           "sign_key_list", "verify_key_list", "key_list_doc", "SignatureProblem", "open_envelope"]

ROLES = ("root", "campaign", "content")
KEYS_PAYLOAD_TYPE = "application/vnd.vota.keys+json"
_KEYS_DOMAIN = b"vota-keys-v1\n"
MAX_KEY_LIST = 256 * 1024


def key_id(public: Ed25519PublicKey) -> str:
    """The first 16 hex digits of the SHA-256 of the raw public key."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class Role:
    keys: Mapping[str, Ed25519PublicKey] = field(default_factory=dict)
    threshold: int = 1
    expires: _dt.datetime | None = None  # the key list's expiry (none for the configuration's keys)

    @classmethod
    def of(cls, trusted: "Role | Mapping[str, Ed25519PublicKey]") -> "Role":
        """A role as given, or a plain key map with a threshold of one."""
        return trusted if isinstance(trusted, Role) else cls(dict(trusted), 1)


class SignatureProblem(Exception):
    """Why the signatures on a document are not enough: ``reason`` is ``unsigned``,
    ``untrusted_key``, ``bad_signature`` or ``threshold``."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


def check_signatures(signatures: Any, message: bytes, role: Role) -> list[str]:
    """The distinct trusted key ids whose signature over ``message`` verifies; at least
    ``role.threshold`` of them, or ``SignatureProblem``. A key that signs twice counts once."""
    if not isinstance(signatures, list) or not signatures:
        raise SignatureProblem("unsigned", "it carries no signature")
    valid: list[str] = []
    trusted_seen = 0
    for entry in signatures:
        if not isinstance(entry, dict):
            continue
        kid = entry.get("keyid")
        if not isinstance(kid, str) or kid not in role.keys:
            continue
        key = role.keys[kid]
        trusted_seen += 1
        if kid in valid:
            continue
        try:
            key.verify(base64.b64decode(str(entry.get("sig")), validate=True), message)
        except (InvalidSignature, binascii.Error, ValueError):
            continue
        valid.append(kid)
    if len(valid) >= max(role.threshold, 1):
        return valid
    if not trusted_seen:
        raise SignatureProblem("untrusted_key", "no signature by a trusted key")
    if not valid:
        raise SignatureProblem("bad_signature", "the signature does not verify")
    raise SignatureProblem("threshold", f"{len(valid)} valid signature(s) by distinct trusted keys, "
                                        f"{role.threshold} needed")


def open_envelope(envelope: bytes, payload_type: str, max_size: int, what: str) -> tuple[bytes, Any]:
    """The payload and the signature entries of a signed envelope (read strictly: one meaning per
    byte string); ``ValueError`` naming the problem."""
    if len(envelope) > max_size:
        raise ValueError(f"envelope larger than {max_size} bytes")
    try:
        env = strict_json.loads(envelope)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deeply
        raise ValueError(f"not JSON{strict_json.why(exc)}") from None
    if not isinstance(env, dict) or env.get("payload_type") != payload_type or not isinstance(env.get("payload"), str):
        raise ValueError(f"not a signed {what} envelope ({payload_type})")
    try:
        return base64.b64decode(env["payload"], validate=True), env.get("signatures")
    except (binascii.Error, ValueError):
        raise ValueError("payload is not base64") from None


def sign_envelope(payload: bytes, payload_type: str, domain: bytes,
                  keys: Ed25519PrivateKey | Iterable[Ed25519PrivateKey]) -> bytes:
    """A signed envelope (payload base64, one signature per key over ``domain + payload``)."""
    signers = [keys] if isinstance(keys, Ed25519PrivateKey) else list(keys)
    if not signers:
        raise ValueError("at least one signing key is needed")
    envelope = {
        "payload_type": payload_type,
        "payload": base64.b64encode(payload).decode(),
        "signatures": [{"keyid": key_id(k.public_key()), "sig": base64.b64encode(k.sign(domain + payload)).decode()}
                       for k in signers],
    }
    return json.dumps(envelope, indent=2).encode() + b"\n"


class KeysRejected(VotaError):
    """A key list the vehicle does not take; ``reason`` is a stable code."""

    REASONS = ("malformed", "unsigned", "untrusted_key", "bad_signature", "threshold", "rollback", "no_root")

    def __init__(self, reason: str, message: str, version: int | None = None) -> None:
        assert reason in self.REASONS
        self.reason, self.version = reason, version
        super().__init__(f"key list rejected ({reason}): {message}")


@dataclass(frozen=True)
class KeyList:
    """The roles in force: version 0 is the configuration's, higher versions came signed."""

    version: int
    roles: Mapping[str, Role]

    def role(self, name: str) -> Role:
        return self.roles.get(name) or Role()

    @property
    def expires(self) -> _dt.datetime | None:
        return next((r.expires for r in self.roles.values()), None)

    def describe(self) -> dict[str, Any]:
        return {"version": self.version, "expires": self.expires.isoformat() if self.expires else None,
                **{name: {"keyids": sorted(r.keys), "threshold": r.threshold} for name, r in self.roles.items()}}


def _parse_key_list(payload: bytes) -> KeyList:
    try:
        doc = strict_json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise KeysRejected("malformed", f"the key list is not JSON{strict_json.why(exc)}") from None
    if not isinstance(doc, dict) or doc.get("format") != "vota-keys":
        raise KeysRejected("malformed", "not a vota-keys document")
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise KeysRejected("malformed", "version must be a whole number from 1")
    expires = _expiry(doc.get("expires"), version)
    raw_keys, raw_roles = doc.get("keys"), doc.get("roles")
    if not isinstance(raw_keys, dict) or not isinstance(raw_roles, dict):
        raise KeysRejected("malformed", "keys and roles must be objects", version)
    keys: dict[str, Ed25519PublicKey] = {}
    for kid, value in raw_keys.items():
        try:
            key = Ed25519PublicKey.from_public_bytes(base64.b64decode(str(value), validate=True))
        except (binascii.Error, ValueError):
            raise KeysRejected("malformed", f"key {kid}: not a base64 Ed25519 public key", version) from None
        if key_id(key) != kid:
            raise KeysRejected("malformed", f"key {kid}: the id is not that of the key", version)
        keys[kid] = key
    roles: dict[str, Role] = {}
    for name in ROLES:
        spec = raw_roles.get(name)
        if not isinstance(spec, dict) or not isinstance(spec.get("keyids"), list):
            raise KeysRejected("malformed", f"role {name} is missing or has no keyids", version)
        ids = spec["keyids"]
        threshold = spec.get("threshold")
        if not all(isinstance(k, str) and k in keys for k in ids) or len(set(ids)) != len(ids):
            raise KeysRejected("malformed", f"role {name}: every key id must be listed once in keys", version)
        if not isinstance(threshold, int) or isinstance(threshold, bool) or not 1 <= threshold <= len(ids):
            raise KeysRejected("malformed", f"role {name}: threshold must be from 1 to its number of keys", version)
        roles[name] = Role({k: keys[k] for k in ids}, threshold, expires)
    unknown = set(raw_roles) - set(ROLES)
    if unknown:
        raise KeysRejected("malformed", f"unknown role(s) {sorted(unknown)}", version)
    return KeyList(version, roles)


def _expiry(value: Any, version: int) -> _dt.datetime | None:
    if value is None:
        return None
    try:
        when = _dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise KeysRejected("malformed", f"expires {value!r} is not an ISO 8601 time", version) from None
    if when.tzinfo is None:
        raise KeysRejected("malformed", f"expires {value!r} has no time zone", version)
    return when


def verify_key_list(envelope: bytes, current: KeyList) -> KeyList:
    """The new key list, if ``envelope`` may replace ``current``; else ``KeysRejected``."""
    try:
        payload, signatures = open_envelope(envelope, KEYS_PAYLOAD_TYPE, MAX_KEY_LIST, "key list")
    except ValueError as exc:
        raise KeysRejected("malformed", str(exc)) from None
    new = _parse_key_list(payload)
    if not current.role("root").keys:
        raise KeysRejected("no_root", "this vehicle has no root keys configured, so its keys cannot change", new.version)
    for who, role in (("the current", current.role("root")), ("its own", new.role("root"))):
        try:
            check_signatures(signatures, _KEYS_DOMAIN + payload, role)
        except SignatureProblem as exc:
            raise KeysRejected(exc.reason, f"{who} root keys: {exc}", new.version) from None
    if new.version <= current.version:
        raise KeysRejected("rollback", f"version {new.version} is not newer than the current {current.version}", new.version)
    return new


def sign_key_list(doc: Mapping[str, Any], keys: Iterable[Ed25519PrivateKey]) -> bytes:
    """The signed envelope of a key list document (checked first, as a vehicle would read it)."""
    payload = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    _parse_key_list(payload)
    return sign_envelope(payload, KEYS_PAYLOAD_TYPE, _KEYS_DOMAIN, keys)


def key_list_doc(version: int, roles: Mapping[str, tuple[Iterable[Ed25519PublicKey], int]],
                 expires: _dt.datetime | None = None) -> dict[str, Any]:
    """A key list document from public keys per role and thresholds (valid until ``expires``)."""
    keys: dict[str, str] = {}
    out: dict[str, Any] = {}
    for name, (members, threshold) in roles.items():
        ids = []
        for k in members:
            kid = key_id(k)
            keys[kid] = base64.b64encode(k.public_bytes(serialization.Encoding.Raw,
                                                        serialization.PublicFormat.Raw)).decode()
            ids.append(kid)
        out[name] = {"keyids": ids, "threshold": threshold}
    doc: dict[str, Any] = {"format": "vota-keys", "version": version, "keys": keys, "roles": out}
    if expires is not None:
        doc["expires"] = expires.astimezone(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    return doc
