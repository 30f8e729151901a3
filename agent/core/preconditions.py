"""Install preconditions and the estimated install time (pure: configuration and values in,
an estimate and the unmet conditions out; the TBOX reads the signals, ``tbox/runner.py``).

The estimate is what is known before an install starts: each image's bytes at its segment's
ISO-TP goodput limit (the emulated or configured bit rate; 500 kbit/s when none is set), the
ECU's erase, check and reset times, a second per ECU for the sessions, SecurityAccess and the
version reads around the flash, and in an atomic campaign the activation of each ECU (its reset
and a second). Install-order groups run one after another; in a group, segments in parallel and
the ECUs of a segment one after another. A pipelined install (the TBOX starts it before the
packages are on the gateway) also waits for the backbone: it ends no sooner than every package
crossed the deploy segment and the last ECU in install order was flashed after its package.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from agent.core.config import PreconditionsConfig, VehicleConfig
from agent.protocol.can_timing import physical_goodput

__all__ = ["Estimate", "estimate_install", "unmet", "required_soc"]

DEFAULT_BITRATE = 500_000
PER_ECU_S = 1.0  # sessions, SecurityAccess, fingerprint, the version reads before and after


@dataclass(frozen=True)
class Estimate:
    install_s: float
    per_ecu: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        return {"install_s": round(self.install_s, 1), "per_ecu": {e: round(s, 1) for e, s in self.per_ecu.items()}}


def _rate(config: VehicleConfig, segment_name: str) -> float:
    segment = config.segments[segment_name]
    nominal, data = segment.bitrate or (DEFAULT_BITRATE, 2_000_000 if segment.fd else None)
    return physical_goodput(segment.tx_data_length, nominal, data if segment.fd else None)


def _flash_s(config: VehicleConfig, ecu: str, size: int) -> float:
    e = config.ecu(ecu)
    return size / _rate(config, e.segment) + (e.sim.erase_ms + e.sim.check_ms + e.sim.reset_ms) / 1000.0 + PER_ECU_S


def estimate_install(config: VehicleConfig, jobs: Iterable[tuple[str, int, int]], activation: str,
                     deploy_segment: str | None = None) -> Estimate:
    """``jobs``: (ECU, image bytes, install order); ``deploy_segment``: a pipelined install's backbone."""
    jobs = list(jobs)
    per_ecu = {ecu: _flash_s(config, ecu, size) for ecu, size, _ in jobs}
    total = 0.0
    for order in sorted({o for _, _, o in jobs}):
        by_segment: dict[str, float] = {}
        for ecu, _, o in jobs:
            if o == order:
                segment = config.ecu(ecu).segment
                by_segment[segment] = by_segment.get(segment, 0.0) + per_ecu[ecu]
        total += max(by_segment.values())
    activate = sum(config.ecu(ecu).sim.reset_ms / 1000.0 + PER_ECU_S for ecu, _, _ in jobs) if activation == "atomic" else 0.0
    if deploy_segment is not None and jobs:
        backbone = sum(size for _, size, _ in jobs) / _rate(config, deploy_segment) + PER_ECU_S * len(jobs)
        last = max(jobs, key=lambda j: j[2])[0]  # deployed last, flashed once it is there
        total = max(total, backbone + per_ecu[last])
    return Estimate(total + activate, per_ecu)


def required_soc(cfg: PreconditionsConfig, install_s: float) -> float:
    return cfg.min_soc + cfg.soc_per_minute * install_s / 60.0


def unmet(cfg: PreconditionsConfig, signals: Mapping[str, Any], install_s: float) -> dict[str, str]:
    """Each condition that does not hold, with the value that fails it (an unreadable signal fails
    every condition on it: what cannot be read cannot be relied on)."""
    out: dict[str, str] = {}

    def value(name: str) -> Any:
        return signals.get(name)

    soc, need = value("soc"), required_soc(cfg, install_s)
    if not isinstance(soc, (int, float)) or soc < need:
        out["soc"] = f"state of charge {soc if soc is not None else 'unknown'} %, {need:.0f} % needed for an install " \
                     f"of about {install_s / 60.0:.0f} min"
    battery = value("battery_mv")
    if cfg.min_battery_mv and (not isinstance(battery, int) or battery < cfg.min_battery_mv):
        out["battery_mv"] = f"battery {battery if battery is not None else 'unknown'} mV, {cfg.min_battery_mv} mV needed"
    if cfg.parked and value("gear") != "P":
        out["parked"] = f"gear {value('gear') or 'unknown'}, P needed"
    if cfg.ignition_off and value("power_mode") != "off":
        out["ignition_off"] = f"power mode {value('power_mode') or 'unknown'}, off needed"
    speed = value("speed_kmh")
    if cfg.speed_zero and speed != 0:
        out["speed_zero"] = f"speed {speed if speed is not None else 'unknown'} km/h, 0 needed"
    charging = value("charging")
    if charging not in ("no", "charging") or (cfg.charging == "forbidden" and charging != "no"):
        out["charging"] = f"charging {charging or 'unknown'}" + (", not charging needed" if cfg.charging == "forbidden"
                                                                 else ", no charging fault needed")
    return out
