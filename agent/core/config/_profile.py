"""Parsing ``flash_profiles`` (agent/core/flash_profile.py, docs/flash-profiles.md): every
error names the key's full path, e.g. ``flash_profiles.acme.steps.pre[3].record[1]``."""

from __future__ import annotations

from typing import Any

from agent.core.config._values import _bool, _choice, _int, _nonneg, _positive, _ranged, _Section, _str
from agent.core.flash_profile import FIELDS, PHASES, FlashProfile, MemoryBlock, ProfileStep, RecordItem, VersionSpec
from agent.errors import ConfigError

__all__ = ["parse_profiles", "parse_memory_blocks"]


def _byte(value: Any) -> int:
    number = _int(value)
    if not 0 <= number <= 0xFF:
        raise ValueError("outside 0..0xFF")
    return number


def _word(value: Any) -> int:
    number = _int(value)
    if not 0 <= number <= 0xFFFF:
        raise ValueError("outside 0..0xFFFF")
    return number


# within one UDS message on ISO-TP: a request's record field; a DID's data in its answer
_field_length = _ranged(1, 4095, "a UDS request on ISO-TP")
_did_length = _ranged(0, 4092, "a DID's data in one UDS answer on ISO-TP")


def _hex(value: Any) -> bytes:
    """``"0x0102"`` or ``"01 02"``: bytes."""
    text = _str(value).strip()
    text = text[2:] if text.lower().startswith("0x") else text
    return bytes.fromhex(text.replace(" ", ""))


def _pad(value: Any) -> bytes:
    if isinstance(value, int) and not isinstance(value, bool):
        return bytes((_byte(value),))
    text = _str(value)
    if len(text) == 1:
        return text.encode("latin-1")
    pad = _hex(text)
    if len(pad) != 1:
        raise ValueError("one byte or one character")
    return pad


def _nrcs(sec: _Section, name: str, default: frozenset[int]) -> frozenset[int]:
    raw = sec.get(name, list, None, what="a list of NRCs (0x10-0xFF)")
    if raw is None:
        return default
    try:
        return frozenset(_byte(v) for v in raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(sec.source, sec.key(name), f"expected a list of NRCs, got {raw!r} ({exc})") from None


def _item(source: str, key: str, raw: Any) -> RecordItem:
    if isinstance(raw, str) and raw.lower().startswith("0x"):
        try:
            return RecordItem(literal=_hex(raw))
        except ValueError as exc:
            raise ConfigError(source, key, f"expected hex bytes, got {raw!r} ({exc})") from None
    if isinstance(raw, str):
        raw = {"field": raw}
    sec = _Section(source, key, raw)
    if "hex" in sec.data:
        item = RecordItem(literal=sec.get("hex", _hex, what="hex bytes"))
        sec.done()
        return item
    name = sec.get("field", _str, what="a field name")
    if name not in FIELDS:
        raise ConfigError(source, sec.key("field") if isinstance(raw, dict) and len(raw) > 1 else key,
                          f"unknown field {name!r} (known: {', '.join(FIELDS)})")
    item = RecordItem(field=name, length=sec.get("length", _field_length, None), pad=sec.get("pad", _pad, b"\x00"),
                      align=sec.get("align", _choice("left", "right"), "left" if name == "version" else "right"))
    sec.done()
    return item


def _step(source: str, key: str, raw: Any, phase: str) -> ProfileStep:
    sec = _Section(source, key, raw)
    name = sec.get("name", _str, what="the step's name")
    kinds = [k for k in ("security", "download", "reset") if sec.data.get(k) not in (None, False)]
    if len(kinds) > 1:
        raise ConfigError(source, sec.key(kinds[1]), f"a step is one of security, download, reset; this one is also {kinds[0]}")
    kind = kinds[0] if kinds else "request"
    routine = sec.get("routine", _word, None, what="a routine id (0-0xFFFF)")
    service_default = {"security": 0x27, "download": 0x34, "reset": 0x11}.get(kind, 0x31 if routine is not None else ...)
    records = sec.get("record", list, [], what="a list of fields and hex bytes")
    step = ProfileStep(
        name=name, kind=kind,
        service=sec.get("service", _byte, service_default, what="a service id (0x10-0xBF)"),
        sub=sec.get("sub", _byte, 0x01 if (routine is not None or kind == "reset") else None),
        did=sec.get("did", _word, None, what="a DID (0-0xFFFF)"), routine=routine,
        record=tuple(_item(source, f"{sec.key('record')}[{i}]", r) for i, r in enumerate(records)),
        level=sec.get("security", _byte, 1) if kind == "security" else 1,
        functional=sec.get("functional", _bool, False), suppress=sec.get("suppress", _bool, False),
        optional=sec.get("optional", _bool, False), tolerate=_nrcs(sec, "tolerate", frozenset()),
        retry_on=_nrcs(sec, "retry_on", frozenset({0x21})), timeout_ms=sec.get("timeout_ms", _positive, None),
        ok_status=tuple(_byte(v) for v in sec.get("ok_status", list, [0], what="a list of status bytes")),
        when=sec.get("when", _choice("always", "signed"), "always"),
    )
    sec.get("download", _bool, False)
    sec.get("reset", _bool, False)
    sec.done()
    if kind == "security" and step.level % 2 != 1:
        raise ConfigError(source, sec.key("security"), "expected an odd level (the seed request)")
    if step.when == "signed" and kind != "request":
        raise ConfigError(source, sec.key("when"), "only a request step can depend on the image's signature")
    if kind == "reset" and phase != "post":
        raise ConfigError(source, sec.key("reset"), "the reset belongs in the post phase")
    if kind == "download" and phase != "block":
        raise ConfigError(source, sec.key("download"), "the download belongs in the block phase")
    if step.functional and not step.suppress:
        raise ConfigError(source, sec.key("functional"), "a functional request expects no answer: set suppress: true")
    if step.suppress and step.sub is None:
        raise ConfigError(source, sec.key("suppress"), "suppressPosRsp needs a sub-function (sub)")
    return step


def _version(sec: _Section) -> VersionSpec:
    d = VersionSpec()
    spec = VersionSpec(did=sec.get("did", _word, d.did), length=sec.get("length", _did_length, d.length),
                       encoding=sec.get("encoding", _choice("ascii", "utf-8", "latin-1"), d.encoding),
                       strip=sec.get("strip", _str, d.strip))
    sec.done()
    return spec


def _profile(source: str, name: str, sec: _Section) -> FlashProfile:
    steps_sec = sec.section("steps")
    phases: dict[str, tuple[ProfileStep, ...]] = {}
    for phase in PHASES:
        raw = steps_sec.get(phase, list, [], what="a list of steps")
        phases[phase] = tuple(_step(source, f"{steps_sec.key(phase)}[{i}]", r, phase) for i, r in enumerate(raw))
    steps_sec.done()
    if sum(s.kind == "download" for s in phases["block"]) != 1:
        raise ConfigError(source, steps_sec.key("block"), "expected exactly one step with download: true")
    seen: set[str] = set()
    for phase in PHASES:
        for i, s in enumerate(phases[phase]):
            if s.name in seen:
                raise ConfigError(source, f"{steps_sec.key(phase)}[{i}].name", f"step name {s.name!r} is used twice")
            seen.add(s.name)
    seed = sec.data.get("seed_key")
    seed_sec = sec.section("seed_key", {}) if not isinstance(seed, str) else None
    if seed_sec is None:
        sec.used.add("seed_key")
    fmt = sec.section("address_format", {})
    profile = FlashProfile(
        name=name, pre=phases["pre"], block=phases["block"], post=phases["post"],
        check=sec.get("check", _str, "crc32"),
        seed_key=str(seed) if seed_sec is None else seed_sec.get("plugin", _str, "vota-hmac"),
        seed_key_params={} if seed_sec is None else dict(seed_sec.get("params", dict, {}, what="a mapping")),
        address_bytes=fmt.get("address", _choice_int(1, 5), 4), size_bytes=fmt.get("size", _choice_int(1, 4), 4),
        max_block=sec.get("max_block", _nonneg, 0),
        version=_version(sec.section("version", {})),
        compression_fallback=_nrcs(sec, "compression_fallback", frozenset({0x31})),
        tester_id=sec.get("tester_id", _hex, b"", what="hex bytes"),
    )
    for s in (fmt, *(() if seed_sec is None else (seed_sec,))):
        s.done()
    sec.done()
    if profile.max_block and profile.max_block < 3:
        raise ConfigError(source, sec.key("max_block"), "must be at least 3 (or 0: the ECU's)")
    return profile


def _choice_int(low: int, high: int) -> Any:
    def conv(value: Any) -> int:
        number = _int(value)
        if not low <= number <= high:
            raise ValueError(f"outside {low}..{high}")
        return number

    conv.__name__ = f"a number of bytes ({low}-{high})"
    return conv


def parse_profiles(sec: _Section) -> dict[str, FlashProfile]:
    """The ``flash_profiles`` section: name -> profile."""
    out = {str(n): _profile(sec.source, str(n), _Section(sec.source, sec.key(str(n)), v)) for n, v in sec.data.items()}
    sec.used.update(str(n) for n in sec.data)
    if "vota-sim" in out:
        raise ConfigError(sec.source, sec.key("vota-sim"), "vota-sim is the built-in profile's name")
    return out


def parse_memory_blocks(memory: _Section, address: int, size: int) -> tuple[MemoryBlock, ...]:
    """``memory.blocks``: the ECU's memory map (default: one block, number 0, at address/size)."""
    raw = memory.get("blocks", list, None, what="a list of {address, size, number}")
    if raw is None:
        return (MemoryBlock(address, size, 0),)
    blocks = []
    for i, entry in enumerate(raw):
        b = _Section(memory.source, f"{memory.key('blocks')}[{i}]", entry)
        blocks.append(MemoryBlock(b.get("address", _nonneg, what="an address"), b.get("size", _positive, what="a size"),
                                  b.get("number", _byte, i)))
        b.done()
    if not blocks:
        raise ConfigError(memory.source, memory.key("blocks"), "at least one block is needed")
    return tuple(blocks)
