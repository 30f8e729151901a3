"""The MQTT cloud link against a real Mosquitto broker: store and forward, last will,
trace compression and splitting, inbound messages."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.adapters.cloud_link import CloudConfig, CloudLink
from cloud_sim.collector import Collector
from tests.conftest import ROOT

VIN = "LVOTA000000000001"


def _link(broker, tmp_path, **kw):  # type: ignore[no-untyped-def]
    config = CloudConfig(broker=broker.url, outbox=str(tmp_path / "outbox.db"), reconnect_min_s=1, reconnect_max_s=2, **kw)
    return config


def _events(collector: Collector) -> list[int]:
    return [m["body"]["n"] for m in collector.messages if m["type"] == "events" and "n" in m["body"]]


def _drained(link: CloudLink, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while link.pending() and time.monotonic() < deadline:
        time.sleep(0.05)
    return link.pending() == 0


def test_reports_survive_broker_outage_and_tbox_restart(mosquitto, tmp_path):
    collector = Collector(mosquitto.url, tmp_path / "cloud")
    collector.start()
    assert collector.connected.wait(10)  # the cloud's durable session exists
    mosquitto.stop()  # the broker is down when the vehicle starts reporting
    link = CloudLink(_link(mosquitto, tmp_path), VIN)
    link.start()
    try:
        for n in range(20):
            link.report("events", {"n": n})
        time.sleep(1.0)
        assert link.pending() == 20  # kept, nothing acknowledged
        mosquitto.start()
        assert collector.wait_for(lambda c: set(_events(c)) == set(range(20)), 20), _events(collector)
        assert _drained(link)
        mosquitto.stop()
        for n in range(20, 30):
            link.report("events", {"n": n})
        link.stop(graceful=False)  # the TBOX goes away with 10 reports unsent ...
        link = CloudLink(_link(mosquitto, tmp_path), VIN)  # ... and comes back with the same outbox
        assert link.pending() == 10
        link.start()
        mosquitto.start()
        assert collector.wait_for(lambda c: set(_events(c)) == set(range(30)), 20), _events(collector)
        assert _drained(link)
        got = _events(collector)
        assert len(got) == 30  # each message stored once, whatever the broker delivered twice
        stored = list((tmp_path / "cloud" / VIN / "messages" / "events").iterdir())
        assert len(stored) == 30
    finally:
        link.stop()
        collector.stop()


def test_online_status_and_last_will(mosquitto, tmp_path):
    collector = Collector(mosquitto.url, tmp_path / "cloud")
    collector.start()
    script = textwrap.dedent(f"""
        import time, sys
        sys.path.insert(0, {str(ROOT)!r})
        from agent.adapters.cloud_link import CloudConfig, CloudLink
        link = CloudLink(CloudConfig(broker={mosquitto.url!r}, outbox={str(tmp_path / 'o.db')!r}, keepalive=2), {VIN!r})
        link.start()
        link.connected.wait(10)
        print("up", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"up"
        assert collector.wait_for(lambda c: c.status.get(VIN) == "online", 10)
        os.kill(proc.pid, signal.SIGKILL)  # no goodbye: the broker publishes the last will
        proc.wait()
        assert collector.wait_for(lambda c: c.status.get(VIN) == "offline", 15)
        assert json.loads((tmp_path / "cloud" / VIN / "status.json").read_text())["state"] == "offline"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        collector.stop()


def test_large_trace_is_compressed_split_and_reassembled(mosquitto, tmp_path):
    collector = Collector(mosquitto.url, tmp_path / "cloud")
    collector.start()
    link = CloudLink(_link(mosquitto, tmp_path, max_message_bytes=4096), VIN)
    link.start()
    try:
        rows = [json.dumps([i * 40.1, f"36{i % 256:02x}", 4095, 38.2, f"76{i % 256:02x}"]) for i in range(3000)]
        trace = ("\n".join(rows) + "\n").encode() + os.urandom(8000).hex().encode()
        ids = link.report_trace("c-1.vcu.flash", trace, {"campaign_id": "c-1", "ecu": "vcu", "stage": "flash"})
        assert len(ids) > 3
        path = tmp_path / "cloud" / VIN / "traces" / "c-1.vcu.flash.jsonl"
        assert collector.wait_for(lambda c: path.exists(), 20)
        assert path.read_bytes() == trace
        parts = [m for m in collector.messages if m["type"] == "traces"]
        assert all(len(json.dumps(m)) <= 4096 for m in parts)
        assert sum(len(m["body"]["data"]) for m in parts) < len(trace)  # compressed
    finally:
        link.stop()
        collector.stop()


@contextlib.contextmanager
def _vehicle_and_cloud(mosquitto, tmp_path, handle):  # type: ignore[no-untyped-def]
    """A vehicle's cloud link handing inbound messages to ``handle``, the collector, and a plain
    MQTT client playing the cloud; all connected and subscribed."""
    collector = Collector(mosquitto.url, tmp_path / "cloud")
    collector.start()
    link = CloudLink(_link(mosquitto, tmp_path), VIN, on_message=handle)
    link.start()
    cloud = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="test-cloud", protocol=mqtt.MQTTv5)
    cloud.connect("127.0.0.1", mosquitto.port)
    cloud.loop_start()
    try:
        assert link.connected.wait(10) and collector.connected.wait(10)
        time.sleep(0.3)  # subscriptions in place
        yield collector, cloud
    finally:
        cloud.loop_stop()
        cloud.disconnect()
        link.stop()
        collector.stop()


def test_inbound_messages_and_oversized_payloads(mosquitto, tmp_path):
    received: list[tuple[str, bytes]] = []
    got = threading.Event()

    def handle(kind: str, payload: bytes) -> None:
        received.append((kind, payload))
        got.set()

    with _vehicle_and_cloud(mosquitto, tmp_path, handle) as (collector, cloud):
        cloud.publish(f"vota/v1/{VIN}/command", b'{"command": "confirm_install"}', qos=1).wait_for_publish(5)
        assert got.wait(10) and received == [("command", b'{"command": "confirm_install"}')]
        cloud.publish(f"vota/v1/{VIN}/campaign", b"x" * (300 * 1024), qos=1).wait_for_publish(5)
        assert collector.wait_for(lambda c: any(m["body"].get("reason") == "too_large" for m in c.messages), 10)
        assert len(received) == 1  # the oversized one never reached the handler


def test_the_collector_survives_hostile_messages_and_writes_only_under_its_store(mosquitto, tmp_path):
    """Anyone on the broker (mosquitto_pub here, not our client): a VIN of ``..``, a status that
    is not an object, trace parts that are not numbers, a gzip bomb. Each is dropped with a
    reason, nothing is written outside ``<store>/<vin>/``, and the collector goes on storing."""
    import base64
    import gzip
    import shutil

    pub = shutil.which("mosquitto_pub")
    assert pub, "mosquitto_pub comes with the mosquitto package make test installs"
    store = tmp_path / "cloud" / "store"
    collector = Collector(mosquitto.url, store)
    collector.start()
    bomb = base64.b64encode(gzip.compress(b"\0" * (300 * 1024 * 1024))).decode()
    hostile = [
        ("vota/v1/../status", '{"state": "online"}'),
        ("vota/v1/../../events", '{"id": "x", "body": {}}'),
        (f"vota/v1/{VIN}/status", "[1, 2]"),
        (f"vota/v1/{VIN}/traces", '{"id": "t1", "body": {"trace_id": "a", "part": "zero", "parts": 1, "data": "x"}}'),
        (f"vota/v1/{VIN}/traces", '{"id": "t2", "body": {"trace_id": "b", "part": 0, "parts": 1, "data": "@@@"}}'),
        (f"vota/v1/{VIN}/traces", json.dumps({"id": "t3", "body": {"trace_id": "c", "part": 0, "parts": 1, "data": bomb}})),
        (f"vota/v1/{VIN}/events", '{"id": "e1", "body": [1]}'),
    ]
    try:
        assert collector.connected.wait(10)
        for topic, payload in hostile:
            run = subprocess.run([pub, "-h", "127.0.0.1", "-p", str(mosquitto.port), "-q", "1", "-t", topic, "-s"],
                                 input=payload.encode(), capture_output=True, timeout=30)
            assert run.returncode == 0, run.stderr
        assert collector.wait_for(lambda c: c.rejected >= len(hostile), 30), collector.rejected
        subprocess.run([pub, "-h", "127.0.0.1", "-p", str(mosquitto.port), "-q", "1", "-t", f"vota/v1/{VIN}/events",
                        "-m", '{"id": "after", "vin": "%s", "type": "events", "body": {"event": "x"}}' % VIN], check=True,
                       timeout=30)
        assert collector.wait_for(lambda c: any(m["id"] == "after" for m in c.messages), 10)  # still collecting
        written = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "cloud").rglob("*") if p.is_file())
        assert all(w.startswith(f"cloud/store/{VIN}/") for w in written), written
        assert not (store / VIN / "traces").exists()  # no trace made of the bomb or the bad parts
        assert not any("-t1" in w or "-t2" in w or "-e1" in w for w in written)  # malformed parts are not kept
    finally:
        collector.stop()


def test_a_message_whose_handling_fails_is_reported_and_the_link_goes_on(mosquitto, tmp_path):
    """Whatever the handler raises on one message, the cloud hears a rejection naming the topic,
    and the next message is handled."""
    handled: list[bytes] = []

    def handle(kind: str, payload: bytes) -> None:
        if payload == b"boom":
            raise ValueError("cannot take this one")
        handled.append(payload)

    with _vehicle_and_cloud(mosquitto, tmp_path, handle) as (collector, cloud):
        for payload in (b"boom", b"next"):
            cloud.publish(f"vota/v1/{VIN}/command", payload, qos=1).wait_for_publish(5)
        assert collector.wait_for(lambda c: any(m["body"].get("reason") == "internal_error" for m in c.messages), 10)
        (rejected,) = [m["body"] for m in collector.messages if m["body"].get("event") == "rejected"]
        assert rejected["topic"] == "command" and rejected["detail"] == "ValueError: cannot take this one"
        deadline = time.monotonic() + 10
        while handled != [b"next"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert handled == [b"next"]


def test_what_the_cloud_publishes_while_the_vehicle_is_offline_waits_for_it(mosquitto, tmp_path):
    """A persistent session (cloud.session_expiry_s): a campaign published while the TBOX is
    offline is delivered when it is back; a command that waited longer than its message expiry
    is dropped by the broker (stale commands do not arrive days later)."""
    from cloud_sim.cloud import publish

    received: list[tuple[str, bytes]] = []
    link = CloudLink(_link(mosquitto, tmp_path), VIN, on_message=lambda kind, payload: received.append((kind, payload)))
    link.start()
    assert link.connected.wait(10)
    time.sleep(0.3)  # subscribed
    link.stop()
    publish(mosquitto.url, VIN, "command", b'{"command": "confirm_install", "campaign_id": "c-1"}', expiry_s=1)
    publish(mosquitto.url, VIN, "campaign", b'{"a signed": "campaign"}')
    time.sleep(2.5)  # the command's expiry passes while the vehicle is away
    link = CloudLink(_link(mosquitto, tmp_path), VIN, on_message=lambda kind, payload: received.append((kind, payload)))
    link.start()
    try:
        deadline = time.monotonic() + 10
        while not received and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        assert received == [("campaign", b'{"a signed": "campaign"}')]
    finally:
        link.stop()


def test_the_cloud_stores_only_reports_the_vehicle_signed(mosquitto, tmp_path):
    """The fake report (security issue): a client the broker lets write publishes `finished:
    success` under the id the TBOX uses later. With the vehicle's report key registered, the
    cloud drops it (unsigned, signed by another key, another vehicle's signed report moved to
    this topic, a signed report altered) and stores the vehicle's own `failed` under that id;
    a replay of it is one report; ids are per vehicle."""
    import shutil

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from agent.core.roles import key_id
    from agent.core.signed_report import sign_report

    pub = shutil.which("mosquitto_pub")
    assert pub, "mosquitto_pub comes with the mosquitto package make test installs"
    other_vin = "LVOTA000000000002"
    keys = {vin: Ed25519PrivateKey.generate() for vin in (VIN, other_vin)}
    for vin, key in keys.items():
        (tmp_path / f"{vin}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                                serialization.NoEncryption()))
    collector = Collector(mosquitto.url, tmp_path / "cloud",
                          report_keys={vin: {key_id(k.public_key()): k.public_key()} for vin, k in keys.items()},
                          require_signed=True)
    collector.start()

    def publish(topic: str, doc: dict) -> None:  # not our client
        run = subprocess.run([pub, "-h", "127.0.0.1", "-p", str(mosquitto.port), "-q", "1", "-t", topic, "-s"],
                             input=json.dumps(doc).encode(), capture_output=True, timeout=30)
        assert run.returncode == 0, run.stderr

    fake = {"id": "c-1.finished", "vin": VIN, "type": "events", "ts": time.time(),
            "body": {"event": "finished", "campaign_id": "c-1", "outcome": "success"}}
    topic = f"vota/v1/{VIN}/events"
    try:
        assert collector.connected.wait(10)
        publish(topic, fake)
        publish(topic, sign_report(fake, Ed25519PrivateKey.generate()))
        publish(topic, sign_report({**fake, "vin": other_vin}, keys[other_vin]))  # the other car's, moved here
        publish(topic, sign_report(fake, keys[other_vin]))  # the other car's key on this car's report
        assert collector.wait_for(lambda c: c.rejected >= 4, 20), collector.rejected
        links = {vin: CloudLink(_link(mosquitto, tmp_path / vin, report_key=str(tmp_path / f"{vin}.key")), vin)
                 for vin in keys}
        for link in links.values():
            link.start()
            link.report("events", {"event": "finished", "campaign_id": "c-1", "outcome": "failed"}, msg_id="c-1.finished")
        assert collector.wait_for(lambda c: len(c.messages) == 2, 20), collector.messages  # one per vehicle
        for link in links.values():
            link.stop()
        (mine,) = [m for m in collector.messages if m["vin"] == VIN]
        assert mine["body"]["outcome"] == "failed" and mine["signatures"][0]["keyid"] == key_id(keys[VIN].public_key())
        publish(topic, mine)  # a replay
        altered = json.loads(json.dumps(mine))
        altered["body"]["outcome"] = "success"
        publish(topic, altered)
        assert collector.wait_for(lambda c: c.rejected >= 5 and c.duplicates >= 1, 20), (collector.rejected,
                                                                                          collector.duplicates)
        stored = [json.loads(p.read_text()) for p in (tmp_path / "cloud" / VIN / "messages" / "events").iterdir()]
        assert [m["body"]["outcome"] for m in stored] == ["failed"]
    finally:
        collector.stop()
