"""Install through the gateway: the TBOX deploys packages and a manifest, starts the
install, the gateway flashes the ECUs and hands back results, traces and the inventory."""

from __future__ import annotations

import hashlib
import json
import os
import time

from agent.canbus import Segment
from agent.config import load_vehicle_config
from agent.trace import parse_trace
from tbox.deploy import PackageDeployer
from tbox.gateway_client import GatewayClient, GatewayError, InstallStatus
from tests.conftest import Proc, ecu_entry, multicast_bus


def _ready(proc: Proc, word: str) -> None:
    deadline = time.monotonic() + 20
    while word not in proc.text():
        assert proc.p.poll() is None and time.monotonic() < deadline, proc.text()
        time.sleep(0.05)


def test_install_flashes_and_results_come_back(tmp_path, write_config, procs):
    path = write_config({
        "segments": {"bb": {"bus": multicast_bus()}, "pt": {"bus": multicast_bus()}},
        "deploy": {"segment": "bb", "package_dir": str(tmp_path / "gw" / "packages")},
        "gateway": {"results_dir": str(tmp_path / "gw" / "results")},
        "ecus": {"vcu": ecu_entry("vcu", 0x7E0, 0x7E8, "pt"), "bms": ecu_entry("bms", 0x7E1, 0x7E9, "pt")},
    })
    procs.append(Proc("ecu-sim", "-c", str(path), "--state-dir", str(tmp_path / "ecu"), log=tmp_path / "ecu.log"))
    procs.append(Proc("gateway", "-c", str(path), log=tmp_path / "gw.log"))
    _ready(procs[0], "ecu-sim ready")
    _ready(procs[1], "gateway ready")
    config = load_vehicle_config(path)
    link = config.deploy_link()
    images = {"vcu": os.urandom(100_000), "bms": os.urandom(70_000)}
    with Segment(config.segments["bb"]) as segment:
        gw = GatewayClient(segment, link)
        for ecu, data in images.items():
            (tmp_path / f"{ecu}-2.0.bin").write_bytes(data)
            r = PackageDeployer(segment, link, f"{ecu}-2.0.bin", tmp_path / f"{ecu}-2.0.bin",
                                hashlib.sha256(data).hexdigest()).run()
            assert r.result == "success", r
        manifest = {"format": "vota-install", "version": 1, "campaign_id": "c-7",
                    "jobs": [{"ecu": e, "package": f"{e}-2.0.bin", "version": "2.0"} for e in images]}
        (tmp_path / "install-c-7.json").write_bytes(json.dumps(manifest).encode())
        r = PackageDeployer(segment, link, "install-c-7.json", tmp_path / "install-c-7.json",
                            hashlib.sha256(json.dumps(manifest).encode()).hexdigest()).run()
        assert r.result == "success"
        assert gw.install_status("c-7")[0] == InstallStatus.NONE
        gw.start_install("install-c-7.json")
        assert gw.wait_install("c-7", timeout=120) == InstallStatus.SUCCEEDED
        assert gw.install_status("c-7") == (InstallStatus.SUCCEEDED, 2, 2)
        summary = json.loads(gw.read_file("c-7/summary.json"))
        assert [(r["ecu"], r["result"], r["version_after"]) for r in summary["results"]] == [
            ("vcu", "success", "2.0"), ("bms", "success", "2.0")]
        trace = parse_trace(gw.read_file("c-7/vcu.trace.jsonl").decode())
        assert trace.header.server == "vcu" and trace.trailer["result"] == "success"
        inventory = {e["ecu"]: e["software_version"] for e in gw.inventory()}
        assert inventory == {"vcu": "2.0", "bms": "2.0"}
        try:
            gw.read_file("../secrets")
            raise AssertionError("a path outside the results was served")
        except GatewayError as exc:
            assert "0x31" in str(exc)
        try:
            gw.start_install("missing.json")
            raise AssertionError("a missing manifest started an install")
        except GatewayError as exc:
            assert "0x31" in str(exc)
