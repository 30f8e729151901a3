"""Deploy, TBOX -> gateway: the deploy server's bytes, and end to end across processes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path

import pytest

from agent.adapters.canbus import Segment
from agent.adapters.trace_files import read_trace
from agent.core.config import parse_vehicle_config
from agent.protocol.files import packet_payload
from gateway.daemon import GatewayDaemon
from tests.conftest import Proc, multicast_bus, virtual_bus, vota

MiB = 1024 * 1024


def _file_request(mode: int, name: str, size: int | None) -> bytes:
    path = name.encode()
    out = bytes((0x38, mode)) + len(path).to_bytes(2, "big") + path
    if size is not None:
        out += b"\x00\x04" + size.to_bytes(4, "big") * 2
    return out


class DeployTester:
    def __init__(self, data: dict) -> None:
        self.config = parse_vehicle_config(data, "test")
        self.daemon = GatewayDaemon(self.config)
        self.daemon.start()
        link = self.config.deploy_link()
        self.segment = Segment(self.config.segments[link.segment])
        self.stack = self.segment.stack(link.request_id, link.response_id)

    def ask(self, request: bytes, timeout: float = 1.0) -> bytes | None:
        self.stack.send(request)
        data = self.stack.recv(block=True, timeout=timeout)
        return None if data is None else bytes(data)

    def close(self) -> None:
        self.segment.shutdown()
        self.daemon.stop()


@pytest.fixture
def gw(tmp_path):  # type: ignore[no-untyped-def]
    tester = DeployTester({"segments": {"bb": {"bus": virtual_bus()}},
                           "deploy": {"segment": "bb", "max_block_length": 38, "package_dir": str(tmp_path / "pk")}})
    yield tester
    tester.close()


def test_deploy_server_bytes(gw, tmp_path):
    data = os.urandom(80)  # 32 bytes per packet (38 - SID - counter - 4-byte packet id)
    assert gw.ask(_file_request(1, "p.bin", 80)) == bytes.fromhex("7f387f")  # default session
    assert gw.ask(b"\x10\x03") == bytes.fromhex("5003 0032 01f4")
    assert gw.ask(b"\x36\x01\x00\x00\x00\x00\xaa") == bytes.fromhex("7f3624")  # no transfer yet
    assert gw.ask(_file_request(1, "../etc/passwd", 80)) == bytes.fromhex("7f3831")
    assert gw.ask(_file_request(1, "p.bin", 0)) == bytes.fromhex("7f3831")
    assert gw.ask(_file_request(5, "p.bin", None)) == bytes.fromhex("7f3831")
    assert gw.ask(_file_request(1, "p.bin", 80)[:-3]) == bytes.fromhex("7f3813")
    assert gw.ask(_file_request(1, "p.bin", 80)) == bytes.fromhex("7801 02 0026 00")
    assert gw.ask(_file_request(1, "q.bin", 80)) == bytes.fromhex("7f3822")  # one transfer at a time
    assert gw.ask(b"\x36\x01\x00\x00\x00\x01" + data[:32]) == bytes.fromhex("7f3631")  # packet 1 before 0
    assert gw.ask(b"\x36\x01\x00\x00\x00\x00" + data[:10]) == bytes.fromhex("7f3613")  # short, not last
    assert gw.ask(b"\x36\x01\x00\x00\x00\x00" + data[:32]) == bytes.fromhex("7601")
    assert gw.ask(b"\x36\x01\x00\x00\x00\x00" + data[:32]) == bytes.fromhex("7601")  # repeat: not written twice
    assert gw.ask(b"\x36\x03\x00\x00\x00\x01" + data[32:64]) == bytes.fromhex("7f3673")
    assert gw.ask(b"\x37" + hashlib.sha256(data).digest()) == bytes.fromhex("7f3724")  # incomplete
    assert gw.ask(b"\x36\x02\x00\x00\x00\x01" + data[32:64]) == bytes.fromhex("7602")
    assert gw.ask(b"\x36\x03\x00\x00\x00\x02" + data[64:] + b"x") == bytes.fromhex("7f3671")  # beyond the size
    assert gw.ask(b"\x36\x03\x00\x00\x00\x02" + data[64:]) == bytes.fromhex("7603")
    assert gw.ask(b"\x37") == bytes.fromhex("7f3713")
    assert gw.ask(b"\x37" + hashlib.sha256(data).digest()) == b"\x77"
    assert (tmp_path / "pk" / "p.bin").read_bytes() == data
    assert gw.ask(_file_request(1, "p.bin", 80)) == bytes.fromhex("7f3822")  # already accepted
    assert gw.ask(_file_request(2, "p.bin", None)) == bytes.fromhex("7802")
    assert not (tmp_path / "pk" / "p.bin").exists()


def test_deploy_server_refuses_a_wrong_digest_and_resumes(gw, tmp_path):
    data = os.urandom(100)
    gw.ask(b"\x10\x03")
    assert gw.ask(_file_request(1, "p.bin", 100))[:2] == b"\x78\x01"
    assert gw.ask(b"\x36\x01\x00\x00\x00\x00" + data[:32]) == b"\x76\x01"
    assert gw.ask(b"\x36\x02\x00\x00\x00\x01" + data[32:64]) == b"\x76\x02"
    assert gw.ask(b"\x10\x01")[:2] == b"\x50\x01"  # link dropped: the partial package stays
    gw.ask(b"\x10\x03")
    resumed = gw.ask(_file_request(6, "p.bin", 100))
    assert resumed == bytes.fromhex("7806 02 0026 00") + (64).to_bytes(8, "big")
    assert gw.ask(b"\x36\x01\x00\x00\x00\x02" + data[64:96]) == b"\x76\x01"
    assert gw.ask(b"\x36\x02\x00\x00\x00\x03" + data[96:]) == b"\x76\x02"
    assert gw.ask(b"\x37" + hashlib.sha256(b"tampered").digest()) == bytes.fromhex("7f3772")
    assert list((tmp_path / "pk").iterdir()) == []  # nothing of it accepted or kept


def _deploy_config(write_config, tmp_path: Path) -> Path:
    return write_config({"segments": {"bb": {"bus": multicast_bus()}},
                         "deploy": {"segment": "bb", "package_dir": str(tmp_path / "gw")}})


def _start_gateway(procs, config: Path, tmp_path: Path, *faults: str) -> Proc:
    args = ["gateway", "-c", str(config)]
    for f in faults:
        args += ["--fault", f]
    gw = Proc(*args, log=tmp_path / "gw.log")
    procs.append(gw)
    return gw.wait_ready("gateway ready")


def test_deploy_across_processes_with_resume_after_kill(tmp_path, write_config, procs):
    config = _deploy_config(write_config, tmp_path)
    _start_gateway(procs, config, tmp_path)
    package = tmp_path / "vcu-2.0.bin"
    package.write_bytes(os.urandom(MiB))
    out = tmp_path / "deploy"
    first = Proc("deploy", "-c", str(config), "--out", str(out), "--no-progress", str(package), log=tmp_path / "d1.log")
    procs.append(first)
    part = tmp_path / "gw" / "vcu-2.0.bin.part"
    deadline = time.monotonic() + 60
    while not (part.exists() and part.stat().st_size > MiB // 3):
        assert time.monotonic() < deadline, first.text()
        time.sleep(0.02)
    os.kill(first.p.pid, signal.SIGKILL)  # the TBOX dies in the middle of the deploy
    first.stop()
    run = vota("deploy", "-c", str(config), "--out", str(out), "--json", "--resume", str(package))
    assert run.returncode == 0, run.stderr
    (result,) = json.loads(run.stdout)
    payload = packet_payload(4095)
    assert result["result"] == "success" and result["resumed_from"] >= MiB // 3
    assert result["resumed_from"] % payload == 0
    assert result["packets"] == -(-(MiB - result["resumed_from"]) // payload)
    assert (tmp_path / "gw" / "vcu-2.0.bin").read_bytes() == package.read_bytes()
    assert not part.exists()
    trace = read_trace(out / "vcu-2.0.bin.deploy.trace.jsonl")
    assert trace.header.stage == "deploy" and trace.header.client == "TBOX" and trace.header.server == "GW"
    assert trace.exchanges[1].header[:2] == b"\x38\x06"  # ResumeFile
    transfers = [e for e in trace.exchanges if e.service == 0x36]
    packet_ids = [int.from_bytes(e.header[2:6], "big") for e in transfers]
    first_packet = result["resumed_from"] // payload
    assert packet_ids == list(range(first_packet, first_packet + len(transfers)))
    assert all(len(e.header) == 6 for e in transfers)  # header only, no package bytes
    assert trace.exchanges[-1].header == b"\x37" and trace.exchanges[-1].response == b"\x77"
    assert result["trace_fraction"] < 0.01


def test_deploy_refuses_tampered_package_and_reports_faults(tmp_path, write_config, procs):
    config = _deploy_config(write_config, tmp_path)
    _start_gateway(procs, config, tmp_path, "deploy:GW:36#5:nrc=0x22")
    package = tmp_path / "bms-3.1.bin"
    package.write_bytes(os.urandom(64 * 1024))
    out = tmp_path / "deploy"
    faulty = vota("deploy", "-c", str(config), "--out", str(out), "--json", str(package))
    assert faulty.returncode == 3
    (r,) = json.loads(faulty.stdout)
    assert (r["result"], r["failed_step"], r["nrc"], r["failed_packet"]) == ("failed", "transfer_data", 0x22, 4)
    last = read_trace(out / "bms-3.1.bin.deploy.trace.jsonl").exchanges[-1]
    assert last.header == bytes.fromhex("3605 00000004") and last.response == bytes.fromhex("7f3622")

    declared = hashlib.sha256(b"what the campaign promised").hexdigest()
    tampered = vota("deploy", "-c", str(config), "--out", str(out), "--json", "--resume", "--sha256", declared, str(package))
    assert tampered.returncode == 3
    (r,) = json.loads(tampered.stdout)
    assert (r["result"], r["failed_step"], r["nrc"]) == ("failed", "transfer_exit", 0x72)
    assert not any((tmp_path / "gw").iterdir())  # the gateway kept nothing of it


def test_the_deploy_link_needs_security_access_and_locks_out_wrong_keys(tmp_path):
    """With deploy.security_secret, nothing is deployed or installed before SecurityAccess:
    0x38 and the routines answer 0x33; three wrong keys lock the link (0x36, then 0x37), also
    for a gateway started again; the key is HMAC-SHA256 over the seed, never in a trace."""
    from agent.adapters.file_client import PackageDeployer
    from agent.protocol.link import deploy_key, secure_request, session_key

    data = {"segments": {"bb": {"bus": virtual_bus()}},
            "deploy": {"segment": "bb", "package_dir": str(tmp_path / "pk"), "security_secret": "per-vehicle-secret",
                       "lockout_s": 2},
            "gateway": {"results_dir": str(tmp_path / "gw")}}
    gw = DeployTester(data)
    try:
        assert gw.ask(b"\x10\x03")[:2] == b"\x50\x03"
        assert gw.ask(_file_request(0x01, "evil.bin", 10)) == bytes.fromhex("7f3833")
        assert gw.ask(b"\x31\x01\x03\x01install-x.json") == bytes.fromhex("7f3133")
        assert gw.ask(b"\x31\x01\x03\x03\x01bcm\x00x") == bytes.fromhex("7f3133")
        assert gw.ask(b"\x27\x02" + bytes(32)) == bytes.fromhex("7f2724")  # no seed asked: sequence error
        for answer in ("7f2735", "7f2735", "7f2736"):
            seed = gw.ask(b"\x27\x01")
            assert seed[:2] == b"\x67\x01" and len(seed) == 18
            assert gw.ask(b"\x27\x02" + bytes(32)) == bytes.fromhex(answer)
        assert gw.ask(b"\x27\x01") == bytes.fromhex("7f2737")  # locked
    finally:
        gw.close()
    gw = DeployTester(data)  # a restart does not reset the count
    try:
        assert gw.ask(b"\x10\x03")[:2] == b"\x50\x03"
        assert gw.ask(b"\x27\x01") == bytes.fromhex("7f2737")
        time.sleep(2.1)
        seed = gw.ask(b"\x27\x01")[2:]
        assert gw.ask(b"\x27\x02" + deploy_key("per-vehicle-secret", seed)) == b"\x67\x02"
        assert gw.ask(b"\x27\x01") == b"\x67\x01" + bytes(16)  # unlocked: a zero seed
        request = _file_request(0x01, "ok.bin", 10)
        assert gw.ask(request) == bytes.fromhex("7f383a")  # unlocked, but no authenticator: secureDataVerificationFailed
        key = session_key("per-vehicle-secret", seed)
        assert gw.ask(secure_request(key, 1, request))[:2] == b"\x78\x01"  # freshness 1 and its MAC: taken
        assert gw.ask(secure_request(key, 1, request)) == bytes.fromhex("7f383a")  # the same again: a replay
        assert gw.ask(b"\x10\x03")[:2] == b"\x50\x03"  # a new session starts locked
        assert gw.ask(_file_request(0x01, "ok.bin", 10)) == bytes.fromhex("7f3833")
        refused = [json.loads(line) for line in (tmp_path / "gw" / "deploy-refused.jsonl").read_text().splitlines()]
        assert [(r["length"], r["reason"][:13]) for r in refused] == [(20, "MAC does not "), (32, "freshness 1 n")]
        # the TBOX's deployer unlocks with the configured secret; with another one it fails at security_access
        image = os.urandom(5000)
        (tmp_path / "vcu.bin").write_bytes(image)
        link = gw.config.deploy_link()
        deployer = PackageDeployer(gw.segment, link, "vcu.bin", tmp_path / "vcu.bin", hashlib.sha256(image).hexdigest())
        result = deployer.run()
        assert result.result == "success", result
        deployer.write(tmp_path / "out", result)
        trace = read_trace(tmp_path / "out" / "vcu.bin.deploy.trace.jsonl")
        assert [(e.header, e.length) for e in trace.exchanges[1:3]] == [(b"\x27\x01", 2), (b"\x27\x02", 34)]  # no key
        assert (tmp_path / "pk" / "vcu.bin").read_bytes() == image
        from dataclasses import replace

        wrong = PackageDeployer(gw.segment, replace(link, security_secret="guess"), "vcu2.bin", tmp_path / "vcu.bin",
                                hashlib.sha256(image).hexdigest()).run()
        assert (wrong.result, wrong.failed_step, wrong.nrc) == ("failed", "security_access", 0x35)
        assert not (tmp_path / "pk" / "vcu2.bin").exists()
    finally:
        gw.close()


def test_compressed_deploy_falls_back_resumes_after_kill_and_refuses_a_broken_stream(tmp_path, write_config, procs):
    """The TBOX prefers lzma, the gateway takes only zlib: NRC 0x31, then zlib. Fewer bytes on
    the link than the package, the package unpacked identical at the gateway, a deploy killed
    midway resumed in the compressed stream, and a stream damaged on the way refused at the
    exit (digest never matched, nothing kept)."""
    import yaml._yaml as compiled

    bus = multicast_bus()
    gateway = write_config({"segments": {"bb": {"bus": bus}},
                            "deploy": {"segment": "bb", "package_dir": str(tmp_path / "gw"), "compression": {"zlib": 1}}},
                           "gateway.yaml")
    tbox = write_config({"segments": {"bb": {"bus": bus}},
                         "deploy": {"segment": "bb", "package_dir": str(tmp_path / "gw"),
                                    "compression": {"lzma": 2, "zlib": 1}}}, "tbox.yaml")
    _start_gateway(procs, gateway, tmp_path)
    package = tmp_path / "vcu-2.0.bin"
    package.write_bytes(Path(compiled.__file__).read_bytes()[:MiB])
    out = tmp_path / "deploy"
    first = Proc("deploy", "-c", str(tbox), "--out", str(out), "--no-progress", str(package), log=tmp_path / "d1.log")
    procs.append(first)
    part = tmp_path / "gw" / "vcu-2.0.bin.part"
    deadline = time.monotonic() + 60
    while not (part.exists() and part.stat().st_size > 60 * 1024):
        assert time.monotonic() < deadline, first.text()
        time.sleep(0.01)
    os.kill(first.p.pid, signal.SIGKILL)
    first.stop()
    run = vota("deploy", "-c", str(tbox), "--out", str(out), "--json", "--resume", str(package))
    assert run.returncode == 0, run.stderr
    (result,) = json.loads(run.stdout)
    assert (result["result"], result["compression"]) == ("success", "zlib"), result
    assert result["resumed_from"] >= 60 * 1024 and result["resumed_from"] + result["bytes_transferred"] < MiB // 2
    assert (tmp_path / "gw" / "vcu-2.0.bin").read_bytes() == package.read_bytes()
    assert sorted(p.name for p in (tmp_path / "gw").iterdir()) == ["vcu-2.0.bin"]  # no .part, .part.raw or sidecar left
    asked = [(e.header[:2].hex(), e.header[4 + 11], (e.response or b"")[:3].hex())
             for e in read_trace(out / "vcu-2.0.bin.deploy.trace.jsonl").exchanges if e.service == 0x38]
    assert asked == [("3806", 0x20, "7f3831"), ("3806", 0x10, "780602")], asked  # lzma refused, then zlib

    run = vota("deploy", "-c", str(tbox), "--out", str(tmp_path / "bad"), "--json", "--fault", "deploy:bms.bin:36#3:corrupt_data",
               str(package.rename(tmp_path / "bms.bin")))
    assert run.returncode == 3, run.stderr
    (bad,) = json.loads(run.stdout)
    assert (bad["failed_step"], bad["nrc"], bad["compression"]) == ("transfer_exit", 0x72, "zlib"), bad
    assert not (tmp_path / "gw" / "bms.bin").exists() and not (tmp_path / "gw" / "bms.bin.part.raw").exists()
