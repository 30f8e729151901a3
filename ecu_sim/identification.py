"""The simulated ECU's identification and status DIDs (ReadDataByIdentifier, and the fingerprint
written before programming): versions, the active and the staged image, the light sensor."""

from __future__ import annotations

import json

from agent.protocol.ecu import (
    DID,
    SIGNALS,
    STAGED,
    STAGED_NONE,
    STAGED_SELECTED,
    SecureVersion,
    StagedImage,
    encode_secure_version,
    encode_signal,
    encode_staged_image,
)
from agent.protocol.uds import Nrc, Request, Session
from ecu_sim.dialect import fingerprint_version
from ecu_sim.flash_banks import BankInfo
from ecu_sim.state import EcuState

__all__ = ["read_data_by_identifier", "write_data_by_identifier"]


NEVER_PROGRAMMED = bytes(4)  # fingerprint of an ECU never programmed: date 00-00-00, no version


def _did_value(s: EcuState, did: int) -> bytes | None:
    info = s.banks.active_info
    if info.state != "valid":  # a single bank being flashed: no application runs, only the bootloader answers
        info = BankInfo("empty")
    values = {
        DID.BOOT_SOFTWARE: b"\x01" + s.sim.bootloader_version.encode(),  # numberOfModules, then the module's id
        DID.PART_NUMBER: s.sim.part_number.encode(),
        s.speaks.version_did: s.speaks.version_value(info.version),
        DID.SERIAL: s.sim.serial.encode(),
        DID.SUPPLIER_VERSION: s.sim.supplier_version.encode(),
        DID.ACTIVE_SESSION: bytes((s.session,)),
        DID.IMAGE_DIGEST: bytes.fromhex(info.sha256) if info.sha256 else bytes(32),
        DID.FINGERPRINT: s.fingerprint or NEVER_PROGRAMMED,
        DID.FINGERPRINT_ALT: s.fingerprint or NEVER_PROGRAMMED,
        **({s.speaks.fingerprint_did: s.fingerprint or NEVER_PROGRAMMED} if s.speaks.fingerprint_did is not None else {}),
        DID.ACTIVE_CONTENT: (s.content.active or "").encode() if s.content is not None else b"",
        DID.STAGED_IMAGE: _staged_image(s),
        DID.BANK_STATUS: bytes((int(info.confirmed), int(s.banks.previous is not None))),
    }
    if did == DID.SECURE_VERSION:
        return None if s.image_key is None else encode_secure_version(
            SecureVersion(info.verified, info.security_version, s.banks.counter, info.version))
    if did == DID.AMBIENT_LIGHT:
        return _ambient_light(s)
    if did in _SIGNAL_OF:
        return _signal(s, _SIGNAL_OF[did])
    if s.banks.single and did in (DID.STAGED_IMAGE, DID.BANK_STATUS):
        return None  # one bank: nothing staged, nothing kept to go back to
    return values.get(did)


def _staged_image(s: EcuState) -> bytes:
    staged = s.banks.staged
    if staged is None:
        return encode_staged_image(StagedImage(STAGED_NONE))
    status = STAGED_SELECTED if s.banks.next_boot == "activate" else STAGED
    return encode_staged_image(StagedImage(status, staged.size, staged.sha256, staged.version))


def _ambient_light(s: EcuState) -> bytes | None:
    """The simulated light sensor: fitted when ``sensors.json`` exists in the ECU's state
    directory (a bench or test writes it), else the DID is not supported."""
    if s.sensors is None:
        return None
    try:
        lux = json.loads(s.sensors.read_text())["ambient_lux"]
        return max(0, min(0xFFFF, int(lux))).to_bytes(2, "big")
    except (OSError, ValueError, KeyError, TypeError):
        return None


_SIGNAL_OF = {did: name for name, (did, _) in SIGNALS.items()}


def _signal(s: EcuState, name: str) -> bytes | None:
    """The vehicle's state as this ECU reports it: ``signals.json`` in its state directory (a
    bench or test writes it, and may change it at any time), e.g. ``{"soc": 80, "power_mode":
    "off", "gear": "P", "speed_kmh": 0, "battery_mv": 12600, "charging": "no"}``; a signal it
    does not name (or no file) is not supported."""
    if s.signals is None:
        return None
    try:
        return encode_signal(name, json.loads(s.signals.read_text())[name])
    except (OSError, ValueError, KeyError, TypeError, OverflowError):
        return None


def read_data_by_identifier(s: EcuState, r: Request) -> bytes:
    body = r.data[1:]
    if not body or len(body) % 2:
        return r.negative(Nrc.IncorrectMessageLengthOrInvalidFormat)
    out = bytearray(b"\x62")
    found = False
    for i in range(0, len(body), 2):
        did = int.from_bytes(body[i : i + 2], "big")
        value = _did_value(s, did)
        if value is None:
            continue
        found = True
        out += body[i : i + 2] + value
    if not found:
        return r.negative(Nrc.RequestOutOfRange)
    return bytes(out)


def write_data_by_identifier(s: EcuState, r: Request) -> bytes:
    if len(r.data) < 4:
        return r.negative(Nrc.IncorrectMessageLengthOrInvalidFormat)
    did = int.from_bytes(r.data[1:3], "big")
    if did not in (DID.FINGERPRINT, DID.FINGERPRINT_ALT, s.speaks.fingerprint_did):
        return r.negative(Nrc.RequestOutOfRange)
    if s.session != Session.programmingSession:
        return r.negative(Nrc.ConditionsNotCorrect)
    if not s.unlocked:
        return r.negative(Nrc.SecurityAccessDenied)
    value = r.data[3:]
    if len(value) < 4 or len(value) > 64:
        return r.negative(Nrc.IncorrectMessageLengthOrInvalidFormat)
    s.fingerprint = value
    if did == s.speaks.fingerprint_did and s.config.profile is not None:  # where its profile puts the version
        version = fingerprint_version(s.speaks, value)
        if version is not None:
            s.banks.pending_version = version
        return b"\x6e" + r.data[1:3]
    # the simulator's layout: 3 bytes date (BCD YYMMDD), 1 byte length, then the software version
    version_length = value[3]
    if 4 + version_length <= len(value):
        s.banks.pending_version = value[4 : 4 + version_length].decode("ascii", "replace")
    return b"\x6e" + r.data[1:3]
