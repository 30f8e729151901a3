"""What the gateway (or a tester) and an ECU agree on: DIDs, the content routines, the seed/key."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

__all__ = ["DID", "ROUTINE_SHOW_CONTENT", "ROUTINE_STOP_CONTENT", "security_key", "StagedImage", "encode_staged_image",
           "decode_staged_image", "STAGED_NONE", "STAGED", "STAGED_SELECTED", "SecureVersion", "encode_secure_version",
           "decode_secure_version"]

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
    SECURE_VERSION = 0xF1A3  # vendor-specific, ECUs that verify images: what runs as verified (SecureVersion)
    ACTIVE_CONTENT = 0xF1C0  # vendor-specific: the owner content being shown (empty: none)
    AMBIENT_LIGHT = 0xF1C1  # vendor-specific: the light sensor, lux as uint16 (day/night for content, C4)
    # vendor-specific: the vehicle's state, what install preconditions are judged on (SIGNALS below)
    BATTERY_VOLTAGE = 0xF1C2
    STATE_OF_CHARGE = 0xF1C3
    POWER_MODE = 0xF1C4
    VEHICLE_SPEED = 0xF1C5
    GEAR = 0xF1C6
    CHARGING = 0xF1C7

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


# DID F1A3, an ECU that verifies what it boots: verified(1) security version(4) counter(4) version(ASCII)
@dataclass(frozen=True)
class SecureVersion:
    """The running image as the bootloader verified it: whether it carried a valid signature, its
    security version and version, and the ECU's anti-rollback counter (no image below it is taken)."""

    verified: bool
    security_version: int
    counter: int
    version: str


def encode_secure_version(v: SecureVersion) -> bytes:
    return (bytes((int(v.verified),)) + v.security_version.to_bytes(4, "big") + v.counter.to_bytes(4, "big")
            + v.version.encode("ascii", "replace"))


def decode_secure_version(data: bytes) -> SecureVersion | None:
    if len(data) < 9 or data[0] > 1:
        return None
    return SecureVersion(bool(data[0]), int.from_bytes(data[1:5], "big"), int.from_bytes(data[5:9], "big"),
                         data[9:].decode("ascii", "replace"))


# ---- the vehicle's state, as install preconditions read it ---------------------------------------
POWER_MODES = ("off", "accessory", "run", "crank")
GEARS = ("P", "R", "N", "D")
CHARGING_STATES = ("no", "charging", "fault")
# signal name -> (DID, length): battery in mV (uint16), state of charge in % (uint8), power mode and
# charging state as an index into their tuples, speed in 0.01 km/h (uint16), the gear as its letter
SIGNALS: dict[str, tuple[int, int]] = {
    "battery_mv": (DID.BATTERY_VOLTAGE, 2),
    "soc": (DID.STATE_OF_CHARGE, 1),
    "power_mode": (DID.POWER_MODE, 1),
    "speed_kmh": (DID.VEHICLE_SPEED, 2),
    "gear": (DID.GEAR, 1),
    "charging": (DID.CHARGING, 1),
}


def encode_signal(name: str, value: object) -> bytes:
    """A signal's DID value; ValueError when the value is not one the signal can have."""
    if name == "power_mode":
        return bytes((POWER_MODES.index(str(value)),))
    if name == "charging":
        return bytes((CHARGING_STATES.index(str(value)),))
    if name == "gear":
        if str(value) not in GEARS:
            raise ValueError(f"gear {value!r} is not one of {', '.join(GEARS)}")
        return str(value).encode("ascii")
    if name == "speed_kmh":
        return round(float(value) * 100).to_bytes(2, "big")  # type: ignore[arg-type]  # OverflowError is a ValueError's kin
    number = int(value)  # type: ignore[call-overload]
    if name == "soc" and not 0 <= number <= 100:
        raise ValueError(f"soc {number} is not a percentage")
    return number.to_bytes(SIGNALS[name][1], "big")


def decode_signal(name: str, raw: bytes) -> object:
    """The value a signal's DID carries; ValueError when it is not one."""
    if len(raw) != SIGNALS[name][1]:
        raise ValueError(f"{name}: {len(raw)} bytes, expected {SIGNALS[name][1]}")
    if name == "power_mode":
        return POWER_MODES[raw[0]] if raw[0] < len(POWER_MODES) else f"unknown {raw[0]}"
    if name == "charging":
        return CHARGING_STATES[raw[0]] if raw[0] < len(CHARGING_STATES) else f"unknown {raw[0]}"
    if name == "gear":
        return raw.decode("ascii", "replace")
    if name == "speed_kmh":
        return int.from_bytes(raw, "big") / 100.0
    return int.from_bytes(raw, "big")
