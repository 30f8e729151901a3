"""Typed configuration of the simulated or real vehicle, loaded from YAML in one place.

One file describes the CAN segments and the ECUs on them; the gateway reads the client side
of each ECU, the ECU simulator reads the ``sim`` part. Every error names the file, the key
and what was expected.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar
from urllib.parse import urlparse

import yaml

from agent.errors import ConfigError

__all__ = [
    "CloudConfig",
    "SegmentConfig",
    "EcuSimConfig",
    "EcuConfig",
    "GatewayConfig",
    "DeployConfig",
    "TboxConfig",
    "VehicleConfig",
    "load_vehicle_config",
    "parse_vehicle_config",
    "load_yaml",
]

T = TypeVar("T")


def load_yaml(path: str | os.PathLike[str]) -> Any:
    """Read a YAML file; any problem becomes one ConfigError naming the file."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(source, None, "file not found") from None
    except OSError as exc:
        raise ConfigError(source, None, f"cannot read file ({exc.strerror})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(source, None, f"broken YAML{where}: {problem}") from None


class _Section:
    """Reads one mapping of a config file, remembering which keys were used."""

    def __init__(self, source: str, path: str, data: Any) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(source, path or None, f"expected a mapping, got {_kind(data)}")
        self.source = source
        self.path = path
        self.data = data
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def get(self, name: str, conv: Callable[[Any], T], default: Any = ..., what: str = "") -> T:
        self.used.add(name)
        if name not in self.data or self.data[name] is None:
            if default is ...:
                raise ConfigError(self.source, self.key(name), f"missing; expected {what or conv.__name__}")
            return default  # type: ignore[no-any-return]
        value = self.data[name]
        try:
            return conv(value)
        except (TypeError, ValueError) as exc:
            detail = f" ({exc})" if str(exc) else ""
            raise ConfigError(
                self.source, self.key(name), f"expected {what or conv.__name__}, got {value!r}{detail}"
            ) from None

    def section(self, name: str, default: Any = ...) -> "_Section":
        self.used.add(name)
        if name not in self.data or self.data[name] is None:
            if default is ...:
                raise ConfigError(self.source, self.key(name), "missing; expected a mapping")
            return _Section(self.source, self.key(name), default)
        return _Section(self.source, self.key(name), self.data[name])

    def done(self) -> None:
        unknown = sorted(str(k) for k in self.data if k not in self.used)
        if unknown:
            raise ConfigError(self.source, self.key(unknown[0]), "unknown key")


def _kind(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__


def _int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    if isinstance(value, str):
        return int(value, 0)
    if isinstance(value, int):
        return value
    raise ValueError(f"{_kind(value)} is not an integer")


def _can_id(value: Any) -> int:
    number = _int(value)
    if not 0 <= number <= 0x1FFFFFFF:
        raise ValueError("outside 0..0x1FFFFFFF")
    return number


def _positive(value: Any) -> int:
    number = _int(value)
    if number <= 0:
        raise ValueError("must be greater than 0")
    return number


def _nonneg(value: Any) -> int:
    number = _int(value)
    if number < 0:
        raise ValueError("must not be negative")
    return number


def _str(value: Any) -> str:
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ValueError(f"{_kind(value)} is not a string")
    return str(value)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{_kind(value)} is not true/false")
    return value


def _choice(*options: str) -> Callable[[Any], str]:
    def conv(value: Any) -> str:
        text = _str(value)
        if text not in options:
            raise ValueError(f"not one of {', '.join(options)}")
        return text

    conv.__name__ = " or ".join(options)
    return conv


def _bitrate(value: Any) -> tuple[int, int | None]:
    """``500000`` or ``"500000/2000000"`` (arbitration/data phase for CAN FD)."""
    if isinstance(value, int) and not isinstance(value, bool):
        parts = [value]
    else:
        parts = [int(p) for p in _str(value).split("/")]
    if len(parts) not in (1, 2) or any(p <= 0 for p in parts):
        raise ValueError("expected N or N/M bit/s")
    return parts[0], (parts[1] if len(parts) == 2 else None)


@dataclass(frozen=True)
class CloudConfig:
    broker: str = "mqtt://127.0.0.1:1883"
    outbox: str = "var/tbox/outbox.db"
    topic_root: str = "vota/v1"
    keepalive: int = 30
    max_message_bytes: int = 128 * 1024
    reconnect_min_s: int = 1
    reconnect_max_s: int = 60
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    username: str | None = None
    password: str | None = None
    mqtt_version: str = "5"  # "5", or "3.1.1" for brokers without MQTT 5 (the demo's embedded one)

    def host_port(self) -> tuple[str, int, bool]:
        url = urlparse(self.broker)
        if url.scheme not in ("mqtt", "mqtts") or not url.hostname:
            raise ConfigError("cloud", "broker", f"expected mqtt://host:port or mqtts://host:port, got {self.broker!r}")
        tls = url.scheme == "mqtts" or self.tls_ca is not None
        return url.hostname, url.port or (8883 if tls else 1883), tls


@dataclass(frozen=True)
class SegmentConfig:
    """One CAN segment: python-can settings plus ISO-TP framing."""

    name: str
    bus: dict[str, Any]
    tx_data_length: int = 8
    bitrate: tuple[int, int | None] | None = None
    isotp: dict[str, Any] = field(default_factory=dict)
    receive_buffer: int = 4 * 1024 * 1024

    @property
    def fd(self) -> bool:
        return self.tx_data_length > 8


@dataclass(frozen=True)
class EcuSimConfig:
    """What the ECU simulator answers and how it behaves (ignored by the gateway)."""

    part_number: str = "VOTA-ECU"
    serial: str = "SN000000"
    software_version: str = "1.0.0"
    supplier_version: str = "SUP-1.0"
    bootloader_version: str = "BL-1.0"
    max_block_length: int = 4095
    erase_ms: int = 500
    check_ms: int = 100
    reset_ms: int = 300
    s3_ms: int = 5000
    p2_ms: int = 50
    p2_star_ms: int = 5000
    pending_interval_ms: int = 1000
    max_attempts: int = 3
    lockout_ms: int = 10000
    state_dir: str = "var/ecu_sim"
    faults: tuple[str, ...] = ()


@dataclass(frozen=True)
class EcuConfig:
    """One ECU as the gateway sees it: addresses, security, memory layout, routines."""

    name: str
    segment: str
    request_id: int
    response_id: int
    functional_id: int = 0x7DF
    security_level: int = 1
    security_secret: str = ""
    memory_address: int = 0x08000000
    memory_size: int = 0x200000
    erase_routine: int = 0xFF00
    check_memory_routine: int = 0x0202
    check_dependencies_routine: int = 0xFF01
    check_memory: str = "crc32"
    fingerprint_did: int = 0xF15A
    p2_ms: int = 1000
    p2_star_ms: int = 6000
    sim: EcuSimConfig = field(default_factory=EcuSimConfig)


@dataclass(frozen=True)
class GatewayConfig:
    results_dir: str = "var/gateway"
    tester_present_ms: int = 2000
    late_response_grace_ms: int = 1000
    reset_wait_ms: int = 5000
    retries: int = 2


@dataclass(frozen=True)
class DeployConfig:
    """The TBOX-gateway link: the TBOX is the UDS client, the gateway's deploy server answers."""

    segment: str
    request_id: int = 0x7D0
    response_id: int = 0x7D8
    max_block_length: int = 4095
    package_dir: str = "var/gateway/packages"
    p2_ms: int = 1000
    p2_star_ms: int = 6000
    late_response_grace_ms: int = 1000


@dataclass(frozen=True)
class ContentConfig:
    """Owner-customised content on the TBOX (C1-C8)."""

    vehicle_key: str | None = None  # X25519 private key (PEM) that decrypts owner resource items
    trusted_keys: tuple[str, ...] = ()  # the trust platform's keys; empty: the campaign keys
    targets: tuple[tuple[str, str], ...] = ()  # resource target -> ECU that shows it (default: same name)
    app_dir: str | None = None  # the infotainment app area (default: <state_dir>/apps)
    light_ecu: str | None = None  # day/night from this ECU's light sensor DID ...
    light_did: int = 0xF1C1
    night_below_lux: int = 50
    night: tuple[str, str] = ("19:00", "06:00")  # ... else from the clock, in the content's time zone
    max_item_size: int = 64 * 1024 * 1024
    tick_ms: int = 500


@dataclass(frozen=True)
class TboxConfig:
    vin: str
    state_dir: str = "var/tbox"
    trusted_keys: tuple[str, ...] = ()
    max_attempts: int = 3
    retry_delay_s: float = 2.0  # first pause after a transient problem; doubles each retry ...
    retry_max_delay_s: float = 60.0  # ... up to this
    max_retries: int = 20  # transient retries in a row before the campaign fails (retries_exhausted)
    install_timeout_s: int = 900
    worker_stale_s: int = 300  # a worker without progress this long stops the systemd watchdog pings
    diagnose: bool = False
    cloud: CloudConfig = field(default_factory=lambda: _cloud_default())
    content: ContentConfig = field(default_factory=ContentConfig)


def _cloud_default() -> CloudConfig:
    return CloudConfig()


@dataclass(frozen=True)
class VehicleConfig:
    source: str
    segments: dict[str, SegmentConfig]
    ecus: dict[str, EcuConfig]
    gateway: GatewayConfig
    deploy: DeployConfig | None = None
    tbox: TboxConfig | None = None

    def tbox_config(self) -> TboxConfig:
        if self.tbox is None:
            raise ConfigError(self.source, "tbox", "missing; the TBOX needs a tbox section (vin, trusted_keys, cloud)")
        return self.tbox

    def deploy_link(self) -> DeployConfig:
        if self.deploy is None:
            raise ConfigError(self.source, "deploy", "missing; the TBOX-gateway link needs a deploy section")
        return self.deploy

    def ecu(self, name: str) -> EcuConfig:
        try:
            return self.ecus[name]
        except KeyError:
            known = ", ".join(sorted(self.ecus)) or "none"
            raise ConfigError(self.source, None, f"unknown ECU {name!r} (configured: {known})") from None


def _segment(source: str, name: str, sec: _Section) -> SegmentConfig:
    bus = sec.get("bus", dict, what="a mapping of python-can Bus settings")
    if "interface" not in bus:
        raise ConfigError(source, sec.key("bus.interface"), "missing; expected a python-can interface name")
    tx_dl = sec.get("tx_data_length", _int, 8)
    if tx_dl not in (8, 12, 16, 20, 24, 32, 48, 64):
        raise ConfigError(source, sec.key("tx_data_length"), f"expected 8 (classic CAN) or 64 (CAN FD), got {tx_dl}")
    bitrate = sec.get("bitrate", _bitrate, None, what="bit/s, e.g. 500000 or 500000/2000000")
    isotp_params = sec.get("isotp", dict, {}, what="a mapping of can-isotp parameters")
    rcvbuf = sec.get("receive_buffer", _positive, 4 * 1024 * 1024)
    sec.done()
    return SegmentConfig(name, dict(bus), tx_dl, bitrate, dict(isotp_params), rcvbuf)


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
    )
    sec.done()
    if cfg.max_block_length < 3:
        raise ConfigError(sec.source, sec.key("max_block_length"), "must be at least 3")
    return cfg


def _ecu(source: str, name: str, sec: _Section, segments: Mapping[str, SegmentConfig]) -> EcuConfig:
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
        check_memory=sec.get("check_memory", _choice("crc32", "sha256"), d.check_memory),
        fingerprint_did=sec.get("fingerprint_did", _int, d.fingerprint_did),
        p2_ms=timing.get("p2_ms", _positive, d.p2_ms),
        p2_star_ms=timing.get("p2_star_ms", _positive, d.p2_star_ms),
        sim=_ecu_sim(sec.section("sim", {})),
    )
    for s in (memory, routines, timing):
        s.done()
    sec.done()
    if cfg.security_level % 2 != 1:
        raise ConfigError(source, sec.key("security_level"), "expected an odd level (the seed request)")
    if cfg.request_id == cfg.response_id:
        raise ConfigError(source, sec.key("response_id"), "must differ from request_id")
    return cfg


def parse_vehicle_config(data: Any, source: str = "<config>") -> VehicleConfig:
    top = _Section(source, "", data)
    segs = top.section("segments")
    segments = {str(n): _segment(source, str(n), _Section(source, segs.key(str(n)), v)) for n, v in segs.data.items()}
    if not segments:
        raise ConfigError(source, "segments", "at least one segment is needed")
    segs.used.update(str(n) for n in segs.data)
    ecus_sec = top.section("ecus", {})
    ecus = {
        str(n): _ecu(source, str(n), _Section(source, ecus_sec.key(str(n)), v), segments)
        for n, v in ecus_sec.data.items()
    }
    _check_unique_ids(source, ecus)
    gw = top.section("gateway", {})
    d = GatewayConfig()
    gateway = GatewayConfig(
        results_dir=gw.get("results_dir", _str, d.results_dir),
        tester_present_ms=gw.get("tester_present_ms", _positive, d.tester_present_ms),
        late_response_grace_ms=gw.get("late_response_grace_ms", _nonneg, d.late_response_grace_ms),
        reset_wait_ms=gw.get("reset_wait_ms", _positive, d.reset_wait_ms),
        retries=gw.get("retries", _nonneg, d.retries),
    )
    gw.done()
    deploy = _deploy(source, top.section("deploy"), segments) if top.data.get("deploy") is not None else None
    top.used.add("deploy")
    tbox = _tbox(top.section("tbox")) if top.data.get("tbox") is not None else None
    top.used.add("tbox")
    top.done()
    if tbox is not None:
        for key, ecu in [("light_sensor.ecu", tbox.content.light_ecu)] + [(f"targets.{t}", e) for t, e in tbox.content.targets]:
            if ecu is not None and ecu not in ecus:
                raise ConfigError(source, f"tbox.content.{key}", f"unknown ECU {ecu!r} (configured: {', '.join(sorted(ecus))})")
    return VehicleConfig(source, segments, ecus, gateway, deploy, tbox)


def _tbox(sec: _Section) -> TboxConfig:
    keys = sec.get("trusted_keys", list, [], what="a list of public key files (PEM)")
    cloud = sec.section("cloud", {})
    tls = cloud.section("tls", {})
    d = CloudConfig()
    cloud_cfg = CloudConfig(
        broker=cloud.get("broker", _str, d.broker),
        outbox=cloud.get("outbox", _str, d.outbox),
        topic_root=cloud.get("topic_root", _str, d.topic_root),
        keepalive=cloud.get("keepalive", _positive, d.keepalive),
        max_message_bytes=cloud.get("max_message_bytes", _positive, d.max_message_bytes),
        reconnect_min_s=cloud.get("reconnect_min_s", _positive, d.reconnect_min_s),
        reconnect_max_s=cloud.get("reconnect_max_s", _positive, d.reconnect_max_s),
        tls_ca=tls.get("ca", _str, None),
        tls_cert=tls.get("cert", _str, None),
        tls_key=tls.get("key", _str, None),
        username=cloud.get("username", _str, None),
        password=cloud.get("password", _str, None),
        mqtt_version=cloud.get("mqtt_version", _choice("5", "3.1.1"), d.mqtt_version),
    )
    tls.done()
    cloud.done()
    if not cloud_cfg.broker.startswith(("mqtt://", "mqtts://")):
        raise ConfigError(sec.source, cloud.key("broker"), f"expected mqtt://host:port or mqtts://host:port, got {cloud_cfg.broker!r}")
    d2 = TboxConfig("")
    content = _content(sec.section("content", {}))
    cfg = TboxConfig(
        vin=sec.get("vin", _str, what="the vehicle's VIN"),
        state_dir=sec.get("state_dir", _str, d2.state_dir),
        trusted_keys=tuple(_str(k) for k in keys),
        max_attempts=sec.get("max_attempts", _positive, d2.max_attempts),
        retry_delay_s=float(sec.get("retry_delay_ms", _positive, 2000)) / 1000.0,
        retry_max_delay_s=float(sec.get("retry_max_delay_ms", _positive, 60000)) / 1000.0,
        max_retries=sec.get("max_retries", _nonneg, d2.max_retries),
        install_timeout_s=sec.get("install_timeout_s", _positive, d2.install_timeout_s),
        worker_stale_s=sec.get("worker_stale_s", _positive, d2.worker_stale_s),
        diagnose=sec.get("diagnose", _bool, d2.diagnose),
        cloud=cloud_cfg,
        content=content,
    )
    sec.done()
    if not cfg.trusted_keys:
        raise ConfigError(sec.source, sec.key("trusted_keys"), "at least one trusted campaign signing key is needed")
    return cfg


def _clock(value: Any) -> str:
    text = _str(value)
    if not re.match(r"^([01]\d|2[0-3]):[0-5]\d$", text):
        raise ValueError(f"expected HH:MM, got {text!r}")
    return text


def _content(sec: _Section) -> ContentConfig:
    d = ContentConfig()
    keys = sec.get("trusted_keys", list, [], what="a list of public key files (PEM)")
    targets = sec.get("targets", dict, {}, what="a mapping of content target -> ECU name")
    light = sec.section("light_sensor", {})
    night = sec.section("night", {})
    cfg = ContentConfig(
        vehicle_key=sec.get("vehicle_key", _str, None),
        trusted_keys=tuple(_str(k) for k in keys),
        targets=tuple((str(k), _str(v)) for k, v in targets.items()),
        app_dir=sec.get("app_dir", _str, None),
        light_ecu=light.get("ecu", _str, None),
        light_did=light.get("did", _int, d.light_did),
        night_below_lux=light.get("night_below_lux", _nonneg, d.night_below_lux),
        night=(night.get("from", _clock, d.night[0], what="HH:MM"), night.get("until", _clock, d.night[1], what="HH:MM")),
        max_item_size=sec.get("max_item_size", _positive, d.max_item_size),
        tick_ms=sec.get("tick_ms", _positive, d.tick_ms),
    )
    light.done()
    night.done()
    sec.done()
    return cfg


def _deploy(source: str, sec: _Section, segments: Mapping[str, SegmentConfig]) -> DeployConfig:
    d = DeployConfig("")
    segment = sec.get("segment", _str)
    if segment not in segments:
        raise ConfigError(source, sec.key("segment"), f"unknown segment {segment!r} (configured: {', '.join(sorted(segments))})")
    timing = sec.section("timing", {})
    cfg = DeployConfig(
        segment=segment,
        request_id=sec.get("request_id", _can_id, d.request_id),
        response_id=sec.get("response_id", _can_id, d.response_id),
        max_block_length=sec.get("max_block_length", _positive, d.max_block_length),
        package_dir=sec.get("package_dir", _str, d.package_dir),
        p2_ms=timing.get("p2_ms", _positive, d.p2_ms),
        p2_star_ms=timing.get("p2_star_ms", _positive, d.p2_star_ms),
        late_response_grace_ms=timing.get("late_response_grace_ms", _nonneg, d.late_response_grace_ms),
    )
    timing.done()
    sec.done()
    if cfg.max_block_length < 7:
        raise ConfigError(source, sec.key("max_block_length"), "must be at least 7 (SID, counter, 4-byte packet id, data)")
    if cfg.request_id == cfg.response_id:
        raise ConfigError(source, sec.key("response_id"), "must differ from request_id")
    return cfg


def _check_unique_ids(source: str, ecus: Mapping[str, EcuConfig]) -> None:
    seen: dict[tuple[str, int], str] = {}
    for ecu in ecus.values():
        for key, can_id in (("request_id", ecu.request_id), ("response_id", ecu.response_id)):
            other = seen.get((ecu.segment, can_id))
            if other is not None:
                raise ConfigError(source, f"ecus.{ecu.name}.{key}", f"CAN id 0x{can_id:X} is already used by {other}")
            seen[(ecu.segment, can_id)] = ecu.name


def load_vehicle_config(path: str | os.PathLike[str]) -> VehicleConfig:
    return parse_vehicle_config(load_yaml(path), str(path))
