"""Authenticated requests on the backbone (SecOC-style, agent/protocol/link.py): a node on the
TBOX-gateway link that did not take part in the key exchange changes nothing, even while the
TBOX's session is unlocked, and a recorded authenticated request cannot be replayed."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import can
import pytest

from agent.adapters.canbus import Segment
from agent.adapters.config_files import load_vehicle_config
from agent.adapters.file_client import PackageDeployer
from agent.adapters.uds_client import UdsLink
from agent.protocol.link import AUTH_TRAILER, deploy_key, open_request, secure_request, session_key
from tests.conftest import Proc, multicast_bus
from tests.scapy_tester import scapy_requests

SECRET = "LVOTA000000000042-deploy"


def test_the_authenticator_binds_the_request_the_session_and_the_freshness():
    key = session_key(SECRET, bytes(range(16)))
    request = b"\x38\x02\x00\x0dbcm-2.2.0.bin"
    sent = secure_request(key, 7, request)
    assert len(sent) == len(request) + AUTH_TRAILER and sent[len(request):len(request) + 4] == bytes.fromhex("00000007")
    assert open_request(key, 6, sent) == (request, 7)
    assert open_request(key, 7, sent) == "freshness 7 not above 7: a replay"
    other = session_key(SECRET, bytes(16))  # another session's key
    assert open_request(other, 0, sent) == "MAC does not verify"
    assert open_request(key, 0, b"\x38\x03" + sent[2:]) == "MAC does not verify"  # the request changed
    assert open_request(key, 0, sent[:-12] + (8).to_bytes(4, "big") + sent[-8:]) == "MAC does not verify"
    assert open_request(key, 0, request[:5]) == "no authenticator"


def _reassembled(frames: list[bytes]) -> list[bytes]:
    """ISO-TP messages from the raw frames of one sender (single, first and consecutive frames)."""
    out, buf, want = [], b"", 0
    for data in frames:
        kind = data[0] >> 4
        if kind == 0:
            out.append(data[1 : 1 + (data[0] & 0x0F)])
        elif kind == 1:
            want, buf = ((data[0] & 0x0F) << 8) | data[1], data[2:8]
        elif kind == 2 and want:
            buf += data[1:8]
            if len(buf) >= want:
                out.append(buf[:want])
                want = 0
    return out


@pytest.mark.slow
def test_a_node_without_the_key_exchange_changes_nothing_inside_the_tbox_s_window(tmp_path: Path, write_config, procs):
    bus = multicast_bus()
    config_path = write_config({"segments": {"bb": {"bus": bus}},
                                "deploy": {"segment": "bb", "package_dir": str(tmp_path / "packages"),
                                           "security_secret": SECRET},
                                "gateway": {"results_dir": str(tmp_path / "results")}})
    procs.append(Proc("gateway", "-c", str(config_path), log=tmp_path / "gateway.log"))
    procs[-1].wait_ready("gateway ready")
    config = load_vehicle_config(str(config_path))
    segment = Segment(config.segments["bb"])
    sniffer = can.Bus(**bus)
    tbox = None
    try:
        package = tmp_path / "bcm-2.2.0.bin"
        package.write_bytes(os.urandom(9000))
        deployed = PackageDeployer(segment, config.deploy_link(), package.name, package,
                                   hashlib.sha256(package.read_bytes()).hexdigest()).run()
        assert deployed.result == "success", deployed
        stored = tmp_path / "packages" / package.name
        assert stored.read_bytes() == package.read_bytes()

        # the TBOX's session: unlocked, and its install-status poll (authenticated) on the bus
        tbox = UdsLink(segment, 0x7D0, 0x7D8, name="tbox", security=lambda level, seed: deploy_key(SECRET, seed),
                       authenticate=SECRET)
        tbox.client.change_session(3)
        tbox.client.unlock_security_access(1)
        while sniffer.recv(0) is not None:
            pass
        assert tbox.client.routine_control(0x0301, 3).positive
        frames = []
        while (msg := sniffer.recv(0.3)) is not None:
            if msg.arbitration_id == 0x7D0:
                frames.append(bytes(msg.data))
        recorded = next(m for m in _reassembled(frames) if m[:4] == bytes.fromhex("31030301"))
        assert len(recorded) == 4 + AUTH_TRAILER

        name = package.name.encode()
        delete = b"\x38\x02" + len(name).to_bytes(2, "big") + name
        forged = delete + recorded[4:]  # the recorded authenticator on another request
        answers = scapy_requests(bus, [delete, b"\x31\x03\x03\x01", recorded, forged,
                                  b"\x31\x01\x03\x04" + b"c-1\x00attack"])  # cancel a campaign
        assert [a.hex() for a in answers] == ["7f383a", "7f313a", "7f313a", "7f383a", "7f313a"]
        assert stored.read_bytes() == package.read_bytes()  # the package is still there

        assert tbox.client.routine_control(0x0301, 3).positive  # the TBOX's session goes on
        time.sleep(0.2)
        refused = [json.loads(line) for line in (tmp_path / "results" / "deploy-refused.jsonl").read_text().splitlines()]
        assert [r["request"][:8] for r in refused] == ["3802000d", "31030301", "31030301", "3802000d", "31010304"]
        assert refused[2]["reason"].endswith("a replay") and refused[0]["reason"] == "MAC does not verify"
        assert "refused 3802000d" in procs[-1].text()
    finally:
        if tbox is not None:
            tbox.close()
        sniffer.shutdown()
        segment.shutdown()
