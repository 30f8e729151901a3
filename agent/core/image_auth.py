"""Signed images: what an ECU with a trust anchor checks before it stages or runs an image
(docs/security.md#ecus-verify-what-they-boot).

The OEM signs each image for one ECU model with that model's key (Ed25519, or ECDSA P-256),
over the text::

    vota-image-v1\\n<ecu>\\n<version>\\n<security version>\\n<SHA-256 of the image in the ECU's memory, hex>

The signature and the image's security version (an anti-rollback counter, 0 to 2^32-1) travel
in the campaign's package entry (``image_auth``) and reach the ECU after the download as the
record of the authenticate routine: ``31 01 FF07 <security version: 4 bytes, big-endian>
<signature: 64 bytes>`` (ECDSA: r and s, 32 bytes each). Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from agent.errors import UsageError

__all__ = ["ImageAuth", "ImageKey", "ImageSigner", "RECORD_SIZE", "image_message", "sign_image", "verify_image",
           "load_image_key", "load_image_signer"]

RECORD_SIZE = 68  # security version (4) + signature (64)
MAX_SECURITY_VERSION = (1 << 32) - 1
ImageKey = Union[Ed25519PublicKey, ec.EllipticCurvePublicKey]
ImageSigner = Union[Ed25519PrivateKey, ec.EllipticCurvePrivateKey]


@dataclass(frozen=True)
class ImageAuth:
    """An image's signature and security version, as the campaign carries them."""

    security_version: int
    signature: bytes  # 64 bytes

    def record(self) -> bytes:
        """The authenticate routine's option record."""
        return self.security_version.to_bytes(4, "big") + self.signature

    def to_json(self) -> dict[str, Any]:
        return {"security_version": self.security_version, "signature": self.signature.hex()}

    @classmethod
    def from_record(cls, record: bytes) -> "ImageAuth | None":
        if len(record) != RECORD_SIZE:
            return None
        return cls(int.from_bytes(record[:4], "big"), bytes(record[4:]))

    @classmethod
    def from_json(cls, doc: Any) -> "ImageAuth":
        """ValueError naming what is wrong."""
        if not isinstance(doc, dict) or set(doc) != {"security_version", "signature"}:
            raise ValueError("needs security_version and signature, nothing else")
        version, signature = doc["security_version"], doc["signature"]
        if not isinstance(version, int) or isinstance(version, bool) or not 0 <= version <= MAX_SECURITY_VERSION:
            raise ValueError("security_version must be an integer from 0 to 4294967295")
        if not isinstance(signature, str) or len(signature) != 128:
            raise ValueError("signature must be 128 hex digits")
        try:
            return cls(version, bytes.fromhex(signature))
        except ValueError:
            raise ValueError("signature must be 128 hex digits") from None


def image_message(ecu: str, version: str, security_version: int, sha256: str) -> bytes:
    return f"vota-image-v1\n{ecu}\n{version}\n{security_version}\n{sha256}".encode()


def sign_image(key: ImageSigner, ecu: str, version: str, security_version: int, sha256: str) -> ImageAuth:
    if not 0 <= security_version <= MAX_SECURITY_VERSION:
        raise UsageError(f"security version {security_version} is outside 0..{MAX_SECURITY_VERSION}")
    message = image_message(ecu, version, security_version, sha256)
    if isinstance(key, Ed25519PrivateKey):
        return ImageAuth(security_version, key.sign(message))
    r, s = decode_dss_signature(key.sign(message, ec.ECDSA(hashes.SHA256())))
    return ImageAuth(security_version, r.to_bytes(32, "big") + s.to_bytes(32, "big"))


def verify_image(key: ImageKey, auth: ImageAuth, ecu: str, version: str, sha256: str) -> bool:
    message = image_message(ecu, version, auth.security_version, sha256)
    try:
        if isinstance(key, Ed25519PublicKey):
            key.verify(auth.signature, message)
        else:
            r, s = int.from_bytes(auth.signature[:32], "big"), int.from_bytes(auth.signature[32:], "big")
            key.verify(encode_dss_signature(r, s), message, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        return False
    return True


def load_image_key(pem: bytes, source: str) -> ImageKey:
    """A trust anchor: an Ed25519 or ECDSA P-256 public key (PEM); UsageError naming the file otherwise."""
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError:
        raise UsageError(f"{source}: not a PEM public key") from None
    if isinstance(key, Ed25519PublicKey) or (isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"):
        return key
    raise UsageError(f"{source}: an image key must be Ed25519 or ECDSA P-256")


def load_image_signer(pem: bytes, source: str) -> ImageSigner:
    """The OEM's signing key for one ECU model (PEM, unencrypted)."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise UsageError(f"{source}: not an unencrypted PEM private key") from None
    if isinstance(key, Ed25519PrivateKey) or (isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"):
        return key
    raise UsageError(f"{source}: an image key must be Ed25519 or ECDSA P-256")
