"""The project as a user installs it: a wheel (not editable) in a fresh virtual environment."""

from __future__ import annotations

import json
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

FLASH_HEAD = {"format": "vota-trace", "version": 1, "stage": "flash", "client": "GW", "server": "bms", "packet": "bms",
              "request_id": 0x7E1, "response_id": 0x7E9, "functional_id": 0x7DF, "started": 0.0}
FAILED_FLASH = [
    [0, "1003", 2, 1, "5003003201f4"], [2, "8502", 2, 1, "c502"], [4, "280301", 3, 1, "6803"],
    [6, "1002", 2, 1, "5002003201f4"], [8, "2701", 2, 1, "670112345678"], [10, "2702", 6, 1, "6702"],
    [12, "2ef15a", 12, 1, "6ef15a"], [14, "3101ff00", 13, 500, "7101ff0000", {"pend": [3]}],
    [520, "3400440800000000003000", 11, 2, "74200fff"],
    [530, "3601", 4095, 30, "7601"], [570, "3602", 4095, 1, "7f3672"],
]


def _site_packages(env: Path) -> Path:
    return next((env / "lib").glob("python3*/site-packages"))


def test_a_wheel_install_diagnoses_a_recorded_failed_run(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                            str(ROOT)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert build.returncode == 0, build.stderr
    wheel = next(wheels.glob("vota-*.whl"))
    assert "agent/core/diagnosis/rules.yaml" in zipfile.ZipFile(wheel).namelist()
    env = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env)
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(env / "bin" / "python"), "install", "-q",
                              "--no-deps", str(wheel)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert install.returncode == 0, install.stderr
    # vota's dependencies come from the test environment's site-packages, but only as a plain path:
    # its .pth files (the editable install of this checkout among them) are not processed.
    here = next(p for p in sys.path if p.endswith("site-packages") and Path(p, "udsoncan").is_dir())
    (_site_packages(env) / "deps.pth").write_text(here + "\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "bms.result.json").write_text(json.dumps({"schema": "vota-flash-result/1", "ecu": "bms", "result": "failed",
                                                         "failed_step": "transfer_data", "trace_file": "bms.trace.jsonl"}))
    rows = [FLASH_HEAD, *FAILED_FLASH, {"end": True, "exchanges": len(FAILED_FLASH), "result": "failed"}]
    (run_dir / "bms.trace.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    where = subprocess.run([str(env / "bin" / "python"), "-c", "import agent; print(agent.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert str(_site_packages(env)) in where.stdout, where.stdout + where.stderr  # the wheel, not this checkout
    run = subprocess.run([str(env / "bin" / "vota"), "diagnose", str(run_dir), "--json", "-"], capture_output=True,
                         text=True, timeout=60, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    verdict = json.loads(run.stdout)
    assert (verdict["cause"], verdict["side"], verdict["unit"]) == ("negative_response", "server", "bms")
    assert verdict["findings"][0]["request"] == "3602" and verdict["findings"][0]["nrc"] == 0x72


def test_plain_pytest_collects_the_whole_suite() -> None:
    """The command every Python developer types first: ``pytest``, not ``python -m pytest``
    (which also puts the working directory on sys.path)."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([str(Path(sys.executable).parent / "pytest"), "--collect-only", "-q", "-p", "no:cacheprovider"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "ERROR" not in run.stdout and " collected" in run.stdout
