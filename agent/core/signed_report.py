"""Reports the vehicle signs, so that the cloud believes only what the vehicle said. Pure.

A report is the JSON object ``{"id", "vin", "type", "ts", "body"}`` the cloud link publishes;
signed, it carries ``"signatures": [{"keyid", "sig"}]``: Ed25519 by the vehicle's own report
key over ``b"vota-report-v1\\n"`` + the canonical JSON of the object without ``signatures``
(keys sorted, no whitespace, ASCII only: TUF's way of signing a JSON object in place). The
VIN, the message type and the id are inside what is signed, so a signed report can neither
be moved to another vehicle's topic or type nor give its id to other content.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.core.roles import key_id

__all__ = ["sign_report", "check_report", "canonical"]

_DOMAIN = b"vota-report-v1\n"


def canonical(doc: Mapping[str, Any]) -> bytes:
    """The bytes a report signature covers."""
    return json.dumps({k: v for k, v in doc.items() if k != "signatures"}, sort_keys=True,
                      separators=(",", ":"), ensure_ascii=True).encode()


def sign_report(doc: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """``doc`` with the vehicle's signature added."""
    return {**doc, "signatures": [{"keyid": key_id(key.public_key()),
                                   "sig": base64.b64encode(key.sign(_DOMAIN + canonical(doc))).decode()}]}


def check_report(doc: Mapping[str, Any], vin: str, kind: str, keys: Mapping[str, Ed25519PublicKey]) -> str | None:
    """None when ``doc`` is a report of type ``kind`` from ``vin`` signed by one of ``keys``
    (that vehicle's report keys); else why it is not."""
    if doc.get("vin") != vin or doc.get("type") != kind:
        return f"the signed report names vehicle {doc.get('vin')!r} and type {doc.get('type')!r}, not the topic's"
    signatures = doc.get("signatures")
    if not isinstance(signatures, list) or not signatures:
        return "not signed by the vehicle"
    message = _DOMAIN + canonical(doc)
    for entry in signatures:
        if not isinstance(entry, dict):
            continue
        key = keys.get(str(entry.get("keyid")))
        if key is None:
            continue
        try:
            key.verify(base64.b64decode(str(entry.get("sig")), validate=True), message)
            return None
        except (InvalidSignature, binascii.Error, ValueError):
            return "the vehicle's signature does not verify"
    return "not signed by this vehicle's report key"
