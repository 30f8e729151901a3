"""Owner content on an ECU simulator (C6): stored by RequestFileTransfer, shown and
stopped by RoutineControl, read back by DID, without flashing the ECU's software."""

from __future__ import annotations

import hashlib
import os

from agent.adapters.canbus import Segment
from agent.adapters.file_client import PackageDeployer
from agent.core.config import DeployConfig
from tests.conftest import ecu_entry, virtual_bus
from tests.helpers import UdsTester, start_sim


def test_projection_material_is_stored_shown_and_stopped(tmp_path):
    data = {"segments": {"body": {"bus": virtual_bus()}}, "ecus": {"dlp_headlamp": ecu_entry("dlp_headlamp", 0x741, 0x749, "body")}}
    config, sim = start_sim(data, ["dlp_headlamp"], str(tmp_path / "state"))
    tester = UdsTester(config, "dlp_headlamp")
    try:
        material = os.urandom(20_000)
        (tmp_path / "heart.bin").write_bytes(material)
        ecu = config.ecu("dlp_headlamp")
        link = DeployConfig("body", ecu.request_id, ecu.response_id, max_block_length=4095)
        with Segment(config.segments["body"]) as segment:
            result = PackageDeployer(segment, link, "heart.bin", tmp_path / "heart.bin",
                                     hashlib.sha256(material).hexdigest()).run()
        assert result.result == "success", result
        stored = tmp_path / "state" / "dlp_headlamp" / "content" / "heart.bin"
        assert stored.read_bytes() == material
        assert tester.ask(b"\x22\xf1\xc0") == b"\x62\xf1\xc0"  # nothing shown yet
        assert tester.ask(b"\x10\x01")[:2] == b"\x50\x01"
        assert tester.ask(b"\x31\x01\x04\x01heart.bin") == bytes.fromhex("7f317f")  # not in the default session
        assert tester.ask(b"\x10\x03")[:2] == b"\x50\x03"
        assert tester.ask(b"\x31\x01\x04\x01nothing.bin") == bytes.fromhex("7f3131")
        assert tester.ask(b"\x31\x01\x04\x01heart.bin") == bytes.fromhex("7101040100")
        assert tester.ask(b"\x22\xf1\xc0") == b"\x62\xf1\xc0heart.bin"
        assert tester.ask(b"\x22\xf1\x89") == b"\x62\xf1\x891.0.0"  # the software was not touched
        assert tester.ask(b"\x31\x01\x04\x02") == bytes.fromhex("7101040200")
        assert tester.ask(b"\x22\xf1\xc0") == b"\x62\xf1\xc0"
        assert tester.ask(b"\x31\x01\x04\x01heart.bin") == bytes.fromhex("7101040100")
    finally:
        tester.close()
        sim.stop()
    # the choice survives a restart of the ECU
    config, sim = start_sim(data, ["dlp_headlamp"], str(tmp_path / "state"))
    tester = UdsTester(config, "dlp_headlamp")
    try:
        assert tester.ask(b"\x22\xf1\xc0") == b"\x62\xf1\xc0heart.bin"
    finally:
        tester.close()
        sim.stop()
