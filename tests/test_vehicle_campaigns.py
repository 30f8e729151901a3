"""Vehicle-level campaigns on the whole simulated vehicle (real processes): four ECUs on two
segments, atomic activation. Whatever fails, every ECU ends on its old image or every ECU on
its new one, read back from the ECUs themselves; install order groups run one after another."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from tests.conftest import Proc, vota
from tests.vehicle import VIN, Vehicle

ALL = ("vcu", "bms", "bcm", "dlp_headlamp")
ECUS3 = ("vcu", "bms", "bcm")
ORDER = {"vcu": 0, "bms": 1, "bcm": 2, "dlp_headlamp": 3}  # one ECU per group: "the third ECU" is bcm


def running(v: Vehicle) -> dict[str, tuple[str, str]]:
    """What each ECU runs, read from the ECUs by an independent tester process (F189, F1A0)."""
    run = vota("versions", "-c", str(v.config), "--json")
    assert run.returncode == 0, run.stderr
    return {e["ecu"]: (e["software_version"], e["image_sha256"]) for e in json.loads(run.stdout)}


def packages(v: Vehicle, version: str) -> list[tuple[str, Path, str]]:
    out = []
    for ecu in ALL:
        path = v.tmp / "cloud" / "packages" / f"{ecu}-{version}.bin"
        path.write_bytes(os.urandom(24 * 1024))
        out.append((ecu, path, version))
    return out


def flash_results(v: Vehicle, cid: str) -> dict[str, dict[str, Any]]:
    return {r["ecu"]: r["result"] for r in v.reports("results", cid) if r["stage"] == "flash"}


def start(tmp_path: Path, mosquitto: Any, write_config: Any, procs: list[Any], fault: str) -> Vehicle:
    return Vehicle(tmp_path, mosquitto, write_config, procs, ecu_faults=(fault,))


def test_a_fault_while_staging_the_third_ecu_leaves_every_ecu_on_its_old_image(tmp_path, mosquitto, write_config, procs):
    v = start(tmp_path, mosquitto, write_config, procs, "bcm:36#2:nrc=0x72")
    try:
        before = running(v)
        assert {e: version for e, (version, _) in before.items()} == {e: "1.0.0" for e in ALL}
        v.send(v.campaign("c-stage", "2.0.0", packages=packages(v, "2.0.0"), order=ORDER))
        done = v.finished("c-stage")
        assert done["outcome"] == "failed" and done["failure"]["reason"] == "flash_failed"
        assert running(v) == before  # nobody runs 2.0.0: the same versions and the same images
        results = flash_results(v, "c-stage")
        assert results["bcm"]["result"] == "failed" and results["bcm"]["failed_step"] == "transfer_data"
        assert [results[e]["phase"] for e in ("vcu", "bms")] == ["discarded", "discarded"]
        assert results["dlp_headlamp"]["failed_step"] == "not_started"
        assert {e: done["versions"][e]["software_version"] for e in ALL} == {e: "1.0.0" for e in ALL}
        for ecu in ALL:  # nothing stays staged either
            meta = json.loads((v.ecu_state(ecu) / "meta.json").read_text())
            assert all(b["state"] in ("valid", "empty") for b in meta["banks"].values()), (ecu, meta)
    finally:
        v.close()


def test_a_fault_at_the_third_activation_rolls_back_the_first_two(tmp_path, mosquitto, write_config, procs):
    # bcm's fourth RoutineControl is the activate routine (erase, check memory, check dependencies come first)
    v = start(tmp_path, mosquitto, write_config, procs, "bcm:31#4:nrc=0x22")
    try:
        before = running(v)
        v.send(v.campaign("c-activate", "2.0.0", packages=packages(v, "2.0.0"), order=ORDER))
        done = v.finished("c-activate")
        assert done["outcome"] == "failed"
        assert running(v) == before
        results = flash_results(v, "c-activate")
        assert results["bcm"]["result"] == "failed" and results["bcm"]["failed_step"] == "activate: activate"
        assert results["bcm"]["nrc"] == 0x22
        assert [results[e]["phase"] for e in ALL] == ["rolled_back", "rolled_back", "discarded", "discarded"]
        rolled = [a for a in results["vcu"]["actions"] if a["action"] == "rollback"]
        assert rolled and rolled[0]["result"] == "success"
        traces = {p.name for p in (v.tmp / "cloud" / "store" / VIN / "traces").iterdir()}
        assert {"c-activate.activate.vcu.jsonl", "c-activate.rollback.vcu.jsonl", "c-activate.discard.dlp_headlamp.jsonl"} <= traces
        # the cloud's diagnosis looks at bcm's activation, not at its (successful) flash
        assert v.cloud.collector.wait_for(lambda c: "c-activate" in c.verdicts, 10)
        verdict = v.cloud.collector.verdicts["c-activate"]
        assert verdict["abnormal_packages"] == ["bcm"] and not verdict["unanalysed"], verdict
        finding = verdict["findings"][0]
        assert (finding["stage"], finding["cause"], finding["side"], finding["nrc"]) == ("activate", "negative_response", "server", 0x22)
        assert finding["request"].startswith("3101ff02") and finding["step"] == "activate"
        rollback = (v.tmp / "cloud" / "store" / VIN / "traces" / "c-activate.rollback.vcu.jsonl").read_text().splitlines()
        steps = [json.loads(line)[5]["step"] for line in rollback[1:-1]]
        assert steps[:3] == ["extended_session", "security_access", "security_access"] and "rollback" in steps, steps
    finally:
        v.close()


def test_a_refused_commit_fails_the_ecu_in_its_commit_phase_and_is_diagnosed_on_the_commit_trace(
        tmp_path, mosquitto, write_config, procs):
    # bcm's fifth RoutineControl is the commit (erase, check memory, check dependencies, activate first)
    v = start(tmp_path, mosquitto, write_config, procs, "bcm:31#5:nrc=0x22")
    try:
        v.send(v.campaign("c-commit", "2.0.0", packages=packages(v, "2.0.0"), order=ORDER))
        done = v.finished("c-commit")
        assert done["outcome"] == "failed" and done["failure"]["reason"] == "flash_failed", done
        results = flash_results(v, "c-commit")
        bcm = results["bcm"]
        assert (bcm["result"], bcm["phase"], bcm["failed_step"], bcm["nrc"]) == ("failed", "commit_failed", "commit: commit",
                                                                                0x22), bcm
        assert all(results[e]["result"] == "success" and results[e]["phase"] == "committed" for e in ("vcu", "bms"))
        assert v.cloud.collector.wait_for(lambda c: "c-commit" in c.verdicts, 10)
        verdict = v.cloud.collector.verdicts["c-commit"]
        assert verdict["abnormal_packages"] == ["bcm"] and verdict["unexplained"] is None, verdict
        finding = verdict["findings"][0]
        assert (finding["stage"], finding["cause"], finding["side"], finding["nrc"]) == ("activate", "negative_response", "server", 0x22)
        assert finding["request"].startswith("3101ff05") and finding["step"] == "commit", finding
    finally:
        v.close()


def test_a_late_answer_during_an_activation_is_in_its_trace_and_diagnosed_as_a_timeout(
        tmp_path, mosquitto, write_config, procs):
    # bcm's fifth session request is the activation's 10 03 (10 03, 10 02, 10 03, 10 01 while staging)
    v = start(tmp_path, mosquitto, write_config, procs, "bcm:10#5:delay=1271")
    try:
        v.send(v.campaign("c-late", "2.0.0", packages=packages(v, "2.0.0"), order=ORDER))
        done = v.finished("c-late")
        assert done["outcome"] == "failed", done
        assert v.cloud.collector.wait_for(lambda c: "c-late" in c.verdicts, 10)
        verdict = v.cloud.collector.verdicts["c-late"]
        finding = verdict["findings"][0]
        assert (finding["stage"], finding["package"], finding["cause"], finding["side"]) == (
            "activate", "bcm", "response_timeout", "server"), verdict
        assert finding["request"] == "1003" and "late" in json.dumps(finding["context"]), finding
    finally:
        v.close()


def test_install_order_groups_run_one_after_another(vehicle):
    """vcu and bcm (order 0) on different segments overlap in time; bms and dlp_headlamp
    (order 1) start only when both have finished; all four end committed on 2.0.0."""
    order = {"vcu": 0, "bcm": 0, "bms": 1, "dlp_headlamp": 1}
    new = packages(vehicle, "2.0.0")
    vehicle.send(vehicle.campaign("c-order", "2.0.0", packages=new, order=order))
    done = vehicle.finished("c-order")
    assert done["outcome"] == "success", done
    assert {e: done["versions"][e]["software_version"] for e in ALL} == {e: "2.0.0" for e in ALL}
    results = flash_results(vehicle, "c-order")
    assert {e: results[e]["phase"] for e in ALL} == {e: "committed" for e in ALL}
    spans = {}
    for ecu in ALL:
        lines = (vehicle.tmp / "cloud" / "store" / VIN / "traces" / f"c-order.flash.{ecu}.jsonl").read_text().splitlines()
        head, rows = json.loads(lines[0]), [json.loads(x) for x in lines[1:] if x.startswith("[")]
        spans[ecu] = (head["started"], head["started"] + rows[-1][0] / 1000.0)
    assert spans["vcu"][0] < spans["bcm"][1] and spans["bcm"][0] < spans["vcu"][1]  # same order: in parallel
    first_done = max(spans["vcu"][1], spans["bcm"][1])
    assert min(spans["bms"][0], spans["dlp_headlamp"][0]) >= first_done  # the next group only after
    assert running(vehicle) == {e: ("2.0.0", done["versions"][e]["image_sha256"]) for e in ALL}


def test_per_ecu_keeps_each_ecu_on_its_own(tmp_path, mosquitto, write_config, procs):
    """activation per_ecu: what was flashed runs (today's behaviour), the failed ECU stays old."""
    v = start(tmp_path, mosquitto, write_config, procs, "bcm:36#2:nrc=0x72")
    try:
        v.send(v.campaign("c-each", "2.0.0", packages=packages(v, "2.0.0"), activation="per_ecu"))
        done = v.finished("c-each")
        assert done["outcome"] == "failed"
        now = {e: version for e, (version, _) in running(v).items()}
        assert now == {"vcu": "2.0.0", "bms": "2.0.0", "bcm": "1.0.0", "dlp_headlamp": "2.0.0"}
        results = flash_results(v, "c-each")
        assert results["bcm"]["failed_step"] == "transfer_data" and results["vcu"]["phase"] == "committed"
    finally:
        v.close()


def test_a_single_bank_ecu_is_flashed_last_and_the_campaign_says_it_is_not_revertible(tmp_path, mosquitto, write_config,
                                                                                      procs):
    v = Vehicle(tmp_path, mosquitto, write_config, procs, ecu_extra={"dlp_headlamp": {"banks": 1}})
    try:
        v.send(v.campaign("c-single", "2.0.0", packages=packages(v, "2.0.0"), order={e: 0 for e in ALL}))
        done = v.finished("c-single")
        assert done["outcome"] == "success" and done["revertible"] is False, done
        assert {e: version for e, (version, _) in running(v).items()} == {e: "2.0.0" for e in ALL}
        results = flash_results(v, "c-single")
        assert {e: results[e]["phase"] for e in ALL} == {e: "committed" for e in ALL}
        assert [a["action"] for a in results["dlp_headlamp"]["actions"]] == []  # flashed in place, no staging
        store = v.tmp / "cloud" / "store" / VIN / "traces"
        started = {p.name: json.loads(p.read_text().splitlines()[0])["started"] for p in store.iterdir()}
        last_activation = max(t for n, t in started.items() if ".activate." in n)
        assert started["c-single.flash.dlp_headlamp.jsonl"] > last_activation  # the others run their new image first
        assert min(t for n, t in started.items() if ".commit." in n) > started["c-single.flash.dlp_headlamp.jsonl"]
    finally:
        v.close()


def test_a_single_bank_ecu_that_fails_sends_the_others_back(tmp_path, mosquitto, write_config, procs):
    v = Vehicle(tmp_path, mosquitto, write_config, procs, ecu_faults=("dlp_headlamp:36#3:nrc=0x72",),
                ecu_extra={"dlp_headlamp": {"banks": 1}})
    try:
        before = running(v)
        v.send(v.campaign("c-single-fail", "2.0.0", packages=packages(v, "2.0.0")))
        done = v.finished("c-single-fail")
        assert done["outcome"] == "failed" and done["revertible"] is False, done
        now = running(v)
        assert {e: now[e] for e in ("vcu", "bms", "bcm")} == {e: before[e] for e in ("vcu", "bms", "bcm")}
        assert now["dlp_headlamp"][0] == ""  # erased in place: no application until it is flashed again
        results = flash_results(v, "c-single-fail")
        assert results["dlp_headlamp"]["failed_step"] == "transfer_data"
        assert [results[e]["phase"] for e in ("vcu", "bms", "bcm")] == ["rolled_back"] * 3
    finally:
        v.close()


def test_a_campaign_with_deltas_sends_each_ecu_the_delta_it_can_take_and_the_full_image_otherwise(
        tmp_path, mosquitto, write_config, procs):
    """Three packages with deltas from the images the vehicle runs: vcu runs the base (the delta
    goes, a fraction of the image on the bus); bms runs another image (the inventory says so: the
    full image goes, and why); bcm runs the base but its bootloader takes no deltas (refused at the
    base check, before anything is erased: a second round with the full image). Every ECU ends
    on the new image; the cloud hears which image went and why."""
    from tests.conftest import ecu_entry, firmware_like, next_release

    v = Vehicle(tmp_path, mosquitto, write_config, procs, ecu_extra={
        "vcu": {"delta": 13}, "bms": {"delta": 13},
        "bcm": {"delta": 13, "sim": ecu_entry("bcm", 0x740, 0x748, "body", accept_delta=False)["sim"]}})
    try:
        pkgs = v.tmp / "cloud" / "packages"
        old, other = firmware_like(64 * 1024), firmware_like(86 * 1024)[22 * 1024:]
        new = next_release(old)
        for name, data in (("old.bin", old), ("other.bin", other), *((f"{e}-2.1.0.bin", new) for e in ECUS3)):
            (pkgs / name).write_bytes(data)
        for e, data in (("vcu", old), ("bms", other), ("bcm", old)):
            (pkgs / f"{e}-2.0.0.bin").write_bytes(data)
        v.send(v.campaign("c-base", "2.0.0", packages=[(e, pkgs / f"{e}-2.0.0.bin", "2.0.0") for e in ECUS3]))
        assert v.finished("c-base")["outcome"] == "success"

        deltas = {e: (pkgs / "old.bin", "2.0.0") for e in ECUS3}  # bms does not run it
        v.send(v.campaign("c-delta", "2.1.0", packages=[(e, pkgs / f"{e}-2.1.0.bin", "2.1.0") for e in ECUS3],
                          deltas=deltas))
        done = v.finished("c-delta", timeout=180)
        assert done["outcome"] == "success", done
        sha = hashlib.sha256(new).hexdigest()
        assert {e: r for e, r in running(v).items() if e in ECUS3} == {e: ("2.1.0", sha) for e in ECUS3}

        events = sorted((e["round"], e["packages"]) for e in v.reports("events", "c-delta") if e.get("event") == "images")
        assert [(r, {n.split("-")[0]: p["image"] for n, p in chosen.items()}) for r, chosen in events] == [
            (0, {"vcu": "delta", "bms": "full", "bcm": "delta"}), (1, {"bcm": "full"})], events
        assert "not the delta's base 2.0.0" in events[0][1]["bms-2.1.0.bin"]["why"]
        assert "refused the delta" in events[1][1]["bcm-2.1.0.bin"]["why"]
        assert events[1][1]["bcm-2.1.0.bin"]["result"]["failed_step"] == "delta_base"
        results = {r["ecu"]: r["result"] for r in v.reports("results", "c-delta") if r["stage"] == "flash"}
        assert results["vcu"]["image_sent"] == "delta" and results["vcu"]["bytes_transferred"] * 5 < len(new), results["vcu"]
        assert [results[e]["image_sent"] for e in ("bms", "bcm")] == ["full", "full"]
        deployed = {r["package"] for r in v.reports("results", "c-delta") if r["stage"] == "deploy"}
        assert deployed == {"vcu-2.1.0.bin.from-2.0.0.delta", "bms-2.1.0.bin", "bcm-2.1.0.bin.from-2.0.0.delta",
                            "bcm-2.1.0.bin"}
    finally:
        v.close()


def _span(path: Path) -> tuple[float, float]:
    """(first request, last answer) of a trace, in epoch seconds."""
    from agent.adapters.trace_files import read_trace

    trace = read_trace(path)
    last = trace.exchanges[-1]
    return trace.header.started, trace.header.started + (last.t + (last.dt or 0)) / 1000.0


def test_a_pipelined_install_flashes_an_ecu_while_the_next_package_is_deployed(tmp_path, mosquitto, write_config, procs):
    """The backbone at 500 kbit/s (emulated): the TBOX starts the install before the packages,
    the gateway stages each ECU as soon as its package arrived and checked out against the
    signed campaign, while the next package is still on the backbone; the campaign ends as
    without pipelining (all ECUs on the new images, activated together)."""
    v = Vehicle(tmp_path, mosquitto, write_config, procs, backbone={"bitrate": 500000})
    try:
        new = packages(v, "2.0.0")
        v.send(v.campaign("c-pipe", "2.0.0", packages=new, order=ORDER))
        done = v.finished("c-pipe", timeout=180)
        assert done["outcome"] == "success", done
        assert {e: version for e, (version, _) in running(v).items()} == {e: "2.0.0" for e in ALL}
        (record,) = (v.tmp / "tbox" / "campaigns").glob("*/flash")
        deploys = {e: _span(record.parent / "deploy" / f"{e}-2.0.0.bin.deploy.trace.jsonl") for e in ALL}
        flashes = {e: _span(record / f"{e}.trace.jsonl") for e in ALL}
        for first, second in zip(ALL[:-1], ALL[1:], strict=True):  # install order: vcu, bms, bcm, dlp_headlamp
            assert flashes[first][0] >= deploys[first][1] - 0.05  # its package was there and checked first
            assert flashes[first][0] < deploys[second][1], (first, flashes[first], second, deploys[second])
        manifest = json.loads((v.tmp / "gw" / "results" / "c-pipe" / "install-manifest.json").read_text())
        assert manifest["arriving"] is True
    finally:
        v.close()


def test_a_failed_pipelined_campaign_is_cancelled_on_the_gateway_and_the_next_one_starts_at_once(
        tmp_path, mosquitto, write_config, procs):
    """The third package's deploy breaks off (a gateway fault drops a TransferData): the campaign
    fails at deploy while the install the TBOX started first waits for that package. Before the
    failure is told, the TBOX cancels that install; the gateway discards what it staged at once
    (not after ``arrival_idle_s``), the ``finished`` event says so, and a campaign sent right
    after installs."""
    v = Vehicle(tmp_path, mosquitto, write_config, procs, gateway_extra={"arrival_idle_s": 600}, tbox_extra={"diagnose": True})
    try:
        v.gateway.stop()
        v.restart_gateway("--fault", "deploy:bcm-2.0.0.bin:36#3:drop")
        v.send(v.campaign("c-lost", "2.0.0", packages=packages(v, "2.0.0"), order=ORDER))
        v.send(v.campaign("c-next", "2.0.1", packages=packages(v, "2.0.1"), order=ORDER))
        done = v.finished("c-lost", timeout=120)
        assert (done["outcome"], done["failure"]["stage"]) == ("failed", "deploy"), done
        assert done["cancel"] == {"state": "done", "status": "cancelled", "discarded": ["bms", "vcu"], "rolled_back": []}
        assert done["cause"] == "response_not_sent"  # the cancel's exchanges do not confuse the diagnosis
        results = v.tmp / "gw" / "results" / "c-lost"
        assert json.loads((results / "install.json").read_text())["status"] == "cancelled"
        summary = json.loads((results / "summary.json").read_text())
        assert summary["cancelled"].startswith("cancelled by the TBOX: deploy: deploy_failed"), summary
        by_ecu = {r["ecu"]: r for r in summary["results"]}
        assert (by_ecu["bcm"]["failed_step"], by_ecu["dlp_headlamp"]["failed_step"]) == ("package_arrival", "not_started")
        assert v.finished("c-next", timeout=180)["outcome"] == "success"
        assert {e: version for e, (version, _) in running(v).items()} == {e: "2.0.1" for e in ALL}
        assert "start install: negative response" not in v.tbox.text()  # never refused: nothing was still running
        # retention: both campaigns ended, so neither box keeps their packages (the evidence stays)
        _wait_for_gone = time.monotonic() + 10
        while list((v.tmp / "tbox" / "campaigns").glob("*/packages")) and time.monotonic() < _wait_for_gone:
            time.sleep(0.2)
        assert list((v.tmp / "tbox" / "campaigns").glob("*/packages")) == []
        assert sorted(p.name for p in (v.tmp / "gw" / "packages").iterdir() if p.suffix in (".bin", ".json")) == []
        assert (v.tmp / "gw" / "results" / "c-lost" / "summary.json").exists()
    finally:
        v.close()


def _staged(v: Vehicle, ecu: str) -> bool:
    meta = json.loads((v.ecu_state(ecu) / "meta.json").read_text())
    return any(bank["state"] == "staged" for name, bank in meta["banks"].items() if name != meta["active"])


def test_an_ecu_silent_during_the_discard_is_discarded_once_it_answers(tmp_path, mosquitto, write_config, procs):
    """As above, but vcu answers every routine after its staging busy (0x21, never carried out: a
    bootloader stuck, as good as silent): its discard fails and it keeps the failed campaign's
    image staged. The gateway owes it that discard and
    makes it once vcu answers again (here: its simulator restarted), without any campaign."""
    v = Vehicle(tmp_path, mosquitto, write_config, procs, gateway_extra={"arrival_idle_s": 600, "owed_retry_s": 1},
                ecu_faults=("vcu:31#4+:nrc=0x21",))  # busy: the discard is never carried out
    try:
        v.gateway.stop()
        v.restart_gateway("--fault", "deploy:bcm-2.0.0.bin:36#3:drop")
        v.send(v.campaign("c-lost", "2.0.0", packages=packages(v, "2.0.0"), order=ORDER))
        done = v.finished("c-lost", timeout=180)
        assert done["cancel"]["discarded"] == ["bms"], done
        assert _staged(v, "vcu") and not _staged(v, "bms")
        owed = json.loads((v.tmp / "gw" / "results" / "owed-discards.json").read_text())["ecus"]
        assert list(owed) == ["vcu"] and owed["vcu"]["campaign"] == "c-lost"
        (sim,) = [p for p in v.procs if p.log == v.tmp / "ecu.log"]
        sim.stop()
        v.procs.append(Proc("ecu-sim", "-c", str(v.config), "--state-dir", str(v.tmp / "ecu"), log=v.tmp / "ecu-2.log"))
        v.procs[-1].wait_ready("ecu-sim ready")
        deadline = time.monotonic() + 60
        while _staged(v, "vcu"):
            assert time.monotonic() < deadline, v.gateway.text()[-3000:]
            time.sleep(0.3)
        while json.loads((v.tmp / "gw" / "results" / "owed-discards.json").read_text())["ecus"]:
            assert time.monotonic() < deadline
            time.sleep(0.3)
        assert {e: version for e, (version, _) in running(v).items()} == {e: "1.0.0" for e in ALL}
    finally:
        v.close()


def test_a_failed_pipelined_campaign_is_cancelled_with_the_broker_down(tmp_path, mosquitto, write_config, procs):
    """The same chain with the broker gone from the deploy on: the cancel needs no cloud (it goes
    over the backbone), the failure and what was undone reach the cloud when the broker is back,
    and the next campaign installs."""
    v = Vehicle(tmp_path, mosquitto, write_config, procs, gateway_extra={"arrival_idle_s": 600})
    try:
        v.gateway.stop()
        v.restart_gateway("--fault", "deploy:bcm-2.0.0.bin:36#3:drop")
        v.send(v.campaign("c-dark", "2.0.0", packages=packages(v, "2.0.0"), order=ORDER))
        assert v.cloud.collector.wait_for(lambda c: any(b.get("state") == "deploying" for b in v.reports("events", "c-dark")), 60)
        mosquitto.stop()
        deadline = time.monotonic() + 90
        while "campaign c-dark cancelled by the TBOX" not in v.gateway.text():
            assert time.monotonic() < deadline, v.tbox.text()[-3000:]
            time.sleep(0.3)
        status = v.tmp / "gw" / "results" / "c-dark" / "install.json"
        while json.loads(status.read_text())["status"] != "cancelled":
            assert time.monotonic() < deadline, status.read_text()
            time.sleep(0.3)
        mosquitto.start()
        done = v.finished("c-dark", timeout=90)
        assert done["cancel"] == {"state": "done", "status": "cancelled", "discarded": ["bms", "vcu"], "rolled_back": []}
        v.send(v.campaign("c-light", "2.0.1", packages=packages(v, "2.0.1"), order=ORDER))
        assert v.finished("c-light", timeout=180)["outcome"] == "success"
        assert {e: version for e, (version, _) in running(v).items()} == {e: "2.0.1" for e in ALL}
    finally:
        v.close()


def test_the_cloud_hears_each_ecu_s_bytes_while_the_install_runs(tmp_path, mosquitto, write_config, procs):
    """Every block of vcu's image after the first answers 0.4 s late (64 KiB: about 6 s of
    transfer): the TBOX, reading the gateway's progress.json every 2 s while the install runs,
    tells the cloud vcu's bytes part-way through, and its end."""
    v = start(tmp_path, mosquitto, write_config, procs, "vcu:36#2+:delay=400")
    try:
        pkgs = packages(v, "2.0.0")
        (v.tmp / "cloud" / "packages" / "vcu-2.0.0.bin").write_bytes(os.urandom(64 * 1024))
        v.send(v.campaign("c-bytes", "2.0.0", packages=pkgs, order=ORDER))
        assert v.finished("c-bytes")["outcome"] == "success"
        seen = [e for e in v.reports("events", "c-bytes") if e.get("event") == "progress" and e.get("ecu") == "vcu"]
        assert any(e["step"] == "transfer_data" and 0 < e["done"] < e["total"] == 64 * 1024 for e in seen), seen
        assert all(e["stage"] == "install" for e in seen)
    finally:
        v.close()
