"""Install through the gateway: the TBOX deploys packages and a manifest, starts the
install, the gateway flashes the ECUs and hands back results, traces and the inventory."""

from __future__ import annotations

import hashlib
import json
import os
import time

from agent.adapters.canbus import Segment
from agent.adapters.file_client import PackageDeployer
from agent.core.config import load_vehicle_config
from agent.core.trace import parse_trace
from agent.protocol.link import ContentOp
from tbox.gateway_client import GatewayClient, GatewayError, InstallStatus
from tests.conftest import Proc, ecu_entry, multicast_bus


def _ready(proc: Proc, word: str) -> None:
    deadline = time.monotonic() + 20
    while word not in proc.text():
        assert proc.p.poll() is None and time.monotonic() < deadline, proc.text()
        time.sleep(0.05)


def _start(tmp_path, path, procs):  # type: ignore[no-untyped-def]
    """The ECU simulators and the gateway of ``path`` as processes; the config and the deploy link."""
    procs.append(Proc("ecu-sim", "-c", str(path), "--state-dir", str(tmp_path / "ecu"), log=tmp_path / "ecu.log"))
    procs.append(Proc("gateway", "-c", str(path), log=tmp_path / "gw.log"))
    _ready(procs[0], "ecu-sim ready")
    _ready(procs[1], "gateway ready")
    config = load_vehicle_config(path)
    return config, config.deploy_link()


def test_install_flashes_and_results_come_back(tmp_path, write_config, procs):
    path = write_config({
        "segments": {"bb": {"bus": multicast_bus()}, "pt": {"bus": multicast_bus()}},
        "deploy": {"segment": "bb", "package_dir": str(tmp_path / "gw" / "packages")},
        "gateway": {"results_dir": str(tmp_path / "gw" / "results")},
        "ecus": {"vcu": ecu_entry("vcu", 0x7E0, 0x7E8, "pt"), "bms": ecu_entry("bms", 0x7E1, 0x7E9, "pt")},
    })
    config, link = _start(tmp_path, path, procs)
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


def test_content_for_an_ecu_that_is_being_flashed_waits_for_the_flash(tmp_path, write_config, procs):
    """One conversation per ECU: a content delivery that arrives during a flash of the same ECU is
    answered "try later" (status 02) and not interleaved with the flash; after it, it goes through."""
    path = write_config({
        "segments": {"bb": {"bus": multicast_bus()}, "body": {"bus": multicast_bus(), "bitrate": 500000}},
        "deploy": {"segment": "bb", "package_dir": str(tmp_path / "gw" / "packages")},
        "gateway": {"results_dir": str(tmp_path / "gw" / "results")},
        "ecus": {"bcm": ecu_entry("bcm", 0x740, 0x748, "body")},
    })
    config, link = _start(tmp_path, path, procs)
    image, material = os.urandom(96_000), os.urandom(3_000)  # ~3 s of TransferData at 500 kbit/s
    files = {"bcm-2.0.bin": image, "lamp.frames": material}
    manifest = json.dumps({"format": "vota-install", "version": 1, "campaign_id": "c-8",
                           "jobs": [{"ecu": "bcm", "package": "bcm-2.0.bin", "version": "2.0"}]}).encode()
    files["install-c-8.json"] = manifest
    with Segment(config.segments["bb"]) as segment:
        gw = GatewayClient(segment, link)
        for name, data in files.items():
            (tmp_path / name).write_bytes(data)
            assert PackageDeployer(segment, link, name, tmp_path / name, hashlib.sha256(data).hexdigest()).run().result == "success"
        gw.start_install("install-c-8.json")
        time.sleep(0.5)
        assert gw.install_status("c-8")[0] == InstallStatus.RUNNING  # bcm is being flashed now
        try:
            gw.content(ContentOp.STORE, "bcm", b"lamp.frames")
            raise AssertionError("content went to bcm in the middle of its flash")
        except GatewayError as exc:
            assert "bcm is busy (flash)" in str(exc)  # a GatewayError: try later, not a refusal
        assert gw.wait_install("c-8", timeout=120) == InstallStatus.SUCCEEDED
        summary = json.loads(gw.read_file("c-8/summary.json"))
        assert [(r["ecu"], r["result"], r["version_after"]) for r in summary["results"]] == [("bcm", "success", "2.0")]
        gw.content(ContentOp.STORE, "bcm", b"lamp.frames")  # the ECU is free again
    assert (tmp_path / "ecu" / "bcm" / "content" / "lamp.frames").read_bytes() == material
