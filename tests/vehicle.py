"""A whole vehicle for tests: TBOX, gateway and ECU simulators as processes against a real
broker, the stand-in cloud in the test process."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from cloud_sim.cloud import CloudSim, make_campaign, publish
from tests.conftest import Proc, ecu_entry, multicast_bus

VIN = "LVOTA000000000042"
ECUS = ("vcu", "bms", "bcm")
# the vehicle's type approvals and their RXSWIN as it left the factory (gateway/rxswin.py)
APPROVALS = [{"regulation": "R10", "rxswin": "R10-VOTA-EMC-0001", "ecus": ["vcu", "bms", "bcm", "dlp_headlamp"]},
             {"regulation": "R149", "rxswin": "R149-VOTA-DLP-0001", "ecus": ["bcm", "dlp_headlamp"]}]




def over_doip(ip: str, **doip: Any) -> dict[str, Any]:
    """``Vehicle`` keyword arguments for the deploy link over DoIP: the gateway's entity on ``ip``."""
    return {"deploy_extra": {"transport": "doip", "segment": None},
            "config_extra": {"doip": {"address": ip, "announce_to": False, **doip}}}


def read_rxswin_over_doip(ip: str, did: int = 0xF1EF) -> dict[str, str]:
    """The RXSWIN set read from the gateway's logical address by python-doipclient (a tester we did not write)."""
    from doipclient import DoIPClient

    from agent.core.rxswin import decode_did

    with DoIPClient(ip, 0x1010, client_logical_address=0x0E00) as client:
        client.send_diagnostic(b"\x22" + did.to_bytes(2, "big"))
        answer = client.receive_diagnostic(timeout=5)
    assert answer[:3] == b"\x62" + did.to_bytes(2, "big"), answer.hex()
    return decode_did(answer[3:])


def _pem(key: Any) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


class Vehicle:
    def __init__(self, tmp: Path, mosquitto: Any, write_config: Any, procs: list[Proc], tbox: bool = True,
                 tbox_extra: dict[str, Any] | None = None, ecu_faults: tuple[str, ...] = (),
                 ecu_extra: dict[str, dict[str, Any]] | None = None, backbone: dict[str, Any] | None = None,
                 gateway_extra: dict[str, Any] | None = None, foreign: dict[str, Any] | None = None,
                 deploy_extra: dict[str, Any] | None = None, config_extra: dict[str, Any] | None = None) -> None:
        """``foreign``: ``flash_profiles`` and ``ecus`` of ECUs the simulator does not play (the
        test starts their servers)."""
        self.tmp = tmp
        self.key = Ed25519PrivateKey.generate()
        self.platform = Ed25519PrivateKey.generate()  # the content trust platform
        self.vehicle_key = X25519PrivateKey.generate()
        (tmp / "keys").mkdir()
        (tmp / "keys" / "cloud.pub").write_bytes(_pem(self.key))
        (tmp / "keys" / "platform.pub").write_bytes(_pem(self.platform))
        (tmp / "keys" / "vehicle.key").write_bytes(self.vehicle_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        self.report_key = Ed25519PrivateKey.generate()  # signs every report; the cloud stores only what it signed
        (tmp / "keys" / "report.key").write_bytes(self.report_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        self.backbone = {"bus": multicast_bus(), **(backbone or {})}
        self.config = write_config({
            "segments": {"bb": self.backbone, "pt": {"bus": multicast_bus()},
                         "body": {"bus": multicast_bus()}},
            "deploy": {"segment": "bb", "package_dir": str(tmp / "gw" / "packages"), "security_secret": f"{VIN}-deploy",
                       **(deploy_extra or {})},
            "gateway": {"results_dir": str(tmp / "gw" / "results"), **(gateway_extra or {})},
            "ecus": {name: entry | (ecu_extra or {}).get(name, {}) for name, entry in {
                "vcu": ecu_entry("vcu", 0x7E0, 0x7E8, "pt"), "bms": ecu_entry("bms", 0x7E1, 0x7E9, "pt"),
                "bcm": ecu_entry("bcm", 0x740, 0x748, "body"),
                "dlp_headlamp": ecu_entry("dlp_headlamp", 0x741, 0x749, "body")}.items()} | (foreign or {}).get("ecus", {}),
            "flash_profiles": (foreign or {}).get("flash_profiles", {}),
            "approvals": APPROVALS,
            **(config_extra or {}),
            "tbox": {"vin": VIN, "state_dir": str(tmp / "tbox"), "trusted_keys": [str(tmp / "keys" / "cloud.pub")],
                     "retry_delay_ms": 300, "retry_max_delay_ms": 2000, "max_retries": 8,  # ~12 s: a busy machine restarts slowly
                     "content": {"vehicle_key": str(tmp / "keys" / "vehicle.key"),
                                 "trusted_keys": [str(tmp / "keys" / "platform.pub")],
                                 "light_sensor": {"ecu": "bcm"}, "targets": {"boot_animation": "bcm"}, "tick_ms": 200},
                     **(tbox_extra or {}),
                     "cloud": {"broker": mosquitto.url, "outbox": str(tmp / "tbox" / "outbox.db"),
                               "report_key": str(tmp / "keys" / "report.key"),
                               "reconnect_min_s": 1, "reconnect_max_s": 2}},
        })
        self.cloud = CloudSim(mosquitto.url, tmp / "cloud" / "store", tmp / "cloud" / "packages", platform_key=self.platform,
                              require_signed=True)
        self.cloud.register_vehicle(VIN, self.report_key.public_key())
        self.cloud.vehicle_keys[VIN] = self.vehicle_key.public_key()
        self.cloud.start()
        assert self.cloud.collector.connected.wait(10)
        self.broker = mosquitto.url
        self.procs = procs
        faults = [a for f in ecu_faults for a in ("--fault", f)]
        simulated = [a for name in ("vcu", "bms", "bcm", "dlp_headlamp") for a in ("--ecu", name)] if foreign else []
        self._simulated = simulated
        procs.append(Proc("ecu-sim", "-c", str(self.config), "--state-dir", str(tmp / "ecu"), *faults, *simulated,
                          log=tmp / "ecu.log"))
        self.sim = procs[-1]
        procs.append(Proc("gateway", "-c", str(self.config), log=tmp / "gw.log"))
        self.gateway = procs[-1]
        if tbox:  # started with the others: the TBOX asks nothing of the gateway until a campaign comes
            self.tbox = self.start_tbox(wait=False)
        self.gateway.wait_ready("gateway ready")
        procs[-2 if not tbox else -3].wait_ready("ecu-sim ready")
        if tbox:
            self.tbox.wait_ready("tbox ready")

    def start_tbox(self, *args: str, wait: bool = True) -> Proc:
        tbox = Proc("tbox", "-c", str(self.config), "-v", *args, log=self.tmp / f"tbox-{time.monotonic_ns()}.log")
        self.procs.append(tbox)
        if wait:
            tbox.wait_ready("tbox ready")
        return tbox

    def restart_sim(self, *faults: str) -> Proc:
        """The ECU simulator stopped and started again on its state, with these faults (counted afresh)."""
        self.sim.stop()
        self.sim = Proc("ecu-sim", "-c", str(self.config), "--state-dir", str(self.tmp / "ecu"),
                        *[a for f in faults for a in ("--fault", f)], *self._simulated,
                        log=self.tmp / f"ecu-{time.monotonic_ns()}.log")
        self.procs.append(self.sim)
        self.sim.wait_ready("ecu-sim ready")
        return self.sim

    def restart_gateway(self, *args: str) -> Proc:
        self.gateway = Proc("gateway", "-c", str(self.config), *args, log=self.tmp / f"gw-{time.monotonic_ns()}.log")
        self.procs.append(self.gateway)
        self.gateway.wait_ready("gateway ready")
        return self.gateway

    def packages(self, version: str, size: int = 48 * 1024) -> list[tuple[str, Path, str]]:
        out = []
        for ecu in ECUS:
            path = self.tmp / "cloud" / "packages" / f"{ecu}-{version}.bin"
            path.write_bytes(os.urandom(size))
            out.append((ecu, path, version))
        return out

    def campaign(self, cid: str, version: str, key: Ed25519PrivateKey | list[Ed25519PrivateKey] | None = None,
                 **kw: Any) -> bytes:
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



    # ---- content ---------------------------------------------------------------------------
    def ecu_state(self, ecu: str) -> Path:
        return self.tmp / "ecu" / ecu

    def set_light(self, lux: int) -> None:
        from agent.adapters.storage import atomic_write_json

        atomic_write_json(self.ecu_state("bcm") / "sensors.json", {"ambient_lux": lux})

    def shown(self, ecu: str = "dlp_headlamp") -> str | None:
        """What the ECU simulator shows (its persisted choice, as DID 0xF1C0 reports it)."""
        import json

        try:
            return json.loads((self.ecu_state(ecu) / "content" / "active.json").read_text()).get("active")
        except (OSError, ValueError):
            return None

    def wait_content(self, bundle_id: str, predicate: Any, timeout: float = 60) -> dict[str, str]:
        ok = self.cloud.collector.wait_for(lambda c: predicate(self.cloud.content_state(VIN, bundle_id)), timeout)
        state = self.cloud.content_state(VIN, bundle_id)
        assert ok, f"content {bundle_id}: {state}\n{self.tbox.text()[-4000:]}"
        return state
