"""Flashing an ECU the project did not write (issue: flash profiles): PyPI's python-uds-server
as a bootloader of another dialect (tests/foreign_ecu.py), described to the gateway by a flash
profile and a seed/key plug-in installed as a package (tests/plugins/acme-seedkey), with no
change to the project's code or to that server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from agent.core.trace import parse_trace
from tests.conftest import ROOT, firmware_like, multicast_bus, vota

pytest.importorskip("uds_server", reason="python-uds-server is installed by make test (setup.cfg, extra test)")

MASK = 0x5A3C9617

ACME_PROFILE: dict[str, Any] = {
    "seed_key": {"plugin": "acme-xor"},
    "check": "crc16",
    "tester_id": "0x0A0B",
    "version": {"did": 0xF189, "length": 16},
    "compression_fallback": [0x31, 0x13],  # this server answers 0x13 to a dataFormatIdentifier it does not know
    "steps": {
        "pre": [
            {"name": "extended_session", "service": 0x10, "sub": 0x03},
            {"name": "check_preconditions", "routine": 0x0203},
            {"name": "dtc_off", "service": 0x85, "sub": 0x02, "optional": True},  # no ControlDTCSetting here: 0x11
            {"name": "comm_off", "service": 0x28, "sub": 0x03, "record": ["0x01"], "functional": True, "suppress": True},
            {"name": "programming_session", "service": 0x10, "sub": 0x02},
            {"name": "unlock", "security": 0x11},
            {"name": "fingerprint", "service": 0x2E, "did": 0xF184,
             "record": ["tester_id", "date", {"field": "version", "length": 16, "pad": " "}]},
        ],
        "block": [
            {"name": "erase_block", "routine": 0xFF00, "record": ["block"]},
            {"name": "download", "download": True},
            {"name": "check_block", "routine": 0x0202, "record": ["block", "check"]},
        ],
        "post": [
            {"name": "check_dependencies", "routine": 0xFF01},
            {"name": "reset", "reset": True},
        ],
    },
}


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The seed/key plug-in installed the way an integrator installs it: pip, from its package."""
    import shutil

    target, source = tmp_path_factory.mktemp("site"), tmp_path_factory.mktemp("src") / "acme-seedkey"
    shutil.copytree(ROOT / "tests" / "plugins" / "acme-seedkey", source)  # the build leaves its files beside the source
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(target), str(source)], check=True, timeout=300)
    return str(target)


def _env(plugin_path: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([plugin_path, str(ROOT)])}


def acme_config(tmp: Path, **profile_changes: Any) -> dict[str, Any]:
    profile = {**ACME_PROFILE, **profile_changes}
    return {
        "segments": {"pt": {"bus": multicast_bus()}},
        "gateway": {"results_dir": str(tmp / "results"), "reset_wait_ms": 3000},
        "flash_profiles": {"acme-boot": profile},
        "ecus": {"acme": {
            "segment": "pt", "request_id": 0x7A0, "response_id": 0x7A8, "profile": "acme-boot",
            "seed_key_params": {"mask": MASK}, "compression": {"zlib": 1},
            "memory": {"blocks": [{"address": 0x10000, "size": 0x8000, "number": 1},
                                  {"address": 0x20000, "size": 0x4000, "number": 2}]},
            "sim": {"software_version": "1.0.0"},
        }},
    }


@pytest.fixture
def acme(tmp_path: Path, write_config: Any, plugin_path: str) -> Iterator[Path]:
    config = write_config(acme_config(tmp_path))
    log = open(tmp_path / "acme.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "tests.foreign_ecu", str(config), "acme"], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, env=_env(plugin_path))
    try:
        for _ in range(200):
            if b"ready" in (tmp_path / "acme.log").read_bytes() or proc.poll() is not None:
                break
            import time

            time.sleep(0.05)
        assert proc.poll() is None, (tmp_path / "acme.log").read_text()
        yield config
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


@pytest.mark.slow
def test_vota_flash_programs_a_foreign_bootloader_with_a_profile_and_a_plugin(acme: Path, tmp_path: Path,
                                                                               plugin_path: str) -> None:
    image = tmp_path / "app.bin"
    image.write_bytes(firmware_like(20_000))
    env = _env(plugin_path)
    before = vota("versions", "-c", str(acme), "--json", env=env)
    assert before.returncode == 0, before.stderr
    assert json.loads(before.stdout)[0]["software_version"] == "1.0.0"  # F189 is "1.0.0" and 11 spaces

    out = tmp_path / "run"
    done = vota("flash", "-c", str(acme), "--out", str(out), "--json", "--no-progress", f"acme={image}@2.1.0", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)[0]
    assert (result["result"], result["profile"], result["version_after"]) == ("success", "acme-boot", "2.1.0")
    assert result["compression_refused"] == ["zlib"]  # 0x13 to the compressed download: sent as it is
    assert result["blocks"] == [{"number": 1, "address": 0x10000, "size": 20_000, "bytes_transferred": 20_000,
                                 "compression": None}]

    trace = parse_trace((out / result["trace_file"]).read_text())
    steps = [x.extra.get("step") for x in trace.exchanges]
    assert "unlock" in steps and "erase_block" in steps and "check_block" in steps
    headers = {x.extra.get("step"): x.header.hex() for x in trace.exchanges}  # header-only: the record is not kept
    assert headers["check_preconditions"] == "31010203" and headers["erase_block"] == "3101ff00"
    comm = next(x for x in trace.exchanges if x.extra.get("step") == "comm_off")
    assert comm.header.hex() == "288301" and comm.extra.get("functional") and comm.response is None
    dtc = next(x for x in trace.exchanges if x.extra.get("step") == "dtc_off")
    assert dtc.response is not None and dtc.response.hex() == "7f8511" and dtc.extra.get("tolerated")

    after = vota("versions", "-c", str(acme), "--json", env=env)
    assert json.loads(after.stdout)[0]["software_version"] == "2.1.0"
    # judged by the profile's sequence (the trace header carries it), every check, nothing found
    diagnosis = vota("diagnose", "--mode", "all", "--json", "-", str(out), env=env)
    verdict = json.loads(diagnosis.stdout[diagnosis.stdout.index("{"):])
    assert (verdict["findings"], verdict["unanalysed"], verdict["abnormal_packages"]) == ([], [], [])


@pytest.mark.slow
def test_a_wrong_key_is_diagnosed_at_the_foreign_ecu(tmp_path: Path, acme: Path, plugin_path: str) -> None:
    import yaml

    data = yaml.safe_load(acme.read_text())
    data["ecus"]["acme"]["seed_key_params"]["mask"] = MASK ^ 1
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(yaml.safe_dump(data))
    image = tmp_path / "app.bin"
    image.write_bytes(firmware_like(4000))
    out = tmp_path / "run"
    done = vota("flash", "-c", str(wrong), "--out", str(out), "--json", "--no-progress", f"acme={image}@2.1.0",
                env=_env(plugin_path))
    assert done.returncode == 3, done.stdout + done.stderr
    result = json.loads(done.stdout)[0]
    assert (result["failed_step"], result["nrc"]) == ("unlock", 0x35)
    diagnosis = vota("diagnose", str(out), env=_env(plugin_path))
    assert "`negative_response` 0x35 InvalidKey" in diagnosis.stdout
    assert "server side at fault: acme" in diagnosis.stdout and "step `unlock`" in diagnosis.stdout


def test_a_profile_naming_a_plugin_not_installed_is_refused_at_start(tmp_path: Path, write_config: Any) -> None:
    config = write_config(acme_config(tmp_path, seed_key={"plugin": "acme-xor"}))
    done = vota("flash", "-c", str(config), "acme=x.bin")  # the plug-in is not on this process's path
    assert done.returncode == 2
    assert "flash_profiles.acme-boot.seed_key" in done.stderr and "acme-xor" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("change, key", [
    ({"steps": {"pre": [{"name": "x", "service": 0x2E, "did": 1, "record": ["serial_number"]}],
                "block": [{"name": "d", "download": True}]}}, "flash_profiles.acme-boot.steps.pre[0].record[0]"),
    ({"steps": {"block": [{"name": "erase", "routine": 1}]}}, "flash_profiles.acme-boot.steps.block"),
    ({"steps": {"block": [{"name": "d", "download": True}], "pre": [{"name": "d", "service": 0x10, "sub": 3}]}},
     "flash_profiles.acme-boot.steps.block[0].name"),
    ({"steps": {"block": [{"name": "d", "download": True, "colour": 1}]}}, "flash_profiles.acme-boot.steps.block[0].colour"),
    ({"check": "crc99"}, "flash_profiles.acme-boot.check"),
])
def test_a_broken_profile_is_refused_with_its_key(tmp_path: Path, write_config: Any, plugin_path: str,
                                                  change: dict[str, Any], key: str) -> None:
    config = write_config(acme_config(tmp_path, **change))
    done = vota("versions", "-c", str(config), env=_env(plugin_path))
    assert done.returncode == 2, done.stdout + done.stderr
    assert key in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_an_srecord_image_goes_into_the_foreign_ecus_logical_blocks(acme: Path, tmp_path: Path, plugin_path: str) -> None:
    import bincopy

    f = bincopy.BinFile()
    f.add_binary(firmware_like(0x8000), address=0x10000)  # all of block 1
    f.add_binary(firmware_like(3000)[::-1], address=0x20100)  # inside block 2
    (tmp_path / "app.s19").write_text(f.as_srec())
    out = tmp_path / "run"
    done = vota("flash", "-c", str(acme), "--out", str(out), "--json", "--no-progress", f"acme={tmp_path / 'app.s19'}@3.0.1",
                env=_env(plugin_path))
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)[0]
    assert [(b["number"], b["address"], b["size"]) for b in result["blocks"]] == [(1, 0x10000, 0x8000), (2, 0x20100, 3000)]
    assert result["compression_refused"] == ["zlib"]  # refused once: not offered again for the second block
    trace = parse_trace((out / result["trace_file"]).read_text())
    assert [x.extra.get("step") for x in trace.exchanges].count("check_block") == 2
    assert json.loads(vota("versions", "-c", str(acme), "--json", env=_env(plugin_path)).stdout)[0]["software_version"] == "3.0.1"


@pytest.mark.slow
def test_a_whole_vehicle_campaign_flashes_the_foreign_ecu_and_containers_beside_the_simulators(
        tmp_path: Path, mosquitto: Any, write_config: Any, procs: list[Any], plugin_path: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway and the TBOX as daemons, the cloud signing a campaign for five ECUs: four
    simulated (A/B banks: staged, activated together; vcu's image an Intel HEX file, bcm's a
    VBF file, signed as delivered) and the foreign single-bank bootloader (flashed in place,
    last), configured by its profile and plug-in only."""
    import hashlib
    import time

    import yaml

    from agent.protocol.images import write_vbf
    from tests.test_image_containers import BASE, SEGMENTS, _hex
    from tests.test_vehicle_campaigns import ALL, flash_results, packages, running
    from tests.vehicle import VIN, Vehicle

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([plugin_path, str(ROOT)]))  # the daemons find the plug-in
    entry = acme_config(tmp_path)["ecus"]["acme"] | {"banks": 1}
    v = Vehicle(tmp_path, mosquitto, write_config, procs, foreign={"flash_profiles": {"acme-boot": ACME_PROFILE},
                                                                   "ecus": {"acme": entry}})
    log = open(tmp_path / "acme.log", "wb")
    acme = subprocess.Popen([sys.executable, "-m", "tests.foreign_ecu", str(v.config), "acme"], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while b"ready" not in (tmp_path / "acme.log").read_bytes():
            assert acme.poll() is None and time.monotonic() < deadline, (tmp_path / "acme.log").read_text()
            time.sleep(0.05)
        store = tmp_path / "cloud" / "packages"
        files = {ecu: (ecu, path, version) for ecu, path, version in packages(v, "2.0.0")}
        (store / "acme-2.0.0.bin").write_bytes(firmware_like(24 * 1024))
        (store / "vcu-2.0.0.hex").write_bytes(_hex(SEGMENTS))
        (store / "bcm-2.0.0.vbf").write_bytes(write_vbf(SEGMENTS[::-1], "32184521 AB"))  # blocks in any order
        files |= {"acme": ("acme", store / "acme-2.0.0.bin", "2.0.0"), "vcu": ("vcu", store / "vcu-2.0.0.hex", "2.0.0"),
                  "bcm": ("bcm", store / "bcm-2.0.0.vbf", "2.0.0")}
        v.send(v.campaign("c-acme", "2.0.0", packages=list(files.values())))
        done = v.finished("c-acme", timeout=180)
        assert done["outcome"] == "success" and done["revertible"] is False, done
        results = flash_results(v, "c-acme")
        assert (results["acme"]["result"], results["acme"]["profile"], results["acme"]["version_after"]) == \
            ("success", "acme-boot", "2.0.0")
        assert {e: results[e]["phase"] for e in ALL} == {e: "committed" for e in ALL}
        assert len(results["vcu"]["blocks"]) == len(results["bcm"]["blocks"]) == 2
        assert results["vcu"]["image_sha256"] == hashlib.sha256((store / "vcu-2.0.0.hex").read_bytes()).hexdigest()
        memory = bytearray(0x10000 + 5000)  # what the containers' segments make in the ECU's memory
        for address, data in SEGMENTS:
            memory[address - BASE : address - BASE + len(data)] = data
        now = running(v)
        assert now["vcu"] == now["bcm"] == ("2.0.0", hashlib.sha256(memory).hexdigest())
        versions = {e["ecu"]: e["software_version"] for e in json.loads(vota("versions", "-c", str(v.config), "--json").stdout)}
        assert versions == {e: "2.0.0" for e in (*ALL, "acme")}
        # its trace reached the cloud; the campaign's traces on the TBOX are judged, each by its own sequence
        assert (tmp_path / "cloud" / "store" / VIN / "traces" / "c-acme.flash.acme.jsonl").exists()
        report = vota("diagnose", "--mode", "all", "--json", "-", str(next((tmp_path / "tbox" / "campaigns").iterdir())))
        assert yaml.safe_load(report.stdout[report.stdout.index("{"):])["findings"] == [], report.stdout + report.stderr
    finally:
        acme.terminate()
        acme.wait(timeout=10)
        log.close()
        v.close()


@pytest.mark.slow
def test_the_simulator_plays_the_foreign_dialect_from_the_same_profile(tmp_path: Path, write_config: Any, procs: list[Any],
                                                                       plugin_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The acme-boot profile given to the ECU simulator: erase by logical block, CRC-16 check
    with the block number, level 0x11 checked with the plug-in, the fingerprint in F184, a
    padded F189: the gateway flashes it as it flashes the real foreign server."""
    import bincopy

    from tests.conftest import Proc

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([plugin_path, str(ROOT)]))
    config = write_config(acme_config(tmp_path))
    procs.append(Proc("ecu-sim", "-c", str(config), "--state-dir", str(tmp_path / "state"), log=tmp_path / "sim.log"))
    procs[-1].wait_ready("ecu-sim ready")
    f = bincopy.BinFile()
    f.add_binary(firmware_like(0x6000), address=0x10000)
    f.add_binary(firmware_like(2000)[::-1], address=0x20000)
    (tmp_path / "app.hex").write_text(f.as_ihex())
    out = tmp_path / "run"
    done = vota("flash", "-c", str(config), "--out", str(out), "--json", "--no-progress", f"acme={tmp_path / 'app.hex'}@4.0.0")
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)[0]
    assert [(b["number"], b["compression"]) for b in result["blocks"]] == [(1, "zlib"), (2, "zlib")]  # the simulator takes zlib
    raw = vota("versions", "-c", str(config), "--json")
    assert json.loads(raw.stdout)[0]["software_version"] == "4.0.0"
    trace = parse_trace((out / result["trace_file"]).read_text())
    verify = next(x for x in trace.exchanges if x.extra.get("step") == "verify")
    assert verify.response == b"\x62\xf1\x89" + b"4.0.0".ljust(16)  # the padded, fixed-length DID
    from ecu_sim.flash_banks import FlashBanks

    bank = FlashBanks(tmp_path / "state" / "acme", "?").active_image()
    assert bank[:0x6000] == firmware_like(0x6000) and bank[0x10000:0x10000 + 2000] == firmware_like(2000)[::-1]
