"""The project as a user installs it: a wheel (not editable) in a fresh virtual environment."""

from __future__ import annotations

import json
import shutil
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


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """vota's wheel, built from this checkout once for the module (offline: no build isolation)."""
    wheels = tmp_path_factory.mktemp("wheels")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                            str(ROOT)], capture_output=True, text=True, timeout=300, cwd=wheels)
    assert build.returncode == 0, build.stderr
    return next(wheels.glob("vota-*.whl"))


def _deps(site_packages: Path) -> None:
    """vota's dependencies, from the test environment's site-packages, as a plain path: its .pth
    files (the editable install of this checkout among them) are not processed."""
    here = next(p for p in sys.path if p.endswith("site-packages") and Path(p, "udsoncan").is_dir())
    (site_packages / "deps.pth").write_text(here + "\n")


def _venv_with(wheel: Path, env: Path) -> Path:
    """A fresh virtual environment with the wheel (and the test environment's dependencies)."""
    venv.EnvBuilder(with_pip=False).create(env)
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(env / "bin" / "python"), "install", "-q",
                              "--no-deps", str(wheel)], capture_output=True, text=True, timeout=300, cwd=env)
    assert install.returncode == 0, install.stderr
    _deps(_site_packages(env))
    return env


def test_a_wheel_install_diagnoses_a_recorded_failed_run(tmp_path: Path, wheel: Path) -> None:
    assert "agent/core/diagnosis/rules.yaml" in zipfile.ZipFile(wheel).namelist()
    env = _venv_with(wheel, tmp_path / "venv")
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


def test_from_a_wheel_a_new_user_starts_a_bench_outside_the_checkout(tmp_path: Path, wheel: Path) -> None:
    """Installed from the wheel, away from this checkout: the examples come with it; ``vota init``
    writes a starter vehicle with its keys, the ECU simulator starts on it, the bench runs a
    campaign to success, and the diagnosis reads what it left."""
    names = zipfile.ZipFile(wheel).namelist()
    for shipped in ("bench.yaml", "vcan.yaml", "mosquitto/vota.acl", "systemd/vota-gateway.service",
                    "systemd/sysusers.d/vota.conf", "content/may20.yaml"):
        assert f"vota-0.1.0.data/data/share/vota/configs/{shipped}" in names, shipped
    env = _venv_with(wheel, tmp_path / "venv")
    vota_bin = str(env / "bin" / "vota")
    work = tmp_path / "work"
    work.mkdir()

    def run(*args: str, cwd: Path = work, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([vota_bin, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)

    missing = run("ecu-sim")  # no configs/ here: the installed example is read, its keys are not there yet
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1, missing.stderr
    assert "keys/image-vcu.pub" in missing.stderr, missing.stderr
    started = run("init", "starter")
    assert started.returncode == 0, started.stderr
    starter = work / "starter"
    assert (starter / "vehicle.yaml").is_file() and (starter / "keys" / "image-vcu.pub").is_file()
    assert (starter / "keys" / "vehicle.key").stat().st_mode & 0o077 == 0  # private keys: owner only
    assert (starter / "examples" / "systemd" / "vota-tbox.service").is_file()
    assert run("init", "starter").returncode == 2  # nothing written over
    sim = subprocess.Popen([vota_bin, "ecu-sim", "-c", "vehicle.yaml"], cwd=starter, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        assert sim.stdout is not None and "ecu-sim ready" in sim.stdout.readline()
    finally:
        sim.terminate()
        sim.wait(10)
    bench = run("bench", "-c", "vehicle.yaml", "--out", "run", "--image-size", "16K", cwd=starter, timeout=300)
    assert bench.returncode == 0, bench.stdout[-2000:] + bench.stderr[-2000:]
    assert json.loads((starter / "run" / "report.json").read_text())["outcome"] == "success"
    diagnosed = run("diagnose", "run", cwd=starter)
    assert diagnosed.returncode == 0 and "No abnormal package" in diagnosed.stdout, diagnosed.stdout + diagnosed.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed on this machine")
def test_make_install_stages_a_root_whose_units_verify_unchanged(tmp_path: Path, wheel: Path) -> None:
    """`make install DESTDIR=...` from the wheel: the venv where the units expect it (its scripts
    naming /opt/vota, not the staging directory), the units, their user and directories, the
    example configuration; systemd-analyze verifies the units inside that root as shipped."""
    root = tmp_path / "root"
    units = root / "usr" / "lib" / "systemd" / "system"
    shutil.copytree("/usr/lib/systemd/system", units, symlinks=True)  # the image's systemd
    run = subprocess.run(["make", "-s", "install", f"DESTDIR={root}", f"SOURCE={wheel}", "PIP_ARGS=--no-deps",
                          f"PYTHON={sys.executable}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    venv_dir = root / "opt" / "vota" / ".venv"
    assert (venv_dir / "bin" / "vota").read_text().splitlines()[0] == "#!/opt/vota/.venv/bin/python"
    assert str(root) not in (venv_dir / "pyvenv.cfg").read_text()
    for unit in ("vota-gateway.service", "vota-tbox.service"):
        assert (units / unit).read_text() == (Path(ROOT) / "configs" / "systemd" / unit).read_text()  # unchanged
        verify = subprocess.run(["systemd-analyze", "verify", f"--root={root}", unit], capture_output=True, text=True,
                                timeout=60)
        assert verify.returncode == 0 and not (verify.stdout + verify.stderr).strip(), verify.stdout + verify.stderr
    for path in ("usr/lib/sysusers.d/vota.conf", "usr/lib/tmpfiles.d/vota.conf", "etc/vota/vehicle.yaml.example",
                 "etc/vota/vota.env", "etc/mosquitto/vota.acl.example"):
        assert (root / path).is_file(), path
    _deps(_site_packages(venv_dir))
    version = subprocess.run([str(venv_dir / "bin" / "python"), "-m", "vota", "--version"], capture_output=True, text=True,
                             timeout=60, cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("vota 0.1.0"), version.stdout + version.stderr
    (venv_dir / "bin" / "vota").unlink()  # the check is real: a unit whose program is missing fails
    verify = subprocess.run(["systemd-analyze", "verify", f"--root={root}", "vota-tbox.service"], capture_output=True,
                            text=True, timeout=60)
    assert verify.returncode != 0 and "/opt/vota/.venv/bin/vota" in verify.stderr, verify.stderr
