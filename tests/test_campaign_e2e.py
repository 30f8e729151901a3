"""A whole vehicle against a real Mosquitto: TBOX, gateway and ECU simulators as separate
processes, the stand-in cloud in the test. Campaigns succeed end to end, bad ones are
refused with the reason reported to the cloud."""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_sim.cloud import CloudSim, make_campaign, publish
from tests.conftest import Proc, ecu_entry, multicast_bus

VIN = "LVOTA000000000042"
ECUS = ("vcu", "bms", "bcm")


def _ready(proc: Proc, word: str) -> None:
    deadline = time.monotonic() + 30
    while word not in proc.text():
        assert proc.p.poll() is None and time.monotonic() < deadline, proc.text()
        time.sleep(0.05)


class Vehicle:
    def __init__(self, tmp: Path, mosquitto: Any, write_config: Any, procs: list[Proc]) -> None:
        self.tmp = tmp
        self.key = Ed25519PrivateKey.generate()
        (tmp / "keys").mkdir()
        (tmp / "keys" / "cloud.pub").write_bytes(self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        self.config = write_config({
            "segments": {"bb": {"bus": multicast_bus()}, "pt": {"bus": multicast_bus()}, "body": {"bus": multicast_bus()}},
            "deploy": {"segment": "bb", "package_dir": str(tmp / "gw" / "packages")},
            "gateway": {"results_dir": str(tmp / "gw" / "results")},
            "ecus": {"vcu": ecu_entry("vcu", 0x7E0, 0x7E8, "pt"), "bms": ecu_entry("bms", 0x7E1, 0x7E9, "pt"),
                     "bcm": ecu_entry("bcm", 0x740, 0x748, "body")},
            "tbox": {"vin": VIN, "state_dir": str(tmp / "tbox"), "trusted_keys": [str(tmp / "keys" / "cloud.pub")],
                     "retry_delay_ms": 300,
                     "cloud": {"broker": mosquitto.url, "outbox": str(tmp / "tbox" / "outbox.db"),
                               "reconnect_min_s": 1, "reconnect_max_s": 2}},
        })
        self.cloud = CloudSim(mosquitto.url, tmp / "cloud" / "store", tmp / "cloud" / "packages")
        self.cloud.start()
        assert self.cloud.collector.connected.wait(10)
        self.broker = mosquitto.url
        self.procs = procs
        procs.append(Proc("ecu-sim", "-c", str(self.config), "--state-dir", str(tmp / "ecu"), log=tmp / "ecu.log"))
        procs.append(Proc("gateway", "-c", str(self.config), log=tmp / "gw.log"))
        _ready(procs[-2], "ecu-sim ready")
        _ready(procs[-1], "gateway ready")
        self.tbox = self.start_tbox()

    def start_tbox(self) -> Proc:
        tbox = Proc("tbox", "-c", str(self.config), "-v", log=self.tmp / f"tbox-{time.monotonic_ns()}.log")
        self.procs.append(tbox)
        _ready(tbox, "tbox ready")
        return tbox

    def packages(self, version: str, size: int = 48 * 1024) -> list[tuple[str, Path, str]]:
        out = []
        for ecu in ECUS:
            path = self.tmp / "cloud" / "packages" / f"{ecu}-{version}.bin"
            path.write_bytes(os.urandom(size))
            out.append((ecu, path, version))
        return out

    def campaign(self, cid: str, version: str, key: Ed25519PrivateKey | None = None, **kw: Any) -> bytes:
        return make_campaign(vin=kw.pop("vin", VIN), packages=kw.pop("packages", None) or self.packages(version),
                             base_url=self.cloud.base_url, key=key or self.key, campaign_id=cid, **kw)

    def send(self, envelope: bytes) -> None:
        publish(self.broker, VIN, "campaign", envelope)

    def finished(self, cid: str, timeout: float = 120) -> dict[str, Any]:
        ok = self.cloud.collector.wait_for(lambda c: self.cloud.finished(VIN, cid) is not None, timeout)
        assert ok, f"campaign {cid} did not finish: {self.tbox.text()[-3000:]}"
        result = self.cloud.finished(VIN, cid)
        assert result is not None
        return result

    def reports(self, kind: str, cid: str) -> list[dict[str, Any]]:
        return [m["body"] for m in self.cloud.collector.messages
                if m["type"] == kind and (m["body"] or {}).get("campaign_id") == cid]

    def rejected(self, cid: str | None, timeout: float = 30) -> dict[str, Any]:
        def find(c: Any) -> bool:
            return any(m["body"].get("event") == "rejected" and m["body"].get("campaign_id") == cid for m in c.messages)
        assert self.cloud.collector.wait_for(find, timeout), self.tbox.text()[-3000:]
        return next(m["body"] for m in self.cloud.collector.messages
                    if m["body"].get("event") == "rejected" and m["body"].get("campaign_id") == cid)

    def close(self) -> None:
        self.cloud.stop()


@pytest.fixture
def vehicle(tmp_path, mosquitto, write_config, procs):  # type: ignore[no-untyped-def]
    v = Vehicle(tmp_path, mosquitto, write_config, procs)
    yield v
    v.close()


def test_campaign_for_three_ecus_end_to_end(vehicle):
    vehicle.send(vehicle.campaign("c-100", "2.0.0"))
    done = vehicle.finished("c-100")
    assert done["outcome"] == "success", done
    states = [b["state"] for b in vehicle.reports("events", "c-100") if b.get("event") == "state"]
    assert states == ["verified", "downloading", "downloaded", "deploying", "deployed", "awaiting_install",
                      "installing", "done"]  # "received" comes before the campaign id is verified
    assert any(b.get("state") == "received" for b in vehicle.reports("events", None))
    (inventory,) = vehicle.reports("inventory", "c-100")
    assert {e["ecu"]: e["software_version"] for e in inventory["ecus"]} == {e: "1.0.0" for e in ECUS}
    results = vehicle.reports("results", "c-100")
    deploy = {r["package"]: r["result"] for r in results if r["stage"] == "deploy"}
    flash = {r["ecu"]: r["result"] for r in results if r["stage"] == "flash"}
    assert {p: r["result"] for p, r in deploy.items()} == {f"{e}-2.0.0.bin": "success" for e in ECUS}
    assert {e: (r["result"], r["version_after"]) for e, r in flash.items()} == {e: ("success", "2.0.0") for e in ECUS}
    traces = vehicle.tmp / "cloud" / "store" / VIN / "traces"
    names = sorted(p.name for p in traces.iterdir())
    assert names == sorted([f"c-100.deploy.{e}-2.0.0.bin.jsonl" for e in ECUS] + [f"c-100.flash.{e}.jsonl" for e in ECUS])
    first = json.loads((traces / "c-100.flash.vcu.jsonl").read_text().splitlines()[0])
    assert first["format"] == "vota-trace" and first["stage"] == "flash" and first["server"] == "vcu"


def test_bad_campaigns_are_refused_with_the_reason(vehicle):
    vehicle.send(vehicle.campaign("c-bad-sig", "2.0.0", key=Ed25519PrivateKey.generate()))
    assert vehicle.rejected("c-bad-sig")["reason"] == "untrusted_key"
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=10)
    vehicle.send(vehicle.campaign("c-expired", "2.0.0", now=past, valid_for=dt.timedelta(days=1)))
    assert vehicle.rejected("c-expired")["reason"] == "expired"
    vehicle.send(vehicle.campaign("c-downgrade", "0.9.0"))
    assert vehicle.rejected("c-downgrade")["reason"] == "downgrade"
    vehicle.send(vehicle.campaign("c-other", "2.0.0", vin="LSOMEONEELSE00001"))
    assert vehicle.rejected("c-other")["reason"] == "wrong_vehicle"
    packages = vehicle.packages("2.1.0")
    envelope = vehicle.campaign("c-tampered", "2.1.0", packages=packages)
    packages[1][1].write_bytes(os.urandom(48 * 1024))  # the file on the server is not what was signed
    vehicle.send(envelope)
    done = vehicle.finished("c-tampered")
    assert done["outcome"] == "failed" and done["failure"]["reason"] == "package_refused"
    assert "does not match" in done["failure"]["detail"]
    assert not vehicle.reports("results", "c-tampered")  # nothing deployed, nothing flashed
    for bad in (b"not json", b'{"command": "self_destruct", "campaign_id": "x"}', b'{"command": "confirm_install"}',
                json.dumps({"command": "confirm_install", "campaign_id": "c-1", "vin": "LOTHER"}).encode()):
        publish(vehicle.broker, VIN, "command", bad)
    assert vehicle.cloud.collector.wait_for(
        lambda c: sum(1 for m in c.messages if m["body"].get("topic") == "command") >= 4, 20)
    reasons = sorted(m["body"]["reason"] for m in vehicle.cloud.collector.messages if m["body"].get("topic") == "command")
    assert reasons == ["malformed", "malformed", "malformed", "wrong_vehicle"]
    assert vehicle.tbox.p.poll() is None  # the daemon keeps running
