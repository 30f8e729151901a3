"""vota bench: the whole vehicle and the stand-in cloud, with the embedded MQTT broker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.adapters.config_files import load_yaml
from tests.conftest import ROOT, ecu_entry, multicast_bus, vota

pytestmark = pytest.mark.slow  # separate processes


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_bench_with_embedded_broker_reports_a_flash_fault(tmp_path, write_config):
    config = write_config({
        "segments": {"bb": {"bus": multicast_bus()}, "pt": {"bus": multicast_bus()}, "body": {"bus": multicast_bus()}},
        "deploy": {"segment": "bb", "compression": {"zlib": 1}},
        "ecus": {"vcu": ecu_entry("vcu", 0x7E0, 0x7E8, "pt"),
                 "bcm": ecu_entry("bcm", 0x740, 0x748, "body") | {"compression": {"lzma": 4}}},
        "tbox": {"vin": "LVOTABENCHTEST001", "trusted_keys": ["unused.pub"], "retry_delay_ms": 300, "diagnose": True},
    })
    out = tmp_path / "bench"
    run = vota("bench", "-c", str(config), "--out", str(out), "--image-size", "32K", "--fault", "vcu:36#2:nrc=0x72",
               "--broker", "embedded", "--image-kind", "firmware", "--capture", "--capture-format", "log", timeout=300)
    assert "(embedded amqtt, plain, no identities)" in run.stdout
    assert run.returncode == 1, run.stdout + run.stderr  # the campaign failed, as the fault demands
    report = json.loads((out / "report.json").read_text())
    assert report["outcome"] == "failed" and report["failure"]["reason"] == "flash_failed"
    flash = {f["ecu"]: f for f in report["flash"]}
    assert flash["vcu"]["result"] == "failed" and flash["vcu"]["failed_step"] == "transfer_data" and flash["vcu"]["nrc"] == 0x72
    # atomic (two packages): bcm staged fine, and was discarded with vcu's failure; nobody runs 2.0.0
    assert flash["bcm"]["result"] == "success" and flash["bcm"]["phase"] == "discarded"
    assert {e: v["software_version"] for e, v in report["final_versions"].items()} == {"vcu": "1.0.0", "bcm": "1.0.0"}
    assert "vehicle now runs: bcm 1.0.0, vcu 1.0.0" in run.stdout
    assert [d["result"] for d in report["deploy"]] == ["success", "success"]
    # firmware-like images: compressed on the deploy link for both, and to bcm (lzma), not to vcu (no method)
    assert {d["package"]: d["compression"] for d in report["deploy"]} == {"vcu-2.0.0.bin": "zlib", "bcm-2.0.0.bin": "zlib"}
    assert (flash["bcm"]["compression"], flash["vcu"]["compression"]) == ("lzma", None)
    assert flash["bcm"]["bytes_transferred"] < flash["bcm"]["image_size"] // 2 and flash["bcm"]["transfer_ratio"] < 0.5
    moved = flash["bcm"]["bytes_transferred"] // 1024
    assert f"  flash bcm: success ({moved} KiB on the bus for 32 KiB, lzma)" in run.stdout, run.stdout
    names = sorted(Path(t).name.split(".", 1)[1] for t in report["traces"])  # every trace at the cloud
    assert names == ["deploy.bcm-2.0.0.bin.jsonl", "deploy.vcu-2.0.0.bin.jsonl", "discard.bcm.jsonl", "discard.vcu.jsonl",
                     "flash.bcm.jsonl", "flash.vcu.jsonl"]
    assert "campaign bench-" in run.stdout and "flash_failed" in run.stdout
    size = (out / "cloud" / "packages" / "vcu-2.0.0.bin").stat().st_size
    packed = next(d["bytes_transferred"] for d in report["deploy"] if d["package"] == "vcu-2.0.0.bin")
    for stage, total in (("download", size), ("deploy", packed)):  # byte progress as it goes, and once complete
        assert f"  {stage} vcu-2.0.0.bin: {total} of {total} bytes (100 %)" in run.stdout, run.stdout
    assert not _processes_mentioning(str(out))  # every process the bench started is gone
    # D10: the diagnosis ran in the bench (report.json), in the cloud and in the vehicle
    d = report["diagnosis"]
    assert (d["stage"], d["cause"], d["side"], d["unit"]) == ("flash", "negative_response", "server", "vcu")
    assert d["findings"][0]["request"] == "3602" and d["findings"][0]["nrc"] == 0x72
    assert "diagnosis: negative_response 0x72 GeneralProgrammingFailure: server side (vcu)" in run.stdout
    cloud = json.loads((out / "cloud" / "store" / "LVOTABENCHTEST001" / "diagnosis" / f"{report['campaign_id']}.json").read_text())
    assert cloud["cause"] == "negative_response" and cloud["findings"][0]["packet"] == "vcu"
    vehicle = list((out / "cloud" / "store" / "LVOTABENCHTEST001" / "messages" / "results").glob("*.diagnosis.json"))
    assert len(vehicle) == 1 and json.loads(vehicle[0].read_text())["body"]["verdict"]["cause"] == "negative_response"
    # the capture (candump -L): bcm's flash, from the gateway's flash worker on the body segment, is
    # exactly the ISO-TP frames of the requests of bcm's trace (TesterPresent aside)
    import can

    from agent.adapters.trace_files import read_trace

    captures = sorted(p.name for p in (out / "capture").iterdir())
    assert captures == ["gw-bb.log", "gw-body.log", "gw-flash-body.log", "gw-flash-pt.log", "gw-pt.log"], captures
    trace = read_trace(out / "gateway" / "results" / report["campaign_id"] / "bcm.trace.jsonl")
    sent = [f for f in can.LogReader(str(out / "capture" / "gw-flash-body.log")) if not f.is_rx
            and f.arbitration_id == 0x740 and f.data[0] >> 4 in (0, 1, 2) and not (f.data[0] >> 4 == 0 and f.data[1] == 0x3E)]
    assert len(sent) == sum(1 if e.length <= 7 else 1 + -(-(e.length - 6) // 7) for e in trace.exchanges)


def test_a_second_bench_run_estimates_from_what_the_first_install_took(tmp_path, write_config):
    """The TBOX learns what each ECU's flash and the install beyond it took; the bench keeps that
    in its output directory, so a second run's estimate is built from measured figures only and,
    for the same vehicle and image sizes, comes to what the first install took (the learned
    figures rounded). ``-v`` prints the estimate's inputs."""
    config = write_config({
        "segments": {"bb": {"bus": multicast_bus()}, "pt": {"bus": multicast_bus()}, "body": {"bus": multicast_bus()}},
        "deploy": {"segment": "bb"},
        "ecus": {"vcu": ecu_entry("vcu", 0x7E0, 0x7E8, "pt"), "bms": ecu_entry("bms", 0x7E1, 0x7E9, "pt"),
                 "bcm": ecu_entry("bcm", 0x740, 0x748, "body")},
        "tbox": {"vin": "LVOTABENCHTEST002", "trusted_keys": ["unused.pub"], "retry_delay_ms": 300},
    })
    out = tmp_path / "bench"
    reports = []
    for version in ("2.0.0", "3.0.0"):
        run = vota("bench", "-c", str(config), "--out", str(out), "--image-size", "24K", "--broker", "embedded",
                   "--version", version, "-v", timeout=300)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        reports.append(json.loads((out / "report.json").read_text()))
        assert "estimate: bcm " in run.stdout and "vcu " in run.stdout, run.stdout
    first, second = reports
    assert set(first["estimate"]["rates"].values()) == {"configured"}
    assert set(second["estimate"]["rates"].values()) == {"measured"}, second["estimate"]
    assert abs(second["estimated_install_s"] - first["install_s"]) <= 0.2, (second["estimated_install_s"], first["install_s"])
    learned = json.loads((out / "tbox" / "rates.json").read_text())
    assert set(learned) == {"vcu", "bms", "bcm", "_install"} and learned["vcu"]["methods"].keys() == {"plain"}, learned


def test_bench_runs_an_owner_content_scenario(tmp_path, write_config):
    data = load_yaml(ROOT / "configs" / "bench.yaml")
    for segment in data["segments"].values():  # the sample's fixed groups are for one bench at a time: private ones here
        segment["bus"] = multicast_bus(fd=bool(segment["bus"].get("fd")))
    config = write_config(data)
    out = tmp_path / "bench"
    run = vota("bench", "-c", str(config), "--out", str(out), "--content", "configs/content/may20.yaml",
               "--content-seconds", "16", timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    # Mosquitto (make test installs it) with the shipped ACLs: the vehicle and the cloud log in,
    # and the cloud stored only reports the vehicle signed
    assert "bench: broker mqtts://127.0.0.1:" in run.stdout and "(mosquitto, configs/mosquitto: TLS, an identity per vehicle" in run.stdout
    assert "cloud packages at https://127.0.0.1:" in run.stdout  # TLS to the broker, HTTPS for packages
    assert "allow_anonymous false" in (out / "broker" / "mosquitto.conf").read_text()
    stored = list((out / "cloud" / "store" / "LVOTA000000000001" / "messages").rglob("*.json"))
    assert stored and all(json.loads(p.read_text())["signatures"] for p in stored)
    report = json.loads((out / "report.json").read_text())
    assert report["outcome"] == "success" and report["content"]["bundle"] == "downloaded"
    items = report["content"]["items"]
    assert [e["status"] for e in items["heart"]] == ["scheduled", "active", "scheduled", "expired"]
    assert [e["status"] for e in items["music"]] == ["active", "expired"]
    assert "maps" not in items  # policy never: offered, never downloaded
    assert not (out / "tbox" / "content" / "bundles" / "may20-v1" / "items" / "maps.bin").exists()
    active = next(e["at"] for e in items["heart"] if e["status"] == "active")
    assert "2026-05-20T19:00" <= active[:16] < "2026-05-20T23:00"  # inside the evening window, Shanghai time
    assert not _processes_mentioning(str(out))


@pytest.mark.parametrize("phase", ["deploy", "install"])
def test_ctrl_c_stops_the_whole_bench_within_seconds_and_leaves_a_journal(tmp_path, write_config, phase):
    """Ctrl-C (SIGINT to the terminal's process group) in the middle of a deploy or an install:
    every process is signalled at once (SIGKILL after a grace of 8 s in all), the bench exits 130
    well within 10 s, nothing it started is left, and the TBOX's campaign state is a checkpoint
    a restart resumes from."""
    import os
    import signal
    import subprocess
    import sys
    import time

    config = write_config({
        "segments": {"bb": {"bus": multicast_bus()}, "pt": {"bus": multicast_bus()}},
        "deploy": {"segment": "bb"},
        "ecus": {"vcu": ecu_entry("vcu", 0x7E0, 0x7E8, "pt"), "bms": ecu_entry("bms", 0x7E1, 0x7E9, "pt")},
        "tbox": {"vin": "LVOTABENCHTEST002", "trusted_keys": ["unused.pub"], "pipeline": False},
    })
    out = tmp_path / "bench"
    bench = subprocess.Popen([sys.executable, "-m", "vota", "bench", "-c", str(config), "--out", str(out),
                              "--image-size", "128K", "--broker", "embedded"], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        seen = []
        mark = "  deploy bms-2.0.0.bin:" if phase == "deploy" else "  tbox: installing"
        assert bench.stdout is not None
        for line in bench.stdout:
            seen.append(line)
            if line.startswith(mark):
                break
        assert any(line.startswith(mark) for line in seen), "".join(seen)
        time.sleep(0.5)
        os.killpg(bench.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        began = time.monotonic()
        rest, _ = bench.communicate(timeout=60)
        took = time.monotonic() - began
    finally:
        if bench.poll() is None:
            os.killpg(bench.pid, signal.SIGKILL)
    assert bench.returncode == 130, "".join(seen) + rest
    assert took < 10, f"{took:.1f} s"
    assert "interrupted; stopping every process" in rest
    assert not _processes_mentioning(str(out))
    (state,) = (out / "tbox" / "campaigns").glob("*/state.json")
    assert json.loads(state.read_text())["state"] in (("deploying", "installing") if phase == "deploy" else ("installing",))


def test_the_bench_over_doip_deploys_over_the_entity_and_flashes_over_can(tmp_path, write_config):
    """vota bench --doip: the bench configuration's DoIP variant (the deploy link over the
    gateway's DoIP entity on loopback) runs a whole campaign to success; the deploy traces say so."""
    from agent.core.trace import parse_trace

    config = write_config({
        "segments": {"bb": {"bus": multicast_bus()}, "pt": {"bus": multicast_bus()}, "body": {"bus": multicast_bus()}},
        "deploy": {"segment": "bb", "security_secret": "LVOTABENCHTEST003-deploy", "compression": {"zlib": 1}},
        "ecus": {"vcu": ecu_entry("vcu", 0x7E0, 0x7E8, "pt"), "bcm": ecu_entry("bcm", 0x740, 0x748, "body")},
        "tbox": {"vin": "LVOTABENCHTEST003", "trusted_keys": ["unused.pub"], "retry_delay_ms": 300},
    })
    out = tmp_path / "bench"
    run = vota("bench", "-c", str(config), "--out", str(out), "--image-size", "64K", "--broker", "embedded", "--doip",
               "--image-kind", "firmware", timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["outcome"] == "success" and report["deploy_link"].startswith("DoIP 127.0.0.1:"), report["deploy_link"]
    assert "deploy link DoIP 127.0.0.1:" in run.stdout and "(0x0E80 -> 0x1010)" in run.stdout
    assert {d["package"]: (d["result"], d["compression"]) for d in report["deploy"]} == {
        "vcu-2.0.0.bin": ("success", "zlib"), "bcm-2.0.0.bin": ("success", "zlib")}
    assert {f["ecu"]: f["result"] for f in report["flash"]} == {"vcu": "success", "bcm": "success"}
    assert {e: v["software_version"] for e, v in report["final_versions"].items()} == {"vcu": "2.0.0", "bcm": "2.0.0"}
    deploys = [Path(t) for t in report["traces"] if ".deploy." in Path(t).name]
    assert len(deploys) == 2
    for path in deploys:
        header = parse_trace(path.read_text(), str(path)).header
        assert header.extra["transport"] == "doip" and (header.request_id, header.response_id) == (0x0E80, 0x1010)
    vehicle = load_yaml(out / "vehicle.yaml")
    assert vehicle["deploy"]["transport"] == "doip" and "segment" not in vehicle["deploy"]
    assert not _processes_mentioning(str(out))
