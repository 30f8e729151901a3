"""From YAML data to the typed configuration: every section, every key checked."""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

from agent.core.config._doip import deploy_over_doip, parse_doip
from agent.core.config._ecu import check_unique_ids, compression_nibbles, parse_ecu
from agent.core.config._profile import parse_profiles
from agent.core.config._values import _bitrate, _bool, _can_id, _choice, _int, _nonneg, _positive, _Section, _str
from agent.core.config.model import (
    Approval,
    CloudConfig,
    ContentConfig,
    DeployConfig,
    DoipConfig,
    GatewayConfig,
    PreconditionsConfig,
    SegmentConfig,
    TboxConfig,
    VehicleConfig,
    VehicleSignalsConfig,
)
from agent.core.rxswin import REGULATION, value_problem
from agent.errors import ConfigError

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(source: str, key: str, value: Any, environ: Mapping[str, str]) -> Any:
    """``${NAME}`` or ``${NAME:-default}`` in a string bus setting, from the environment: one
    configuration serves vehicles whose CAN interfaces are named differently (systemd's
    EnvironmentFile sets the names). A name that is not set and has no default is an error."""
    if not isinstance(value, str) or "$" not in value:
        return value

    def one(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in environ and environ[name] != "":
            return environ[name]
        if default is None:
            raise ConfigError(source, key, f"environment variable {name} is not set (write ${{{name}:-default}} for a default)")
        return default

    if value.count("${") != len(_ENV_REF.findall(value)):
        raise ConfigError(source, key, f"expected ${{NAME}} or ${{NAME:-default}}, got {value!r}")
    expanded = _ENV_REF.sub(one, value)
    # a whole value that is one reference to a number is the number (a port, a bit rate)
    return int(expanded) if _ENV_REF.fullmatch(value) and expanded.isdigit() else expanded


def _segment(source: str, name: str, sec: _Section) -> SegmentConfig:
    bus = sec.get("bus", dict, what="a mapping of python-can Bus settings")
    bus = {k: _expand(source, sec.key(f"bus.{k}"), v, os.environ) for k, v in bus.items()}
    if "interface" not in bus:
        raise ConfigError(source, sec.key("bus.interface"), "missing; expected a python-can interface name")
    tx_dl = sec.get("tx_data_length", _int, 8)
    if tx_dl not in (8, 12, 16, 20, 24, 32, 48, 64):
        raise ConfigError(source, sec.key("tx_data_length"), f"expected 8 (classic CAN) or 64 (CAN FD), got {tx_dl}")
    bitrate = sec.get("bitrate", _bitrate, None, what="bit/s, e.g. 500000 or 500000/2000000")
    isotp_params = sec.get("isotp", dict, {}, what="a mapping of can-isotp parameters")
    rcvbuf = sec.get("receive_buffer", _positive, 4 * 1024 * 1024)
    backend = sec.get("isotp_backend", _choice("python", "kernel"), "python")
    sec.done()
    if backend == "kernel" and bus.get("interface") != "socketcan":
        raise ConfigError(source, sec.key("isotp_backend"), f"kernel ISO-TP sockets need interface socketcan, not "
                                                            f"{bus.get('interface')!r}")
    if backend == "kernel" and bitrate is not None:
        raise ConfigError(source, sec.key("bitrate"), "bus-timing emulation paces frames in Python; with kernel ISO-TP "
                                                      "sockets the bus (vcan or a real one) has its own timing")
    return SegmentConfig(name, dict(bus), tx_dl, bitrate, dict(isotp_params), rcvbuf, backend)


def parse_vehicle_config(data: Any, source: str = "<config>") -> VehicleConfig:
    top = _Section(source, "", data)
    segs = top.section("segments")
    segments = {str(n): _segment(source, str(n), _Section(source, segs.key(str(n)), v)) for n, v in segs.data.items()}
    if not segments:
        raise ConfigError(source, "segments", "at least one segment is needed")
    segs.used.update(str(n) for n in segs.data)
    profiles = parse_profiles(top.section("flash_profiles", {}))
    ecus_sec = top.section("ecus", {})
    ecus = {
        str(n): parse_ecu(source, str(n), _Section(source, ecus_sec.key(str(n)), v), segments, profiles)
        for n, v in ecus_sec.data.items()
    }
    check_unique_ids(source, ecus)
    gw = top.section("gateway", {})
    d = GatewayConfig()
    gateway = GatewayConfig(
        results_dir=gw.get("results_dir", _str, d.results_dir),
        tester_present_ms=gw.get("tester_present_ms", _positive, d.tester_present_ms),
        late_response_grace_ms=gw.get("late_response_grace_ms", _nonneg, d.late_response_grace_ms),
        reset_wait_ms=gw.get("reset_wait_ms", _positive, d.reset_wait_ms),
        retries=gw.get("retries", _nonneg, d.retries),
        worker_stale_s=gw.get("worker_stale_s", _positive, d.worker_stale_s),
        worker_pong_s=gw.get("worker_pong_s", _positive, d.worker_pong_s),
        segment_workers=gw.get("segment_workers", _choice("auto", "process", "thread"), d.segment_workers),
        arrival_idle_s=gw.get("arrival_idle_s", _positive, d.arrival_idle_s),
        keep_results=gw.get("keep_results", _positive, d.keep_results),
        owed_retry_s=gw.get("owed_retry_s", _positive, d.owed_retry_s),
        keep_days=gw.get("keep_days", _positive, d.keep_days),
        trusted_keys=tuple(_str(k) for k in gw.get("trusted_keys", list, [], what="a list of public key files (PEM)")),
        content_trusted_keys=tuple(_str(k) for k in gw.get("content_trusted_keys", list, [],
                                                            what="a list of public key files (PEM)")),
        root_keys=tuple(_str(k) for k in gw.get("root_keys", list, [], what="a list of public key files (PEM)")),
        signature_threshold=gw.get("signature_threshold", _positive, None),
        content_signature_threshold=gw.get("content_signature_threshold", _positive, None),
        root_threshold=gw.get("root_threshold", _positive, None),
        vin=gw.get("vin", _str, None),
        rxswin_did=gw.get("rxswin_did", _did, d.rxswin_did, what="a DID, 0x0100..0xFEFF or 0xF1xx"),
    )
    gw.done()
    approvals = _approvals(source, top.data.get("approvals"), ecus)
    top.used.add("approvals")
    signals = _signals(top.section("vehicle_signals"), segments) if top.data.get("vehicle_signals") is not None else None
    top.used.add("vehicle_signals")
    tbox = _tbox(top.section("tbox")) if top.data.get("tbox") is not None else None
    top.used.add("tbox")
    doip = parse_doip(top.section("doip"), ecus, gateway.vin or (tbox.vin if tbox else None)) \
        if top.data.get("doip") is not None else None
    top.used.add("doip")
    deploy = _deploy(source, top.section("deploy"), segments, doip) if top.data.get("deploy") is not None else None
    top.used.add("deploy")
    top.done()
    if tbox is not None:
        _check_tbox_ecus(source, tbox, ecus)
    return VehicleConfig(source, segments, ecus, gateway, deploy, tbox, approvals, signals, doip)


def _check_tbox_ecus(source: str, tbox: TboxConfig, ecus: Mapping[str, Any]) -> None:
    """The ECUs the tbox section names exist; a safety-relevant ECU needs the preconditions ECU."""
    for key, ecu in [("light_sensor.ecu", tbox.content.light_ecu)] + [(f"targets.{t}", e) for t, e in tbox.content.targets]:
        if ecu is not None and ecu not in ecus:
            raise ConfigError(source, f"tbox.content.{key}", f"unknown ECU {ecu!r} (configured: {', '.join(sorted(ecus))})")
    ecu = tbox.preconditions.ecu
    if ecu is not None and ecu not in ecus:
        raise ConfigError(source, "tbox.preconditions.ecu", f"unknown ECU {ecu!r} (configured: {', '.join(sorted(ecus))})")
    safety = sorted(n for n, e in ecus.items() if e.safety_relevant)
    if safety and ecu is None:
        raise ConfigError(source, "tbox.preconditions.ecu", f"needed: {', '.join(safety)} is safety-relevant and is "
                                                           "installed only in the safe state, read from that ECU")


def _signals(sec: _Section, segments: Mapping[str, Any]) -> VehicleSignalsConfig:
    """``vehicle_signals``: {dbc, segment, stale_ms}."""
    segment = sec.get("segment", _str, what="the segment the frames are on")
    if segment not in segments:
        raise ConfigError(sec.source, sec.key("segment"), f"unknown segment {segment!r} (configured: "
                                                          f"{', '.join(sorted(segments))})")
    cfg = VehicleSignalsConfig(dbc=sec.get("dbc", _str, what="a DBC file"), segment=segment,
                               stale_ms=sec.get("stale_ms", _nonneg, 0))
    sec.done()
    return cfg


def _did(value: Any) -> int:
    number = _int(value)
    if not 0x0100 <= number <= 0xFEFF or number == 0xF1B0:  # F1B0: the gateway's boot id
        raise ValueError("outside 0x0100..0xFEFF, or the gateway's boot id F1B0")
    return number


def _approvals(source: str, data: Any, ecus: Mapping[str, Any]) -> tuple[Approval, ...]:
    """``approvals``: a list of {regulation, rxswin, ecus} (agent/core/rxswin.py)."""
    if data is None:
        return ()
    if not isinstance(data, list):
        raise ConfigError(source, "approvals", "expected a list of {regulation, rxswin, ecus}")
    out: list[Approval] = []
    for i, entry in enumerate(data):
        sec = _Section(source, f"approvals[{i}]", entry)
        regulation = sec.get("regulation", _str, what="a regulation, e.g. R156")
        if not REGULATION.fullmatch(regulation) or regulation in {a.regulation for a in out}:
            raise ConfigError(source, sec.key("regulation"), f"{regulation!r}: a unique name of letters, digits, ._- "
                                                             "(16 at most)")
        rxswin = sec.get("rxswin", _str, what="the vehicle's RXSWIN under this regulation")
        problem = value_problem(rxswin)
        if problem is not None:
            raise ConfigError(source, sec.key("rxswin"), f"the RXSWIN {problem}")
        covered = tuple(_str(e) for e in sec.get("ecus", list, what="a list of the ECUs whose software it covers"))
        unknown = [e for e in covered if e not in ecus]
        if unknown or not covered:
            raise ConfigError(source, sec.key("ecus"), f"unknown ECU {unknown[0]!r}" if unknown else "names no ECU")
        sec.done()
        out.append(Approval(regulation, rxswin, covered))
    if len(out) > 32:
        raise ConfigError(source, "approvals", "more than 32 approvals")
    return tuple(out)


def _cloud(cloud: _Section) -> CloudConfig:
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
        session_expiry_s=cloud.get("session_expiry_s", _nonneg, d.session_expiry_s),
        report_key=cloud.get("report_key", _str, None),
        app_acks=cloud.get("app_acks", _bool, d.app_acks),
        ack_timeout_s=cloud.get("ack_timeout_s", _positive, d.ack_timeout_s),
    )
    tls.done()
    cloud.done()
    if not cloud_cfg.broker.startswith(("mqtt://", "mqtts://")):
        raise ConfigError(cloud.source, cloud.key("broker"), f"expected mqtt://host:port or mqtts://host:port, got {cloud_cfg.broker!r}")
    return cloud_cfg


def _tbox(sec: _Section) -> TboxConfig:
    keys = sec.get("trusted_keys", list, [], what="a list of public key files (PEM)")
    cloud_cfg = _cloud(sec.section("cloud", {}))
    d2 = TboxConfig("")
    content = _content(sec.section("content", {}))
    preconditions = _preconditions(sec.section("preconditions", {}))
    cfg = TboxConfig(
        vin=sec.get("vin", _str, what="the vehicle's VIN"),
        state_dir=sec.get("state_dir", _str, d2.state_dir),
        trusted_keys=tuple(_str(k) for k in keys),
        signature_threshold=sec.get("signature_threshold", _positive, d2.signature_threshold),
        root_keys=tuple(_str(k) for k in sec.get("root_keys", list, [], what="a list of public key files (PEM)")),
        root_threshold=sec.get("root_threshold", _positive, d2.root_threshold),
        max_attempts=sec.get("max_attempts", _positive, d2.max_attempts),
        retry_delay_s=float(sec.get("retry_delay_ms", _positive, 2000)) / 1000.0,
        retry_max_delay_s=float(sec.get("retry_max_delay_ms", _positive, 60000)) / 1000.0,
        max_retries=sec.get("max_retries", _nonneg, d2.max_retries),
        retry_give_up_s=sec.get("retry_give_up_s", _positive, d2.retry_give_up_s),
        install_timeout_s=sec.get("install_timeout_s", _positive, d2.install_timeout_s),
        cancel_timeout_s=sec.get("cancel_timeout_s", _positive, d2.cancel_timeout_s),
        storage_grace_s=sec.get("storage_grace_s", _positive, d2.storage_grace_s),
        download_min_rate=sec.get("download_min_rate", _nonneg, d2.download_min_rate),
        download_rate_window_s=sec.get("download_rate_window_s", _positive, d2.download_rate_window_s),
        download_max_time_s=sec.get("download_max_time_s", _positive, d2.download_max_time_s),
        package_ca=sec.get("package_ca", _str, None),
        worker_stale_s=sec.get("worker_stale_s", _positive, d2.worker_stale_s),
        pipeline=sec.get("pipeline", _bool, d2.pipeline),
        media_dir=sec.get("media_dir", _str, None),
        keep_campaigns=sec.get("keep_campaigns", _positive, d2.keep_campaigns),
        keep_days=sec.get("keep_days", _positive, d2.keep_days),
        media_follow_links=sec.get("media_follow_links", _bool, d2.media_follow_links),
        min_free_mib=sec.get("min_free_mib", _nonneg, d2.min_free_mib),
        hmi_socket=sec.get("hmi_socket", _str, None),
        preconditions=preconditions,
        diagnose=sec.get("diagnose", _bool, d2.diagnose),
        cloud=cloud_cfg,
        content=content,
    )
    sec.done()
    if not cfg.trusted_keys:
        raise ConfigError(sec.source, sec.key("trusted_keys"), "at least one trusted campaign signing key is needed")
    for key, threshold, count in (("signature_threshold", cfg.signature_threshold, len(cfg.trusted_keys)),
                                  ("root_threshold", cfg.root_threshold, len(cfg.root_keys))):
        if count and threshold > count:
            raise ConfigError(sec.source, sec.key(key), f"{threshold} signatures needed but only {count} key(s) listed")
    return cfg


def _preconditions(sec: _Section) -> PreconditionsConfig:
    d = PreconditionsConfig()
    cfg = PreconditionsConfig(
        ecu=sec.get("ecu", _str, None),
        min_soc=float(sec.get("min_soc", _number, d.min_soc)),
        soc_per_minute=float(sec.get("soc_per_minute", _number, d.soc_per_minute)),
        min_battery_mv=sec.get("min_battery_mv", _nonneg, d.min_battery_mv),
        parked=sec.get("parked", _bool, d.parked),
        ignition_off=sec.get("ignition_off", _bool, d.ignition_off),
        speed_zero=sec.get("speed_zero", _bool, d.speed_zero),
        charging=sec.get("charging", _choice("allowed", "forbidden"), d.charging),
        recheck_s=float(sec.get("recheck_s", _number, d.recheck_s)),
        window_s=float(sec.get("window_s", _number, d.window_s)),
    )
    sec.done()
    if cfg.recheck_s <= 0 or cfg.window_s <= 0:
        raise ConfigError(sec.source, sec.key("recheck_s" if cfg.recheck_s <= 0 else "window_s"), "must be greater than 0")
    return cfg


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("not a number")
    if value < 0:
        raise ValueError("must not be negative")
    return float(value)


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
        signature_threshold=sec.get("signature_threshold", _positive, d.signature_threshold),
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


def _deploy(source: str, sec: _Section, segments: Mapping[str, SegmentConfig], doip: DoipConfig | None) -> DeployConfig:
    d = DeployConfig("")
    transport = sec.get("transport", _choice("can", "doip"), "can")
    segment = ""
    if transport == "can":
        segment = sec.get("segment", _str)
        if segment not in segments:
            raise ConfigError(source, sec.key("segment"),
                              f"unknown segment {segment!r} (configured: {', '.join(sorted(segments))})")
    timing = sec.section("timing", {})
    cfg = DeployConfig(
        segment=segment,
        transport=transport,
        request_id=sec.get("request_id", _can_id, d.request_id),
        response_id=sec.get("response_id", _can_id, d.response_id),
        max_block_length=sec.get("max_block_length", _positive, d.max_block_length),
        package_dir=sec.get("package_dir", _str, d.package_dir),
        p2_ms=timing.get("p2_ms", _positive, d.p2_ms),
        p2_star_ms=timing.get("p2_star_ms", _positive, d.p2_star_ms),
        late_response_grace_ms=timing.get("late_response_grace_ms", _nonneg, d.late_response_grace_ms),
        retries=sec.get("retries", _nonneg, d.retries),
        security_secret=sec.get("security_secret", _str, None),
        lockout_s=sec.get("lockout_s", _nonneg, d.lockout_s),
        min_free_mib=sec.get("min_free_mib", _nonneg, d.min_free_mib),
        compression=compression_nibbles(sec),
        authenticate_requests=sec.get("authenticate_requests", _bool, d.authenticate_requests),
    )
    cfg = deploy_over_doip(sec, cfg, doip)
    timing.done()
    sec.done()
    if cfg.max_block_length < 7:
        raise ConfigError(source, sec.key("max_block_length"), "must be at least 7 (SID, counter, 4-byte packet id, data)")
    if cfg.request_id == cfg.response_id:
        raise ConfigError(source, sec.key("response_id"), "must differ from request_id")
    return cfg
