"""Full disks on the real processes: the TBOX's state directory and the gateway's packages and
results each on a small file system of their own (tmpfs), filled up at chosen moments. No thread
dies, a campaign that cannot go on says ``storage`` (or the gateway's 0x70), nothing stays
staged, and once there is room again the vehicle works and reports everything it kept, once."""

from __future__ import annotations

import json
import os
import time
from collections import Counter

import pytest

from tests.test_vehicle_campaigns import ALL, ORDER, packages, running
from tests.vehicle import Vehicle

pytestmark = pytest.mark.slow  # separate processes


def _wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_a_full_tbox_keeps_its_link_and_goes_on_once_there_is_room(tmp_path, mosquitto, write_config, procs, small_disk):
    disk = small_disk(24)
    v = Vehicle(tmp_path, mosquitto, write_config, procs, tbox_extra={"state_dir": str(disk.path / "tbox"),
                                                                      "min_free_mib": 2})
    try:
        # full: a campaign arriving now cannot be stored; the MQTT thread lives on and takes it later
        disk.fill()
        v.send(v.campaign("c-later", "2.0.0", packages=packages(v, "2.0.0"), order=ORDER))
        _wait_for(lambda: "cannot be stored now" in v.tbox.text(), 30, v.tbox.text()[-3000:])
        time.sleep(2)
        assert v.tbox.p.poll() is None
        disk.free()
        assert v.finished("c-later", timeout=120)["outcome"] == "success"
        assert {e: version for e, (version, _) in running(v).items()} == {e: "2.0.0" for e in ALL}

        # room for the reports, not for the packages: refused before a byte is downloaded
        disk.fill(leave=1 << 20)
        v.send(v.campaign("c-big", "3.0.0", packages=packages(v, "3.0.0"), order=ORDER))
        done = v.finished("c-big", timeout=60)
        assert (done["failure"]["stage"], done["failure"]["reason"]) == ("download", "storage"), done
        assert "MiB must stay free on the TBOX" in done["failure"]["detail"]
        disk.free()
        finished = Counter(m["body"]["campaign_id"] for m in v.cloud.collector.messages
                           if m["type"] == "events" and m["body"].get("event") == "finished")
        assert finished == {"c-later": 1, "c-big": 1}  # every report once
    finally:
        v.close()


def test_a_full_gateway_refuses_a_deploy_and_goes_back_from_an_install(tmp_path, mosquitto, write_config, procs, small_disk):
    disk = small_disk(16)
    v = Vehicle(tmp_path, mosquitto, write_config, procs, tbox_extra={"pipeline": False},
                deploy_extra={"package_dir": str(disk.path / "packages"), "min_free_mib": 1},
                gateway_extra={"results_dir": str(disk.path / "results")})
    try:
        # no room for a package: refused with 0x70 at once (not taken for a gateway restart)
        disk.fill(leave=512 * 1024)
        v.send(v.campaign("c-noroom", "2.0.0", packages=packages(v, "2.0.0"), order=ORDER))
        done = v.finished("c-noroom", timeout=60)
        assert (done["failure"]["stage"], done["failure"]["reason"]) == ("deploy", "deploy_failed"), done
        assert "0x70" in done["failure"]["detail"] and "restarted" not in done["failure"]["detail"], done
        disk.free()

        # the disk fills up while the ECUs stage: the install goes back and discards what it staged
        big = [(ecu, path, version) for ecu, path, version in packages(v, "2.1.0")]
        for _, path, _ in big:  # images that take seconds to stage: the disk fills up in the middle
            path.write_bytes(os.urandom(192 * 1024))
        v.send(v.campaign("c-mid", "2.1.0", packages=big, order=ORDER))
        journal = disk.path / "results" / "c-mid" / "journal.json"
        _wait_for(journal.exists, 120, v.gateway.text()[-3000:])
        disk.fill()
        _wait_for(lambda: "it goes back" in v.gateway.text(), 60, v.gateway.text()[-3000:])
        done = v.finished("c-mid", timeout=120)  # its summary read while the disk is still full
        disk.free()
        assert (done["outcome"], done["failure"]["reason"]) == ("failed", "flash_failed"), done
        assert {e: version for e, (version, _) in running(v).items()} == {e: "1.0.0" for e in ALL}
        # the status and summary kept while the disk was full are written at the next status request
        v.send(v.campaign("c-after", "2.2.0", packages=packages(v, "2.2.0"), order=ORDER))
        assert v.finished("c-after", timeout=120)["outcome"] == "success"
        status = json.loads((disk.path / "results" / "c-mid" / "install.json").read_text())
        assert status["status"] == "failed" and status["error"].startswith("storage: "), status
        summary = json.loads((disk.path / "results" / "c-mid" / "summary.json").read_text())
        assert summary["cancelled"].startswith("storage: ")
        assert not any(r["phase"] in ("staged", "activated") for r in summary["results"]), summary["results"]
        assert {e: version for e, (version, _) in running(v).items()} == {e: "2.2.0" for e in ALL}
        assert v.gateway.p.poll() is None
    finally:
        v.close()


def test_a_tbox_disk_that_fills_during_a_deploy_ends_the_campaign_with_storage(tmp_path, mosquitto, write_config, procs,
                                                                                small_disk):
    """The TBOX's disk fills up while it deploys (the install already started: pipelined): the
    campaign cannot go on; after ``storage_grace_s`` it ends with reason ``storage`` at state
    ``deploying``, which is written down, the gateway's install cancelled and told once there is
    room again. Nothing stays staged."""
    disk = small_disk(24)
    v = Vehicle(tmp_path, mosquitto, write_config, procs, tbox_extra={"state_dir": str(disk.path / "tbox"),
                                                                      "min_free_mib": 1, "storage_grace_s": 3},
                backbone={"bitrate": 500000})  # deploys that take seconds
    try:
        big = packages(v, "2.0.0")
        for _, path, _ in big:
            path.write_bytes(os.urandom(96 * 1024))
        v.send(v.campaign("c-fill", "2.0.0", packages=big, order=ORDER))
        _wait_for(lambda: any(b.get("event") == "progress" and b.get("stage") == "deploy"
                              for b in v.reports("events", "c-fill")), 120, v.tbox.text()[-3000:])
        disk.fill()
        _wait_for(lambda: "the campaign ends" in v.tbox.text(), 60, v.tbox.text()[-3000:])
        time.sleep(2)
        disk.free()
        done = v.finished("c-fill", timeout=120)
        assert done["failure"]["stage"] == "deploying", done
        assert done["failure"]["reason"] == "storage" and "No space left" in done["failure"]["detail"], done
        assert done["cancel"]["state"] == "done", done
        assert {e: version for e, (version, _) in running(v).items()} == {e: "1.0.0" for e in ALL}
        assert v.tbox.p.poll() is None  # (the next campaign after a full TBOX disk: the first test above)
    finally:
        v.close()
