"""What the driver is told (UN R156 7.2): the HMI states of a campaign that waits for consent and
for the vehicle's state then succeeds, and of one that fails, as the vehicle's HMI gets them on
the TBOX's local socket and as the cloud gets them; the consent given on that socket recorded
in the update log. The states are the documented ones (agent/core/hmi.py, docs/type-approval.md)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from agent.adapters.storage import atomic_write_json
from agent.core.hmi import STATES, HmiTracker, parse_information
from tests.conftest import vota
from tests.test_evidence import pack_files
from tests.vehicle import VIN, Vehicle

PARKED = {"soc": 80, "power_mode": "off", "gear": "P", "speed_kmh": 0, "battery_mv": 12600, "charging": "no"}
INFORMATION = {"en": {"purpose": "Better range estimate", "changes": ["BMS state-of-charge model", "VCU torque map"],
                      "unavailable": "Driving, charging", "instructions": "Park, switch off, stay out of the vehicle",
                      "after_success": "Your vehicle is up to date", "after_failure": "Nothing changed; we will retry"},
               "de": {"purpose": "Genauere Reichweite"}}


class HmiClient:
    """The vehicle's HMI: connected to the TBOX's socket, every line it gets kept."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.lines: list[dict[str, Any]] = []
        self._file = self.sock.makefile("rb")
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self._file:
            self.lines.append(json.loads(line))

    def send(self, doc: Any) -> dict[str, Any]:
        seen = len(self.lines)
        self.sock.sendall((doc if isinstance(doc, bytes) else json.dumps(doc).encode()) + b"\n")
        return self.wait(lambda: next((m for m in self.lines[seen:] if "ok" in m), None))

    def wait(self, found: Any, timeout: float = 90) -> Any:
        deadline = time.monotonic() + timeout
        while (hit := found()) is None:
            assert time.monotonic() < deadline, self.lines[-5:]
            time.sleep(0.02)
        return hit

    def states(self, cid: str) -> list[str]:
        """The states shown for ``cid``, each once in the order they came."""
        out: list[str] = []
        for line in self.lines:
            if line.get("campaign_id") == cid and (not out or out[-1] != line["state"]):
                out.append(line["state"])
        return out

    def close(self) -> None:
        self.sock.close()


def test_information_and_the_tracker_rules():
    assert parse_information(INFORMATION) == INFORMATION
    for bad, why in (({"english": {"purpose": "x"}}, "language tag"), ({"en": {"price": "x"}}, "nothing else"),
                     ({"en": {"purpose": ""}}, "printable text"), ({"en": {"changes": ["ok", 3]}}, "list of them"),
                     ({"en": {"purpose": "a\x1b[2Jb"}}, "printable"), ({}, "1 to 32")):
        with pytest.raises(ValueError, match=why):
            parse_information(bad)
    tracker = HmiTracker(lambda cid: {"information": INFORMATION, "install": "immediate", "confirmed": False})
    assert tracker.event({"event": "state", "campaign_id": "c", "state": "verified"}, 0)[0]["state"] == "offered"
    assert tracker.event({"event": "estimate", "campaign_id": "c", "install_s": 60.0, "recovery_s": 20.0}, 1) is None
    shown, new = tracker.event({"event": "state", "campaign_id": "c", "state": "installing"}, 100)
    assert new and shown["unusable_from"] == 100 and shown["unusable_until"] == 180 and shown["time_left_s"] == 60
    shown, new = tracker.event({"event": "progress", "campaign_id": "c", "stage": "install", "ecu": "vcu", "done": 50,
                                "total": 200}, 130)
    assert not new and shown["percent"] == 25.0 and shown["time_left_s"] == 30
    shown, _ = tracker.event({"event": "finished", "campaign_id": "c", "outcome": "failed", "revertible": False,
                              "failure": {"stage": "flash", "reason": "flash_failed"}}, 140)
    assert shown["state"] == "failed" and shown["action"] == "workshop"
    assert shown["information"] == {"en": "Nothing changed; we will retry"}


@pytest.mark.slow
def test_the_driver_sees_offer_consent_waiting_install_and_the_end(tmp_path, mosquitto, write_config, procs):
    sock = Path(f"/tmp/vota-hmi-{os.getpid()}-{time.monotonic_ns()}.sock")  # a Unix socket path has 107 bytes at most
    v = Vehicle(tmp_path, mosquitto, write_config, procs, tbox_extra={
        "hmi_socket": str(sock), "preconditions": {"ecu": "bcm", "min_soc": 30, "soc_per_minute": 1.0, "recheck_s": 0.3}})
    atomic_write_json(v.ecu_state("bcm") / "signals.json", {**PARKED, "soc": 12})
    hmi = HmiClient(sock)
    try:
        assert hmi.send(b"not json") == {"ok": False, "error": "not JSON"}
        assert hmi.send({"consent": "c-none", "accept": True}) == {"ok": False, "error": "no campaign 'c-none' is offered"}
        v.send(v.campaign("c-hmi", "2.0.0", install="confirm", information=INFORMATION))
        asked = hmi.wait(lambda: next((m for m in hmi.lines if m.get("state") == "awaiting_consent"), None))
        assert asked["information"] == INFORMATION and asked["duration_s"] > 0, asked
        assert hmi.send({"consent": "c-hmi", "accept": False}) == {"ok": True}  # postponed: still asked
        assert hmi.send({"consent": "c-hmi", "accept": True}) == {"ok": True}
        waiting = hmi.wait(lambda: next((m for m in hmi.lines if m.get("state") == "awaiting_conditions"), None))
        assert set(waiting["unmet"]) == {"soc"} and waiting["values"]["soc"] == 12, waiting
        atomic_write_json(v.ecu_state("bcm") / "signals.json", PARKED)
        done = v.finished("c-hmi")
        assert done["outcome"] == "success", done
        end = hmi.wait(lambda: next((m for m in hmi.lines if m.get("state") == "succeeded"), None))
        assert end["versions"] == {e: "2.0.0" for e in ("vcu", "bms", "bcm")} and end["information"] == {
            "en": "Your vehicle is up to date"}
        assert hmi.states("c-hmi") == ["offered", "awaiting_consent", "awaiting_conditions", "installing", "succeeded"]
        installing = [m for m in hmi.lines if m.get("state") == "installing"]
        assert installing[0]["unusable_until"] > installing[0]["unusable_from"] > 0
        assert any(m["percent"] for m in installing), installing  # progress while it installs
        assert v.cloud.collector.wait_for(lambda c: any(
            b.get("event") == "hmi" and b.get("state") == "succeeded" for b in v.reports("events", "c-hmi")), 30)
        told = [b["state"] for b in v.reports("events", "c-hmi") if b.get("event") == "hmi"]
        assert told == hmi.states("c-hmi"), told  # the cloud hears each new state once
        consents = [(b["given"], b["by"]) for b in v.reports("events", "c-hmi") if b.get("event") == "consent"]
        assert consents == [(False, "hmi"), (True, "hmi")]
        logged = [json.loads(line) for line in (v.tmp / "tbox" / "update-log.jsonl").read_text().splitlines()]
        kinds = [e["body"].get("event") for e in logged if e.get("campaign_id") == "c-hmi"]
        assert kinds.count("consent") == 2 and kinds.count("hmi") == len(told), kinds

        # a campaign whose activation fails on bcm: rolled back, nothing for the driver to do
        v.restart_sim("bcm:31#4:nrc=0x22")
        v.send(v.campaign("c-hmi-fail", "3.0.0", information=INFORMATION))
        done = v.finished("c-hmi-fail", timeout=180)
        assert done["outcome"] == "failed", done
        end = hmi.wait(lambda: next((m for m in hmi.lines if m.get("state") == "failed"), None))
        assert end["action"] == "none" and end["information"] == {"en": "Nothing changed; we will retry"}, end
        assert hmi.states("c-hmi-fail") == ["offered", "installing", "failed"]
        assert set(hmi.states("c-hmi") + hmi.states("c-hmi-fail")) <= set(STATES)
        _evidence_of_a_failed_campaign(v, "c-hmi-fail")
    finally:
        hmi.close()
        v.close()


def _evidence_of_a_failed_campaign(v: Vehicle, cid: str) -> None:
    """``vota evidence`` on the vehicle: the pack holds what R156 asks and verifies offline."""
    out = v.tmp / "evidence.tar.gz"
    made = vota("evidence", cid, "-c", str(v.config), "--out", str(out))
    assert made.returncode == 0, made.stderr
    pub = v.tmp / "keys" / "report.pub"
    pub.write_bytes(v.report_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                           serialization.PublicFormat.SubjectPublicKeyInfo))
    checked = vota("evidence", "--verify", str(out), "--key", str(pub), "--json")
    assert checked.returncode == 0 and json.loads(checked.stdout)["ok"], checked.stdout + checked.stderr
    files = pack_files(out)
    summary = json.loads(files["summary.json"])
    assert summary["outcome"] == "failed" and summary["failure"]["stage"] == "flash"
    assert summary["rxswin"]["before"] == summary["rxswin"]["after"] == {"R10": "R10-VOTA-EMC-0001",
                                                                         "R149": "R149-VOTA-DLP-0001"}
    assert summary["versions"]["before"] == {"vcu": "2.0.0", "bms": "2.0.0", "bcm": "2.0.0", "dlp_headlamp": "1.0.0"}
    assert summary["versions"]["after"] == {"vcu": "2.0.0", "bms": "2.0.0", "bcm": "2.0.0"}  # the campaign's ECUs, read back
    assert summary["preconditions"] and all(p["values"]["soc"] == 80 for p in summary["preconditions"] if p["values"])
    assert [s["state"] for s in summary["shown"]] == ["offered", "installing", "failed"]
    assert all(s["at"] > 0 for s in summary["shown"]) and summary["information"] == INFORMATION
    assert summary["estimate"]["install_s"] > 0 and summary["estimate"]["recovery_s"] > 0
    assert ("bcm", "failed") in [(r["unit"], r["result"]) for r in summary["results"] if r["stage"] == "flash"]
    assert summary["diagnosis"]["unit"] == "bcm", summary["diagnosis"]
    assert "campaign/flash/bcm.activate.trace.jsonl" in files and "campaign/campaign.signed.json" in files
    assert files["campaign-log.jsonl"] and b"c-hmi-fail" in files["campaign-log.jsonl"]

    # the same campaign's pack from the cloud's store, signed by the OEM, each report by the vehicle
    oem = v.tmp / "keys" / "oem.key"
    oem.write_bytes(v.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
    oem_pub = v.tmp / "keys" / "oem.pub"
    oem_pub.write_bytes(v.key.public_key().public_bytes(serialization.Encoding.PEM,
                                                        serialization.PublicFormat.SubjectPublicKeyInfo))
    from_cloud = v.tmp / "evidence-cloud.tar.gz"
    made = vota("evidence", cid, "--store", str(v.tmp / "cloud" / "store"), "--vin", VIN, "--key", str(oem),
                "--out", str(from_cloud))
    assert made.returncode == 0, made.stderr
    checked = vota("evidence", "--verify", str(from_cloud), "--key", str(oem_pub), "--vehicle-key", str(pub), "--json")
    assert checked.returncode == 0 and json.loads(checked.stdout)["ok"], checked.stdout + checked.stderr
    cloud = pack_files(from_cloud)
    seen = json.loads(cloud["summary.json"])
    assert [s["state"] for s in seen["shown"]] == ["offered", "installing", "failed"]
    assert seen["rxswin"] == summary["rxswin"] and seen["versions"] == summary["versions"]
    assert seen["diagnosis"]["unit"] == "bcm" and any(n.startswith(f"traces/{cid}.") for n in cloud)
    wrong = vota("evidence", "--verify", str(from_cloud), "--key", str(oem_pub), "--vehicle-key", str(oem_pub))
    assert wrong.returncode == 1 and "not signed by this vehicle's report key" in wrong.stdout, wrong.stdout
