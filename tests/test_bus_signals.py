"""The vehicle's state from its broadcast CAN frames (agent/adapters/bus_signals.py): the ECU
simulator sends configs/vehicle-signals.dbc's messages, checked on the wire with cantools and a
bus of our own; the preconditions take the values from the frames, and a signal whose frames
stop counts as unmet, named stale."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import can
import cantools
import pytest

from agent.adapters.bus_signals import BroadcastSignals, BusSignals
from agent.adapters.canbus import Segment
from agent.adapters.storage import atomic_write_json
from agent.core.config import PreconditionsConfig, SegmentConfig, VehicleSignalsConfig
from agent.core.preconditions import unmet
from agent.errors import ConfigError
from tests.conftest import ecu_entry, virtual_bus
from tests.vehicle import Vehicle

DBC = str(Path(__file__).resolve().parent.parent / "configs" / "vehicle-signals.dbc")
PARKED = {"soc": 80, "power_mode": "off", "gear": "P", "speed_kmh": 0, "battery_mv": 12600, "charging": "no"}


def _until(what: str, check: Any, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, what
        time.sleep(0.02)
    return found


def test_frames_on_the_wire_decode_to_the_signals_and_stop_as_stale(tmp_path: Path) -> None:
    import threading

    bus = virtual_bus()
    signals = tmp_path / "signals.json"
    atomic_write_json(signals, {**PARKED, "speed_kmh": 12.5, "gear": "D"})
    stop = threading.Event()
    sender, listener = Segment(SegmentConfig("body", bus)), Segment(SegmentConfig("body", bus))
    wire = can.Bus(**bus)
    try:
        BroadcastSignals(DBC, sender, signals, stop).thread.start()
        heard = BusSignals(VehicleSignalsConfig(DBC, "body"), listener)
        assert heard.covered == set(PARKED)
        db = cantools.database.load_file(DBC)
        frames: dict[int, bytes] = {}
        while len(frames) < 2:  # both messages, read by a bus and a decoder of our own
            msg = wire.recv(5)
            assert msg is not None, "no broadcast frame"
            frames[msg.arbitration_id] = bytes(msg.data)
        assert db.decode_message(0x120, frames[0x120]) == {"speed_kmh": 12.5, "gear": "D", "power_mode": "off"}
        assert db.decode_message(0x130, frames[0x130]) == {"soc": 80, "battery_mv": 12600, "charging": "no"}
        values, stale = _until("all signals heard", lambda: (lambda v: v if not v[1] else None)(heard.read()))
        assert values == {**PARKED, "speed_kmh": 12.5, "gear": "D"} and stale == {}
        atomic_write_json(signals, {k: v for k, v in PARKED.items() if k != "gear"})  # VCU_Status is no longer sent
        values, stale = _until("VCU_Status stale", lambda: (lambda v: v if "gear" in v[1] else None)(heard.read()))
        assert set(stale) == {"gear", "power_mode", "speed_kmh"} and values["soc"] == 80
        assert stale["gear"].startswith("stale: no VCU_Status frame for ")
        why = unmet(PreconditionsConfig(ecu="bcm"), {**values, "stale": stale}, 60.0)
        assert why["parked"].startswith("gear unknown (stale: no VCU_Status frame for "), why
    finally:
        stop.set()
        wire.shutdown()
        sender.shutdown()
        listener.shutdown()


def test_a_dbc_that_cannot_be_used_is_named(tmp_path: Path) -> None:
    segment = Segment(SegmentConfig("body", virtual_bus()))
    try:
        for text, why in (("BO_ 1 X: 8 Y\n SG_ a : 0|8@1+ (1,0) [0|1] \"\" Y\n", "no message carries a signal"),
                          ("not a dbc {", "not a usable DBC file")):
            path = tmp_path / "v.dbc"
            path.write_text(text)
            with pytest.raises(ConfigError, match=why) as caught:
                BusSignals(VehicleSignalsConfig(str(path), "body"), segment)
            assert str(path) in str(caught.value)
        with pytest.raises(ConfigError, match="cannot read"):
            BusSignals(VehicleSignalsConfig(str(tmp_path / "missing.dbc"), "body"), segment)
    finally:
        segment.shutdown()


@pytest.mark.slow
def test_the_install_waits_on_the_broadcast_state_and_names_a_silent_signal(tmp_path, mosquitto, write_config, procs):
    v = Vehicle(tmp_path, mosquitto, write_config, procs,
                ecu_extra={"bcm": {"sim": {**ecu_entry("bcm", 0x740, 0x748, "body")["sim"], "broadcast": True}}},
                config_extra={"vehicle_signals": {"dbc": DBC, "segment": "body"}},
                tbox_extra={"preconditions": {"ecu": "bcm", "min_soc": 30, "soc_per_minute": 1.0, "recheck_s": 0.3,
                                              "window_s": 120}})
    try:
        signals = v.ecu_state("bcm") / "signals.json"
        atomic_write_json(signals, {**PARKED, "soc": 12})
        v.send(v.campaign("c-bus", "2.0.0"))

        def checks() -> list[dict[str, Any]]:
            return [b for b in v.reports("events", "c-bus") if b.get("event") == "preconditions"]

        first = _until("the charge held it", lambda: checks(), 60)[0]
        assert first["met"] is False and set(first["unmet"]) == {"soc"} and first["values"]["soc"] == 12, first
        atomic_write_json(signals, {k: val for k, val in PARKED.items() if k != "gear"})  # VCU_Status stops
        silent = _until("the silent frame named", lambda: [c for c in checks() if "parked" in (c.get("unmet") or {})], 60)[0]
        assert "stale: no VCU_Status frame for" in silent["unmet"]["parked"] or "no VCU_Status frame" in \
            silent["unmet"]["parked"], silent
        assert set(silent["values"]["stale"]) == {"gear", "power_mode", "speed_kmh"}, silent
        atomic_write_json(signals, PARKED)
        done = v.finished("c-bus", timeout=120)
        assert done["outcome"] == "success", done
        assert json.loads(signals.read_text()) == PARKED
    finally:
        v.close()
