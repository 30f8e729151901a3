"""The systemd units an administrator installs, checked by systemd's own tool: they verify
clean, their exposure score is 3 or lower, a configuration error (exit 2) is not restarted
for ever, and the user and directories they need come with them."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

UNITS = sorted((Path(ROOT) / "configs" / "systemd").glob("*.service"))
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed on this machine")


def _installed_copy(unit: Path, tmp_path: Path) -> Path:
    """The unit as installed with this checkout's vota (ExecStart must name an executable)."""
    vota = Path(sys.executable).parent / "vota"
    assert vota.exists(), "the package's console script is installed with it"
    copy = tmp_path / unit.name
    copy.write_text(unit.read_text().replace("/opt/vota/.venv/bin/vota", str(vota)))
    return copy


def test_there_are_two_units():
    assert [u.name for u in UNITS] == ["vota-gateway.service", "vota-tbox.service"]


@needs_analyze
@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_units_verify_clean_and_are_hardened(unit, tmp_path):
    copy = _installed_copy(unit, tmp_path)
    verify = subprocess.run([ANALYZE, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and not (verify.stdout + verify.stderr).strip(), verify.stdout + verify.stderr
    security = subprocess.run([ANALYZE, "security", "--offline=true", str(copy)], capture_output=True, text=True,
                              timeout=60)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", security.stdout)
    assert found, security.stdout + security.stderr
    assert float(found.group(1)) <= 3.0, security.stdout


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_a_configuration_error_is_not_restarted_for_ever(unit):
    text = unit.read_text()
    assert "RestartPreventExitStatus=2" in text  # vota exits 2 on a bad configuration
    assert "StartLimitBurst=" in text and "StartLimitIntervalSec=" in text
    assert "User=vota" in text


def test_the_user_and_directories_come_with_the_units():
    base = Path(ROOT) / "configs" / "systemd"
    assert "u vota " in (base / "sysusers.d" / "vota.conf").read_text()
    tmpfiles = (base / "tmpfiles.d" / "vota.conf").read_text()
    assert "d /var/lib/vota 0750 vota vota" in tmpfiles and "d /etc/vota" in tmpfiles
