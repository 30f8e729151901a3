"""The ``doip`` section: the gateway as a DoIP entity (ISO 13400-2), its addresses and limits."""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
from typing import Any, Mapping

from agent.core.config._values import _bool, _int, _positive, _Section, _str
from agent.core.config.model import DeployConfig, DoipConfig, EcuConfig
from agent.errors import ConfigError


def _ip(value: Any) -> str:
    return str(ipaddress.ip_address(_str(value)))


def _announce(value: Any) -> str:
    return "" if value is False else _ip(value)


def _port(value: Any) -> int:
    number = _int(value)
    if not 1 <= number <= 65535:
        raise ValueError("outside 1..65535")
    return number


def _entity(value: Any) -> int:
    """A logical address a DoIP entity or an ECU may have (ISO 13400-2: 0x0001..0x0DFF, 0x1000..0x7FFF)."""
    number = _int(value)
    if not (0x0001 <= number <= 0x0DFF or 0x1000 <= number <= 0x7FFF):
        raise ValueError("outside 0x0001..0x0DFF and 0x1000..0x7FFF")
    return number


def _address(low: int, high: int) -> Any:
    def conv(value: Any) -> int:
        number = _int(value)
        if not low <= number <= high:
            raise ValueError(f"outside 0x{low:04X}..0x{high:04X}")
        return number
    return conv


def _id6(value: Any) -> bytes:
    text = _str(value).replace(":", "").replace("-", "")
    raw = bytes.fromhex(text)
    if len(raw) != 6:
        raise ValueError("expected 6 bytes, e.g. 02:00:00:00:00:01")
    return raw


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError("not above 0")
    return float(value)


def parse_doip(sec: _Section, ecus: Mapping[str, EcuConfig], vin: str | None) -> DoipConfig:
    d = DoipConfig()
    testers = sec.get("testers", list, [d.testers[0], d.testers[1]], what="[first, last] tester source address")
    if len(testers) != 2:
        raise ConfigError(sec.source, sec.key("testers"), "expected [first, last], e.g. [0x0E00, 0x0FFF]")
    low, high = (_address(0x0E00, 0x0FFF)(t) for t in testers)
    group = tuple(_str(n) for n in sec.get("functional_group", list, [], what="a list of ECU names"))
    for name in group:
        if name not in ecus:
            raise ConfigError(sec.source, sec.key("functional_group"),
                              f"unknown ECU {name!r} (configured: {', '.join(sorted(ecus))})")
    announce = sec.get("announce_to", _announce, d.announce_to, what="an IP address, or false: not announced")
    cfg = DoipConfig(
        address=sec.get("address", _ip, d.address, what="an IP address"),
        port=sec.get("port", _port, d.port, what="a port"),
        logical_address=sec.get("logical_address", _entity, d.logical_address,
                                what="the gateway's logical address (0x0001..0x0DFF, 0x1000..0x7FFF)"),
        announce_to=announce or None,
        announce_port=sec.get("announce_port", _port, d.announce_port, what="a port"),
        eid=sec.get("eid", _id6, b"", what="6 bytes, e.g. 02:00:00:00:00:01"),
        gid=sec.get("gid", _id6, b"", what="6 bytes"),
        max_testers=sec.get("max_testers", _positive, d.max_testers, what="a number of testers > 0"),
        testers=(low, high),
        functional_address=sec.get("functional_address", _address(0xE400, 0xEFFF), d.functional_address,
                                   what="a functional address, 0xE400..0xEFFF"),
        functional_group=group,
        hold_s=sec.get("hold_s", _seconds, d.hold_s, what="seconds > 0"),
        initial_inactivity_s=sec.get("initial_inactivity_s", _seconds, d.initial_inactivity_s, what="seconds > 0"),
        idle_s=sec.get("idle_s", _seconds, d.idle_s, what="seconds > 0"),
        activation_secret=sec.get("activation_secret", _str, None),
        max_request=sec.get("max_request", _positive, d.max_request, what="bytes > 0"),
        vin=vin or "",
    )
    cfg = _entity_tls(sec, cfg)
    sec.done()
    if low > high:
        raise ConfigError(sec.source, sec.key("testers"), "the first address is above the last")
    if not cfg.eid:
        cfg = dataclasses.replace(cfg, eid=bytes([0x02]) + hashlib.sha256(cfg.vin.encode()).digest()[:5])
    if not cfg.gid:
        cfg = dataclasses.replace(cfg, gid=cfg.eid)
    seen = {cfg.logical_address: "the gateway (doip.logical_address)"}
    for ecu in ecus.values():
        address = cfg.ecu_address(ecu)
        if not (0x0001 <= address <= 0x0DFF or 0x1000 <= address <= 0x7FFF):
            raise ConfigError(sec.source, f"ecus.{ecu.name}.logical_address",
                              f"missing; its request id gives 0x{address:04X}, not an ECU's logical address")
        if address in seen:
            raise ConfigError(sec.source, f"ecus.{ecu.name}.logical_address",
                              f"0x{address:04X} is already {seen[address]}'s")
        seen[address] = ecu.name
    return cfg




def _entity_tls(sec: _Section, cfg: DoipConfig) -> DoipConfig:
    given = sec.data.get("tls") is not None
    tls = sec.section("tls", {})
    out = dataclasses.replace(
        cfg, tls_port=tls.get("port", _port, cfg.tls_port, what="a port"), tls_cert=tls.get("cert", _str, None),
        tls_key=tls.get("key", _str, None), tls_ca=tls.get("ca", _str, None), plain=tls.get("plain", _bool, True))
    tls.done()
    if given and (out.tls_cert is None or out.tls_key is None):
        raise ConfigError(sec.source, tls.key("cert" if out.tls_cert is None else "key"),
                          "missing; the entity's TLS needs its certificate and key (PEM files)")
    if given and out.tls_port == out.port:
        raise ConfigError(sec.source, tls.key("port"), f"must differ from doip.port ({out.port})")
    return out


def deploy_over_doip(sec: _Section, cfg: DeployConfig, doip: DoipConfig | None) -> DeployConfig:
    """The deploy section's DoIP keys (``transport: doip``): the TBOX reaches the gateway's deploy
    server at the entity's logical address, with its own source address."""
    if cfg.transport != "doip":
        for key in ("host", "source_address", "tls"):
            if sec.data.get(key) is not None:
                raise ConfigError(sec.source, sec.key(key), "only with transport: doip")
        return cfg
    if sec.data.get("segment") is not None:
        raise ConfigError(sec.source, sec.key("segment"), "not used with transport: doip (the link is the doip "
                                                          "section's entity); remove it")
    sec.used.add("segment")
    if doip is None:
        raise ConfigError(sec.source, sec.key("transport"), "doip needs the doip section (the gateway's DoIP entity)")
    host = sec.get("host", _ip, doip.address, what="the gateway's IP address")
    if ipaddress.ip_address(host).is_unspecified:
        raise ConfigError(sec.source, sec.key("host"), f"missing; doip.address {host} does not say where the gateway is")
    source = sec.get("source_address", _address(0x0E00, 0x0FFF), 0x0E80,
                     what="the TBOX's logical address, 0x0E00..0x0FFF")
    if not doip.testers[0] <= source <= doip.testers[1]:
        raise ConfigError(sec.source, sec.key("source_address"),
                          f"0x{source:04X} is outside doip.testers (0x{doip.testers[0]:04X}..0x{doip.testers[1]:04X}): "
                          "the gateway would refuse its routing activation")
    given = sec.data.get("tls") is not None
    tls = sec.section("tls", {})
    ca, cert, key = tls.get("ca", _str, None), tls.get("cert", _str, None), tls.get("key", _str, None)
    tls.done()
    if given and doip.tls_cert is None:
        raise ConfigError(sec.source, sec.key("tls"), "the doip section has no tls: the entity does not offer it")
    if given and ca is None:
        raise ConfigError(sec.source, tls.key("ca"), "missing; the CA that signed the gateway's certificate")
    if (cert is None) != (key is None):
        raise ConfigError(sec.source, tls.key("key" if key is None else "cert"), "missing; give both cert and key")
    if not given and not doip.plain:
        raise ConfigError(sec.source, sec.key("tls"), "missing; doip.tls.plain is false: the entity takes TLS only")
    return dataclasses.replace(cfg, doip_host=host, doip_port=doip.tls_port if given else doip.port, doip_source=source,
                               doip_target=doip.logical_address, doip_tls=given, doip_tls_ca=ca, doip_tls_cert=cert,
                               doip_tls_key=key)
