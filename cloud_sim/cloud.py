"""The stand-in cloud's operations: make and sign a campaign, publish it or a command to a
vehicle, and serve packages plus the collector (``vota cloud serve``)."""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import json
import time
import zlib
from pathlib import Path
from typing import Any, Mapping

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.adapters.cloud_link import topic_prefix
from agent.adapters.storage import atomic_write_bytes
from agent.core.campaign import key_id, sign_campaign
from agent.core.content import SLACK, read_archive
from agent.core.image_auth import ImageSigner, sign_image
from agent.errors import UsageError, VotaError
from agent.protocol.images import ImageError, read_image
from cloud_sim.collector import Collector
from cloud_sim.mqtt import broker_address, cloud_client, shown
from cloud_sim.package_server import PackageServer
from cloud_sim.trust import TrustPlatform

__all__ = ["make_campaign", "memory_sha256", "publish", "CloudSim", "broker_address", "content_offer"]


def make_campaign(
    *,
    vin: str,
    packages: list[tuple[str, Path, str]],
    base_url: str,
    key: Ed25519PrivateKey | list[Ed25519PrivateKey],
    campaign_id: str,
    install: str = "immediate",
    now: _dt.datetime | None = None,
    valid_for: _dt.timedelta = _dt.timedelta(days=30),
    order: dict[str, int] | None = None,
    requires: dict[str, dict[str, str]] | None = None,
    activation: str | None = None,
    deltas: dict[str, tuple[Path, str]] | None = None,
    preconditions: dict[str, Any] | None = None,
    image_keys: Mapping[str, tuple[ImageSigner, int]] | None = None,
    rxswin: Mapping[str, tuple[str, str]] | None = None,
    information: Mapping[str, Any] | None = None,
) -> bytes:
    """Sign a campaign for ``packages`` [(ecu, file, version)], served under ``base_url``;
    ``order`` and ``requires`` per ECU, ``activation`` atomic or per_ecu (the vehicle's default
    when None: atomic for more than one package). ``deltas`` per ECU: (the image it runs, its
    version): the delta from it is made beside the package (``<name>.from-<version>.delta``)
    and the campaign carries both. ``preconditions``: this campaign's overrides of the vehicle's.
    ``image_keys`` per ECU: (the OEM's key for that ECU model, the image's security version): the
    image is signed for an ECU that verifies what it boots (``image_auth``). ``rxswin`` per
    regulation: (the vehicle's RXSWIN before, after) the campaign (agent/core/rxswin.py).
    ``information``: per language, what the driver is told (agent/core/hmi.py)."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    entries = []
    for ecu, path, version in packages:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise UsageError(f"{path}: cannot read package ({exc.strerror})") from None
        entry = {"name": path.name, "ecu": ecu, "version": version, "url": f"{base_url.rstrip('/')}/{path.name}",
                 "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        if order and ecu in order:
            entry["order"] = order[ecu]
        if requires and ecu in requires:
            entry["requires"] = requires[ecu]
        if deltas and ecu in deltas:
            entry["delta"] = _delta_entry(path, data, *deltas[ecu], base_url)
        if image_keys and ecu in image_keys:
            signer, security_version = image_keys[ecu]
            entry["image_auth"] = sign_image(signer, ecu, version, security_version, memory_sha256(data, path.name)).to_json()
        entries.append(entry)
    doc = {"format": "vota-campaign", "version": 1, "campaign_id": campaign_id, "vin": vin,
           "issued": (now - _dt.timedelta(seconds=1)).isoformat(timespec="seconds"),
           "expires": (now + valid_for).isoformat(timespec="seconds"), "install": install, "packages": entries}
    if activation is not None:
        doc["activation"] = activation
    if preconditions is not None:
        doc["preconditions"] = preconditions
    if information:
        doc["information"] = dict(information)
    if rxswin:
        doc["rxswin"] = {r: {"before": before, "after": after} for r, (before, after) in rxswin.items()}
    return sign_campaign(doc, key)


def memory_sha256(data: bytes, name: str) -> str:
    """The digest of an image as it lies in the ECU's memory, which its signature covers: the file
    itself, or a container's segments laid out from the lowest one's address (gaps zero-filled;
    the ECU's memory is taken to start there)."""
    try:
        container = read_image(data, name)
    except ImageError as exc:
        raise UsageError(str(exc)) from None
    if not container.segments:
        return hashlib.sha256(data).hexdigest()
    base = min(address for address, _ in container.segments)
    memory = bytearray()
    for address, chunk in container.segments:
        offset = address - base
        memory[len(memory):offset] = bytes(max(0, offset - len(memory)))
        memory[offset : offset + len(chunk)] = chunk
    return hashlib.sha256(memory).hexdigest()


def _delta_entry(path: Path, data: bytes, base_path: Path, base_version: str, base_url: str) -> dict[str, Any]:
    """Make the delta from the image at ``base_path`` to ``data`` beside ``path``; its campaign entry."""
    from agent.protocol.delta import apply_delta, make_delta  # noqa: PLC0415 - detools only where deltas are made

    try:
        base = base_path.read_bytes()
    except OSError as exc:
        raise UsageError(f"{base_path}: cannot read the delta's base image ({exc.strerror})") from None
    patch = make_delta(base, data)
    if apply_delta(base, patch) != data:  # never sign a patch that does not make the image
        raise VotaError(f"the delta from {base_path} to {path} does not make the image")
    name = f"{path.name}.from-{base_version}.delta"
    atomic_write_bytes(path.parent / name, patch)
    return {"name": name, "url": f"{base_url.rstrip('/')}/{name}", "size": len(patch),
            "sha256": hashlib.sha256(patch).hexdigest(), "base_sha256": hashlib.sha256(base).hexdigest(),
            "base_version": base_version, "image_crc32": zlib.crc32(data)}


COMMAND_EXPIRY_S = 24 * 3600  # a command not delivered within a day is dropped by the broker


def publish(broker: str, vin: str, kind: str, payload: bytes, mqtt_version: str = "5", root: str = "vota/v1",
            timeout: float = 10.0, expiry_s: int | None = None, retain: bool = False) -> None:
    """Publish one message to a vehicle's ``campaign``, ``command`` or ``keys`` topic (QoS 1). It
    waits at the broker for a vehicle that is offline; with MQTT 5, no longer than ``expiry_s``
    (default: a day for commands; campaigns carry their own signed expiry). ``retain``: the
    broker keeps it and hands it to the vehicle at every connection (the current key list)."""
    client, host, port = cloud_client(broker, f"vota-cloud-publisher-{time.monotonic_ns()}", mqtt_version, clean=True)
    try:
        client.connect(host, port, keepalive=30)
    except OSError as exc:
        raise VotaError(f"cannot reach the broker {shown(broker)}: {exc}") from None
    client.loop_start()
    try:
        props = None
        expiry = expiry_s if expiry_s is not None else (COMMAND_EXPIRY_S if kind == "command" else None)
        if mqtt_version == "5" and expiry:
            props = Properties(PacketTypes.PUBLISH)
            props.MessageExpiryInterval = expiry
        info = client.publish(f"{topic_prefix(root, vin)}/{kind}", payload, qos=1, retain=retain, properties=props)
        info.wait_for_publish(timeout)
        if not info.is_published():
            raise VotaError(f"the broker {shown(broker)} did not acknowledge the {kind} message within {timeout:.0f} s")
    finally:
        client.disconnect()
        client.loop_stop()


def content_offer(bundle: bytes, packages: Path, base_url: str, vin: str, request: bool = False) -> bytes:
    """The ``content_offer`` command for a signed bundle: the manifest and its signature go in
    the message, the item files are put where the package server serves them."""
    members = read_archive(bundle, len(bundle) + SLACK)  # an archive with ../ paths stops here
    manifest, sig = members.get("manifest.json"), members.get("manifest.sig.json")
    if manifest is None or sig is None:
        raise UsageError("not a signed content bundle (vota content sign makes one)")
    try:
        doc = json.loads(manifest)
        items = [(str(i["id"]), str(i.get("file", ""))) for i in doc["items"]]
        prefix = f"content-{doc['bundle_id']}-v{doc['bundle_version']}-{vin}"
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"the bundle's manifest is not usable ({exc})") from None
    urls = {}
    for item_id, file in items:
        name = f"{prefix}-{item_id}.bin"
        if file in members:
            atomic_write_bytes(packages / name, members[file])
        urls[item_id] = f"{base_url.rstrip('/')}/{name}"
    return json.dumps({"command": "content_offer", "vin": vin, "manifest": base64.b64encode(manifest).decode(),
                       "signature": base64.b64encode(sig).decode(), "urls": urls, "request": request}).encode()


class CloudSim:
    """Package server + collector: what the bench and tests use as the OEM cloud; with a
    trust platform key, also the content review, signing and offers (C2, C7)."""

    def __init__(self, broker: str, store: str | Path, packages: str | Path, http_port: int = 0, mqtt_version: str = "5",
                 platform_key: Ed25519PrivateKey | None = None, require_signed: bool = False,
                 collector_broker: str | None = None, tls: tuple[str, str] | None = None,
                 share: str | None = None, collector_id: str = "vota-cloud-collector") -> None:
        """``broker``: the operator's connection (campaigns, commands, key lists);
        ``collector_broker``: the collector's, its own identity (default: the same URL);
        ``share``, ``collector_id``: one of several collectors on a shared subscription, each
        with its own client id, storing each report once in the same store;
        ``tls``: the package server's certificate and key (HTTPS), else plain HTTP."""
        broker_address(broker)  # a bad URL is refused here, not at the first publish
        Path(packages).mkdir(parents=True, exist_ok=True)
        self.broker, self.mqtt_version = broker, mqtt_version
        self.packages = PackageServer(packages, port=http_port, tls=tls)
        # VIN -> that vehicle's report keys: its reports are stored only when it signed them
        self.report_keys: dict[str, dict[str, Ed25519PublicKey]] = {}
        self.collector = Collector(collector_broker or broker, store, client_id=collector_id, mqtt_version=mqtt_version,
                                   report_keys=self.report_keys, require_signed=require_signed, share=share)
        self.trust = TrustPlatform(platform_key) if platform_key is not None else None
        self.vehicle_keys: dict[str, X25519PublicKey] = {}

    def register_vehicle(self, vin: str, report_key: Ed25519PublicKey) -> None:
        """The vehicle's report key (from its production record): from now on only reports it signed count."""
        self.report_keys.setdefault(vin, {})[key_id(report_key)] = report_key

    # ---- content (C2, C3, C7) ----------------------------------------------------------------
    def offer_bundle(self, vin: str, bundle: bytes, request: bool = False) -> None:
        publish(self.broker, vin, "command", content_offer(bundle, self.packages.root, self.base_url, vin, request),
                self.mqtt_version)

    def offer_content(self, bundle_id: str, vin: str, request: bool = False) -> bytes:
        """Offer approved content to a vehicle (the owner's own, or shared with another
        owner: the same content, its keys wrapped for this vehicle). Returns the bundle."""
        if self.trust is None:
            raise UsageError("the stand-in cloud has no trust platform key")
        if vin not in self.vehicle_keys:
            raise UsageError(f"no content key registered for {vin}")
        bundle = self.trust.bundle_for(bundle_id, vin, self.vehicle_keys[vin])
        self.offer_bundle(vin, bundle, request)
        return bundle

    def request_content(self, vin: str, bundle_id: str) -> None:
        """What the owner's phone sends: download and run the offered content."""
        publish(self.broker, vin, "command", json.dumps({"command": "content_request", "vin": vin,
                                                          "bundle_id": bundle_id}).encode(), self.mqtt_version)

    def content_events(self, vin: str, bundle_id: str | None = None) -> list[dict[str, Any]]:
        return [dict(m["body"]) for m in list(self.collector.messages)
                if m.get("vin") == vin and isinstance(m.get("body"), dict) and m["body"].get("event") == "content"
                and (bundle_id is None or m["body"].get("bundle_id") == bundle_id)]

    def content_state(self, vin: str, bundle_id: str) -> dict[str, str]:
        """The latest status the vehicle reported per item (and ``bundle`` for the bundle)."""
        out: dict[str, str] = {}
        for body in self.content_events(vin, bundle_id):
            out[str(body.get("item") or "bundle")] = str(body["status"])
        return out

    @property
    def base_url(self) -> str:
        return self.packages.url("").rstrip("/")

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
