"""The bootloader dialect the simulator plays, read from the ECU's flash profile (the same
description the gateway programs it by, docs/flash-profiles.md#the-simulator-plays-a-profile):

- the SecurityAccess levels of its ``security`` steps, the key checked with its seed/key plug-in;
- the erase: the block-phase routine before the download, by region (``alfid address size``),
  by logical block number (``block``) or of everything (no record);
- check memory: the block-phase routine whose record holds ``check`` (the profile's algorithm,
  over the block just written), with the block number when the record names it;
- check dependencies: the post-phase routines; any other routine of the profile answers ok;
- the fingerprint: the pre-phase WriteDataByIdentifier, its version read out of the record;
- the version DID, space-padded to the profile's fixed length.

The built-in profile gives the simulator's behaviour as it always was.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from agent.adapters.plugins import check_for, seed_key_for
from agent.core.config import EcuConfig
from agent.core.flash_profile import FIELDS, ProfileStep, RecordItem

__all__ = ["Dialect", "dialect_of", "fingerprint_version"]

@dataclass(frozen=True)
class Dialect:
    security_levels: frozenset[int]
    key: Callable[[int, bytes], bytes]
    erase_routine: int
    erase_by: str  # region | block | all
    check_routine: int
    check_with_block: bool
    check: Callable[[bytes], bytes]
    dependencies_routines: frozenset[int]
    other_routines: frozenset[int]
    fingerprint_did: int | None
    version_at: tuple[int, int | None] | None  # where the version sits in the fingerprint (offset, length; None: to the end)
    version_did: int = 0xF189
    version_length: int = 0
    version_pad: bytes = b" "
    blocks: dict[int, tuple[int, int]] = field(default_factory=dict)  # logical block -> (address, size)

    def version_value(self, version: str) -> bytes:
        raw = version.encode("ascii", "replace")
        return raw.ljust(self.version_length, self.version_pad)[: self.version_length] if self.version_length else raw

def _fields(step: ProfileStep) -> list[str | None]:
    return [item.field for item in step.record]

def _width(item: RecordItem, ecu: EcuConfig) -> int | None:
    """The bytes an item takes in a record (None: as long as its value)."""
    if item.field is None:
        return len(item.literal)
    if item.length is not None:
        return item.length
    profile = ecu.flash_profile
    fixed = {"address": profile.address_bytes, "size": profile.size_bytes, "tester_id": len(profile.tester_id),
             "digest": 32}
    return fixed.get(item.field, FIELDS[item.field][1])

def _version_at(step: ProfileStep, ecu: EcuConfig) -> tuple[int, int | None] | None:
    offset = 0
    for item in step.record:
        if item.field == "version":
            return offset, item.length
        width = _width(item, ecu)
        if width is None:
            return None
        offset += width
    return None

def _routines(steps: tuple[ProfileStep, ...]) -> list[ProfileStep]:
    return [s for s in steps if s.kind == "request" and s.routine is not None]

def dialect_of(ecu: EcuConfig) -> Dialect:
    profile = ecu.flash_profile
    download = next(i for i, s in enumerate(profile.block) if s.kind == "download")
    before, after = _routines(profile.block[:download]), _routines(profile.block[download + 1 :])
    erase = before[-1] if before else None
    check = next((s for s in after if "check" in _fields(s)), None)
    fingerprint = next((s for s in profile.pre if s.service == 0x2E and s.did is not None), None)
    named = {s.routine for s in (erase, check) if s is not None}
    post = {s.routine for s in _routines(profile.post)} - named
    everything = {s.routine for s in _routines(profile.steps())}
    erase_fields = _fields(erase) if erase is not None else []
    return Dialect(
        security_levels=frozenset(s.level for s in profile.steps() if s.kind == "security"),
        key=seed_key_for(ecu),
        erase_routine=erase.routine if erase is not None and erase.routine is not None else ecu.erase_routine,
        erase_by="block" if "block" in erase_fields else "region" if "address" in erase_fields else "all",
        check_routine=check.routine if check is not None and check.routine is not None else ecu.check_memory_routine,
        check_with_block=check is not None and "block" in _fields(check),
        check=check_for(ecu),
        dependencies_routines=frozenset(r for r in post if r is not None),
        other_routines=frozenset(r for r in everything - named - post if r is not None),
        fingerprint_did=fingerprint.did if fingerprint is not None else None,
        version_at=_version_at(fingerprint, ecu) if fingerprint is not None else None,
        version_did=profile.version.did, version_length=profile.version.length,
        version_pad=(profile.version.strip or " ")[:1].encode("latin-1"),
        blocks={b.number: (b.address, b.size) for b in ecu.memory_map},
    )

def fingerprint_version(d: Dialect, record: bytes) -> str | None:
    """The version a fingerprint record carries, padding stripped (None: none in it)."""
    if d.version_at is None:
        return None
    offset, length = d.version_at
    raw = record[offset:] if length is None else record[offset : offset + length]
    return raw.decode("ascii", "replace").strip(" \x00") or None
