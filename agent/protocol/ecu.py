"""What the gateway (or a tester) and an ECU agree on: DIDs, the content routines, the seed/key."""

from __future__ import annotations

import hashlib
import hmac

__all__ = ["DID", "ROUTINE_SHOW_CONTENT", "ROUTINE_STOP_CONTENT", "security_key"]

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
