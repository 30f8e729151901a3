"""What the gateway (or a tester) and an ECU agree on: DIDs, the content routines, the seed/key."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

__all__ = ["DID", "ROUTINE_SHOW_CONTENT", "ROUTINE_STOP_CONTENT", "security_key", "StagedImage", "encode_staged_image",
           "decode_staged_image", "STAGED_NONE", "STAGED", "STAGED_SELECTED"]

ROUTINE_SHOW_CONTENT = 0x0401  # 31 01 0401 <name>: show owner content the ECU holds
ROUTINE_STOP_CONTENT = 0x0402  # 31 01 0402: stop showing it


class DID:
    BOOT_SOFTWARE = 0xF180
    PART_NUMBER = 0xF187
    SOFTWARE_VERSION = 0xF189
    SERIAL = 0xF18C
    SUPPLIER_VERSION = 0xF195
    FINGERPRINT = 0xF15A
    FINGERPRINT_ALT = 0xF199
    ACTIVE_SESSION = 0xF186
    IMAGE_DIGEST = 0xF1A0  # vendor-specific: SHA-256 of the active image
    STAGED_IMAGE = 0xF1A1  # vendor-specific: the staged image: status, size, SHA-256, version (staged_image_record)
    BANK_STATUS = 0xF1A2  # vendor-specific: the running image confirmed (01) or on trial (00), a previous image kept (01)
    ACTIVE_CONTENT = 0xF1C0  # vendor-specific: the owner content being shown (empty: none)
    AMBIENT_LIGHT = 0xF1C1  # vendor-specific: the light sensor, lux as uint16 (day/night for content, C4)

    INVENTORY = {
        "part_number": PART_NUMBER,
        "software_version": SOFTWARE_VERSION,
        "serial": SERIAL,
        "supplier_software": SUPPLIER_VERSION,
        "bootloader": BOOT_SOFTWARE,
    }


def security_key(secret: str, seed: bytes) -> bytes:
    """SecurityAccess key for a seed: the first 4 bytes of HMAC-SHA256(secret, seed)."""
    return hmac.new(secret.encode(), seed, hashlib.sha256).digest()[:4]


# DID F1A1, the staged image:  status(1) size(4) sha256(32) version(ASCII)
STAGED_NONE, STAGED, STAGED_SELECTED = 0x00, 0x01, 0x02  # nothing staged; staged; staged and selected for the next reset


@dataclass(frozen=True)
class StagedImage:
    status: int
    size: int = 0
    sha256: str = ""
    version: str = ""


def encode_staged_image(image: StagedImage) -> bytes:
    digest = bytes.fromhex(image.sha256) if image.sha256 else bytes(32)
    return bytes((image.status,)) + image.size.to_bytes(4, "big") + digest + image.version.encode("ascii", "replace")


def decode_staged_image(data: bytes) -> StagedImage | None:
    """The record, or None when its layout is wrong."""
    if len(data) < 37 or data[0] not in (STAGED_NONE, STAGED, STAGED_SELECTED):
        return None
    digest = data[5:37]
    return StagedImage(data[0], int.from_bytes(data[1:5], "big"), digest.hex() if any(digest) else "",
                       data[37:].decode("ascii", "replace"))
