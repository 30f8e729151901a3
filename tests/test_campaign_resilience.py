"""A campaign survives a TBOX killed in the middle of each long step and a broker outage;
a campaign with install policy "confirm" waits for the owner's confirmation."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import loopback
from tests.vehicle import ECUS, VIN, Vehicle, over_doip

KiB = 1024


def _state(v, cid: str) -> str | None:  # type: ignore[no-untyped-def]
    for path in (v.tmp / "tbox" / "campaigns").glob("*/state.json"):
        doc = json.loads(path.read_text())
        if doc.get("campaign_id") == cid:
            return str(doc["state"])
    return None


def _wait(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def _kill_tbox(v) -> None:  # type: ignore[no-untyped-def]
    os.kill(v.tbox.p.pid, signal.SIGKILL)
    v.tbox.stop()


def _results_once(v, cid: str) -> dict[str, dict]:  # type: ignore[no-untyped-def]
    results = v.reports("results", cid)
    keys = [(r["stage"], r.get("package") or r.get("ecu")) for r in results]
    assert len(keys) == len(set(keys)) == 2 * len(ECUS), keys  # every result arrived, once
    return {f"{k[0]}:{k[1]}": r["result"]["result"] for k, r in zip(keys, results, strict=True)}


@pytest.mark.parametrize("link", ["can", "doip"])
def test_tbox_killed_during_download_deploy_and_install(tmp_path, mosquitto, write_config, procs, link):
    """(doip: the deploy link over DoIP, each TransferData answered 40 ms late for a deploy to be caught in.)"""
    v = Vehicle(tmp_path, mosquitto, write_config, procs, **(over_doip(loopback()) if link == "doip" else {}))
    try:
        if link == "doip":
            v.gateway.stop()
            v.restart_gateway("--fault", "deploy:GW:36#1+:delay=40")
        _killed_three_times(v)
    finally:
        v.close()


def _killed_three_times(v: Vehicle) -> None:
    v.cloud.packages.throttle = 200 * KiB  # a slow link: the download takes a while
    v.send(v.campaign("c-kill", "3.0.0", packages=v.packages("3.0.0", size=256 * KiB)))
    tbox_dir = v.tmp / "tbox" / "campaigns"

    def partial_download() -> bool:
        return any(p.stat().st_size > 64 * KiB for p in tbox_dir.glob("*/packages/*.part"))

    _wait(partial_download, 60, "no partial download")
    _kill_tbox(v)  # 1: in the middle of a download
    v.cloud.packages.throttle = None
    v.tbox = v.start_tbox()

    def partial_deploy() -> bool:
        return any(p.stat().st_size > 32 * KiB for p in (v.tmp / "gw" / "packages").glob("*.part"))

    _wait(partial_deploy, 60, "no partial deploy")
    _kill_tbox(v)  # 2: in the middle of a deploy
    v.tbox = v.start_tbox()
    _wait(lambda: _state(v, "c-kill") == "installing", 90, "never installing")
    _kill_tbox(v)  # 3: while the gateway flashes and the TBOX waits for the results
    v.tbox = v.start_tbox()
    done = v.finished("c-kill")
    assert done["outcome"] == "success", done
    ranges = [r["range"] for r in v.cloud.packages.requests if r["range"]]
    assert ranges, "the download restarted instead of resuming"
    deploy = {r["package"]: r["result"] for r in v.reports("results", "c-kill") if r["stage"] == "deploy"}
    assert any(r["resumed_from"] > 0 for r in deploy.values()), deploy  # ResumeFile after the kill
    assert set(_results_once(v, "c-kill").values()) == {"success"}
    summary = json.loads((v.tmp / "gw" / "results" / "c-kill" / "install.json").read_text())
    assert summary["status"] == "succeeded" and summary["total"] == len(ECUS)


def test_broker_outage_in_the_middle_of_a_campaign(vehicle, mosquitto):
    v = vehicle
    v.send(v.campaign("c-outage", "3.1.0", packages=v.packages("3.1.0", size=128 * KiB)))
    _wait(lambda: _state(v, "c-outage") in ("deploying", "deployed", "awaiting_install", "installing"), 60, "no deploy")
    mosquitto.stop()
    _wait(lambda: _state(v, "c-outage") in ("done", "failed", "reported"), 120, "campaign did not end offline")
    time.sleep(1.0)
    mosquitto.start()  # every report written meanwhile goes out now
    done = v.finished("c-outage")
    assert done["outcome"] == "success"
    assert set(_results_once(v, "c-outage").values()) == {"success"}
    states = [b["state"] for b in v.reports("events", "c-outage") if b.get("event") == "state"]
    assert states == ["verified", "downloading", "downloaded", "deploying", "deployed", "awaiting_install",
                      "installing", "done"]


def test_confirm_policy_waits_for_the_owner(vehicle):
    v = vehicle
    v.send(v.campaign("c-confirm", "3.2.0", install="confirm"))
    _wait(lambda: _state(v, "c-confirm") == "awaiting_install", 60, "not awaiting the install")
    time.sleep(2.0)
    assert _state(v, "c-confirm") == "awaiting_install"  # nothing flashed without the confirmation
    assert not (Path(v.tmp) / "gw" / "results" / "c-confirm").exists()
    from cloud_sim.cloud import publish

    publish(v.broker, VIN, "command", json.dumps({"command": "confirm_install", "campaign_id": "c-confirm"}).encode())
    assert v.finished("c-confirm")["outcome"] == "success"
