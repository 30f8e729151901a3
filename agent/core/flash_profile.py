"""Flash profiles: an ECU's programming sequence as data (docs/flash-profiles.md).

A profile names the steps a bootloader expects, in three phases: ``pre`` (sessions, security
access, fingerprint), ``block`` (run once per memory block of the image: erase, the download,
the check) and ``post`` (dependencies, the reset, leaving programming). Each step is a request
template: a service with an optional sub-function, DID or routine id, and a data record built
from named fields (the block's address and size, its check value, the date, the version...).
A step can be sent functionally, with suppressPosRsp, be optional, tolerate NRCs, retry on
NRCs, and have its own timeout. Three kinds of step are more than one request: ``security``
(the seed/key exchange through a plug-in), ``download`` (RequestDownload, TransferData...,
RequestTransferExit, compressed when the ECU accepts it) and a ``reset`` (ECUReset, then
waiting until the ECU answers again; left out when an image is only staged).

``default_profile(ecu)`` is the sequence the project's ECU simulator speaks, built from the
ECU's routine ids, fingerprint DID, check algorithm and security level. Pure: no I/O.
"""

from __future__ import annotations

import binascii
import datetime as _dt
import hashlib
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

__all__ = ["FIELDS", "CHECKS", "RecordItem", "RecordContext", "ProfileStep", "VersionSpec", "FlashProfile",
           "MemoryBlock", "build_record", "check_value", "default_profile", "fingerprint_record", "profile_flow"]

PHASES = ("pre", "block", "post")


def _crc16_ccitt(data: bytes) -> bytes:
    """CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF), as most bootloaders compute it."""
    return binascii.crc_hqx(data, 0xFFFF).to_bytes(2, "big")


# check memory: what the ECU compares the written block with (a plug-in may add more)
CHECKS: dict[str, Callable[[bytes], bytes]] = {
    "none": lambda data: b"",
    "crc16": _crc16_ccitt,
    "crc32": lambda data: zlib.crc32(data).to_bytes(4, "big"),
    "sha256": lambda data: hashlib.sha256(data).digest(),
}


def check_value(algorithm: str, data: bytes) -> bytes:
    return CHECKS[algorithm](data)


@dataclass(frozen=True)
class MemoryBlock:
    """One region of an ECU's memory map: erased and programmed as a unit (its logical block number)."""

    address: int
    size: int
    number: int


@dataclass(frozen=True)
class RecordContext:
    """What a step's data record can be built from."""

    address: int = 0
    size: int = 0
    block: int = 0
    data: bytes = b""  # the block's bytes as written (for its check value and digest)
    check: bytes = b""  # the block's check value when the data is not at hand (a delta)
    digest: bytes = b""
    version: str = ""
    today: _dt.date = _dt.date(2000, 1, 1)
    address_bytes: int = 4
    size_bytes: int = 4
    tester_id: bytes = b""
    signature: bytes = b""  # a signed image: the OEM's signature (agent/core/image_auth.py) ...
    security_version: int = 0  # ... and its security version


def _bcd_date(ctx: RecordContext) -> bytes:
    d = ctx.today
    return bytes(int(f"{v:02d}", 16) for v in (d.year % 100, d.month, d.day))


def _version_bytes(ctx: RecordContext) -> bytes:
    return ctx.version.encode("ascii", "replace")[:60]


# every field a record can name, and its default width (None: as long as its value)
FIELDS: dict[str, tuple[Callable[[RecordContext], bytes], int | None]] = {
    "address": (lambda c: c.address.to_bytes(c.address_bytes, "big"), None),
    "size": (lambda c: c.size.to_bytes(c.size_bytes, "big"), None),
    "alfid": (lambda c: bytes(((c.size_bytes << 4) | c.address_bytes,)), 1),
    "block": (lambda c: c.block.to_bytes(4, "big"), 1),
    "check": (lambda c: c.check, None),
    "digest": (lambda c: c.digest or hashlib.sha256(c.data).digest(), None),
    "date": (_bcd_date, 3),
    "version": (_version_bytes, None),
    "version_length": (lambda c: bytes((min(255, len(_version_bytes(c))),)), 1),
    "tester_id": (lambda c: c.tester_id, None),
    "signature": (lambda c: c.signature, None),
    "security_version": (lambda c: c.security_version.to_bytes(4, "big"), 4),
}


@dataclass(frozen=True)
class RecordItem:
    """A named field (cut or padded to ``length`` when given), or literal bytes."""

    field: str | None = None
    literal: bytes = b""
    length: int | None = None
    pad: bytes = b"\x00"
    align: str = "right"  # numbers keep their low bytes (right); text its start (left)

    def encode(self, ctx: RecordContext) -> bytes:
        if self.field is None:
            return self.literal
        make, width = FIELDS[self.field]
        value = make(ctx)
        length = self.length if self.length is not None else width
        if length is None or len(value) == length:
            return value
        if self.align == "left":
            return value[:length] + self.pad * (length - len(value[:length]))
        return (self.pad * length + value)[-length:]


def build_record(items: tuple[RecordItem, ...], ctx: RecordContext) -> bytes:
    return b"".join(item.encode(ctx) for item in items)


@dataclass(frozen=True)
class ProfileStep:
    """One step of a profile (see the module). ``kind``: request, security, download or reset."""

    name: str
    kind: str = "request"
    service: int = 0
    sub: int | None = None
    did: int | None = None
    routine: int | None = None
    record: tuple[RecordItem, ...] = ()
    level: int = 1  # security: the seed request's level
    functional: bool = False
    suppress: bool = False  # suppressPosRsp: no positive answer expected
    optional: bool = False  # any NRC, or no answer, is tolerated
    tolerate: frozenset[int] = frozenset()
    retry_on: frozenset[int] = frozenset({0x21})
    timeout_ms: int | None = None
    ok_status: tuple[int, ...] = (0x00,)  # a routine's first status byte, if any, must be one of these; (): not checked
    when: str = "always"  # "signed": sent only for an image that carries its signature (image_auth)

    def payload(self, ctx: RecordContext) -> bytes:
        """The request's bytes."""
        head = bytes((self.service,))
        if self.sub is not None:
            head += bytes((self.sub | (0x80 if self.suppress else 0),))
        if self.did is not None:
            head += self.did.to_bytes(2, "big")
        if self.routine is not None:
            head += self.routine.to_bytes(2, "big")
        return head + build_record(self.record, ctx)


@dataclass(frozen=True)
class VersionSpec:
    """The DID the software version is read from, and how its bytes become the version."""

    did: int = 0xF189
    length: int = 0  # a fixed-length DID (0: as long as the answer)
    encoding: str = "ascii"
    strip: str = " \x00"  # padding taken off both ends

    def decode(self, raw: bytes) -> str:
        raw = raw[: self.length] if self.length else raw
        return raw.decode(self.encoding, "replace").strip(self.strip)


@dataclass(frozen=True)
class FlashProfile:
    name: str
    pre: tuple[ProfileStep, ...] = ()
    block: tuple[ProfileStep, ...] = ()
    post: tuple[ProfileStep, ...] = ()
    check: str = "crc32"  # the check value's algorithm (the ``check`` field)
    seed_key: str = "vota-hmac"  # the plug-in that makes SecurityAccess keys
    seed_key_params: Mapping[str, Any] = field(default_factory=dict)
    address_bytes: int = 4  # addressAndLengthFormatIdentifier: bytes of the address ...
    size_bytes: int = 4  # ... and of the size
    max_block: int = 0  # a cap on maxNumberOfBlockLength (0: the ECU's)
    version: VersionSpec = field(default_factory=VersionSpec)
    compression_fallback: frozenset[int] = frozenset({0x31})  # NRCs to a compressed download: offer the next way
    tester_id: bytes = b""

    def steps(self) -> tuple[ProfileStep, ...]:
        return self.pre + self.block + self.post

    def context(self, **values: Any) -> RecordContext:
        return RecordContext(address_bytes=self.address_bytes, size_bytes=self.size_bytes, tester_id=self.tester_id,
                             **values)


def _r(name: str, **kw: Any) -> RecordItem:
    return RecordItem(field=name, **kw)


def fingerprint_record() -> tuple[RecordItem, ...]:
    """The simulator's fingerprint (F15A): date as BCD YYMMDD, the version's length, the version."""
    return (_r("date"), _r("version_length"), _r("version", align="left"))


def default_profile(ecu: Any) -> FlashProfile:
    """The sequence the project's ECU simulator speaks, from an ``EcuConfig``'s keys."""
    req = ProfileStep
    return FlashProfile(
        name="vota-sim",
        pre=(
            req("extended_session", service=0x10, sub=0x03),
            req("dtc_setting_off", service=0x85, sub=0x02),
            req("communication_disable", service=0x28, sub=0x03, record=(RecordItem(literal=b"\x01"),)),
            req("programming_session", service=0x10, sub=0x02),
            req("security_access", kind="security", service=0x27, level=ecu.security_level),
            req("write_fingerprint", service=0x2E, did=ecu.fingerprint_did, record=fingerprint_record()),
        ),
        block=(
            req("erase", service=0x31, sub=0x01, routine=ecu.erase_routine,
                record=(_r("alfid"), _r("address"), _r("size"))),
            req("request_download", kind="download", service=0x34),
            req("check_memory", service=0x31, sub=0x01, routine=ecu.check_memory_routine, record=(_r("check"),)),
        ),
        post=(
            req("authenticate", service=0x31, sub=0x01, routine=ecu.authenticate_routine,
                record=(_r("security_version"), _r("signature")), when="signed"),
            req("check_dependencies", service=0x31, sub=0x01, routine=ecu.check_dependencies_routine),
            req("ecu_reset", kind="reset", service=0x11, sub=0x01),
            req("post_extended_session", service=0x10, sub=0x03),
            req("communication_enable", service=0x28, sub=0x00, record=(RecordItem(literal=b"\x03"),)),
            req("dtc_setting_on", service=0x85, sub=0x01),
            req("default_session", service=0x10, sub=0x01),
        ),
        check=ecu.check_memory,
        seed_key="vota-hmac",
    )


def _entry(step: ProfileStep) -> list[tuple[str, str]]:
    """The request prefixes (hex) a step's exchanges begin with, each with the state it leads to."""
    if step.kind == "security":
        return [(f"27{step.level:02x}", f"{step.name}:seed"), (f"27{step.level + 1:02x}", step.name)]
    if step.kind == "download":
        return [("34", f"{step.name}:data"), ("37", step.name)]
    head = bytes((step.service,)) + (bytes((step.sub | (0x80 if step.suppress else 0),)) if step.sub is not None else b"")
    if step.did is not None:
        head += step.did.to_bytes(2, "big")
    if step.routine is not None:
        head += step.routine.to_bytes(2, "big")
    return [(head.hex(), step.name)]


def profile_flow(profile: FlashProfile, delta_routine: int | None = None) -> dict[str, Any]:
    """What the diagnosis needs to judge a trace of this profile (it is written into the trace's
    header): the sequence as a state machine ``{state: {request prefix: next state}}`` (an optional,
    functional or reset step may be left out, the block steps repeat per block), and the
    sub-functions each service uses (none: a service without one)."""
    steps = list(profile.pre)
    if delta_routine is not None:
        steps.append(ProfileStep("delta_base", service=0x31, sub=0x01, routine=delta_routine, optional=True))
    first_block = len(steps)
    steps += [*profile.block, *profile.post]
    last_block = first_block + len(profile.block) - 1
    skippable = [s.optional or s.functional or s.kind == "reset" or s.name == "delta_base" or s.when != "always"
                 for s in steps]
    flow: dict[str, dict[str, str]] = {"start": {}}

    def reachable(after: int) -> list[int]:
        out = []
        for j in range(after + 1, len(steps)):
            out.append(j)
            if not skippable[j]:
                break
        if after == last_block:  # the next block
            out += [j for j in reachable(first_block - 1) if j <= last_block]
        return out

    for i in range(-1, len(steps)):
        state = "start" if i < 0 else steps[i].name
        moves = flow.setdefault(state, {})
        for j in reachable(i):
            prefix, target = _entry(steps[j])[0]
            moves.setdefault(prefix, target)
        if i >= 0:
            moves.setdefault(_entry(steps[i])[-1][0], state)  # asked again
    for s in steps:
        chain = _entry(s)
        if len(chain) == 2:  # the middle state: the key after the seed, the data after the download
            mid = flow.setdefault(chain[0][1], {})
            mid[chain[0][0]] = chain[0][1]
            mid[chain[1][0]] = chain[1][1]
            if s.kind == "download":
                mid["36"] = chain[0][1]
    subs: dict[str, list[int]] = {"22": [], "3e": [0]}  # the version reads, TesterPresent
    for s in steps:
        if s.kind == "security":
            subs.setdefault("27", []).extend([s.level, s.level + 1])
        elif s.kind == "download":
            for sid in ("34", "36", "37"):
                subs.setdefault(sid, [])
        elif s.sub is not None:
            subs.setdefault(f"{s.service:02x}", []).append(s.sub)
        else:
            subs.setdefault(f"{s.service:02x}", [])
    return {"name": profile.name, "flow": flow, "subfunctions": {k: sorted(set(v)) for k, v in subs.items()}}
