"""The ``ecus`` section: one ECU as the gateway flashes it and as the simulator plays it."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from agent.core.config._profile import parse_memory_blocks
from agent.core.config._values import _bool, _can_id, _choice, _int, _nibble, _nonneg, _positive, _Section, _str
from agent.core.config.model import EcuConfig, EcuSimConfig, SegmentConfig
from agent.core.flash_profile import FlashProfile
from agent.errors import ConfigError
from agent.protocol.compression import METHODS, Params

__all__ = ["parse_ecu", "check_unique_ids", "compression_nibbles"]


def _ecu_sim(sec: _Section) -> EcuSimConfig:
    d = EcuSimConfig()
    faults = sec.get("faults", list, [], what="a list of fault specs")
    cfg = EcuSimConfig(
        part_number=sec.get("part_number", _str, d.part_number),
        serial=sec.get("serial", _str, d.serial),
        software_version=sec.get("software_version", _str, d.software_version),
        supplier_version=sec.get("supplier_version", _str, d.supplier_version),
        bootloader_version=sec.get("bootloader_version", _str, d.bootloader_version),
        max_block_length=sec.get("max_block_length", _positive, d.max_block_length),
        erase_ms=sec.get("erase_ms", _nonneg, d.erase_ms),
        check_ms=sec.get("check_ms", _nonneg, d.check_ms),
        reset_ms=sec.get("reset_ms", _nonneg, d.reset_ms),
        s3_ms=sec.get("s3_ms", _positive, d.s3_ms),
        p2_ms=sec.get("p2_ms", _positive, d.p2_ms),
        p2_star_ms=sec.get("p2_star_ms", _positive, d.p2_star_ms),
        pending_interval_ms=sec.get("pending_interval_ms", _positive, d.pending_interval_ms),
        max_attempts=sec.get("max_attempts", _positive, d.max_attempts),
        lockout_ms=sec.get("lockout_ms", _nonneg, d.lockout_ms),
        state_dir=sec.get("state_dir", _str, d.state_dir),
        faults=tuple(_str(f) for f in faults),
        accept_compression=_accepted(sec),
        accept_delta=sec.get("accept_delta", _bool, d.accept_delta),
        image_key=sec.get("image_key", _str, None, what="a public key file (PEM)"),
        broadcast=sec.get("broadcast", _bool, d.broadcast),
    )
    sec.done()
    if cfg.max_block_length < 3:
        raise ConfigError(sec.source, sec.key("max_block_length"), "must be at least 3")
    return cfg


def _method(sec: _Section, key: str, value: Any) -> str:
    if value not in METHODS:
        raise ConfigError(sec.source, sec.key(key), f"unknown compression method {value!r} (known: {', '.join(METHODS)})")
    return str(value)


def _accepted(sec: _Section) -> tuple[str, ...] | None:
    accepted = sec.get("accept_compression", list, None, what="a list of compression methods")
    return None if accepted is None else tuple(_method(sec, "accept_compression", m) for m in accepted)


def compression_nibbles(sec: _Section) -> tuple[tuple[str, int], ...]:
    """``compression: {zlib: 1, lzma: 2}``: method -> the dataFormatIdentifier's high nibble."""
    raw = sec.get("compression", dict, {}, what="a mapping of compression method to its nibble (1-15)")
    out: list[tuple[str, int]] = []
    for method, nibble in raw.items():
        _method(sec, "compression", method)
        if isinstance(nibble, bool) or not isinstance(nibble, int) or not 1 <= nibble <= 15:
            raise ConfigError(sec.source, f"{sec.key('compression')}.{method}", f"expected a nibble from 1 to 15, got {nibble!r}")
        if nibble in (n for _, n in out):
            raise ConfigError(sec.source, f"{sec.key('compression')}.{method}", f"nibble {nibble} is already taken")
        out.append((str(method), nibble))
    return tuple(out)


def _compression_params(sec: _Section) -> Params:
    d = Params()
    window = sec.get("lzss_window_bits", _int, d.lzss_window_bits)
    if not 4 <= window <= 15:
        raise ConfigError(sec.source, sec.key("lzss_window_bits"), f"expected 4..15 (a window of 2^bits bytes), got {window}")
    lookahead = sec.get("lzss_lookahead_bits", _int, d.lzss_lookahead_bits)
    if not 3 <= lookahead < window:
        raise ConfigError(sec.source, sec.key("lzss_lookahead_bits"), f"expected 3..{window - 1} (below the window's bits), "
                                                                     f"got {lookahead}")
    kib = sec.get("lzma_dict_kib", _positive, d.lzma_dict_size // 1024)
    if not 4 <= kib <= 1024 * 1024:
        raise ConfigError(sec.source, sec.key("lzma_dict_kib"), f"expected 4..1048576 KiB, got {kib}")
    sec.done()
    return Params(lzma_dict_size=kib * 1024, lzss_window_bits=window, lzss_lookahead_bits=lookahead)


def parse_ecu(source: str, name: str, sec: _Section, segments: Mapping[str, SegmentConfig],
         profiles: Mapping[str, FlashProfile]) -> EcuConfig:
    d = EcuConfig(name, "", 0, 0)
    segment = sec.get("segment", _str)
    if segment not in segments:
        raise ConfigError(source, sec.key("segment"), f"unknown segment {segment!r} (configured: {', '.join(sorted(segments))})")
    memory = sec.section("memory", {})
    routines = sec.section("routines", {})
    timing = sec.section("timing", {})
    cfg = EcuConfig(
        name=name,
        segment=segment,
        request_id=sec.get("request_id", _can_id, what="a CAN id"),
        response_id=sec.get("response_id", _can_id, what="a CAN id"),
        functional_id=sec.get("functional_id", _can_id, d.functional_id),
        security_level=sec.get("security_level", _int, d.security_level),
        security_secret=sec.get("security_secret", _str, d.security_secret),
        memory_address=memory.get("address", _nonneg, d.memory_address),
        memory_size=memory.get("size", _positive, d.memory_size),
        erase_routine=routines.get("erase", _int, d.erase_routine),
        check_memory_routine=routines.get("check_memory", _int, d.check_memory_routine),
        check_dependencies_routine=routines.get("check_dependencies", _int, d.check_dependencies_routine),
        activate_routine=routines.get("activate", _int, d.activate_routine),
        discard_routine=routines.get("discard", _int, d.discard_routine),
        rollback_routine=routines.get("rollback", _int, d.rollback_routine),
        commit_routine=routines.get("commit", _int, d.commit_routine),
        delta_base_routine=routines.get("delta_base", _int, d.delta_base_routine),
        authenticate_routine=routines.get("authenticate", _int, d.authenticate_routine),
        check_memory=sec.get("check_memory", _choice("crc32", "sha256"), d.check_memory),
        banks=sec.get("banks", _int, d.banks),
        safety_relevant=sec.get("safety_relevant", _bool, d.safety_relevant),
        fingerprint_did=sec.get("fingerprint_did", _int, d.fingerprint_did),
        logical_address=sec.get("logical_address", _ecu_address, None, what="a DoIP logical address (0x0001..0x0DFF, 0x1000..0x7FFF)"),
        p2_ms=timing.get("p2_ms", _positive, d.p2_ms),
        p2_star_ms=timing.get("p2_star_ms", _positive, d.p2_star_ms),
        compression=compression_nibbles(sec),
        compression_params=_compression_params(sec.section("compression_params", {})),
        delta=sec.get("delta", _nibble, None, what="the dataFormatIdentifier nibble of a delta (1-15)"),
        sim=_ecu_sim(sec.section("sim", {})),
        profile=_ecu_profile(sec, profiles),
        memory_blocks=parse_memory_blocks(memory, memory.get("address", _nonneg, d.memory_address),
                                          memory.get("size", _positive, d.memory_size)) if "blocks" in memory.data else (),
        seed_key_params=dict(sec.get("seed_key_params", dict, {}, what="a mapping of the seed/key plug-in's parameters")),
    )
    for s in (memory, routines, timing):
        s.done()
    sec.done()
    if cfg.memory_blocks and "address" not in memory.data and "size" not in memory.data:  # the map spans the memory
        low = min(b.address for b in cfg.memory_blocks)
        cfg = dataclasses.replace(cfg, memory_address=low,
                                  memory_size=max(b.address + b.size for b in cfg.memory_blocks) - low)
    if cfg.security_level % 2 != 1:
        raise ConfigError(source, sec.key("security_level"), "expected an odd level (the seed request)")
    if cfg.request_id == cfg.response_id:
        raise ConfigError(source, sec.key("response_id"), "must differ from request_id")
    if cfg.delta is not None and cfg.delta in (n for _, n in cfg.compression):
        raise ConfigError(source, sec.key("delta"), f"nibble {cfg.delta} is already a compression method's")
    if cfg.banks not in (1, 2):
        raise ConfigError(source, sec.key("banks"), "expected 2 (A/B flash banks) or 1 (a single bank, flashed in place)")
    return cfg


def _ecu_address(value: Any) -> int:
    number = _int(value)
    if not (0x0001 <= number <= 0x0DFF or 0x1000 <= number <= 0x7FFF):  # ISO 13400-2: the ECUs' ranges
        raise ValueError("outside 0x0001..0x0DFF and 0x1000..0x7FFF")
    return number


def _ecu_profile(sec: _Section, profiles: Mapping[str, FlashProfile]) -> FlashProfile | None:
    name = sec.get("profile", _str, "vota-sim")
    if name == "vota-sim":
        return None
    if name not in profiles:
        known = ", ".join(["vota-sim", *sorted(profiles)])
        raise ConfigError(sec.source, sec.key("profile"), f"unknown flash profile {name!r} (known: {known})")
    return profiles[name]


def check_unique_ids(source: str, ecus: Mapping[str, EcuConfig]) -> None:
    seen: dict[tuple[str, int], str] = {}
    for ecu in ecus.values():
        for key, can_id in (("request_id", ecu.request_id), ("response_id", ecu.response_id)):
            other = seen.get((ecu.segment, can_id))
            if other is not None:
                raise ConfigError(source, f"ecus.{ecu.name}.{key}", f"CAN id 0x{can_id:X} is already used by {other}")
            seen[(ecu.segment, can_id)] = ecu.name
