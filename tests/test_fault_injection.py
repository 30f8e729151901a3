"""Server-side fault injection at byte level: what the faulty ECU puts on the wire."""

from __future__ import annotations

import time

import pytest

from agent.core.faults import parse_fault
from agent.protocol.uds import malformed, mismatched
from tests.conftest import ecu_entry, virtual_bus
from tests.helpers import UdsTester, start_sim


@pytest.fixture
def faulty(tmp_path):  # type: ignore[no-untyped-def]
    started = []

    def make(*specs: str) -> UdsTester:
        data = {"segments": {"pt": {"bus": virtual_bus()}}, "ecus": {"bms": ecu_entry("bms", 0x7E1, 0x7E9)}}
        config, sim = start_sim(data, ["bms"], str(tmp_path / "state"), [parse_fault(s) for s in specs])
        tester = UdsTester(config, "bms")
        started.append((tester, sim))
        return tester

    yield make
    for tester, sim in started:
        tester.close()
        sim.stop()


def test_drop_only_the_nth_occurrence(faulty):
    t = faulty("bms:22#2:drop")
    assert t.ask(b"\x22\xf1\x89") == b"\x62\xf1\x891.0.0"
    assert t.ask(b"\x22\xf1\x89", timeout=0.4) is None
    assert t.ask(b"\x22\xf1\x89") == b"\x62\xf1\x891.0.0"


def test_delay(faulty):
    t = faulty("bms:3e:delay=300")
    start = time.monotonic()
    assert t.ask(b"\x3e\x00") == b"\x7e\x00"
    assert time.monotonic() - start >= 0.3


def test_nrc_malformed_and_mismatch(faulty):
    t = faulty("bms:22#1:nrc=0x22", "bms:22#2:malformed", "bms:22#3:mismatch", "bms:10#1:mismatch")
    assert t.ask(b"\x22\xf1\x89") == b"\x7f\x22\x22"
    assert t.ask(b"\x22\xf1\x89") == b"\x62"
    assert t.ask(b"\x22\xf1\x89") == b"\x62\xf2\x891.0.0"  # echo of another DID
    assert t.ask(b"\x10\x03") == bytes.fromhex("5004 0032 01f4")  # echo of another session


def test_wrong_id_sends_from_another_can_id(faulty):
    t = faulty("bms:3e:wrong_id=0x6F0")
    assert t.ask(b"\x3e\x00", timeout=0.4) is None
    stray = [m for m in t.frames if m.arbitration_id == 0x6F0]
    assert len(stray) == 1 and bytes(stray[0].data[:3]) == b"\x02\x7e\x00"


def test_fault_helpers():
    assert malformed(b"\x76\x01") == b"\x76"
    assert malformed(b"\x77") == b"\x7f"
    assert malformed(b"\x7f\x36\x73") == b"\x7f\x36"
    assert mismatched(b"\x36\x04", b"\x76\x04") == b"\x76\x05"
    assert mismatched(b"\x37", b"\x77") == b"\x78"
    assert mismatched(b"\x36\x01", b"\x7f\x36\x73") == b"\x7f\x37\x73"
