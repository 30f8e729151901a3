"""The gateway as a DoIP entity (ISO 13400-2), checked with python-doipclient, a DoIP client we
did not write, and with raw sockets for what a client library never sends: vehicle discovery,
routing activation and its refusals, alive checks, diagnostic messages routed by logical address
onto the CAN segments (a flash included), the one-owner-per-ECU rule between testers, and the
generic header's negative acknowledgements."""

from __future__ import annotations

import random
import socket
import struct
import time
import zlib
from typing import Any, Iterator

import pytest
import udsoncan
from doipclient import DoIPClient
from doipclient.connectors import DoIPClientUDSConnector
from udsoncan.client import Client

from agent.core.config import parse_vehicle_config
from agent.protocol import doip
from agent.protocol.ecu import security_key
from gateway.buses import Buses
from gateway.doip_entity import DoipEntity, activation_key
from tests.conftest import Proc, ecu_entry, loopback, multicast_bus, virtual_bus

VIN = "VOTADOIP000000001"
GATEWAY = 0x1010


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def doip_config(tmp_path: Any, ip: str, buses: dict[str, dict[str, Any]], **doip_extra: Any) -> dict[str, Any]:
    return {
        "segments": {name: {"bus": bus} for name, bus in buses.items()},
        "deploy": {"segment": "bb", "package_dir": str(tmp_path / "gw" / "packages")},
        "gateway": {"results_dir": str(tmp_path / "gw" / "results"), "vin": VIN},
        "ecus": {"vcu": ecu_entry("vcu", 0x7E0, 0x7E8, "pt"), "bms": ecu_entry("bms", 0x7E1, 0x7E9, "pt"),
                 "bcm": ecu_entry("bcm", 0x740, 0x748, "body")},
        "doip": {"address": ip, "logical_address": GATEWAY, "announce_to": "127.0.0.1", **doip_extra},
    }


@pytest.fixture
def gateway(tmp_path, write_config, procs) -> Iterator[dict[str, Any]]:  # type: ignore[no-untyped-def]
    """An ECU simulator on two segments and a gateway process with its DoIP entity; the
    announcement is caught on a socket opened before the gateway starts."""
    ip, port = loopback(), free_udp_port()
    config = write_config(doip_config(tmp_path, ip, {"bb": multicast_bus(), "pt": multicast_bus(), "body": multicast_bus()},
                                      announce_port=port, hold_s=1.0))
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind(("127.0.0.1", port))
    try:
        procs.append(Proc("ecu-sim", "-c", str(config), "--state-dir", str(tmp_path / "ecu"), log=tmp_path / "ecu.log"))
        procs.append(Proc("gateway", "-c", str(config), log=tmp_path / "gw.log"))
        procs[-1].wait_ready("gateway ready")
        procs[-2].wait_ready("ecu-sim ready")
        yield {"ip": ip, "listener": listener, "gw": procs[-1], "config": config}
    finally:
        listener.close()


class Bytes(udsoncan.DidCodec):
    def encode(self, *values: Any) -> bytes:
        return bytes(values[0])

    def decode(self, payload: bytes) -> Any:
        return payload

    def __len__(self) -> int:
        raise udsoncan.DidCodec.ReadAllRemainingData


def uds(client: DoIPClient) -> Client:
    config = dict(udsoncan.configs.default_client_config)
    config.update(p2_timeout=2.0, p2_star_timeout=6.0, request_timeout=None, use_server_timing=False,
                  data_identifiers={0xF15A: Bytes()})
    uds_client = Client(DoIPClientUDSConnector(client), config=config)  # type: ignore[arg-type]
    uds_client.open()
    return uds_client


def raw(client: DoIPClient, address: int, request: bytes, timeout: float = 3.0) -> bytes:
    """One request to ``address`` and its final answer (response pending skipped)."""
    client.send_diagnostic_to_address(address, request)
    deadline = time.monotonic() + timeout
    while True:
        message = client.read_doip(timeout=max(0.1, deadline - time.monotonic()))
        if getattr(message, "source_address", None) != address or not hasattr(message, "user_data"):
            continue
        answer = bytes(message.user_data)
        if answer[:1] == b"\x7f" and answer[2:3] == b"\x78":
            continue
        return answer


@pytest.mark.slow  # separate processes
def test_a_doip_client_finds_the_vehicle_reads_every_segment_and_flashes_an_ecu(gateway: dict[str, Any]) -> None:
    ip = gateway["ip"]
    addr, announcement = DoIPClient.await_vehicle_announcement(timeout=10, sock=gateway["listener"])
    assert addr[0] == ip and announcement.vin == VIN and announcement.logical_address == GATEWAY
    assert DoIPClient.get_entity(ecu_ip_address=ip)[1].vin == VIN  # (address, identification)
    assert DoIPClient.get_entity(ecu_ip_address=ip, vin=VIN)[1].logical_address == GATEWAY
    assert DoIPClient.get_entity(ecu_ip_address=ip, eid=announcement.eid)[1].vin == VIN
    with pytest.raises(TimeoutError):  # another vehicle's VIN: this one keeps quiet
        DoIPClient.get_entity(ecu_ip_address=ip, vin="WRONGVIN000000000")

    with DoIPClient(ip, 0x07E0, client_logical_address=0x0E00) as tester:
        status = tester.request_entity_status()
        assert status.node_type == 0 and status.max_concurrent_sockets == 4 and status.currently_open_sockets == 1
        assert tester.request_diagnostic_power_mode().diagnostic_power_mode == 1
        assert tester.request_alive_check().source_address == GATEWAY
        # an ECU on each segment, and the gateway itself (the deploy server's boot id)
        assert raw(tester, 0x07E0, bytes.fromhex("22f189")) == bytes.fromhex("62f189") + b"1.0.0"
        assert raw(tester, 0x0740, bytes.fromhex("22f187")) == bytes.fromhex("62f187") + b"BCM-1"
        assert raw(tester, GATEWAY, bytes.fromhex("22f1b0"))[:3] == bytes.fromhex("62f1b0")
        with pytest.raises(OSError, match="code: 3"):  # unknown target address
            tester.send_diagnostic_to_address(0x0123, bytes.fromhex("22f189"))

    # a whole programming sequence, through the gateway, by udsoncan on python-doipclient
    image = random.randbytes(20 * 1024)
    with DoIPClient(ip, 0x07E1, client_logical_address=0x0E05) as tester:
        client = uds(tester)
        client.change_session(3)
        client.control_dtc_setting(2)
        client.communication_control(3, 1)
        client.change_session(2)
        seed = client.request_seed(1).service_data.seed
        client.send_key(2, security_key("bms-secret", bytes(seed)))
        client.write_data_by_identifier(0xF15A, b"\x26\x12\x06" + bytes((10,)) + b"2.0.0-doip")
        erase = client.start_routine(0xFF00, b"\x44" + struct.pack(">LL", 0x08000000, len(image)))
        assert erase.service_data.routine_status_record == b"\x00"
        location = udsoncan.MemoryLocation(0x08000000, len(image), address_format=32, memorysize_format=32)
        block = client.request_download(location).service_data.max_length - 2
        for i, at in enumerate(range(0, len(image), block)):
            client.transfer_data((i + 1) & 0xFF, image[at:at + block])
        client.request_transfer_exit()
        check = client.start_routine(0x0202, struct.pack(">L", zlib.crc32(image)))
        assert check.service_data.routine_status_record == b"\x00"
        assert client.start_routine(0xFF01).service_data.routine_status_record == b"\x00"
        client.ecu_reset(1)
        time.sleep(0.5)
        deadline = time.monotonic() + 10
        while True:
            try:
                assert raw(tester, 0x07E1, bytes.fromhex("22f189")) == bytes.fromhex("62f189") + b"2.0.0-doip"
                break
            except (TimeoutError, AssertionError):
                assert time.monotonic() < deadline

    # the project's own DoIP client channel under the traced udsoncan connection the deploy link uses
    from agent.adapters.doip_client import DoipChannel, DoipRefused
    from agent.adapters.uds_client import RawCodec, TracingConnection
    from agent.core.trace import TraceHeader, TraceRecorder

    recorder = TraceRecorder(TraceHeader(stage="link", client="TBOX", server="GW", packet="doip", request_id=0x0E80,
                                         response_id=GATEWAY, functional_id=None, started=time.time()))
    with DoipChannel(ip, doip.TCP_PORT, 0x0E80, GATEWAY) as channel:
        config = dict(udsoncan.configs.default_client_config)
        config.update(request_timeout=None, p2_timeout=2.0, data_identifiers={0xF1B0: RawCodec()})
        with Client(TracingConnection(channel, recorder, "doip"), config=config) as client:  # type: ignore[arg-type]
            boot = client.read_data_by_identifier(0xF1B0).service_data.values[0xF1B0]
            assert len(boot) == 8
            assert client.change_session(3).positive
    # traced as the same exchanges are on CAN (agent/core/trace.py decides what of them is kept)
    assert [(e.header.hex(), (e.response or b"")[:2].hex()) for e in recorder.exchanges] == [("22f1b0", "62f1"),
                                                                                           ("1003", "5003")]
    with pytest.raises(DoipRefused, match="code 0x00"):  # an address outside doip.testers
        DoipChannel(ip, doip.TCP_PORT, 0x0A00, GATEWAY)
    with DoipChannel(ip, doip.TCP_PORT, 0x0E81, 0x0123) as channel, pytest.raises(DoipRefused, match="code 0x03"):
        channel.send(bytes.fromhex("22f189"))  # unknown target: the send fails as a transmit error does

    # vota deploy over DoIP, from the vehicle's file with deploy.transport doip: this gateway (deploy
    # link on CAN) serves its deploy server on its logical address as well
    import json

    import yaml

    from agent.protocol.files import packet_payload
    from tests.conftest import vota

    data = yaml.safe_load(gateway["config"].read_text())
    data["deploy"] = {k: v for k, v in data["deploy"].items() if k != "segment"} | {"transport": "doip"}
    config = gateway["config"].with_name("tbox-doip.yaml")
    config.write_text(yaml.safe_dump(data))
    package = config.with_name("map-7.bin")
    package.write_bytes(random.randbytes(100 * 1024))
    run = vota("deploy", "-c", str(config), "--out", str(config.with_name("deployed")), "--json", str(package))
    assert run.returncode == 0, run.stdout + run.stderr
    (result,) = json.loads(run.stdout)
    assert result["result"] == "success" and result["packets"] == -(-len(package.read_bytes()) // packet_payload(4095))
    assert (config.with_name("gw") / "packages" / "map-7.bin").read_bytes() == package.read_bytes()
    header = json.loads((config.with_name("deployed") / "map-7.bin.deploy.trace.jsonl").read_text().splitlines()[0])
    assert header["transport"] == "doip" and header["doip"]["target"] == GATEWAY
    assert "Traceback" not in gateway["gw"].text()


@pytest.mark.slow  # separate processes
def test_one_tester_at_a_time_per_ecu_the_other_is_told_busy(gateway: dict[str, Any]) -> None:
    ip = gateway["ip"]
    with DoIPClient(ip, 0x07E1, client_logical_address=0x0E00) as a, \
            DoIPClient(ip, 0x07E1, client_logical_address=0x0E01) as b:
        assert raw(a, 0x07E1, bytes.fromhex("1003"))[:2] == bytes.fromhex("5003")  # a holds bms, in its session
        assert raw(b, 0x07E1, bytes.fromhex("22f189")) == bytes.fromhex("7f2221")  # busyRepeatRequest, from bms's address
        assert raw(b, 0x07E0, bytes.fromhex("22f189")) == bytes.fromhex("62f189") + b"1.0.0"  # vcu is free
        assert raw(a, 0x07E1, bytes.fromhex("22f189")) == bytes.fromhex("62f189") + b"1.0.0"
        time.sleep(1.6)  # a quiet for longer than hold_s: bms let go
        assert raw(b, 0x07E1, bytes.fromhex("22f189")) == bytes.fromhex("62f189") + b"1.0.0"
        # the gateway's own services (the deploy server) are one tester's at a time too, let go with its connection
        assert raw(a, GATEWAY, bytes.fromhex("22f1b0"))[:3] == bytes.fromhex("62f1b0")
        assert raw(b, GATEWAY, bytes.fromhex("22f1b0")) == bytes.fromhex("7f2221")
        with DoIPClient(ip, GATEWAY, client_logical_address=0x0E02) as c:
            assert raw(c, GATEWAY, bytes.fromhex("1003")) == bytes.fromhex("7f1021")
        time.sleep(1.6)  # a quiet for longer than hold_s
        assert raw(b, GATEWAY, bytes.fromhex("22f1b0"))[:3] == bytes.fromhex("62f1b0")
        time.sleep(1.6)
        # ... and a TBOX on the CAN backbone that talks to the deploy server keeps the DoIP testers out meanwhile
        import threading

        import can
        import yaml

        backbone = can.Bus(**yaml.safe_load(gateway["config"].read_text())["segments"]["bb"]["bus"])
        talking = threading.Event()
        talking.set()

        def tbox() -> None:
            while talking.is_set():
                backbone.send(can.Message(arbitration_id=0x7D0, data=bytes.fromhex("023e00cccccccccc"), is_extended_id=False))
                time.sleep(0.1)

        thread = threading.Thread(target=tbox)
        thread.start()
        try:
            time.sleep(0.5)
            assert raw(b, GATEWAY, bytes.fromhex("22f1b0")) == bytes.fromhex("7f2221")
        finally:
            talking.clear()
            thread.join(5)
            backbone.shutdown()
        time.sleep(0.8)
        assert raw(b, GATEWAY, bytes.fromhex("22f1b0"))[:3] == bytes.fromhex("62f1b0")
        # a functional TesterPresent, wanting no answer, and a functional read: every free ECU answers
        b.send_diagnostic_to_address(0xE400, bytes.fromhex("3e80"))
        b.send_diagnostic_to_address(0xE400, bytes.fromhex("22f187"))
        answers: dict[int, bytes] = {}
        deadline = time.monotonic() + 5
        while len(answers) < 3 and time.monotonic() < deadline:
            try:
                message = b.read_doip(timeout=0.5)
            except TimeoutError:
                continue
            if hasattr(message, "user_data"):
                answers[message.source_address] = bytes(message.user_data)
        assert answers == {0x07E0: bytes.fromhex("62f187") + b"VCU-1", 0x07E1: bytes.fromhex("62f187") + b"BMS-1",
                           0x0740: bytes.fromhex("62f187") + b"BCM-1"}


# ---- the entity's protocol, in-process, with raw sockets ---------------------------------------
@pytest.fixture
def entity(tmp_path) -> Iterator[DoipEntity]:  # type: ignore[no-untyped-def]
    data = doip_config(tmp_path, loopback(), {"bb": virtual_bus(), "pt": virtual_bus(), "body": virtual_bus()},
                       announce_to=False, max_testers=2, activation_secret="workshop", initial_inactivity_s=1.0)
    config = parse_vehicle_config(data, "vehicle.yaml")
    with Buses(config) as buses:
        e = DoipEntity(config, buses)
        e.start()
        try:
            yield e
        finally:
            e.stop()


class Raw:
    """A tester on a plain TCP socket: it sends what it is told and answers alive checks only when asked to."""

    def __init__(self, ip: str) -> None:
        self.sock = socket.create_connection((ip, doip.TCP_PORT), timeout=2)
        self.framer = doip.Framer(max_payload=1 << 20)
        self.pending: list[doip.Message] = []

    def send(self, payload_type: int, payload: bytes, version: int = 2) -> None:
        self.sock.sendall(doip.encode(payload_type, payload, version))

    def read(self, timeout: float = 2.0) -> doip.Message | None:
        """The next message, None when the entity closed the socket."""
        deadline = time.monotonic() + timeout
        while not self.pending:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                raise TimeoutError("nothing from the entity") from None
            except ConnectionResetError:
                return None
            if not data:
                return None
            self.pending += [m for m in self.framer.feed(data) if isinstance(m, doip.Message)]
        return self.pending.pop(0)

    def activate(self, source: int, kind: int = 0, oem: bytes | None = None) -> int:
        self.send(doip.PayloadType.ROUTING_ACTIVATION_REQUEST,
                  struct.pack("!HB", source, kind) + bytes(4) + (oem if oem is not None else b""))
        answer = self.read()
        assert answer is not None and answer.payload_type == doip.PayloadType.ROUTING_ACTIVATION_RESPONSE
        return answer.payload[4]

    def closed(self, timeout: float = 1.0) -> bool:
        try:
            return self.read(timeout=timeout) is None
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


def test_routing_activation_and_its_refusals(entity: DoipEntity) -> None:
    ip = entity.doip.address
    outsider = Raw(ip)
    assert outsider.activate(0x0A00) == doip.RoutingCode.UNKNOWN_SOURCE_ADDRESS and outsider.closed()
    odd = Raw(ip)
    assert odd.activate(0x0E00, kind=0x42) == doip.RoutingCode.UNSUPPORTED_ACTIVATION_TYPE and odd.closed()
    secure = Raw(ip)
    assert secure.activate(0x0E10, kind=0xE0, oem=b"\x00\x00\x00\x00") == doip.RoutingCode.MISSING_AUTHENTICATION
    assert not secure.closed()  # only the authentication is missing: it may try again
    assert secure.activate(0x0E10, kind=0xE0, oem=activation_key("workshop", 0x0E10, entity.doip.eid)) == 0x10
    assert secure.activate(0x0E10) == 0x10  # asked again on its own socket: still active
    assert secure.activate(0x0E11) == doip.RoutingCode.SOURCE_ADDRESS_MISMATCH and secure.closed()

    a = Raw(ip)
    assert a.activate(0x0E00) == 0x10
    b = Raw(ip)
    assert b.activate(0x0E01) == 0x10
    # a third tester on a full house: both are alive-checked; a answers, b does not and loses its socket
    c = Raw(ip)
    c.send(doip.PayloadType.ROUTING_ACTIVATION_REQUEST, struct.pack("!HB", 0x0E02, 0) + bytes(4))
    check = a.read()
    assert check is not None and check.payload_type == doip.PayloadType.ALIVE_CHECK_REQUEST
    a.send(doip.PayloadType.ALIVE_CHECK_RESPONSE, struct.pack("!H", 0x0E00))
    answer = c.read()
    assert answer is not None and answer.payload[4] == 0x10
    assert b.read().payload_type == doip.PayloadType.ALIVE_CHECK_REQUEST and b.closed()  # type: ignore[union-attr]
    # the same source address on another socket: the one holding it answers its alive check, so it keeps it
    d = Raw(ip)
    d.send(doip.PayloadType.ROUTING_ACTIVATION_REQUEST, struct.pack("!HB", 0x0E00, 0) + bytes(4))
    assert a.read().payload_type == doip.PayloadType.ALIVE_CHECK_REQUEST  # type: ignore[union-attr]
    a.send(doip.PayloadType.ALIVE_CHECK_RESPONSE, struct.pack("!H", 0x0E00))
    answer = d.read()
    assert answer is not None and answer.payload[4] == doip.RoutingCode.SOURCE_ADDRESS_IN_USE
    assert sorted(entity.testers()) == [0x0E00, 0x0E02]
    for t in (outsider, odd, secure, a, b, c, d):
        t.close()


def test_the_generic_header_and_diagnostic_message_checks(entity: DoipEntity) -> None:
    ip = entity.doip.address
    t = Raw(ip)
    t.send(doip.PayloadType.DIAGNOSTIC_MESSAGE, struct.pack("!HH", 0x0E00, 0x07E0) + b"\x22\xf1\x89")  # not activated
    nack = t.read()
    assert nack is not None and nack.payload_type == doip.PayloadType.DIAGNOSTIC_NACK and nack.payload[4] == 0x02
    assert t.closed()

    t = Raw(ip)
    assert t.activate(0x0E00) == 0x10
    t.sock.sendall(struct.pack("!BBHL", 2, 0xFD, 0x9999, 3) + b"abc")  # unknown payload type: skipped, socket kept
    assert t.read().payload == b"\x01"  # type: ignore[union-attr]
    t.sock.sendall(struct.pack("!BBHL", 2, 0xFD, doip.PayloadType.DIAGNOSTIC_MESSAGE, 0x7FFFFFFF))  # above any limit
    assert t.read().payload == b"\x02"  # type: ignore[union-attr]
    t.close()  # (its payload would follow: the connection is given up here)

    t = Raw(ip)
    assert t.activate(0x0E00) == 0x10
    t.send(doip.PayloadType.DIAGNOSTIC_MESSAGE, struct.pack("!HH", 0x0E00, 0x0123) + b"\x22\xf1\x89")
    assert t.read().payload[4] == doip.DiagNack.UNKNOWN_TARGET_ADDRESS  # type: ignore[union-attr]
    t.send(doip.PayloadType.DIAGNOSTIC_MESSAGE, struct.pack("!HH", 0x0E07, 0x07E0) + b"\x22\xf1\x89")  # not its address
    assert t.read().payload[4] == doip.DiagNack.INVALID_SOURCE_ADDRESS and t.closed()  # type: ignore[union-attr]

    t = Raw(ip)
    t.sock.sendall(struct.pack("!BBHL", 2, 0x00, 0x0005, 7))  # the version's inverse is wrong
    assert t.read().payload == b"\x00" and t.closed()  # type: ignore[union-attr]
    t = Raw(ip)
    t.sock.sendall(struct.pack("!BBHL", 2, 0xFD, 0x0005, 3) + b"abc")  # a routing activation cannot be 3 bytes
    assert t.read().payload == b"\x04" and t.closed()  # type: ignore[union-attr]
    t = Raw(ip)
    assert t.closed(timeout=5.0)  # no routing activation within initial_inactivity_s: closed

    # UDP: identification with the "any version" header, and garbage
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.settimeout(2)
        u.sendto(struct.pack("!BBHL", 0xFF, 0x00, 0x0001, 0), (ip, doip.UDP_PORT))
        answer = doip.Framer(64, udp=True).feed(u.recv(100))[0]
        assert isinstance(answer, doip.Message) and answer.payload[:17] == VIN.encode()
        u.sendto(b"\x02\xfd\x80\x01\x00\x00\x00\x05\x0e\x00\x07\xe0\x3e", (ip, doip.UDP_PORT))  # a TCP-only type
        answer = doip.Framer(64, udp=True).feed(u.recv(100))[0]
        assert isinstance(answer, doip.Message) and answer.payload_type == 0 and answer.payload in (b"\x01", b"\x02")
    t.close()


@pytest.mark.slow  # separate processes
def test_a_campaign_deployed_over_doip_and_a_tester_told_busy_for_the_ecu_it_flashes(
        tmp_path, mosquitto, write_config, procs):  # type: ignore[no-untyped-def]
    """The TBOX deploys and installs over DoIP with TLS (deploy.transport: doip, mutual TLS on port
    3496), the gateway flashes over CAN; a tester on the plain port polls an ECU all the while and
    gets its answer or busy, never a place in the flash."""
    import json
    import threading

    import can
    import yaml

    from agent.core.trace import parse_trace
    from cloud_sim.pki import bench_pki
    from tests.vehicle import VIN as VIN_OF_VEHICLE
    from tests.vehicle import Vehicle

    ip = loopback()
    pki = bench_pki(tmp_path / "pki", ["tbox"], server_names=[ip])
    v = Vehicle(tmp_path, mosquitto, write_config, procs, ecu_extra={"bms": {"sim": {**ecu_entry("bms", 0, 0)["sim"],
                                                                                     "erase_ms": 2500}}},
                deploy_extra={"transport": "doip", "segment": None,
                              "tls": {"ca": str(pki / "ca.pem"), "cert": str(pki / "tbox.pem"), "key": str(pki / "tbox.key")}},
                config_extra={"doip": {"address": ip, "announce_to": False, "hold_s": 0.3,
                                       "tls": {"cert": str(pki / "server.pem"), "key": str(pki / "server.key"),
                                               "ca": str(pki / "ca.pem")}}})
    segments = yaml.safe_load(v.config.read_text())["segments"]
    sniffer = can.Bus(**segments["pt"]["bus"])
    backbone = can.Bus(**segments["bb"]["bus"])  # still configured, and unused by the deploy link
    answers: list[bytes] = []
    stop = threading.Event()

    def tester() -> None:
        with DoIPClient(ip, 0x07E1, client_logical_address=0x0E00) as client:
            while not stop.is_set():
                answers.append(raw(client, 0x07E1, bytes.fromhex("22f18c")))  # bms's serial: the flash never reads it
                time.sleep(0.05)

    frames: list[bytes] = []

    def sniff() -> None:
        while not stop.is_set():
            m = sniffer.recv(0.1)
            if m is not None and m.arbitration_id == 0x7E1:
                frames.append(bytes(m.data))

    thread = threading.Thread(target=tester)
    listener = threading.Thread(target=sniff)
    try:
        listener.start()
        thread.start()
        v.send(v.campaign("c-doip-busy", "2.0.0"))
        done = v.finished("c-doip-busy")
        stop.set()
        thread.join(timeout=10)
        assert done["outcome"] == "success", done
        serial = bytes.fromhex("62f18c") + b"SN-bms"
        assert set(answers) == {serial, bytes.fromhex("7f2221")}, set(answers)  # the answer, or busy: nothing else
        # on the wire: the flash (its first request to bms up to its return to the default session)
        # holds no request of the tester; the tester's reads come before it and after
        listener.join(timeout=10)
        singles = [f[1:1 + f[0]] for f in frames if f[0] < 8]
        first = singles.index(bytes.fromhex("1003"))
        end = singles.index(bytes.fromhex("1001"), first)
        flash = " ".join(x.hex() for x in singles[first:end + 1])
        assert "3101ff01" in flash and "22f18c" not in flash, flash
        assert bytes.fromhex("22f18c") in singles[:first] and bytes.fromhex("22f18c") in singles[end:]

        # the deploy and the link went over DoIP: traced with the logical addresses and the
        # connection in the header, the same exchanges as on CAN; not a frame on the backbone
        campaigns = tmp_path / "tbox" / "campaigns"
        deploys = sorted(campaigns.glob("**/*.deploy.trace.jsonl"))
        assert {f"{e}-2.0.0.bin" for e in ("vcu", "bms", "bcm")} <= {p.name.split(".deploy")[0] for p in deploys}, deploys
        for path in deploys:
            trace = parse_trace(path.read_text(), str(path))
            assert (trace.header.request_id, trace.header.response_id) == (0x0E80, GATEWAY)
            assert trace.header.extra["transport"] == "doip" and trace.header.extra["doip"]["target"] == GATEWAY
            assert trace.header.extra["doip"]["port"] == doip.TLS_PORT and trace.header.extra["doip"]["tls"] is True
            services = [e.header[0] for e in trace.exchanges]
            assert services[:3] == [0x10, 0x27, 0x27] and 0x38 in services and services[-1] == 0x37, services
            assert all(e.response is not None and e.response[0] != 0x7F for e in trace.exchanges if e.header[0] == 0x36)
        installing = json.loads(next(campaigns.glob("*/link/installing.link.trace.jsonl")).read_text().splitlines()[0])
        assert installing["transport"] == "doip" and installing["request_id"] == 0x0E80
        assert backbone.recv(0.5) is None

        # owner content over the same link: the boot animation deployed to the gateway, shown by bcm
        boot = {"bundle_id": "boot-doip", "bundle_version": 1, "owner": "owner-42", "title": "boot animation",
                "config": {"mode": "any", "start": "2026-01-01T00:00:00", "expiry": "2099-01-01T00:00:00", "tz": "UTC"},
                "items": [{"id": "anim", "class": "resource", "target": "boot_animation", "policy": "auto"}]}
        v.cloud.trust.submit(boot, {"anim": b"frames " * 3000})
        assert v.cloud.trust.review("boot-doip").status == "approved"
        v.cloud.offer_content("boot-doip", VIN_OF_VEHICLE, request=True)
        v.wait_content("boot-doip", lambda s: s.get("anim") == "active")
        assert v.shown("bcm") == "c-boot-doip-v1-anim.bin"

        # the gateway restarted with a configuration whose testers leave out the TBOX's address:
        # every activation is refused, and the diagnosis names DoIP's refusal and the TBOX's side
        data = yaml.safe_load(v.config.read_text())
        data["doip"]["testers"] = [0x0E00, 0x0E0F]
        data["deploy"]["source_address"] = 0x0E05  # what this file says of the TBOX (the TBOX reads its own)
        narrow = tmp_path / "gateway-narrow.yaml"
        narrow.write_text(yaml.safe_dump(data))
        v.gateway.stop()
        v.gateway = Proc("gateway", "-c", str(narrow), log=tmp_path / "gw-narrow.log")
        procs.append(v.gateway)
        v.gateway.wait_ready("gateway ready")
        v.send(v.campaign("c-doip-refused", "2.1.0"))
        done = v.finished("c-doip-refused", timeout=120)
        assert done["outcome"] == "failed", done
        assert v.cloud.collector.wait_for(lambda c: "c-doip-refused" in c.verdicts, 10)
        verdict = v.cloud.collector.verdicts["c-doip-refused"]
        first = verdict["findings"][0]
        assert (first["cause"], first["side"], first["unit"]) == ("routing_activation_refused", "client", "TBOX"), verdict
        assert "code 0x00 (unknown source address)" in first["detail"], first
    finally:
        stop.set()
        thread.join(timeout=10)
        listener.join(timeout=10)
        sniffer.shutdown()
        backbone.shutdown()
        v.close()


@pytest.mark.parametrize("doip_section, ecu_extra, why", [
    ({"address": "not-an-ip"}, {}, "doip.address: expected an IP address"),
    ({"logical_address": 0x0E00}, {}, "doip.logical_address: expected the gateway's logical address"),
    ({"testers": [0x0E00]}, {}, "doip.testers: expected [first, last]"),
    ({"testers": [0x0F00, 0x0E00]}, {}, "doip.testers: the first address is above the last"),
    ({"functional_group": ["abs"]}, {}, "doip.functional_group: unknown ECU 'abs'"),
    ({"eid": "02:00"}, {}, "doip.eid: expected 6 bytes"),
    ({"hold_s": 0}, {}, "doip.hold_s: expected seconds > 0"),
    ({"port": 70000}, {}, "doip.port: expected a port"),
    ({"colour": "red"}, {}, "doip.colour: unknown key"),
    ({}, {"logical_address": 0x07E0}, "ecus.bms.logical_address: 0x07E0 is already vcu's"),
    ({"logical_address": 0x0740}, {}, "ecus.bcm.logical_address: 0x0740 is already the gateway"),
    ({}, {"logical_address": 0x0F00}, "ecus.bms.logical_address: expected a DoIP logical address"),
])
def test_a_wrong_doip_section_is_named(tmp_path, doip_section, ecu_extra, why) -> None:  # type: ignore[no-untyped-def]
    from agent.errors import ConfigError

    data = doip_config(tmp_path, "127.0.0.1", {"bb": virtual_bus(), "pt": virtual_bus(), "body": virtual_bus()})
    data["doip"] = {**data["doip"], **doip_section}
    data["ecus"]["bms"].update(ecu_extra)
    with pytest.raises(ConfigError) as err:
        parse_vehicle_config(data, "vehicle.yaml")
    assert why in str(err.value)


@pytest.mark.parametrize("deploy, doip_section, why", [
    ({"transport": "doip", "segment": None}, None, "deploy.transport: doip needs the doip section"),
    ({"transport": "doip"}, {}, "deploy.segment: not used with transport: doip"),
    ({"transport": "ethernet"}, {}, "deploy.transport: expected can or doip"),
    ({"host": "10.0.0.1"}, {}, "deploy.host: only with transport: doip"),
    ({"source_address": 0x0E80}, {}, "deploy.source_address: only with transport: doip"),
    ({"transport": "doip", "segment": None}, {"address": "0.0.0.0"}, "deploy.host: missing; doip.address 0.0.0.0"),
    ({"transport": "doip", "segment": None, "source_address": 0x0E80}, {"testers": [0x0E00, 0x0E0F]},
     "deploy.source_address: 0x0E80 is outside doip.testers (0x0E00..0x0E0F)"),
    ({"transport": "doip", "segment": None, "source_address": 0x0A00}, {},
     "deploy.source_address: expected the TBOX's logical address, 0x0E00..0x0FFF"),
])
def test_a_wrong_deploy_link_over_doip_is_named(tmp_path, deploy, doip_section, why) -> None:  # type: ignore[no-untyped-def]
    from agent.errors import ConfigError

    data = doip_config(tmp_path, "127.0.0.1", {"bb": virtual_bus(), "pt": virtual_bus(), "body": virtual_bus()})
    data["deploy"].update(deploy)
    if doip_section is None:
        del data["doip"]
    else:
        data["doip"].update(doip_section)
    with pytest.raises(ConfigError) as err:
        parse_vehicle_config(data, "vehicle.yaml")
    assert why in str(err.value)


def test_the_deploy_link_over_doip_takes_the_entitys_address_port_and_logical_address(tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = doip_config(tmp_path, "127.0.0.9", {"bb": virtual_bus(), "pt": virtual_bus(), "body": virtual_bus()}, port=13401)
    data["deploy"] = {"transport": "doip", "package_dir": "p", "source_address": "0x0E10"}
    link = parse_vehicle_config(data, "vehicle.yaml").deploy_link()
    assert (link.transport, link.segment, link.doip_host, link.doip_port, link.doip_source, link.doip_target) == (
        "doip", "", "127.0.0.9", 13401, 0x0E10, GATEWAY)


# ---- TLS (ISO 13400-2's port 3496) ---------------------------------------------------------------
@pytest.fixture
def tls_entity(tmp_path) -> Iterator[tuple[DoipEntity, Any]]:  # type: ignore[no-untyped-def]
    """An entity that takes TLS only (plain: false), asking testers for a certificate its CA signed."""
    from cloud_sim.pki import bench_pki

    ip = loopback()
    pki = bench_pki(tmp_path / "pki", ["tbox"], server_names=[ip])
    data = doip_config(tmp_path, ip, {"bb": virtual_bus(), "pt": virtual_bus(), "body": virtual_bus()}, announce_to=False,
                       tls={"cert": str(pki / "server.pem"), "key": str(pki / "server.key"), "ca": str(pki / "ca.pem"),
                            "plain": False})
    config = parse_vehicle_config(data, "vehicle.yaml")
    with Buses(config) as buses:
        e = DoipEntity(config, buses)
        e.start()
        try:
            yield e, pki
        finally:
            e.stop()


def test_over_tls_a_tester_with_a_certificate_is_routed_and_the_plain_port_says_tls_required(tls_entity) -> None:  # type: ignore[no-untyped-def]
    import ssl

    from agent.adapters.doip_client import DoipChannel, DoipRefused
    from agent.adapters.tls_stream import client_context

    entity, pki = tls_entity
    ip = entity.doip.address
    plain = Raw(ip)
    assert plain.activate(0x0E00) == doip.RoutingCode.TLS_REQUIRED and plain.closed()
    mutual = client_context(str(pki / "ca.pem"), str(pki / "tbox.pem"), str(pki / "tbox.key"))
    with DoipChannel(ip, doip.TLS_PORT, 0x0E80, 0x07E0, tls=mutual) as channel:
        channel.send(bytes.fromhex("3e00"))  # acknowledged over TLS (no ECU plays on these buses), then routed
        deadline = time.monotonic() + 5
        while entity.testers() != {0x0E80: ["vcu"]}:
            assert time.monotonic() < deadline, entity.testers()
            time.sleep(0.02)
    # python-doipclient, a client we did not write, over TLS with the tester's certificate
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # it passes no server name; the CA still verifies the entity
    context.load_verify_locations(str(pki / "ca.pem"))
    context.load_cert_chain(str(pki / "tbox.pem"), str(pki / "tbox.key"))
    with DoIPClient(ip, 0x07E1, tcp_port=doip.TLS_PORT, client_logical_address=0x0E01, use_secure=context) as client:
        client.send_diagnostic(bytes.fromhex("3e00"))  # raises unless positively acknowledged
    # an entity whose certificate another CA signed is not believed; a tester without a certificate is turned away
    from cloud_sim.pki import bench_pki

    other = bench_pki(pki.parent / "other", [], server_names=[ip])
    with pytest.raises(DoipRefused) as err:
        DoipChannel(ip, doip.TLS_PORT, 0x0E80, 0x07E0, tls=client_context(str(other / "ca.pem")))
    assert err.value.trace == {"conn": "tls"} and "certificate verify failed" in str(err.value)
    with pytest.raises(DoipRefused):  # TLS 1.3: the entity's refusal comes after the client's half of the handshake
        with DoipChannel(ip, doip.TLS_PORT, 0x0E80, 0x07E0, tls=client_context(str(pki / "ca.pem"))) as channel:
            channel.send(bytes.fromhex("3e00"))
    deadline = time.monotonic() + 5
    while entity.testers():  # the testers that closed are gone once their connection's thread sees it
        assert time.monotonic() < deadline, entity.testers()
        time.sleep(0.05)


@pytest.mark.parametrize("tls, deploy_tls, why", [
    ({"key": "k.pem"}, None, "doip.tls.cert: missing; the entity's TLS needs its certificate and key"),
    ({"cert": "c.pem", "key": "k.pem", "port": 13400}, None, "doip.tls.port: must differ from doip.port"),
    ({"cert": "c.pem", "key": "k.pem", "plain": False}, None, "deploy.tls: missing; doip.tls.plain is false"),
    (None, {"ca": "ca.pem"}, "deploy.tls: the doip section has no tls"),
    ({"cert": "c.pem", "key": "k.pem"}, {"cert": "t.pem"}, "deploy.tls.ca: missing"),
    ({"cert": "c.pem", "key": "k.pem"}, {"ca": "ca.pem", "cert": "t.pem"}, "deploy.tls.key: missing; give both"),
])
def test_a_wrong_tls_setting_is_named(tmp_path, tls, deploy_tls, why) -> None:  # type: ignore[no-untyped-def]
    from agent.errors import ConfigError

    data = doip_config(tmp_path, "127.0.0.1", {"bb": virtual_bus(), "pt": virtual_bus(), "body": virtual_bus()})
    data["deploy"] = {"transport": "doip", "package_dir": "p", **({"tls": deploy_tls} if deploy_tls else {})}
    if tls is not None:
        data["doip"]["tls"] = tls
    with pytest.raises(ConfigError) as err:
        parse_vehicle_config(data, "vehicle.yaml")
    assert why in str(err.value)


def test_an_entity_certificate_that_cannot_be_read_is_named(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from agent.errors import ConfigError

    data = doip_config(tmp_path, loopback(), {"bb": virtual_bus(), "pt": virtual_bus(), "body": virtual_bus()},
                       announce_to=False, tls={"cert": str(tmp_path / "none.pem"), "key": str(tmp_path / "none.key")})
    config = parse_vehicle_config(data, "vehicle.yaml")
    with Buses(config) as buses, pytest.raises(ConfigError, match="doip.tls: cannot use .*none.pem"):
        DoipEntity(config, buses)


def test_an_entity_address_not_there_yet_is_retried_by_systemd_not_a_configuration_error(tmp_path, write_config) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import vota

    data = doip_config(tmp_path, "192.0.2.1", {"bb": virtual_bus(), "pt": virtual_bus(), "body": virtual_bus()},
                       announce_to=False)  # TEST-NET-1: an address of no interface here
    run = vota("gateway", "-c", str(write_config(data)), timeout=60)
    assert run.returncode == 1, run.stdout + run.stderr  # exit 1: systemd starts it again; 2 would be final
    assert "doip.address 192.0.2.1 is not (yet) an address of this machine" in run.stderr
    assert "Traceback" not in run.stderr
