"""The shipped Mosquitto configuration (configs/mosquitto/): one identity per vehicle and one
for the cloud, ACLs by topic, queues that keep what the broker acknowledged. Checked on a real Mosquitto running that configuration: the
vehicle's reports reach the cloud and its campaigns reach the vehicle; an anonymous client
cannot connect; another vehicle can neither read this one's topics nor write to them."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.adapters.cloud_link import CloudLink
from agent.core.config import CloudConfig
from cloud_sim.collector import Collector
from tests.conftest import ROOT, Mosquitto

pytestmark = pytest.mark.slow  # a broker process

VIN, OTHER = "LVOTAACL000000001", "LVOTAACL000000002"
SHIPPED = Path(ROOT) / "configs" / "mosquitto"


@pytest.fixture
def broker(tmp_path: Path) -> Any:
    """Mosquitto running the shipped vota.conf and vota.acl, with a password file for the cloud
    and two vehicles (made with mosquitto_passwd, as an operator would)."""
    passwd = tmp_path / "vota.passwd"
    passwd.write_text("")
    for user in ("vota-cloud", VIN, OTHER):
        subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, f"pw-{user}"], check=True, capture_output=True)
    b = Mosquitto(tmp_path / "broker")
    conf = (SHIPPED / "vota.conf").read_text()
    conf = conf.replace("listener 1883", f"listener {b.port} 127.0.0.1")
    conf = conf.replace("/etc/mosquitto/vota.passwd", str(passwd)).replace("/etc/mosquitto/vota.acl", str(SHIPPED / "vota.acl"))
    b.conf.write_text(conf + f"persistence_location {b.dir}/\n" + b.user_line())
    b.start()
    yield b
    b.stop()


def _client(broker: Mosquitto, user: str | None) -> tuple[mqtt.Client, list[tuple[str, bytes]], int]:
    got: list[tuple[str, bytes]] = []
    done = threading.Event()
    result: list[Any] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"probe-{user}-{time.monotonic_ns()}", protocol=mqtt.MQTTv5)
    if user:
        client.username_pw_set(user, f"pw-{user}")
    client.on_message = lambda c, u, m: got.append((m.topic, bytes(m.payload)))
    client.on_connect = lambda c, u, f, reason, p: (result.append(reason), done.set())
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    assert done.wait(10)
    return client, got, result[0].value


def test_vehicles_and_the_cloud_see_only_what_the_acl_allows(broker: Mosquitto, tmp_path: Path) -> None:
    collector = Collector("127.0.0.1", broker.port, tmp_path / "store", username="vota-cloud", password="pw-vota-cloud")
    collector.start()
    received: list[tuple[str, bytes]] = []
    config = CloudConfig(broker=broker.url, outbox=str(tmp_path / "outbox.db"), username=VIN, password=f"pw-{VIN}")
    link = CloudLink(config, VIN, on_message=lambda kind, payload: received.append((kind, payload)))
    link.start()
    anonymous, _, anonymous_rc = _client(broker, None)
    other, other_got, other_rc = _client(broker, OTHER)
    cloud, _, cloud_rc = _client(broker, "vota-cloud")
    try:
        assert link.connected.wait(10) and collector.connected.wait(10)
        assert anonymous_rc != 0 and other_rc == 0 and cloud_rc == 0  # anonymous: not authorised
        other.subscribe(f"vota/v1/{VIN}/#", qos=1)
        time.sleep(0.5)
        link.report("events", {"event": "state", "campaign_id": "c-1", "state": "verified"}, msg_id="c-1.state.verified")
        assert collector.wait_for(lambda c: any(m["id"] == "c-1.state.verified" for m in c.messages), 10)
        # another vehicle writes a fake report under this vehicle's topic, and a fake campaign to it
        other.publish(f"vota/v1/{VIN}/events", json.dumps({"id": "c-1.finished", "vin": VIN, "type": "events",
                                                           "body": {"event": "finished", "outcome": "success"}}), qos=1)
        other.publish(f"vota/v1/{VIN}/campaign", b'{"fake": "campaign"}', qos=1)
        # the vehicle writes to an inbound topic (its own campaign) and reads nothing it should not
        cloud.publish(f"vota/v1/{VIN}/campaign", b'{"from": "the cloud"}', qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 10
        while not received and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)
        assert received == [("campaign", b'{"from": "the cloud"}')]  # the cloud's, not the other vehicle's
        assert not any(m["id"] == "c-1.finished" for m in collector.messages)  # the fake report was dropped
        assert other_got == []  # the other vehicle read none of this vehicle's traffic
    finally:
        for client in (anonymous, other, cloud):
            client.loop_stop()
            client.disconnect()
        link.stop()
        collector.stop()


def test_a_burst_while_the_cloud_is_away_is_all_delivered(broker: Mosquitto, tmp_path: Path) -> None:
    """The shipped queue settings: 3,000 reports acknowledged by the broker while the collector
    is offline (a durable session) all reach it when it is back; with Mosquitto's default of
    1,000 queued messages most of them would be dropped after the broker acknowledged them."""
    collector = Collector("127.0.0.1", broker.port, tmp_path / "store", username="vota-cloud", password="pw-vota-cloud",
                          diagnose=False)
    collector.start()
    assert collector.connected.wait(10)
    collector.stop()  # away; its session (and the queue for it) stays at the broker
    config = CloudConfig(broker=broker.url, outbox=str(tmp_path / "outbox.db"), username=VIN, password=f"pw-{VIN}")
    link = CloudLink(config, VIN)
    link.start()
    try:
        for n in range(3_000):
            link.report("events", {"event": "tick", "n": n}, msg_id=f"tick-{n}")
        deadline = time.monotonic() + 120
        while link.pending() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert link.pending() == 0  # every report acknowledged by the broker, so gone from the outbox
    finally:
        link.stop()
    collector = Collector("127.0.0.1", broker.port, tmp_path / "store", username="vota-cloud", password="pw-vota-cloud",
                          diagnose=False)
    collector.start()
    try:
        def ticks(c: Collector) -> int:
            return sum(1 for m in c.messages if m["id"].startswith("tick-"))

        assert collector.wait_for(lambda c: ticks(c) == 3_000, 120), ticks(collector)
    finally:
        collector.stop()
