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
