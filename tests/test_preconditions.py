"""Install preconditions from the vehicle's state on the whole vehicle: the signals served by an
ECU simulator from a file the test changes while the campaign runs; the estimated install
time told before, the real one after."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from agent.adapters.storage import atomic_write_json
from agent.core.config import PreconditionsConfig
from agent.core.preconditions import unmet
from tests.conftest import vota
from tests.vehicle import Vehicle

PARKED = {"soc": 80, "power_mode": "off", "gear": "P", "speed_kmh": 0, "battery_mv": 12600, "charging": "no"}


def _vehicle(tmp_path, mosquitto, write_config, procs, **conditions: Any) -> Vehicle:  # type: ignore[no-untyped-def]
    return Vehicle(tmp_path, mosquitto, write_config, procs, tbox_extra={"preconditions": {
        "ecu": "bcm", "min_soc": 30, "soc_per_minute": 1.0, "recheck_s": 0.3, **conditions}})


def _signals(v: Vehicle, **values: Any) -> None:
    atomic_write_json(v.ecu_state("bcm") / "signals.json", {**PARKED, **values})


def _events(v: Vehicle, cid: str, event: str) -> list[dict[str, Any]]:
    return [b for b in v.reports("events", cid) if b.get("event") == event]


def _versions(v: Vehicle) -> dict[str, str]:
    run = vota("versions", "-c", str(v.config), "--json")
    assert run.returncode == 0, run.stderr
    return {e["ecu"]: e["software_version"] for e in json.loads(run.stdout)}


@pytest.mark.slow
def test_a_low_charge_holds_the_install_until_it_is_raised(tmp_path, mosquitto, write_config, procs):
    v = _vehicle(tmp_path, mosquitto, write_config, procs, window_s=120)
    try:
        _signals(v, soc=12, gear="D")
        v.send(v.campaign("c-soc", "2.0.0"))
        assert v.cloud.collector.wait_for(lambda c: any(
            m["body"].get("event") == "preconditions" and m["body"].get("campaign_id") == "c-soc" for m in c.messages), 60)
        (waiting,) = _events(v, "c-soc", "preconditions")
        assert waiting["met"] is False and set(waiting["unmet"]) == {"soc", "parked"}, waiting
        assert "state of charge 12 %" in waiting["unmet"]["soc"] and waiting["values"]["gear"] == "D"
        (estimate,) = _events(v, "c-soc", "estimate")
        assert estimate["install_s"] > 0 and set(estimate["per_ecu"]) == {"vcu", "bms", "bcm"}
        time.sleep(1.0)
        assert set(_versions(v).values()) == {"1.0.0"}  # nothing started
        _signals(v, soc=45, gear="D")  # still in D: only the charge was raised
        assert v.cloud.collector.wait_for(lambda c: len(_events(v, "c-soc", "preconditions")) >= 2, 30)
        assert set(_events(v, "c-soc", "preconditions")[-1]["unmet"]) == {"parked"}
        _signals(v, soc=45, gear="P")
        done = v.finished("c-soc", timeout=120)
        assert done["outcome"] == "success", done
        assert done["estimated_install_s"] == estimate["install_s"] and done["install_s"] > 0, done
        assert {e: s for e, s in _versions(v).items() if e != "dlp_headlamp"} == {e: "2.0.0" for e in ("vcu", "bms", "bcm")}
        assert _events(v, "c-soc", "preconditions")[-1]["met"] is True
    finally:
        v.close()


@pytest.mark.slow
def test_preconditions_that_never_hold_fail_the_campaign_when_its_window_ends(tmp_path, mosquitto, write_config, procs):
    v = _vehicle(tmp_path, mosquitto, write_config, procs, window_s=3)
    try:
        _signals(v, power_mode="run", speed_kmh=42.5)
        v.send(v.campaign("c-drive", "2.0.0"))
        done = v.finished("c-drive", timeout=90)
        failure = done["failure"]
        assert (done["outcome"], failure["stage"], failure["reason"]) == ("failed", "awaiting_install", "preconditions")
        assert set(failure["unmet"]) == {"ignition_off", "speed_zero"} and failure["values"]["speed_kmh"] == 42.5, failure
        assert set(_versions(v).values()) == {"1.0.0"}
    finally:
        v.close()


def test_what_cannot_be_read_cannot_be_relied_on():
    cfg = PreconditionsConfig(ecu="bcm", min_soc=20, soc_per_minute=1.0, charging="forbidden", min_battery_mv=11800)
    assert unmet(cfg, PARKED, 600) == {}
    assert unmet(cfg, {**PARKED, "soc": 29}, 600) == {"soc": "state of charge 29 %, 30 % needed for an install of about 10 min"}
    assert set(unmet(cfg, {}, 0)) == {"soc", "battery_mv", "parked", "ignition_off", "speed_zero", "charging"}
    assert set(unmet(cfg, {**PARKED, "charging": "charging"}, 0)) == {"charging"}
    assert set(unmet(PreconditionsConfig(ecu="bcm"), {**PARKED, "charging": "charging"}, 0)) == set()
    assert set(unmet(PreconditionsConfig(ecu="bcm"), {**PARKED, "charging": "fault"}, 0)) == {"charging"}


def test_the_estimate_adds_groups_runs_segments_in_parallel_and_counts_activation():
    from agent.core.config import parse_vehicle_config
    from agent.core.preconditions import PER_ECU_S, estimate_install
    from agent.protocol.can_timing import physical_goodput
    from tests.conftest import ecu_entry, virtual_bus

    config = parse_vehicle_config({
        "segments": {"a": {"bus": virtual_bus(), "bitrate": 500000}, "b": {"bus": virtual_bus(), "bitrate": 250000}},
        "ecus": {"x": ecu_entry("x", 0x7E0, 0x7E8, "a"), "y": ecu_entry("y", 0x7E1, 0x7E9, "a"),
                 "z": ecu_entry("z", 0x7E2, 0x7EA, "b")}})
    fixed = (150 + 20 + 200) / 1000 + PER_ECU_S  # ecu_entry's erase, check and reset times
    a, b = physical_goodput(8, 500000), physical_goodput(8, 250000)
    size = 64 * 1024
    one_group = estimate_install(config, [("x", size, 0), ("y", size, 0), ("z", size, 0)], "per_ecu")
    assert one_group.install_s == pytest.approx(max(2 * (size / a + fixed), size / b + fixed))
    two_groups = estimate_install(config, [("x", size, 0), ("z", size, 1)], "per_ecu")
    assert two_groups.install_s == pytest.approx(size / a + size / b + 2 * fixed)
    atomic = estimate_install(config, [("x", size, 0), ("z", size, 1)], "atomic")
    assert atomic.install_s == pytest.approx(two_groups.install_s + 2 * (0.2 + PER_ECU_S))
    assert set(atomic.to_json()["per_ecu"]) == {"x", "z"}
    pipelined = estimate_install(config, [("x", size, 0), ("z", size, 1)], "per_ecu", deploy_segment="a")
    assert pipelined.install_s == pytest.approx(2 * size / a + 2 * PER_ECU_S + size / b + fixed)  # both deployed, then z
