"""Install preconditions and the estimated install time (pure: configuration and values in,
an estimate and the unmet conditions out; the TBOX reads the signals, ``tbox/runner.py``).

The estimate is what is known before an install starts: each image's bytes at the rate measured
when that ECU was last flashed (``measured``: TransferData bytes over the time from the first
TransferData to the transfer exit's answer), else at its segment's ISO-TP goodput limit (the
emulated or configured bit rate; 500 kbit/s when none is set), the
ECU's erase, check and reset times, a second per ECU for the sessions, SecurityAccess and the
version reads around the flash, and in an atomic campaign the activation of each ECU (its reset
and a second). Install-order groups run one after another; in a group, segments in parallel and
the ECUs of a segment one after another. A pipelined install (the TBOX starts it before the
packages are on the gateway) also waits for the backbone: it ends no sooner than every package
crossed the deploy segment and the last ECU in install order was flashed after its package.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from agent.core.config import PreconditionsConfig, VehicleConfig
from agent.errors import InstallRefused
from agent.protocol.can_timing import physical_goodput

__all__ = ["Estimate", "estimate_install", "install_kind",
           "unmet", "required_soc", "Gate", "parse_gate", "loosened", "tightest", "SAFE_STATE"]

DEFAULT_BITRATE = 500_000
ETHERNET_GOODPUT = 100e6 / 8 * 0.9  # bytes a second on a 100 Mbit/s automotive Ethernet link
PER_ECU_S = 1.0  # sessions, SecurityAccess, fingerprint, the version reads before and after


@dataclass(frozen=True)
class Estimate:
    install_s: float
    per_ecu: dict[str, float]
    rates: dict[str, str] = dataclasses.field(default_factory=dict)  # ECU -> "measured" | "configured"
    # going back when the install fails at its last step: every activated ECU rolled back (its reset
    # and the reads around it; in an atomic campaign all of them, else the one that failed)
    recovery_s: float = 0.0

    @property
    def energy_s(self) -> float:
        """The time the vehicle's charge must last: the install and, if it fails late, the way back."""
        return self.install_s + self.recovery_s

    def to_json(self) -> dict[str, Any]:
        return {"install_s": round(self.install_s, 1), "per_ecu": {e: round(s, 1) for e, s in self.per_ecu.items()},
                "rates": dict(self.rates), "recovery_s": round(self.recovery_s, 1)}


def _rate(config: VehicleConfig, segment_name: str) -> float:
    if not segment_name:  # the deploy link over DoIP: a 100BASE-T1 backbone less TCP/IP and DoIP headers
        return ETHERNET_GOODPUT
    segment = config.segments[segment_name]
    nominal, data = segment.bitrate or (DEFAULT_BITRATE, 2_000_000 if segment.fd else None)
    return physical_goodput(segment.tx_data_length, nominal, data if segment.fd else None)


def _flash_s(config: VehicleConfig, ecu: str, size: int, learned: Mapping[str, float]) -> float:
    e = config.ecu(ecu)
    other = learned.get("other_s")
    if other is None:
        other = (e.sim.erase_ms + e.sim.check_ms + e.sim.reset_ms) / 1000.0 + PER_ECU_S
    return size / (learned.get("bytes_per_s") or _rate(config, e.segment)) + other


def _learned(measured: Mapping[str, Any] | None) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """(per ECU: bytes_per_s and, when known, other_s; per activation mode: seconds per ECU)."""
    ecus: dict[str, dict[str, float]] = {}
    for ecu, v in (measured or {}).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:  # a rate alone
            ecus[ecu] = {"bytes_per_s": float(v)}
        elif isinstance(v, Mapping) and ecu != "_install" and isinstance(v.get("bytes_per_s"), (int, float)) \
                and v["bytes_per_s"] > 0:
            ecus[ecu] = {k: float(v[k]) for k in ("bytes_per_s", "other_s") if isinstance(v.get(k), (int, float))}
    modes = (measured or {}).get("_install")
    return ecus, {str(k): float(x) for k, x in modes.items() if isinstance(x, (int, float))} if isinstance(modes, Mapping) else {}


def install_kind(activation: str, pipelined: bool) -> str:
    """The key an install's time beyond its flashes is learned under: ``atomic``, ``per_ecu/pipelined``..."""
    return activation + ("/pipelined" if pipelined else "")


def estimate_install(config: VehicleConfig, jobs: Iterable[tuple[str, int, int]], activation: str,
                     deploy_segment: str | None = None, measured: Mapping[str, Any] | None = None) -> Estimate:
    """``jobs``: (ECU, image bytes, install order); ``deploy_segment``: a pipelined install's backbone ("": DoIP on Ethernet);
    ``measured``: what earlier installs took (``tbox/rates.py``): per ECU its transfer rate (bytes a
    second, or ``{"bytes_per_s", "other_s"}`` with the rest of its flash), and under ``_install``
    the time an install took beyond its flashes, per ECU, by ``install_kind``."""
    jobs = list(jobs)
    learned, beyond = _learned(measured)
    per_ecu = {ecu: _flash_s(config, ecu, size, learned.get(ecu, {})) for ecu, size, _ in jobs}
    total = 0.0
    for order in sorted({o for _, _, o in jobs}):
        by_segment: dict[str, float] = {}
        for ecu, _, o in jobs:
            if o == order:
                segment = config.ecu(ecu).segment
                by_segment[segment] = by_segment.get(segment, 0.0) + per_ecu[ecu]
        total += max(by_segment.values())
    back = [config.ecu(ecu).sim.reset_ms / 1000.0 + PER_ECU_S for ecu, _, _ in jobs]
    recovery = (sum(back) if activation == "atomic" else max(back)) if back else 0.0
    sources = {e: "measured" if e in learned else "configured" for e, _, _ in jobs}
    kind = install_kind(activation, deploy_segment is not None)
    if kind in beyond:  # learned: whatever such an install took beyond its flashes (the backbone's wait too)
        return Estimate(total + beyond[kind] * len(jobs), per_ecu, sources, recovery)
    activate = sum(config.ecu(ecu).sim.reset_ms / 1000.0 + PER_ECU_S for ecu, _, _ in jobs) if activation == "atomic" else 0.0
    if deploy_segment is not None and jobs:
        backbone = sum(size for _, size, _ in jobs) / _rate(config, deploy_segment) + PER_ECU_S * len(jobs)
        last = max(jobs, key=lambda j: j[2])[0]  # deployed last, flashed once it is there
        total = max(total, backbone + per_ecu[last])
    return Estimate(total + activate, per_ecu, sources, recovery)


SAFE_STATE = ("parked", "ignition_off", "speed_zero")  # what a safety-relevant ECU always needs
_AT_LEAST = ("min_soc", "soc_per_minute", "min_battery_mv")  # floors: a campaign may raise them, never lower


def loosened(floor: PreconditionsConfig, overrides: Mapping[str, Any]) -> dict[str, str]:
    """The safety conditions a campaign's ``overrides`` would loosen below the vehicle's own
    (``floor``), each with why; empty when they only tighten (or leave) them. Loosening: a
    condition the vehicle asks for switched off, a minimum lowered, charging allowed where the
    vehicle forbids it. ``window_s`` (how long to wait) and ``recheck_s`` are no safety."""
    out: dict[str, str] = {}
    for key, value in overrides.items():
        mine = getattr(floor, key, None)
        if key in SAFE_STATE and mine is True and value is not True:
            out[key] = f"the vehicle asks {key}: true"
        elif key in _AT_LEAST and isinstance(value, (int, float)) and isinstance(mine, (int, float)) and value < mine:
            out[key] = f"{value} is below the vehicle's {mine}"
        elif key == "charging" and mine == "forbidden" and value != "forbidden":
            out[key] = "the vehicle forbids charging during an install"
    return out


def tightest(floor: PreconditionsConfig, asked: PreconditionsConfig, safe_state: bool = False) -> PreconditionsConfig:
    """``asked`` held to ``floor`` (every condition at least as strict: a manifest cannot loosen
    what the vehicle's own configuration asks); ``safe_state``: parked, ignition off and speed
    zero whatever either says (a safety-relevant ECU is in the install)."""
    return dataclasses.replace(
        asked, ecu=asked.ecu or floor.ecu,
        **{k: bool(getattr(floor, k) or getattr(asked, k) or safe_state) for k in SAFE_STATE},
        **{k: max(getattr(floor, k), getattr(asked, k)) for k in _AT_LEAST},
        charging="forbidden" if "forbidden" in (floor.charging, asked.charging) else "allowed")


def required_soc(cfg: PreconditionsConfig, install_s: float) -> float:
    return cfg.min_soc + cfg.soc_per_minute * install_s / 60.0


def unmet(cfg: PreconditionsConfig, signals: Mapping[str, Any], install_s: float) -> dict[str, str]:
    """Each condition that does not hold, with the value that fails it (an unreadable signal fails
    every condition on it: what cannot be read cannot be relied on; ``signals["stale"]`` says why
    a signal from the bus is unknown: stale, or never seen)."""
    out: dict[str, str] = {}
    stale = signals.get("stale")
    why: Mapping[str, Any] = stale if isinstance(stale, Mapping) else {}

    def value(name: str) -> Any:
        return signals.get(name)

    def shown(name: str) -> Any:
        v = signals.get(name)
        return v if v is not None and v != "" else f"unknown ({why[name]})" if name in why else "unknown"

    soc, need = value("soc"), required_soc(cfg, install_s)
    if not isinstance(soc, (int, float)) or soc < need:
        out["soc"] = f"state of charge {shown('soc')} %, {need:.0f} % needed for about " \
                     f"{install_s / 60.0:.0f} min of install (and the way back if it fails late)"
    battery = value("battery_mv")
    if cfg.min_battery_mv and (not isinstance(battery, int) or battery < cfg.min_battery_mv):
        out["battery_mv"] = f"battery {shown('battery_mv')} mV, {cfg.min_battery_mv} mV needed"
    if cfg.parked and value("gear") != "P":
        out["parked"] = f"gear {shown('gear')}, P needed"
    if cfg.ignition_off and value("power_mode") != "off":
        out["ignition_off"] = f"power mode {shown('power_mode')}, off needed"
    speed = value("speed_kmh")
    if cfg.speed_zero and speed != 0:
        out["speed_zero"] = f"speed {shown('speed_kmh')} km/h, 0 needed"
    charging = value("charging")
    if charging not in ("no", "charging") or (cfg.charging == "forbidden" and charging != "no"):
        out["charging"] = f"charging {shown('charging')}" + (", not charging needed" if cfg.charging == "forbidden"
                                                            else ", no charging fault needed")
    return out


@dataclass(frozen=True)
class Gate:
    """The preconditions an install runs under, as the TBOX hands them to the gateway in the install
    manifest (``preconditions``): the conditions, the time the charge is judged against (the estimated
    install and its way back, ``Estimate.energy_s``), and the end of the campaign's install window
    (epoch seconds). The gateway checks them
    again while it stages and before each activation (gateway/install.py)."""

    conditions: PreconditionsConfig
    install_s: float
    until: float

    def unmet(self, signals: Mapping[str, Any]) -> dict[str, str]:
        return unmet(self.conditions, signals, self.install_s)

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self.conditions), "install_s": round(self.install_s, 1), "until": round(self.until, 3)}


_FIELDS = {f.name: f for f in dataclasses.fields(PreconditionsConfig)}


def parse_gate(doc: Any, campaign_id: str | None = None) -> Gate:
    """The manifest's ``preconditions``; InstallRefused says why they cannot be used."""
    if not isinstance(doc, dict):
        raise InstallRefused("preconditions must be an object", campaign_id)
    unknown = sorted(set(doc) - set(_FIELDS) - {"install_s", "until"})
    if unknown:
        raise InstallRefused(f"preconditions: unknown key {unknown[0]!r}", campaign_id)
    values: dict[str, Any] = {}
    for name, value in doc.items():
        if name == "ecu":
            if not isinstance(value, str) or not value:
                raise InstallRefused("preconditions: ecu must be an ECU's name", campaign_id)
        elif name == "charging":
            if value not in ("allowed", "forbidden"):
                raise InstallRefused("preconditions: charging must be allowed or forbidden", campaign_id)
        elif name in ("parked", "ignition_off", "speed_zero"):
            if not isinstance(value, bool):
                raise InstallRefused(f"preconditions: {name} must be true or false", campaign_id)
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1e12 or value != value:
            raise InstallRefused(f"preconditions: {name} must be a number, 0 or more", campaign_id)
        values[name] = value
    if "ecu" not in values or "until" not in values:
        raise InstallRefused("preconditions: ecu and until are needed", campaign_id)
    install_s, until = float(values.pop("install_s", 0.0)), float(values.pop("until"))
    if "min_battery_mv" in values:
        values["min_battery_mv"] = int(values["min_battery_mv"])
    conditions = PreconditionsConfig(**values)
    if conditions.recheck_s <= 0:
        raise InstallRefused("preconditions: recheck_s must be greater than 0", campaign_id)
    return Gate(conditions, install_s, until)
