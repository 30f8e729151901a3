"""Kill -9 in the middle of a vehicle-level campaign (real processes): the gateway, the TBOX, or
both, at eight points across stage, activate and commit, each found in the gateway's journal.
Every run ends on the whole new set or the whole old set (read back from the ECUs by an
independent tester process), the campaign finishes, each result reaches the cloud once, and
the cloud is told where the install was interrupted. And a gateway killed in the middle of
a deploy: the TBOX resumes the package."""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from tests.conftest import Proc, loopback, vota
from tests.scapy_tester import read_rxswin
from tests.test_rxswin import FACTORY
from tests.test_vehicle_campaigns import ALL, packages, running
from tests.vehicle import VIN, Vehicle, over_doip, read_rxswin_over_doip

RXSWIN = {"R10": ("R10-VOTA-EMC-0001", "R10-VOTA-EMC-0002")}

# Slow ECUs, so that each step below lasts long enough to be caught by polling the journal:
# every RoutineControl and ECUReset answers after 250 ms, every session change after 80 ms.
SLOW = ("*:31:delay=250", "*:11:delay=250", "*:10:delay=80")
ORDER = {"vcu": 0, "bcm": 0, "bms": 1, "dlp_headlamp": 1}

# (journal phase, ECU, what runs on it, step): in the order an install gets there
POINTS = [
    ("stage", "vcu", "stage", "erase"),
    ("stage", "bcm", "stage", "transfer_data"),
    ("stage", "bms", "stage", "check_memory"),
    ("stage", "dlp_headlamp", "stage", "check_dependencies"),
    ("activate", "vcu", "activate", "activate"),
    ("activate", "bms", "activate", "ecu_reset"),
    ("activate", "dlp_headlamp", "activate", "extended_session"),
    ("commit", "bcm", "commit", "commit"),
]


def _journal(v: Vehicle, cid: str) -> dict[str, Any] | None:
    try:
        return json.loads((v.tmp / "gw" / "results" / cid / "journal.json").read_text())
    except (OSError, ValueError):
        return None


def _wait_point(v: Vehicle, cid: str, point: tuple[str, str, str, str], timeout: float = 90) -> None:
    phase, ecu, doing, step = point
    deadline = time.monotonic() + timeout
    while True:
        j = _journal(v, cid)
        if j and j["phase"] == phase and j["ecus"][ecu].get("doing") == doing and j["ecus"][ecu].get("step") == step:
            return
        assert time.monotonic() < deadline, f"never at {point}: {j and j['phase']} {j and j['ecus']}"
        time.sleep(0.005)


def _kill(proc: Proc) -> None:
    os.kill(proc.p.pid, signal.SIGKILL)
    proc.stop()


@pytest.fixture
def slow_vehicle(request, tmp_path, mosquitto, write_config, procs):  # type: ignore[no-untyped-def]
    """The vehicle with slow ECUs; a test parametrized ``...-doip`` gets the deploy link over DoIP."""
    ip = loopback()
    doip = over_doip(ip) if str(getattr(request, "param", "")).endswith("doip") else {}
    v = Vehicle(tmp_path, mosquitto, write_config, procs, ecu_faults=SLOW, **doip)
    v.doip_ip = ip if doip else None  # type: ignore[attr-defined]
    yield v
    v.close()


def _check_once(v: Vehicle, cid: str) -> dict[str, dict[str, Any]]:
    results = [r for r in v.reports("results", cid) if r["stage"] == "flash"]
    assert sorted(r["ecu"] for r in results) == sorted(ALL), [r["ecu"] for r in results]  # each once
    return {r["ecu"]: r["result"] for r in results}


@pytest.mark.parametrize("slow_vehicle, who", [("can", "gateway"), ("can", "tbox"), ("can", "both"), ("doip", "both")],
                         indirect=["slow_vehicle"], ids=["gateway", "tbox", "both", "both-doip"])
def test_killed_at_eight_points_the_campaign_finishes_all_new(slow_vehicle, who):
    """(both-doip: the deploy link over DoIP; the entity comes back with each gateway.)"""
    v, cid = slow_vehicle, f"c-kill-{who}"
    before = running(v)
    v.send(v.campaign(cid, "2.0.0", packages=packages(v, "2.0.0"), order=ORDER, rxswin=RXSWIN))
    points = POINTS[::2] if who == "both" else POINTS  # both killed: every other point (vcu's erase and activation kept)
    for point in points:
        _wait_point(v, cid, point)
        if who in ("gateway", "both"):
            _kill(v.gateway)
        if who in ("tbox", "both"):
            _kill(v.tbox)
        if who in ("gateway", "both"):
            v.restart_gateway()  # the install waits for it: the next point is still ahead
        if who in ("tbox", "both"):
            v.tbox = v.start_tbox(wait=False)  # the gateway goes on: killed again wherever it is by then
    done = v.finished(cid, timeout=180)
    assert done["outcome"] == "success", done
    now = running(v)
    assert {e: version for e, (version, _) in now.items()} == {e: "2.0.0" for e in ALL}
    assert now != before and {e: done["versions"][e]["image_sha256"] for e in ALL} == {e: sha for e, (_, sha) in now.items()}
    results = _check_once(v, cid)
    assert {e: r["phase"] for e, r in results.items()} == {e: "committed" for e in ALL}
    # the RXSWIN changed with the commit, once, read back by a tester we did not write
    read = read_rxswin_over_doip(v.doip_ip) if v.doip_ip else read_rxswin(v.backbone["bus"])  # type: ignore[attr-defined]
    assert read == {**FACTORY, "R10": "R10-VOTA-EMC-0002"} == done["rxswin"]["after"]
    history = json.loads((v.tmp / "gw" / "results" / "rxswin.json").read_text())["history"]
    assert [h["campaign_id"] for h in history] == [cid] and done["rxswin"]["before"] == FACTORY
    for ecu in ALL:  # nothing left staged or on trial
        meta = json.loads((v.ecu_state(ecu) / "meta.json").read_text())
        assert meta["banks"][meta["active"]]["confirmed"] and meta["next_boot"] == "", (ecu, meta)
    # the vehicle's update log, written by a TBOX killed at every point, verifies whole and signed
    pub = v.tmp / "keys" / "report.pub"
    pub.write_bytes(v.report_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                           serialization.PublicFormat.SubjectPublicKeyInfo))
    run = vota("log", "verify", str(v.tmp / "tbox" / "update-log.jsonl"), "--key", str(pub), "--json")
    assert run.returncode == 0 and cid in json.loads(run.stdout)["campaigns"], run.stdout + run.stderr
    if who == "tbox":
        assert "interruptions" not in done  # the gateway went on alone
        return
    where = [(i["phase"], sorted(i["ecus"].items())) for i in done["interruptions"]]
    assert len(where) == len(points), where
    for (phase, ecu, doing, step), (seen_phase, seen) in zip(points, where, strict=True):
        assert seen_phase == phase and (ecu, f"{doing}: {step}") in seen, (phase, ecu, seen)
    # the trace of the work that was cut off reached the cloud, named after the interruption
    traces = {p.name for p in (v.tmp / "cloud" / "store" / VIN / "traces").iterdir()}
    on_vcu = [n for n, (_, ecu, _, _) in enumerate(points, 1) if ecu == "vcu"]
    assert on_vcu and all(f"{cid}.interrupted-{n}.vcu.jsonl" in traces for n in on_vcu), sorted(traces)
    cut = [(a["during"], a["step"]) for a in results["vcu"]["actions"] if a["action"] == "interrupted"]
    assert cut[0] == ("stage", "erase") and cut[-1] == ("activate", "activate"), cut  # vcu: staged again, activated again


def test_gateway_killed_while_rolling_back_ends_all_old(tmp_path, mosquitto, write_config, procs):
    """bcm's activation fails (its fourth RoutineControl); the gateway is killed while it rolls
    vcu back and again while it discards: the vehicle still ends on the whole old set."""
    v = Vehicle(tmp_path, mosquitto, write_config, procs, ecu_faults=("bcm:31#4:nrc=0x22", *SLOW))
    try:
        cid = "c-kill-back"
        before = running(v)
        v.send(v.campaign(cid, "2.0.0", packages=packages(v, "2.0.0"), order={"vcu": 0, "bms": 1, "bcm": 2, "dlp_headlamp": 3},
                          rxswin=RXSWIN))
        for point in [("rollback", "vcu", "rollback", "rollback"),
                      ("discard", "dlp_headlamp", "discard", "discard")]:
            _wait_point(v, cid, point)
            _kill(v.gateway)
            v.restart_gateway()
        done = v.finished(cid, timeout=180)
        assert done["outcome"] == "failed" and "bcm" in done["failure"]["detail"], done
        assert running(v) == before
        results = _check_once(v, cid)
        assert results["bcm"]["failed_step"] == "activate: activate"
        assert [results[e]["phase"] for e in ALL] == ["rolled_back", "rolled_back", "discarded", "discarded"]
        assert [i["phase"] for i in done["interruptions"]] == ["rollback", "discard"]
        assert read_rxswin(v.backbone["bus"]) == FACTORY == done["rxswin"]["after"]  # as it was
    finally:
        v.close()


@pytest.mark.parametrize("link", ["can", "doip"])
def test_gateway_killed_during_a_deploy_the_deploy_resumes(tmp_path, mosquitto, write_config, procs, link):
    """The gateway restarts while the TBOX deploys a package: the TBOX sees a new boot id, reports
    the interruption with its trace and resumes the package (ResumeFile); the campaign succeeds.
    Over DoIP (Ethernet speed) each TransferData is answered 40 ms late, for a deploy to be caught in."""
    v = Vehicle(tmp_path, mosquitto, write_config, procs, **(over_doip(loopback()) if link == "doip" else {}))
    try:
        _killed_during_a_deploy(v, link)
    finally:
        v.close()


def _killed_during_a_deploy(v: Vehicle, link: str) -> None:
    if link == "doip":
        v.gateway.stop()
        v.restart_gateway("--fault", "deploy:GW:36#1+:delay=40")
    cid = "c-kill-deploy"
    new = []
    for ecu, path, version in packages(v, "2.0.0"):
        path.write_bytes(os.urandom(160 * 1024))
        new.append((ecu, path, version))
    v.send(v.campaign(cid, "2.0.0", packages=new))
    part = v.tmp / "gw" / "packages" / "bms-2.0.0.bin.part"
    deadline = time.monotonic() + 60
    while not (part.exists() and part.stat().st_size > 16 * 1024):
        assert time.monotonic() < deadline, "bms was never being deployed"
        time.sleep(0.005)
    _kill(v.gateway)
    v.restart_gateway()
    done = v.finished(cid, timeout=180)
    assert done["outcome"] == "success", done
    assert {e: version for e, (version, _) in running(v).items()} == {e: "2.0.0" for e in ALL}
    cut = [b for b in v.reports("events", cid) if b.get("event") == "interrupted"]
    assert [(b["stage"], b["package"]) for b in cut] == [("deploy", "bms-2.0.0.bin")]
    deploy = {r["package"]: r["result"] for r in v.reports("results", cid) if r["stage"] == "deploy"}
    assert deploy["bms-2.0.0.bin"]["result"] == "success" and deploy["bms-2.0.0.bin"]["resumed_from"] > 0
    traces = {p.name for p in (v.tmp / "cloud" / "store" / VIN / "traces").iterdir()}
    assert f"{cid}.deploy.bms-2.0.0.bin.interrupted-1.jsonl" in traces
