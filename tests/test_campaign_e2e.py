"""A whole vehicle against a real Mosquitto: TBOX, gateway and ECU simulators as separate
processes, the stand-in cloud in the test. Campaigns succeed end to end, bad ones are
refused with the reason reported to the cloud."""

from __future__ import annotations

import datetime as dt
import json
import os

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_sim.cloud import publish
from tests.conftest import vota
from tests.vehicle import ECUS, VIN


def test_campaign_for_three_ecus_end_to_end(vehicle):
    vehicle.send(vehicle.campaign("c-100", "2.0.0"))
    done = vehicle.finished("c-100")
    assert done["outcome"] == "success", done
    states = [b["state"] for b in vehicle.reports("events", "c-100") if b.get("event") == "state"]
    assert states == ["verified", "downloading", "downloaded", "deploying", "deployed", "awaiting_install",
                      "installing", "done"]  # "received" comes before the campaign id is verified
    assert any(b.get("state") == "received" for b in vehicle.reports("events", None))
    progress = {(b["stage"], b.get("package")) for b in vehicle.reports("events", "c-100") if b.get("event") == "progress"}
    assert {("download", f"{e}-2.0.0.bin") for e in ECUS} | {("deploy", f"{e}-2.0.0.bin") for e in ECUS} | {
        ("install", None)} <= progress  # the cloud hears each long step as it goes
    (inventory,) = vehicle.reports("inventory", "c-100")
    assert {e["ecu"]: e["software_version"] for e in inventory["ecus"]} == {e: "1.0.0" for e in (*ECUS, "dlp_headlamp")}
    results = vehicle.reports("results", "c-100")
    deploy = {r["package"]: r["result"] for r in results if r["stage"] == "deploy"}
    flash = {r["ecu"]: r["result"] for r in results if r["stage"] == "flash"}
    assert {p: r["result"] for p, r in deploy.items()} == {f"{e}-2.0.0.bin": "success" for e in ECUS}
    assert {e: (r["result"], r["version_after"]) for e, r in flash.items()} == {e: ("success", "2.0.0") for e in ECUS}
    traces = vehicle.tmp / "cloud" / "store" / VIN / "traces"
    names = sorted(p.name for p in traces.iterdir())
    assert names == sorted([f"c-100.deploy.{e}-2.0.0.bin.jsonl" for e in ECUS] + [f"c-100.flash.{e}.jsonl" for e in ECUS]
                           + [f"c-100.{a}.{e}.jsonl" for e in ECUS for a in ("activate", "commit")])  # atomic: two phases
    assert {e: done["versions"][e]["software_version"] for e in ECUS} == {e: "2.0.0" for e in ECUS}  # read back
    first = json.loads((traces / "c-100.flash.vcu.jsonl").read_text().splitlines()[0])
    assert first["format"] == "vota-trace" and first["stage"] == "flash" and first["server"] == "vcu"


def test_bad_campaigns_are_refused_with_the_reason(vehicle):
    vehicle.send(vehicle.campaign("c-bad-sig", "2.0.0", key=Ed25519PrivateKey.generate()))
    assert vehicle.rejected("c-bad-sig")["reason"] == "untrusted_key"
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=10)
    vehicle.send(vehicle.campaign("c-expired", "2.0.0", now=past, valid_for=dt.timedelta(days=1)))
    assert vehicle.rejected("c-expired")["reason"] == "expired"
    vehicle.send(vehicle.campaign("c-downgrade", "0.9.0"))
    assert vehicle.rejected("c-downgrade")["reason"] == "downgrade"
    vehicle.send(vehicle.campaign("c-other", "2.0.0", vin="LSOMEONEELSE00001"))
    assert vehicle.rejected("c-other")["reason"] == "wrong_vehicle"
    vehicle.send(b"\x00garbage, not a campaign")
    assert vehicle.rejected(None)["reason"] == "malformed"
    packages = vehicle.packages("2.1.0")
    envelope = vehicle.campaign("c-tampered", "2.1.0", packages=packages)
    packages[1][1].write_bytes(os.urandom(48 * 1024))  # the file on the server is not what was signed
    vehicle.send(envelope)
    done = vehicle.finished("c-tampered")
    assert done["outcome"] == "failed" and done["failure"]["reason"] == "package_refused"
    assert "does not match" in done["failure"]["detail"]
    assert not vehicle.reports("results", "c-tampered")  # nothing deployed, nothing flashed
    # no CAN exchange failed, so no trace can explain it: the verdict says so, it is never silent
    assert vehicle.cloud.collector.wait_for(lambda c: "c-tampered" in c.verdicts, 10)
    unexplained = vehicle.cloud.collector.verdicts["c-tampered"]["unexplained"]
    assert unexplained["stage"] == "download" and unexplained["failed_step"] == "package_refused", unexplained
    assert "no traced exchange shows this failure" in unexplained["why"]
    for bad in (b"not json", b'{"command": "self_destruct", "campaign_id": "x"}', b'{"command": "confirm_install"}',
                json.dumps({"command": "confirm_install", "campaign_id": "c-1", "vin": "LOTHER"}).encode()):
        publish(vehicle.broker, VIN, "command", bad)
    assert vehicle.cloud.collector.wait_for(
        lambda c: sum(1 for m in c.messages if m["body"].get("topic") == "command") >= 4, 20)
    reasons = sorted(m["body"]["reason"] for m in vehicle.cloud.collector.messages if m["body"].get("topic") == "command")
    assert reasons == ["malformed", "malformed", "malformed", "wrong_vehicle"]
    assert vehicle.tbox.p.poll() is None  # the daemon keeps running


def test_transient_failures_are_retried_with_their_own_budget_not_the_loop_guard(vehicle):
    packages = vehicle.packages("2.2.0")
    envelope = vehicle.campaign("c-loop", "2.2.0", packages=packages)
    vehicle.cloud.packages.cut_after = 1000  # every download attempt breaks off: transient, retried
    vehicle.send(envelope)
    done = vehicle.finished("c-loop", timeout=60)
    assert done["outcome"] == "failed" and done["failure"]["reason"] == "retries_exhausted"
    assert done["failure"]["stage"] == "downloading"
    events = vehicle.reports("events", "c-loop")
    entered = [b["attempt"] for b in events if b.get("event") == "state" and b["state"] == "downloading"]
    assert entered == [1]  # entered once: retries are no entries
    assert sorted(b["retry"] for b in events if b.get("event") == "retry") == list(range(1, 9))  # max_retries (8), backing off


def test_a_campaign_that_fails_on_the_link_around_the_transfers_is_diagnosed_on_it(vehicle):
    """The install status the TBOX polls is refused by the gateway every time: the campaign fails
    with its retries used up, and the verdict names the gateway, the NRC and the step, from the
    link trace (the exchanges around the transfers), in the vehicle and in the cloud."""
    vehicle.gateway.stop()
    vehicle.restart_gateway("--fault", "deploy:GW:31#2+:nrc=0x22")  # #1: the inventory; #2 on: the install
    vehicle.send(vehicle.campaign("c-link", "2.3.0"))
    done = vehicle.finished("c-link", timeout=90)
    assert (done["outcome"], done["failure"]["stage"], done["failure"]["reason"]) == (
        "failed", "installing", "retries_exhausted"), done
    assert vehicle.cloud.collector.wait_for(lambda c: "c-link" in c.verdicts, 10)
    verdict = vehicle.cloud.collector.verdicts["c-link"]
    (first, *_) = verdict["findings"]
    assert (verdict["stage"], verdict["abnormal_packages"], verdict["side"], verdict["unit"]) == (
        "link", ["installing"], "server", "GW"), verdict
    assert (first["nrc"], first["step"], first["request"]) == (0x22, "install status", "31030301"), first
    (result,) = [r for r in vehicle.reports("results", "c-link") if r["stage"] == "link"]
    assert result["result"]["failed_step"] == "install status" and result["result"]["nrc"] == 0x22
    link = vehicle.tmp / "tbox" / "campaigns"
    (trace,) = link.glob("*/link/installing.link.trace.jsonl")
    rows = [json.loads(line) for line in trace.read_text().splitlines()]
    assert rows[0]["stage"] == "link" and rows[0]["client"] == "TBOX" and rows[0]["server"] == "GW"
    steps = {row[5]["step"] for row in rows[1:-1]}
    assert steps == {"install status"}, steps
    assert all(row[1] in ("2701", "2702") for row in rows[1:-1] if row[1].startswith("27"))  # no key recorded
    for state, asked in (("received", {"collect inventory", "read inventory.json", "rxswin"}), ("deploying", {"boot id"})):
        assert json.loads((trace.parent / f"{state}.link.result.json").read_text())["result"] == "success"
        rows = [json.loads(line) for line in (trace.parent / f"{state}.link.trace.jsonl").read_text().splitlines()[1:-1]]
        assert {row[5]["step"] for row in rows} == asked, rows

    # every routine refused, the inventory's too: the campaign ends in received, under its id, within
    # the retry pauses' bound, and is diagnosed on the received state's link trace
    vehicle.gateway.stop()
    vehicle.restart_gateway("--fault", "deploy:GW:31#1+:nrc=0x31")
    vehicle.send(vehicle.campaign("c-received", "2.3.1"))
    done = vehicle.finished("c-received", timeout=90)
    assert (done["outcome"], done["failure"]["stage"], done["failure"]["reason"]) == (
        "failed", "received", "retries_exhausted"), done
    assert vehicle.cloud.collector.wait_for(lambda c: "c-received" in c.verdicts, 10)
    verdict = vehicle.cloud.collector.verdicts["c-received"]
    (first, *_) = verdict["findings"]
    assert (verdict["stage"], verdict["abnormal_packages"], verdict["side"], verdict["unit"]) == (
        "link", ["received"], "server", "GW"), verdict
    assert (first["nrc"], first["step"], first["request"]) == (0x31, "collect inventory", "31010302"), first

    # the fleet's view: this vehicle's store copied as twelve more vehicles, diagnosed in a process
    # pool; every failed campaign of every vehicle is one row, as the collector diagnosed it
    import shutil

    store = vehicle.tmp / "cloud" / "store"
    assert vehicle.cloud.collector.wait_for(lambda c: any(  # the campaign's last report: what the driver was told
        m["body"].get("event") == "hmi" and m["body"].get("state") == "failed" for m in c.messages
        if m["body"].get("campaign_id") == "c-received"), 30)
    for i in range(12):  # a report being stored meanwhile (its claim file) is not the vehicle's
        shutil.copytree(store / VIN, store / f"LVOTAFLEET{i:07d}", ignore=shutil.ignore_patterns(".claim-*"))
    out = vehicle.tmp / "fleet"
    run = vota("fleet", "diagnose", str(store), "--out", str(out), "--workers", "2")
    assert run.returncode == 0 and "13 vehicles" in run.stdout, run.stdout + run.stderr
    rows = [json.loads(line) for line in (out / "findings.jsonl").read_text().splitlines()]
    expected = {cid: (v["cause"], v["findings"][0]["nrc"], v["stage"]) for cid, v in vehicle.cloud.collector.verdicts.items()}
    assert len(rows) == 13 * len(expected) and len({r["vin"] for r in rows}) == 13
    assert all((r["cause"], r["nrc"], r["stage"]) == expected[r["campaign_id"]] for r in rows), rows[:3]
    summary = (out / "summary.md").read_text()
    assert "| link: GW (server) | " + str(len(rows)) + " | 100.0 % |" in summary, summary
    # incremental: only the new vehicle is diagnosed
    shutil.copytree(store / VIN, store / "LVOTAFLEETNEW0001", ignore=shutil.ignore_patterns(".claim-*"))
    run = vota("fleet", "diagnose", str(store), "--out", str(out))
    assert f"{len(expected)} new failed campaigns diagnosed ({14 * len(expected)} failed of " in run.stdout, run.stdout


def test_a_campaign_refused_for_an_unknown_version_is_explained_by_the_inventory_trace(tmp_path, mosquitto,
                                                                                        write_config, procs):
    """bms answers no identification read: its version is unknown, so the campaign is refused
    before anything is downloaded; the gateway's inventory trace of bms, fetched by the TBOX,
    names bms's silence as the cause."""
    from tests.vehicle import Vehicle

    vehicle = Vehicle(tmp_path, mosquitto, write_config, procs, ecu_faults=("bms:22:drop",))
    try:
        vehicle.send(vehicle.campaign("c-unknown", "2.4.0"))
        done = vehicle.finished("c-unknown", timeout=60)
        assert (done["outcome"], done["failure"]["reason"]) == ("failed", "unknown_version"), done
        assert vehicle.cloud.collector.wait_for(lambda c: "c-unknown" in c.verdicts, 10)
        verdict = vehicle.cloud.collector.verdicts["c-unknown"]
        (first, *_) = verdict["findings"]
        assert (verdict["stage"], verdict["abnormal_packages"], verdict["cause"], verdict["side"], verdict["unit"]) == (
            "link", ["inventory-bms"], "response_not_sent", "server", "bms"), verdict
        assert (first["request"], first["step"]) == ("22f187", "inventory"), first
        (link,) = (tmp_path / "tbox" / "campaigns").glob("*/link")
        assert sorted(p.name for p in link.glob("inventory-*")) == ["inventory-bms.link.result.json",
                                                                    "inventory-bms.link.trace.jsonl"]
        good = tmp_path / "gw" / "results" / "inventory" / "vcu.link.result.json"
        assert json.loads(good.read_text())["result"] == "success"  # every ECU's reads are traced, kept on the gateway
    finally:
        vehicle.close()
