"""Campaigns from removable media on the whole vehicle: exported by the cloud side, imported
with the broker down, verified as strictly as an online campaign, reported once a link exists."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import vota
from tests.vehicle import Vehicle

pytestmark = pytest.mark.slow  # separate processes

ALL = ("vcu", "bms", "bcm")


def _stick(v: Vehicle, cid: str, version: str, tmp: Path) -> Path:
    """What the cloud writes to a stick: the signed campaign and its packages (vota campaign export)."""
    envelope = tmp / f"{cid}.json"
    envelope.write_bytes(v.campaign(cid, version))
    stick = tmp / f"stick-{cid}"
    run = vota("campaign", "export", str(envelope), "--packages", str(v.tmp / "cloud" / "packages"), "--out", str(stick))
    assert run.returncode == 0, run.stderr
    return stick


def _running(v: Vehicle) -> dict[str, str]:
    run = vota("versions", "-c", str(v.config), "--json")
    assert run.returncode == 0, run.stderr
    return {e["ecu"]: e["software_version"] for e in json.loads(run.stdout) if e["ecu"] in ALL}


def _events(v: Vehicle, cid: str, event: str) -> list[dict[str, Any]]:
    return [b for b in v.reports("events", cid) if b.get("event") == event]


def test_a_stick_installs_with_the_broker_down_and_the_cloud_hears_it_later(vehicle, mosquitto, tmp_path):
    v = vehicle
    stick = _stick(v, "c-usb", "4.0.0", tmp_path)
    assert sorted(p.name for p in (stick / "packages").iterdir()) == [f"{e}-4.0.0.bin" for e in sorted(ALL)]
    mosquitto.stop()
    run = vota("campaign", "import", str(stick), "-c", str(v.config), "--wait", "120", timeout=150)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "campaign c-usb: success" in run.stdout
    assert _running(v) == {e: "4.0.0" for e in ALL}
    mosquitto.start()  # the reports written meanwhile go out now
    done = v.finished("c-usb")
    assert done["outcome"] == "success"
    (imported,) = _events(v, "c-usb", "imported")
    assert imported["from"] == "media" and imported["path"] == str(stick.resolve())
    results = {r["ecu"]: r["result"]["result"] for r in v.reports("results", "c-usb") if r["stage"] == "flash"}
    assert results == {e: "success" for e in ALL}

    again = vota("campaign", "import", str(stick), "-c", str(v.config))
    assert again.returncode == 2 and "already known" in again.stderr, again.stderr

    older = _stick(v, "c-old", "3.0.0", tmp_path)  # signed and valid, but older than what runs
    run = vota("campaign", "import", str(older), "-c", str(v.config), "--wait", "60", timeout=90)
    assert run.returncode == 1 and "downgrade" in run.stdout, run.stdout + run.stderr
    assert v.cloud.collector.wait_for(
        lambda c: any(m["body"].get("event") == "rejected" and m["body"].get("reason") == "downgrade"
                      and m["body"].get("campaign_id") == "c-old" for m in c.messages), 30)
    assert _running(v) == {e: "4.0.0" for e in ALL}


def test_a_tampered_stick_is_refused_with_the_online_reason_codes(vehicle, tmp_path):
    v = vehicle
    stick = _stick(v, "c-tamper", "5.0.0", tmp_path)
    package = stick / "packages" / "bms-5.0.0.bin"
    data = bytearray(package.read_bytes())
    data[100] ^= 0xFF
    package.write_bytes(bytes(data))
    run = vota("campaign", "import", str(stick), "-c", str(v.config), "--wait", "60", timeout=90)
    assert run.returncode == 1 and "package_refused" in run.stdout and "SHA-256" in run.stdout, run.stdout + run.stderr
    assert _running(v) == {e: "1.0.0" for e in ALL}  # nothing deployed, nothing flashed
    assert v.finished("c-tamper")["failure"]["reason"] == "package_refused"

    envelope = json.loads((stick / "vota-campaign.json").read_text())
    payload = json.loads(base64.b64decode(envelope["payload"]))
    payload["packages"][0]["size"] += 1  # the campaign itself altered: its signature no longer holds
    envelope["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    forged = tmp_path / "forged"
    (forged / "packages").mkdir(parents=True)
    (forged / "vota-campaign.json").write_text(json.dumps(envelope))
    run = vota("campaign", "import", str(forged), "-c", str(v.config))
    assert run.returncode == 1 and "bad_signature" in run.stderr and "Traceback" not in run.stderr, run.stderr
    run = vota("campaign", "import", str(tmp_path / "nowhere"), "-c", str(v.config))
    assert run.returncode == 2 and "not a directory" in run.stderr, run.stderr
    resigned = _stick(v, "c-missing", "5.0.1", tmp_path)
    (resigned / "packages" / "bcm-5.0.1.bin").unlink()  # a package missing on the stick
    run = vota("campaign", "import", str(resigned), "-c", str(v.config))
    assert run.returncode == 2 and "not on the media" in run.stderr, run.stderr
    records = list((v.tmp / "tbox" / "campaigns").iterdir())
    assert all((r / "state.json").exists() for r in records) and len(records) == 1  # nothing half-imported


def test_the_tbox_imports_a_campaign_found_where_media_is_mounted(tmp_path, mosquitto, write_config, procs):
    """``tbox.media_dir``: a stick mounted there (its packages copied first, the campaign last,
    as a slow copy would leave it) is imported and installed; a forged one is reported once."""
    mount = tmp_path / "mnt"
    (mount / "packages").mkdir(parents=True)
    os.mkfifo(mount / "vota-campaign.json")  # hostile media first: a FIFO where the campaign goes, a link to a device
    (mount / "packages" / "vcu-6.0.0.bin").symlink_to("/dev/zero")
    v = Vehicle(tmp_path, mosquitto, write_config, procs, tbox_extra={"media_dir": str(mount)})
    try:
        v.send(v.campaign("c-online", "5.0.0"))  # served meanwhile: the media is looked at in a thread of its own
        assert v.finished("c-online", timeout=120)["outcome"] == "success"
        assert v.tbox.text().count("a FIFO, not a file") == 1, v.tbox.text()[-3000:]  # said once, not read again
        (mount / "vota-campaign.json").unlink()
        (mount / "packages" / "vcu-6.0.0.bin").unlink()
        stick = _stick(v, "c-mounted", "6.0.0", tmp_path / "cloud")
        (mount / "vota-campaign.json").write_bytes((stick / "vota-campaign.json").read_bytes())  # before its packages
        for package in (stick / "packages").iterdir():
            (mount / "packages" / package.name).write_bytes(package.read_bytes())
        assert v.finished("c-mounted", timeout=120)["outcome"] == "success"
        assert _running(v) == {e: "6.0.0" for e in ALL}
        (imported,) = _events(v, "c-mounted", "imported")
        assert imported["path"] == str(mount.resolve())
    finally:
        v.close()
