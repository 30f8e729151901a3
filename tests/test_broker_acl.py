"""The shipped Mosquitto configuration (configs/mosquitto/): TLS only, one identity per vehicle
and per cloud service with the client id bound to it, ACLs by topic, queues that keep what the
broker acknowledged. Checked on a real Mosquitto running that configuration, attacked with
Mosquitto's own command-line clients: the vehicle's reports reach the cloud and its campaigns
reach the vehicle; an anonymous or plaintext client cannot connect; another vehicle can neither
read this one's topics nor write to them, nor take over its session or the collector's."""

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
from cloud_sim.pki import bench_pki
from tests.conftest import Mosquitto
from vota.bench.broker import shipped_conf

pytestmark = pytest.mark.slow  # a broker process

VIN, OTHER = "LVOTAACL000000001", "LVOTAACL000000002"
USERS = ("vota-cloud", "vota-collector", VIN, OTHER)


class ShippedBroker(Mosquitto):
    """Mosquitto running the shipped vota.conf and vota.acl: its certificates from the bench's
    PKI (``vota cloud certs``), a password per identity made with mosquitto_passwd, as an operator would."""

    def __init__(self, directory: Path, mutual_tls: bool = False) -> None:
        super().__init__(directory)
        self.certs = bench_pki(directory / "certs", [VIN, OTHER])
        passwd = directory / "vota.passwd"
        passwd.write_text("")
        for user in USERS:
            subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, f"pw-{user}"], check=True, capture_output=True)
        conf = shipped_conf(self.port, directory, passwd, self.certs)
        if mutual_tls:  # the shipped configuration's two commented lines, as an operator would enable them
            conf = conf.replace("#require_certificate true", "require_certificate true")
            conf = conf.replace("#use_identity_as_username true", "use_identity_as_username true")
        self.conf.write_text(conf.replace("user root\n", "") + self.user_line())

    def cloud_url(self, user: str) -> str:
        return f"mqtts://{user}:pw-{user}@127.0.0.1:{self.port}?ca={self.certs / 'ca.pem'}"

    def link_config(self, tmp_path: Path, vin: str = VIN, **extra: Any) -> CloudConfig:
        return CloudConfig(broker=f"mqtts://127.0.0.1:{self.port}", outbox=str(tmp_path / f"outbox-{vin}.db"),
                           username=vin, password=f"pw-{vin}", tls_ca=str(self.certs / "ca.pem"), **extra)

    def tool(self, program: str, user: str | None, *args: str, cert: str | None = None) -> subprocess.CompletedProcess[str]:
        """mosquitto_pub or mosquitto_sub against this broker (MQTT 5), logged in as ``user``."""
        argv = [program, "-h", "127.0.0.1", "-p", str(self.port), "-V", "mqttv5", "--cafile", str(self.certs / "ca.pem")]
        if user:
            argv += ["-u", user, "-P", f"pw-{user}"]
        if cert:
            argv += ["--cert", str(self.certs / f"{cert}.pem"), "--key", str(self.certs / f"{cert}.key")]
        return subprocess.run(argv + list(args), capture_output=True, text=True, timeout=30)


@pytest.fixture
def broker(tmp_path: Path) -> Any:
    b = ShippedBroker(tmp_path / "broker")
    b.start()
    yield b
    b.stop()


def _client(broker: ShippedBroker, user: str | None) -> tuple[mqtt.Client, list[tuple[str, bytes]], int]:
    got: list[tuple[str, bytes]] = []
    done = threading.Event()
    result: list[Any] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"probe-{user}-{time.monotonic_ns()}", protocol=mqtt.MQTTv5)
    client.tls_set(ca_certs=str(broker.certs / "ca.pem"))
    if user:
        client.username_pw_set(user, f"pw-{user}")
    client.on_message = lambda c, u, m: got.append((m.topic, bytes(m.payload)))
    client.on_connect = lambda c, u, f, reason, p: (result.append(reason), done.set())
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    assert done.wait(10)
    return client, got, result[0].value


def _collector_away(broker: ShippedBroker, tmp_path: Path) -> None:
    """The collector connects once and goes: its session (and the queue for it) stays at the broker."""
    collector = Collector(broker.cloud_url("vota-collector"), tmp_path / "store", diagnose=False)
    collector.start()
    assert collector.connected.wait(10)
    collector.stop()


def _published(link: CloudLink, timeout: float) -> None:
    """Every report of ``link`` taken by the broker (PUBACK)."""
    deadline = time.monotonic() + timeout
    while link.unpublished() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert link.unpublished() == 0


def test_vehicles_and_the_cloud_see_only_what_the_acl_allows(broker: ShippedBroker, tmp_path: Path) -> None:
    collector = Collector(broker.cloud_url("vota-collector"), tmp_path / "store")
    collector.start()
    received: list[tuple[str, bytes]] = []
    link = CloudLink(broker.link_config(tmp_path), VIN, on_message=lambda kind, payload: received.append((kind, payload)))
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


def test_a_burst_while_the_cloud_is_away_is_all_delivered(broker: ShippedBroker, tmp_path: Path) -> None:
    """The shipped queue settings: 3,000 reports acknowledged by the broker while the collector
    is offline (a durable session) all reach it when it is back; with Mosquitto's default of
    1,000 queued messages most of them would be dropped after the broker acknowledged them."""
    _collector_away(broker, tmp_path)
    link = CloudLink(broker.link_config(tmp_path), VIN)
    link.start()
    try:
        for n in range(3_000):
            link.report("events", {"event": "tick", "n": n}, msg_id=f"tick-{n}")
        _published(link, 120)  # every report taken by the broker (kept until the cloud acknowledges it)
    finally:
        link.stop()
    collector = Collector(broker.cloud_url("vota-collector"), tmp_path / "store", diagnose=False)
    collector.start()
    try:
        def ticks(c: Collector) -> int:
            return sum(1 for m in c.messages if m["id"].startswith("tick-"))

        assert collector.wait_for(lambda c: ticks(c) == 3_000, 120), ticks(collector)
    finally:
        collector.stop()


def _sessioned(broker: ShippedBroker, user: str, topic: str, cert: str | None = None) -> tuple[mqtt.Client, list[bytes], list[Any]]:
    """A client that keeps its session at the broker (MQTT 5, a day), subscribed to ``topic``;
    returns it with what it received and its disconnects."""
    got: list[bytes] = []
    disconnects: list[Any] = []
    subscribed = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"vota-tbox-{user}", protocol=mqtt.MQTTv5)  # as the TBOX names itself
    client.tls_set(ca_certs=str(broker.certs / "ca.pem"), certfile=str(broker.certs / f"{cert}.pem") if cert else None,
                   keyfile=str(broker.certs / f"{cert}.key") if cert else None)
    if cert is None:
        client.username_pw_set(user, f"pw-{user}")
    client.on_message = lambda c, u, m: got.append(bytes(m.payload))
    client.on_connect = lambda c, u, f, reason, p: c.subscribe(topic, qos=1)
    client.on_subscribe = lambda c, u, mid, reasons, p: subscribed.set()
    client.on_disconnect = lambda c, u, f, reason, p: disconnects.append(reason)
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 86400
    client.connect("127.0.0.1", broker.port, clean_start=False, properties=props)
    client.loop_start()
    assert subscribed.wait(10)
    return client, got, disconnects


def _close(client: mqtt.Client) -> None:
    client.disconnect()
    client.loop_stop()


def test_another_vehicle_cannot_take_over_a_vehicles_or_the_collectors_session(broker: ShippedBroker, tmp_path: Path) -> None:
    """The attack: vehicle B, logged in as itself, connects with A's client id (or the collector's)
    and a clean start, to wipe the session and the messages queued in it, or over and over to
    keep A off the broker. With the client id bound to the user name, B only ever touches its own."""
    campaign_topic = f"vota/v1/{VIN}/campaign"
    a, a_got, a_disconnects = _sessioned(broker, VIN, campaign_topic)
    for n in range(3):  # B, over and over, as A's and the collector's client ids, with a clean start
        for borrowed in (VIN, f"vota-tbox-{VIN}", "vota-collector", "vota-cloud-collector"):
            done = broker.tool("mosquitto_pub", OTHER, "-i", borrowed, "-q", "1", "-t", f"vota/v1/{OTHER}/events",
                               "-m", json.dumps({"id": f"b-{n}-{borrowed}"}))
            assert done.returncode == 0, done.stderr  # B may connect: as itself
    time.sleep(0.5)
    assert a_disconnects == []  # A was never kicked off
    _close(a)  # A offline: its session (and a campaign queued in it) stays at the broker
    collector = Collector(broker.cloud_url("vota-collector"), tmp_path / "store", diagnose=False)
    collector.start()
    assert collector.connected.wait(10)
    collector.stop()  # the collector away too; its session stays
    link = CloudLink(broker.link_config(tmp_path, OTHER), OTHER)  # B reports while the collector is away
    link.start()
    link.report("events", {"event": "hello"}, msg_id="b-report")
    _published(link, 10)
    link.stop()
    for borrowed in (VIN, f"vota-tbox-{VIN}", "vota-collector", "vota-cloud-collector"):  # B tries to wipe them again
        assert broker.tool("mosquitto_sub", OTHER, "-i", borrowed, "-t", f"vota/v1/{OTHER}/campaign", "-E").returncode == 0
    sent = broker.tool("mosquitto_pub", "vota-cloud", "-q", "1", "-t", campaign_topic, "-m", '{"campaign": "for A"}')
    assert sent.returncode == 0, sent.stderr
    a, a_got, _ = _sessioned(broker, VIN, campaign_topic)  # A back: what was queued for it is there
    collector = Collector(broker.cloud_url("vota-collector"), tmp_path / "store", diagnose=False)
    collector.start()
    try:
        deadline = time.monotonic() + 10
        while not a_got and time.monotonic() < deadline:
            time.sleep(0.05)
        assert a_got == [b'{"campaign": "for A"}']
        assert collector.wait_for(lambda c: any(m["id"] == "b-report" for m in c.messages), 10)
    finally:
        _close(a)
        collector.stop()


def test_the_broker_speaks_tls_only_and_the_vehicle_checks_its_certificate(broker: ShippedBroker, tmp_path: Path) -> None:
    plain = subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-u", VIN, "-P", f"pw-{VIN}",
                            "-t", f"vota/v1/{VIN}/events", "-m", "x"], capture_output=True, text=True, timeout=30)
    assert plain.returncode != 0  # no plaintext MQTT on the shipped listener
    other_ca = bench_pki(tmp_path / "other-pki", [])  # a broker certificate from another CA (a man in the middle)
    fooled = CloudLink(CloudConfig(broker=f"mqtts://127.0.0.1:{broker.port}", outbox=str(tmp_path / "o.db"), username=VIN,
                                   password=f"pw-{VIN}", tls_ca=str(other_ca / "ca.pem"), reconnect_max_s=1), VIN)
    fooled.start()
    try:
        assert not fooled.connected.wait(3)  # the vehicle does not trust it, so sends it nothing
    finally:
        fooled.stop()
    assert broker.tool("mosquitto_pub", VIN, "-t", f"vota/v1/{VIN}/events", "-m", "x").returncode == 0  # the right CA


def test_reports_leave_the_outbox_only_when_the_cloud_stored_them(broker: ShippedBroker, tmp_path: Path) -> None:
    """The broker takes five reports (PUBACK) while the collector is away, then loses them: the
    collector's session wiped (the operator's tool connected with its identity and a clean start).
    The vehicle still holds them, sends them again, and they reach the cloud."""
    _collector_away(broker, tmp_path)
    link = CloudLink(broker.link_config(tmp_path, ack_timeout_s=2), VIN)
    link.start()
    try:
        for n in range(5):
            link.report("events", {"event": "tick", "n": n}, msg_id=f"tick-{n}")
        _published(link, 10)
        assert link.pending() == 5  # the broker has them; the cloud has not said so
        wiped = broker.tool("mosquitto_sub", "vota-collector", "-t", "vota/v1/+/events", "-E")  # clean start: queue gone
        assert wiped.returncode == 0, wiped.stderr
        collector = Collector(broker.cloud_url("vota-collector"), tmp_path / "store", diagnose=False)
        collector.start()
        try:
            assert collector.wait_for(lambda c: {f"tick-{n}" for n in range(5)} <= {m["id"] for m in c.messages}, 30)
            deadline = time.monotonic() + 10
            while link.pending() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert link.pending() == 0  # acknowledged by the cloud: now they go
        finally:
            collector.stop()
        again = Collector(broker.cloud_url("vota-collector"), tmp_path / "store", diagnose=False)
        assert {(VIN, f"tick-{n}") for n in range(5)} <= again.seen  # a restarted collector stores a resend once
    finally:
        link.stop()


def test_with_mutual_tls_the_certificate_is_the_identity(tmp_path: Path) -> None:
    """The shipped configuration's mutual-TLS lines enabled: no certificate, no entry; B's
    certificate with A's client id is still B."""
    broker = ShippedBroker(tmp_path / "broker", mutual_tls=True)
    bench_pki(broker.certs, ["vota-cloud"])
    broker.start()
    try:
        topic = f"vota/v1/{VIN}/campaign"
        assert broker.tool("mosquitto_pub", VIN, "-t", f"vota/v1/{VIN}/events", "-m", "x").returncode != 0  # password only
        a, a_got, _ = _sessioned(broker, VIN, topic, cert=VIN)
        _close(a)
        for borrowed in (VIN, f"vota-tbox-{VIN}"):
            assert broker.tool("mosquitto_sub", None, "-i", borrowed, "-t", f"vota/v1/{OTHER}/campaign", "-E",
                               cert=OTHER).returncode == 0
        assert broker.tool("mosquitto_pub", None, "-q", "1", "-t", topic, "-m", "for A", cert="vota-cloud").returncode == 0
        a, a_got, _ = _sessioned(broker, VIN, topic, cert=VIN)
        try:
            deadline = time.monotonic() + 10
            while not a_got and time.monotonic() < deadline:
                time.sleep(0.05)
            assert a_got == [b"for A"]
        finally:
            _close(a)
    finally:
        broker.stop()
