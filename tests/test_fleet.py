"""Fleet failure analytics on a fleet made from real campaigns: one simulated vehicle runs five
campaigns with what a fleet meets (a clean install, one that waits for its preconditions and
then installs, one whose window closes, a flash the gateway gets wrong, a deploy the gateway
refuses); a synthetic fleet of those campaigns is diagnosed by ``vota fleet diagnose`` in a
process pool, on a Dask LocalCluster started here and on one it starts itself; the tables,
the summary and the chart page must count exactly what was injected."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
from cryptography.hazmat.primitives import serialization

from agent.adapters.storage import atomic_write_json
from cloud_sim.fleet_synth import make_fleet
from tests.conftest import vota
from tests.vehicle import VIN, Vehicle

pytestmark = pytest.mark.slow  # separate processes

PARKED = {"soc": 80, "power_mode": "off", "gear": "P", "speed_kmh": 0, "battery_mv": 12600, "charging": "no"}
WEIGHTS = {"ok": 5, "waited": 2, "window": 1, "flash": 2, "deploy": 1}


def _signals(v: Vehicle, **values: object) -> None:
    atomic_write_json(v.ecu_state("bcm") / "signals.json", {**PARKED, **values})


def _unmet_reported(v: Vehicle, cid: str) -> bool:
    return v.cloud.collector.wait_for(lambda c: any(
        m["body"].get("event") == "preconditions" and m["body"].get("campaign_id") == cid and m["body"].get("met") is False
        for m in c.messages), 60)


def _campaigns(v: Vehicle) -> dict[str, dict]:
    """Runs the five template campaigns; their verdicts by template name."""
    small = 16 * 1024
    _signals(v)
    v.send(v.campaign("c-ok", "2.0.0", packages=v.packages("2.0.0", small)))
    assert v.finished("c-ok")["outcome"] == "success"
    _signals(v, soc=12)
    v.send(v.campaign("c-waited", "2.1.0", packages=v.packages("2.1.0", small)))
    assert _unmet_reported(v, "c-waited")
    _signals(v)
    assert v.finished("c-waited")["outcome"] == "success"
    _signals(v, power_mode="run", speed_kmh=30)
    v.send(v.campaign("c-window", "2.2.0", packages=v.packages("2.2.0", small), preconditions={"window_s": 2}))
    assert v.finished("c-window")["failure"]["reason"] == "preconditions"
    _signals(v)
    v.gateway.stop()
    v.restart_gateway("--fault", "bms:36#2:bad_length")
    v.send(v.campaign("c-flash", "2.3.0", packages=v.packages("2.3.0", small)))
    assert v.finished("c-flash")["failure"]["reason"] == "flash_failed"
    v.gateway.stop()
    v.restart_gateway("--fault", "deploy:GW:36#2+:nrc=0x72")
    v.send(v.campaign("c-deploy", "2.4.0", packages=v.packages("2.4.0", small)))
    assert v.finished("c-deploy", timeout=90)["outcome"] == "failed"
    verdicts = {}
    for name in ("window", "flash", "deploy"):
        assert v.cloud.collector.wait_for(lambda c, n=name: f"c-{n}" in c.verdicts, 15)
        verdicts[name] = v.cloud.collector.verdicts[f"c-{name}"]
    return verdicts


@contextlib.contextmanager
def _dask_cluster(tmp_path: Path) -> Iterator[str]:
    """``dask scheduler`` and ``dask worker`` (two processes) on loopback; the scheduler's address."""
    dask = str(Path(sys.executable).parent / "dask")
    info = tmp_path / "scheduler.json"
    started = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                                 "--scheduler-file", str(info)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)]
    try:
        deadline = time.monotonic() + 60
        while not info.exists() or not info.read_text().strip():
            assert time.monotonic() < deadline and started[0].poll() is None, "dask scheduler did not start"
            time.sleep(0.1)
        address = json.loads(info.read_text())["address"]
        started.append(subprocess.Popen([dask, "worker", address, "--nworkers", "2", "--nthreads", "1", "--host", "127.0.0.1",
                                         "--no-dashboard"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True))
        from dask.distributed import Client

        with Client(address, timeout=30) as client:
            client.wait_for_workers(2, timeout=60)
        yield address
    finally:
        for proc in reversed(started):
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _rows(path: Path) -> list[dict]:
    return sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda r: (r["vin"], r["campaign_id"]))


def test_a_fleet_s_failures_are_counted_by_cause_ecu_and_campaign_on_every_core_and_on_dask(
        tmp_path, mosquitto, write_config, procs):
    import duckdb

    v = Vehicle(tmp_path, mosquitto, write_config, procs, tbox_extra={
        "max_retries": 2, "cancel_timeout_s": 2,
        "preconditions": {"ecu": "bcm", "min_soc": 30, "soc_per_minute": 1.0, "recheck_s": 0.3, "window_s": 120}})
    try:
        verdicts = _campaigns(v)
        # a campaign waiting now is in the waiting table, not among the finished ones
        v.gateway.stop()
        v.restart_gateway()
        _signals(v, soc=10)
        v.send(v.campaign("c-pending", "2.5.0", packages=v.packages("2.5.0", 16 * 1024)))
        assert _unmet_reported(v, "c-pending")
        # the vehicle's own record of the same campaigns: the signed update log verifies offline
        pub = tmp_path / "report.pub"
        pub.write_bytes(v.report_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                               serialization.PublicFormat.SubjectPublicKeyInfo))
        run = vota("log", "verify", str(tmp_path / "tbox" / "update-log.jsonl"), "--key", str(pub), "--json")
        assert run.returncode == 0, run.stdout + run.stderr
        logged = json.loads(run.stdout)
        assert {"c-ok", "c-waited", "c-window", "c-flash", "c-deploy", "c-pending"} <= set(logged["campaigns"]), logged
        own = tmp_path / "own"
        run = vota("fleet", "diagnose", str(tmp_path / "cloud"), "--out", str(own), "--workers", "1")
        assert run.returncode == 0 and "1 vehicles, 3 new failed campaigns" in run.stdout, run.stdout + run.stderr
        (pending,) = _rows(own / "waiting.jsonl")
        assert (pending["campaign_id"], pending["outcome"], pending["deferred_by"]) == ("c-pending", "waiting", "soc")
    finally:
        v.close()
    window = verdicts["window"]  # no fault: the vehicle was driven until the window closed
    assert (window["cause"], window["side"], window["unit"], window["stage"]) == (
        "preconditions_not_met", "vehicle", "ignition_off,speed_zero", "awaiting_install"), window
    assert window["vehicle_state"]["values"]["speed_kmh"] == 30 and window["unexplained"] is None, window
    flash, deploy = verdicts["flash"]["findings"][0], verdicts["deploy"]["findings"][0]
    assert (flash["cause"], flash["side"], flash["package"]) == ("illegal_request_length", "client", "bms"), flash
    assert (deploy["stage"], deploy["cause"], deploy["side"], deploy["nrc"]) == ("deploy", "negative_response", "server",
                                                                                  0x72), deploy

    store = tmp_path / "fleet-store"
    vehicle = tmp_path / "cloud" / "store" / VIN
    manifest = make_fleet({name: (vehicle, f"c-{name}") for name in WEIGHTS}, WEIGHTS, store, 90, ["2027-01", "2027-02"])
    drawn = collections.Counter(m["template"] for m in manifest["vehicles"].values())
    assert all(drawn[name] for name in WEIGHTS), drawn
    out = tmp_path / "fleet"
    run = vota("fleet", "diagnose", str(store), "--out", str(out), "--workers", "2")
    failed = drawn["window"] + drawn["flash"] + drawn["deploy"]
    assert run.returncode == 0, run.stderr
    assert f"90 vehicles, {failed} new failed campaigns diagnosed ({failed} failed of 90 finished, 0 waiting)" in run.stdout

    # the table, by what was injected into each vehicle's campaign
    expected = collections.Counter()
    for m in manifest["vehicles"].values():
        if m["template"] in verdicts:
            verdict = verdicts[m["template"]]
            nrc = verdict["findings"][0]["nrc"] if verdict["findings"] else None
            expected[(m["template"], m["campaign"], verdict["cause"], verdict["unit"], nrc)] += 1
    rows = _rows(out / "findings.jsonl")
    found = collections.Counter((manifest["vehicles"][r["vin"]]["template"], r["campaign_id"], r["cause"], r["unit"],
                                 r["nrc"]) for r in rows)
    assert found == expected, (found, expected)
    by_cause = duckdb.sql(f"select cause, unit, count(*) from '{out}/findings.parquet' group by all").fetchall()
    per_unit = collections.Counter()
    for (_, _, cause, unit, _), n in expected.items():
        per_unit[(cause, unit)] += n
    assert {(c, u): n for c, u, n in by_cause} == dict(per_unit), by_cause
    (bms,) = [r for r in rows if r["package"] == "bms"][:1]
    assert (bms["part_number"], bms["software_before"], bms["stage"]) == ("BMS-1", "2.1.0", "flash"), bms
    deferred = duckdb.sql(f"select outcome, count(*) from '{out}/campaigns.parquet' where deferrals > 0 "
                          "group by all order by outcome").fetchall()
    assert deferred == [("failed", drawn["window"]), ("success", drawn["waited"])], deferred

    # the summary and the chart page
    summary = (out / "summary.md").read_text()
    assert f"- {failed} failed ({100.0 * failed / 90:.1f} %)" in summary, summary
    assert (f"- {drawn['waited'] + drawn['window']} waited for their preconditions first (deferrals, not failures): "
            f"{drawn['waited']} installed afterwards, {drawn['window']} failed because their window closed; 0 waiting now"
            ) in summary, summary
    assert f"| flash: bms | {drawn['flash']} |" in summary and f"| flash: GW (client) | {drawn['flash']} |" in summary, summary
    assert f"| 0x72 GeneralProgrammingFailure | {drawn['deploy']} |" in summary, summary
    page = (out / "summary.html").read_text()
    assert page.count("<svg") == 2 and "flash: bms" in page and "illegal_request_length" in page, page[:2000]

    # every query the documentation shows runs on this output
    queries = re.findall(r"```sql\n(.*?)```", (Path(__file__).parent.parent / "docs" / "diagnosis.md").read_text(), re.S)
    assert len(queries) >= 3
    for query in queries:
        duckdb.sql(query.replace("fleet/", f"{out}/")).fetchall()

    # the same table on Dask: a scheduler and two workers started as separate processes with Dask's
    # own command, and the LocalCluster of worker processes the command starts itself
    with _dask_cluster(tmp_path) as address:
        run = vota("fleet", "diagnose", str(store), "--out", str(tmp_path / "dask"), "--dask", address)
        assert run.returncode == 0 and "on 2 Dask workers" in run.stdout, run.stdout + run.stderr
    run = vota("fleet", "diagnose", str(store), "--out", str(tmp_path / "local"), "--dask", "local", "--workers", "2")
    assert run.returncode == 0, run.stderr
    for other in ("dask", "local"):
        assert _rows(tmp_path / other / "findings.jsonl") == rows
        assert _rows(tmp_path / other / "campaigns.jsonl") == _rows(out / "campaigns.jsonl")
