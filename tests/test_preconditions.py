"""Install preconditions from the vehicle's state on the whole vehicle: the signals served by an
ECU simulator from a file the test changes while the campaign runs; the estimated install
time told before, the real one after."""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import pytest

from agent.adapters.storage import atomic_write_json
from agent.core.config import PreconditionsConfig
from agent.core.preconditions import unmet
from tests.conftest import vota
from tests.vehicle import VIN, Vehicle

ECUS3 = ("vcu", "bms", "bcm")
PARKED = {"soc": 80, "power_mode": "off", "gear": "P", "speed_kmh": 0, "battery_mv": 12600, "charging": "no"}


def _vehicle(tmp_path, mosquitto, write_config, procs, faults: tuple[str, ...] = (),  # type: ignore[no-untyped-def]
             **conditions: Any) -> Vehicle:
    return Vehicle(tmp_path, mosquitto, write_config, procs, ecu_faults=faults, tbox_extra={"preconditions": {
        "ecu": "bcm", "min_soc": 30, "soc_per_minute": 1.0, "recheck_s": 0.3, **conditions}})


def _signals(v: Vehicle, **values: Any) -> None:
    atomic_write_json(v.ecu_state("bcm") / "signals.json", {**PARKED, **values})


def _events(v: Vehicle, cid: str, event: str) -> list[dict[str, Any]]:
    return [b for b in v.reports("events", cid) if b.get("event") == event]


def _journal(v: Vehicle, cid: str) -> dict[str, Any]:
    try:
        return dict(json.loads((v.tmp / "gw" / "results" / cid / "journal.json").read_text()))
    except (OSError, ValueError):
        return {}


def _until(what: str, check: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def _nothing_staged(v: Vehicle) -> None:
    for ecu in ("vcu", "bms", "bcm"):
        meta = json.loads((v.ecu_state(ecu) / "meta.json").read_text())
        assert all(b["state"] in ("valid", "empty") for b in meta["banks"].values()) and meta["next_boot"] == "", (ecu, meta)


def _all_old(v: Vehicle) -> None:
    """Every ECU runs 1.0.0, read from the simulators' own state: while a campaign waits, the TBOX
    or the gateway reads bcm's signals every 0.3 s, and a second tester on bcm would collide."""
    for ecu in ECUS3:
        meta = json.loads((v.ecu_state(ecu) / "meta.json").read_text())
        assert meta["banks"][meta["active"]]["version"] == "1.0.0", (ecu, meta)


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
        _all_old(v)  # nothing started
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
        _signals(v, power_mode="run", speed_kmh=80, gear="D", soc=8)
        # a signed campaign that switches the vehicle's conditions off: refused, the floor holds
        v.send(v.campaign("c-loose", "2.0.0", preconditions={"parked": False, "ignition_off": False, "speed_zero": False,
                                                              "min_soc": 0, "soc_per_minute": 0}))
        rejected = v.rejected("c-loose")
        assert rejected["reason"] == "malformed" and "never loosened" in rejected["detail"], rejected
        assert all(k in rejected["detail"] for k in ("parked", "ignition_off", "speed_zero", "min_soc")), rejected
        assert v.finished("c-loose")["failure"]["reason"] == "malformed"
        _signals(v, power_mode="run", speed_kmh=42.5)
        v.send(v.campaign("c-drive", "2.0.0"))
        done = v.finished("c-drive", timeout=90)
        failure = done["failure"]
        assert (done["outcome"], failure["stage"], failure["reason"]) == ("failed", "awaiting_install", "preconditions")
        assert set(failure["unmet"]) == {"ignition_off", "speed_zero"} and failure["values"]["speed_kmh"] == 42.5, failure
        assert set(_versions(v).values()) == {"1.0.0"}
    finally:
        v.close()


@pytest.mark.slow
def test_ignition_on_while_staging_stops_it_and_the_campaign_waits_until_parked_again(
        tmp_path, mosquitto, write_config, procs):
    # vcu's 2nd to 7th TransferData answer after 0.7 s each, the first time only: long enough to be
    # caught staging; bcm (on the other segment, the ECU that reports the vehicle's state) is
    # staged by then and can be read
    v = _vehicle(tmp_path, mosquitto, write_config, procs, window_s=120,
                 faults=tuple(f"vcu:36#{n}:delay=700" for n in range(2, 8)))
    try:
        _signals(v)
        v.send(v.campaign("c-ign", "2.0.0"))
        _until("vcu staging while bcm is staged", lambda: (j := _journal(v, "c-ign")) and j["phase"] == "stage"
               and j["ecus"]["vcu"].get("step") == "transfer_data"
               and ((j["ecus"]["bcm"].get("result") or {}).get("phase") == "staged"))
        _signals(v, power_mode="run")
        assert v.cloud.collector.wait_for(lambda c: any(
            e.get("phase") == "stage" for e in _events(v, "c-ign", "preconditions")), 60)
        (stopped,) = [e for e in _events(v, "c-ign", "preconditions") if e.get("phase") == "stage"]
        assert stopped["staging"] == "stopped" and set(stopped["unmet"]) == {"ignition_off"}, stopped
        assert stopped["values"]["power_mode"] == "run" and stopped["ecus"]["bcm"] == "discarded", stopped
        assert _journal(v, "c-ign")["outcome"] == "failed"
        _all_old(v)
        _nothing_staged(v)  # what was staged, and the image cut off, discarded
        time.sleep(1.5)
        assert v.cloud.finished(VIN, "c-ign") is None  # waiting, not failed ...
        assert len([e for e in _events(v, "c-ign", "preconditions") if e.get("phase") == "stage"]) == 1  # ... nor staging again
        _signals(v)  # parked again: staged from the start, activated
        done = v.finished("c-ign", timeout=120)
        assert done["outcome"] == "success", done
        assert {e: s for e, s in _versions(v).items() if e != "dlp_headlamp"} == {e: "2.0.0" for e in ("vcu", "bms", "bcm")}
    finally:
        v.close()


@pytest.mark.slow
def test_staged_waits_for_the_preconditions_before_activating_and_turns_back_if_they_fail_between(
        tmp_path, mosquitto, write_config, procs):
    # vcu's activate routine (its 4th RoutineControl) answers after 0.8 s: the gateway is killed
    # then, the ignition turned on while it is down; after the restart the staged install waits.
    # vcu's activation reset answers after 0.8 s: the ignition turned on again then is found
    # before bms is activated
    v = _vehicle(tmp_path, mosquitto, write_config, procs, window_s=120, faults=("vcu:31#4:delay=800", "vcu:11:delay=800"))
    try:
        _signals(v)
        v.send(v.campaign("c-act", "2.0.0"))
        _until("vcu activating", lambda: _journal(v, "c-act").get("ecus", {}).get("vcu", {}).get("step") == "activate")
        os.kill(v.gateway.p.pid, signal.SIGKILL)
        v.gateway.stop()
        _signals(v, power_mode="run")
        v.restart_gateway()
        assert v.cloud.collector.wait_for(lambda c: any(
            e.get("phase") == "activate" for e in _events(v, "c-act", "preconditions")), 60)
        (waiting,) = [e for e in _events(v, "c-act", "preconditions") if e.get("phase") == "activate"]
        assert waiting["met"] is False and set(waiting["unmet"]) == {"ignition_off"}, waiting
        journal = _journal(v, "c-act")
        assert journal["phase"] == "activate" and {e: journal["ecus"][e]["result"]["phase"] for e in ECUS3} == \
            {e: "staged" for e in ECUS3}
        _all_old(v)  # staged, held
        _signals(v)
        _until("vcu reset", lambda: _journal(v, "c-act")["ecus"]["vcu"].get("step") == "ecu_reset")
        _signals(v, power_mode="run")
        done = v.finished("c-act", timeout=120)
        failure = done["failure"]
        assert (done["outcome"], failure["stage"], failure["reason"], failure["phase"]) == \
            ("failed", "install", "preconditions", "activate"), done
        assert set(failure["unmet"]) == {"ignition_off"}
        assert any(e.get("phase") == "activate" and e["met"] for e in _events(v, "c-act", "preconditions"))
        phases = {r["ecu"]: r["result"]["phase"] for r in v.reports("results", "c-act") if r["stage"] == "flash"}
        assert phases == {"vcu": "rolled_back", "bms": "discarded", "bcm": "discarded"}, phases
        assert set(_versions(v).values()) == {"1.0.0"}
        _nothing_staged(v)
    finally:
        v.close()


def test_the_gate_the_gateway_gets_round_trips_and_refuses_what_it_cannot_use():
    from agent.core.preconditions import Gate, parse_gate
    from agent.errors import InstallRefused
    from agent.protocol.link import InstallJob, InstallManifest, encode_manifest, parse_manifest

    gate = Gate(PreconditionsConfig(ecu="bcm", min_soc=25, charging="forbidden", recheck_s=2), 184.93, 1.8e9)
    manifest = parse_manifest(encode_manifest(InstallManifest("c-1", (InstallJob("vcu", "v.bin", "2"),),
                                                               preconditions=gate.to_json())))
    back = parse_gate(manifest.preconditions)
    assert back == Gate(gate.conditions, 184.9, 1.8e9)
    assert set(back.unmet({**PARKED, "soc": 26})) == {"soc"}  # 25 % + 0.5 % a minute of about 3 minutes

    def refusal(doc: object) -> str:
        with pytest.raises(InstallRefused) as refused:
            parse_gate(doc, "c-1")
        assert refused.value.campaign_id == "c-1"
        return refused.value.detail

    assert refusal([]) == "preconditions must be an object"
    assert refusal({"ecu": "bcm"}) == "preconditions: ecu and until are needed"
    assert refusal({**gate.to_json(), "doors": True}) == "preconditions: unknown key 'doors'"
    assert refusal({**gate.to_json(), "parked": "yes"}) == "preconditions: parked must be true or false"
    assert refusal({**gate.to_json(), "min_soc": float("nan")}) == "preconditions: min_soc must be a number, 0 or more"
    assert refusal({**gate.to_json(), "recheck_s": 0}) == "preconditions: recheck_s must be greater than 0"
    with pytest.raises(InstallRefused) as refused:
        parse_manifest(b'{"format": "vota-install", "version": 1, "campaign_id": "c", "preconditions": 3,'
                       b' "jobs": [{"ecu": "a", "package": "p", "version": "1"}]}')
    assert (refused.value.detail, refused.value.campaign_id) == ("malformed manifest (preconditions must be an object)", "c")


def test_what_cannot_be_read_cannot_be_relied_on():
    cfg = PreconditionsConfig(ecu="bcm", min_soc=20, soc_per_minute=1.0, charging="forbidden", min_battery_mv=11800)
    assert unmet(cfg, PARKED, 600) == {}
    assert unmet(cfg, {**PARKED, "soc": 29}, 600) == {
        "soc": "state of charge 29 %, 30 % needed for about 10 min of install (and the way back if it fails late)"}
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
    learned = estimate_install(config, [("x", size, 0), ("z", size, 1)], "per_ecu", measured={"x": 8192.0, "y": 1.0})
    assert learned.install_s == pytest.approx(size / 8192 + size / b + 2 * fixed)  # x at the rate it was last flashed at
    assert learned.to_json()["rates"] == {"x": "measured", "z": "configured"}
    # the charge must also cover the way back from a late failure: every ECU rolled back in an
    # atomic campaign, the one that failed otherwise (each a reset and a second)
    assert atomic.recovery_s == pytest.approx(2 * (0.2 + PER_ECU_S))
    assert atomic.energy_s == pytest.approx(atomic.install_s + atomic.recovery_s)
    assert two_groups.recovery_s == pytest.approx(0.2 + PER_ECU_S) and two_groups.to_json()["recovery_s"] == 1.2


def test_a_campaign_may_tighten_the_vehicle_s_preconditions_never_loosen_them():
    from agent.core.preconditions import loosened, tightest

    floor = PreconditionsConfig(ecu="bcm", min_soc=30, soc_per_minute=1.0, min_battery_mv=11800, charging="forbidden")
    assert loosened(floor, {"min_soc": 70, "charging": "forbidden", "window_s": 60, "parked": True}) == {}
    bad = loosened(floor, {"parked": False, "speed_zero": False, "min_soc": 10, "soc_per_minute": 0,
                           "min_battery_mv": 0, "charging": "allowed", "window_s": 1e6})
    assert set(bad) == {"parked", "speed_zero", "min_soc", "soc_per_minute", "min_battery_mv", "charging"}, bad
    relaxed = PreconditionsConfig(ecu="bcm", min_soc=10, parked=False, ignition_off=False, speed_zero=False)
    assert loosened(relaxed, {"parked": False}) == {}  # the vehicle itself does not ask it
    held = tightest(floor, PreconditionsConfig(ecu=None, min_soc=5, parked=False, charging="allowed"))
    assert (held.ecu, held.min_soc, held.parked, held.charging, held.min_battery_mv) == ("bcm", 30, True, "forbidden", 11800)
    safe = tightest(relaxed, relaxed, safe_state=True)  # a safety-relevant ECU in the install
    assert (safe.parked, safe.ignition_off, safe.speed_zero, safe.min_soc) == (True, True, True, 10)


def test_the_gateway_holds_a_manifest_to_the_vehicle_s_own_floor(tmp_path, write_config):
    """A manifest that lowers the conditions, or carries none (a TBOX that lost them, a node with
    the deploy secret), runs under the vehicle's own; a safety-relevant ECU adds the safe state;
    a vehicle whose safety-relevant ECU cannot be judged is a configuration error."""
    from agent.adapters.config_files import load_vehicle_config
    from agent.errors import ConfigError
    from agent.protocol.link import InstallJob, InstallManifest
    from gateway.plan import _gate
    from tests.conftest import ecu_entry, multicast_bus

    base = {"segments": {"pt": {"bus": multicast_bus()}},
            "ecus": {"vcu": ecu_entry("vcu", 0x7E0, 0x7E8) | {"safety_relevant": True}, "bcm": ecu_entry("bcm", 0x740, 0x748)},
            "tbox": {"vin": VIN, "trusted_keys": ["k.pub"],
                     "preconditions": {"ecu": "bcm", "min_soc": 40, "parked": False, "ignition_off": False}}}
    config = load_vehicle_config(write_config(base))
    lowered = InstallManifest("c-1", (InstallJob("bcm", "bcm.bin", "2.0.0"),), preconditions={
        "ecu": "bcm", "min_soc": 5, "charging": "allowed", "parked": False, "until": 2e9})
    gate = _gate(lowered, config)
    assert gate is not None and (gate.conditions.min_soc, gate.until) == (40, 2e9)
    assert (gate.conditions.parked, gate.conditions.speed_zero) == (False, True)
    bare = _gate(InstallManifest("c-2", (InstallJob("vcu", "vcu.bin", "2.0.0"),)), config)
    assert bare is not None and bare.conditions.ecu == "bcm" and bare.until > time.time()
    assert (bare.conditions.parked, bare.conditions.ignition_off, bare.conditions.min_soc) == (True, True, 40)
    del base["tbox"]["preconditions"]
    with pytest.raises(ConfigError, match="vcu is safety-relevant"):
        load_vehicle_config(write_config(base))
