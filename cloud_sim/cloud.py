"""The stand-in cloud's operations: make and sign a campaign, publish it or a command to a
vehicle, and serve packages plus the collector (``vota cloud serve``)."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.campaign import sign_campaign
from agent.cloud_link import make_client, topic_prefix
from agent.errors import UsageError, VotaError
from cloud_sim.collector import Collector
from cloud_sim.package_server import PackageServer

__all__ = ["make_campaign", "publish", "CloudSim", "broker_address"]


def broker_address(url: str) -> tuple[str, int]:
    parsed = urlparse(url)
    if parsed.scheme != "mqtt" or not parsed.hostname:
        raise UsageError(f"broker must be mqtt://host:port, got {url!r}")
    return parsed.hostname, parsed.port or 1883


def make_campaign(
    *,
    vin: str,
    packages: list[tuple[str, Path, str]],
    base_url: str,
    key: Ed25519PrivateKey,
    campaign_id: str,
    install: str = "immediate",
    now: _dt.datetime | None = None,
    valid_for: _dt.timedelta = _dt.timedelta(days=30),
) -> bytes:
    """Sign a campaign for ``packages`` [(ecu, file, version)], served under ``base_url``."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    entries = []
    for ecu, path, version in packages:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise UsageError(f"{path}: cannot read package ({exc.strerror})") from None
        entries.append({"name": path.name, "ecu": ecu, "version": version, "url": f"{base_url.rstrip('/')}/{path.name}",
                        "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    doc = {"format": "vota-campaign", "version": 1, "campaign_id": campaign_id, "vin": vin,
           "issued": (now - _dt.timedelta(seconds=1)).isoformat(timespec="seconds"),
           "expires": (now + valid_for).isoformat(timespec="seconds"), "install": install, "packages": entries}
    return sign_campaign(doc, key)


def publish(broker: str, vin: str, kind: str, payload: bytes, mqtt_version: str = "5", root: str = "vota/v1",
            timeout: float = 10.0) -> None:
    """Publish one message to a vehicle's ``campaign`` or ``command`` topic (QoS 1)."""
    host, port = broker_address(broker)
    client = make_client(f"vota-cloud-publisher-{time.monotonic_ns()}", mqtt_version, clean=True)
    try:
        client.connect(host, port, keepalive=30)
    except OSError as exc:
        raise VotaError(f"cannot reach the broker {broker}: {exc}") from None
    client.loop_start()
    try:
        info = client.publish(f"{topic_prefix(root, vin)}/{kind}", payload, qos=1)
        info.wait_for_publish(timeout)
        if not info.is_published():
            raise VotaError(f"the broker {broker} did not acknowledge the {kind} message within {timeout:.0f} s")
    finally:
        client.disconnect()
        client.loop_stop()


class CloudSim:
    """Package server + collector: what the bench and tests use as the OEM cloud."""

    def __init__(self, broker: str, store: str | Path, packages: str | Path, http_port: int = 0, mqtt_version: str = "5") -> None:
        host, port = broker_address(broker)
        Path(packages).mkdir(parents=True, exist_ok=True)
        self.packages = PackageServer(packages, port=http_port)
        self.collector = Collector(host, port, store, mqtt_version=mqtt_version)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.packages.port}/packages"

    def start(self) -> None:
        self.packages.start()
        self.collector.start()

    def stop(self) -> None:
        self.collector.stop()
        self.packages.stop()

    def finished(self, vin: str, campaign_id: str) -> dict[str, Any] | None:
        for m in list(self.collector.messages):
            body = m.get("body") or {}
            if m.get("vin") == vin and body.get("event") == "finished" and body.get("campaign_id") == campaign_id:
                return dict(body)
        return None

    def rejection(self, vin: str) -> dict[str, Any] | None:
        for m in list(self.collector.messages):
            body = m.get("body") or {}
            if m.get("vin") == vin and body.get("event") == "rejected":
                return dict(body)
        return None


def load_json(path: Path) -> Any:
    return json.loads(path.read_text())
