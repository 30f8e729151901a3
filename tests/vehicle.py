"""A whole vehicle for tests: TBOX, gateway and ECU simulators as processes against a real
broker, the stand-in cloud in the test process."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

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


