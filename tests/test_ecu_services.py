"""Exact request and response bytes of every ECU simulator service, NRC paths included.

The simulator runs as a real UDS server on a python-can ``virtual`` bus; the tester
speaks raw ISO-TP to it.
"""

from __future__ import annotations

import struct
import time
import zlib
from pathlib import Path
from typing import Iterator

import can
import pytest

from agent.protocol.ecu import security_key
from tests.conftest import ecu_entry, virtual_bus
from tests.helpers import UdsTester, start_sim


@pytest.fixture
def bench(tmp_path: Path) -> Iterator[tuple[UdsTester, object]]:
    data = {
        "segments": {"pt": {"bus": virtual_bus()}},
        "ecus": {"bms": ecu_entry("bms", 0x7E1, 0x7E9, s3_ms=400, max_block_length=18, lockout_ms=300)
                 | {"memory": {"address": 0x1000, "size": 0x10000}}},
    }
    config, sim = start_sim(data, ["bms"], str(tmp_path / "state"))
    tester = UdsTester(config, "bms")
    try:
        yield tester, sim
    finally:
        tester.close()
        sim.stop()


def test_session_control_bytes(bench):
    t, _ = bench
    assert t.ask(b"\x10\x03") == bytes.fromhex("5003 0032 01f4")  # P2 50 ms, P2* 5000 ms
    assert t.ask(b"\x10\x02") == bytes.fromhex("5002 0032 01f4")
    assert t.ask(b"\x10\x01") == bytes.fromhex("5001 0032 01f4")
    assert t.ask(b"\x10\x02") == bytes.fromhex("7f107e")  # programming only from extended
    assert t.ask(b"\x10\x05") == bytes.fromhex("7f1012")
    assert t.ask(b"\x10\x03\x00") == bytes.fromhex("7f1013")
    assert t.ask(b"\x10") == bytes.fromhex("7f1013")


def test_unknown_service_and_tester_present(bench):
    t, _ = bench
    assert t.ask(b"\x19\x02\xff") == bytes.fromhex("7f1911")
    assert t.ask(b"\x3e\x00") == bytes.fromhex("7e00")
    assert t.ask(b"\x3e\x80", timeout=0.3) is None  # suppress positive response
    assert t.ask(b"\x3e\x01") == bytes.fromhex("7f3e12")
    assert t.ask(b"\x3e\x00\x00") == bytes.fromhex("7f3e13")


def test_functional_addressing_suppresses_some_nrcs(bench):
    t, _ = bench
    assert t.ask(b"\x3e\x00", functional=True) == bytes.fromhex("7e00")
    assert t.ask(b"\x22\xf1\x90", functional=True, timeout=0.3) is None  # 0x31 not sent
    assert t.ask(b"\x19\x02", functional=True, timeout=0.3) is None  # 0x11 not sent


def test_functional_request_with_a_multi_frame_answer_takes_flow_control_from_the_physical_id(bench):
    """ISO 15765-2: the answer to a functional request is physical; the tester's flow
    control for it comes from its physical request id, as real testers send it."""
    t, _ = bench
    sniffer = can.Bus(**t.segment.config.bus)  # a third node on the bus hears both sides
    try:
        answer = t.ask(b"\x22\xf1\x87\xf1\x89\xf1\x8c", functional=True)
        sent = []
        while (m := sniffer.recv(0.2)) is not None:
            sent.append((m.arbitration_id, bytes(m.data)))
    finally:
        sniffer.shutdown()
    assert answer == b"\x62\xf1\x87BMS-1\xf1\x891.0.0\xf1\x8cSN-bms"
    assert sent[0] == (0x7DF, bytes.fromhex("0722f187f189f18c"))  # functional single frame
    assert sent[1][0] == 0x7E9 and sent[1][1][:2] == b"\x10\x17"  # first frame from the response id
    assert sent[2][0] == 0x7E1 and sent[2][1][0] == 0x30  # flow control on the physical request id
    assert [i for i, _ in sent[3:]] == [0x7E9] * 3


def test_a_tester_that_sends_flow_control_from_the_functional_id_is_answered_too(bench):
    """Some testers (scapy's ISO-TP among them) answer the first frame from the id they sent
    the functional request on: that flow control is taken as well."""
    t, _ = bench
    t.segment.release(t.phys)  # nobody sends flow control from the physical id
    functional = t.segment.stack(t.ecu.functional_id, t.ecu.response_id)  # sends, and flow control, on 0x7DF
    try:
        functional.send(b"\x22\xf1\x87\xf1\x89\xf1\x8c")
        answer = functional.recv(block=True, timeout=2)
    finally:
        t.segment.release(functional)
    assert answer is not None and bytes(answer) == b"\x62\xf1\x87BMS-1\xf1\x891.0.0\xf1\x8cSN-bms"


def test_read_data_by_identifier(bench):
    t, _ = bench
    assert t.ask(b"\x22\xf1\x87") == b"\x62\xf1\x87BMS-1"
    assert t.ask(b"\x22\xf1\x89") == b"\x62\xf1\x891.0.0"
    assert t.ask(b"\x22\xf1\x8c") == b"\x62\xf1\x8cSN-bms"
    # F180: numberOfModules (1), then the boot software's identification (ISO 14229-1 C.1)
    assert t.ask(b"\x22\xf1\x80\xf1\x87") == b"\x62\xf1\x80\x01BL-1.0\xf1\x87BMS-1"
    # the fingerprint of an ECU never programmed: date 00 00 00, no version (not an empty answer)
    assert t.ask(b"\x22\xf1\x5a") == b"\x62\xf1\x5a\x00\x00\x00\x00"
    assert t.ask(b"\x22\xf1\x99") == b"\x62\xf1\x99\x00\x00\x00\x00"
    assert t.ask(b"\x22\xf1\x95")[:3] == b"\x62\xf1\x95"
    assert t.ask(b"\x22\xf1\x86") == b"\x62\xf1\x86\x01"
    assert t.ask(b"\x22\xf1\x90") == bytes.fromhex("7f2231")
    assert t.ask(b"\x22\xf1") == bytes.fromhex("7f2213")


def test_dtc_and_communication_control(bench):
    t, _ = bench
    assert t.ask(b"\x85\x02") == bytes.fromhex("7f857f")  # not in the default session
    assert t.ask(b"\x28\x03\x01") == bytes.fromhex("7f287f")
    t.ask(b"\x10\x03")
    assert t.ask(b"\x85\x02") == bytes.fromhex("c502")
    assert t.ask(b"\x85\x03") == bytes.fromhex("7f8512")
    assert t.ask(b"\x28\x03\x01") == bytes.fromhex("6803")
    assert t.ask(b"\x28\x03") == bytes.fromhex("7f2813")
    assert t.ask(b"\x28\x03\x00") == bytes.fromhex("7f2831")
    assert t.ask(b"\x85\x81", timeout=0.3) is None  # suppressed positive response


def test_security_access_seed_key_attempts_and_lockout(bench):
    t, _ = bench
    assert t.ask(b"\x27\x01") == bytes.fromhex("7f277f")
    t.ask(b"\x10\x03")
    assert t.ask(b"\x27\x02\x00\x00\x00\x00") == bytes.fromhex("7f2724")  # key without seed
    assert t.ask(b"\x27\x03") == bytes.fromhex("7f2712")
    for expected in ("7f2735", "7f2735", "7f2736"):
        seed = t.ask(b"\x27\x01")
        assert seed[:2] == b"\x67\x01" and len(seed) == 6
        assert t.ask(b"\x27\x02\xde\xad\xbe\xef") == bytes.fromhex(expected)
    assert t.ask(b"\x27\x01") == bytes.fromhex("7f2737")  # lock-out delay running
    time.sleep(0.35)
    seed = t.ask(b"\x27\x01")[2:]
    assert t.ask(b"\x27\x02" + security_key("bms-secret", seed)[:3]) == bytes.fromhex("7f2713")
    seed = t.ask(b"\x27\x01")[2:]
    assert t.ask(b"\x27\x02" + security_key("bms-secret", seed)) == bytes.fromhex("6702")
    assert t.ask(b"\x27\x01") == bytes.fromhex("6701 00000000")  # already unlocked: zero seed


def test_programming_preconditions(bench):
    t, _ = bench
    t.ask(b"\x10\x03")
    # RoutineControl is served in the extended session; the programming routines are not (ISO
    # 14229-1: requestOutOfRange for a routine the active session does not support)
    for routine in ("3101ff00 44 00001000 00000100", "3101ff06" + "00" * 64, "3101ff01"):
        assert t.ask(bytes.fromhex(routine)) == bytes.fromhex("7f3131"), routine
    t.ask(b"\x10\x02")
    erase = bytes.fromhex("3101ff00 44 00001000 00000100")
    assert t.ask(erase) == bytes.fromhex("7f3133")  # locked
    assert t.ask(bytes.fromhex("3400 44 00001000 00000100")) == bytes.fromhex("7f3433")
    assert t.ask(b"\x2e\xf1\x5a" + b"\x26\x11\x21\x031.1") == bytes.fromhex("7f2e33")
    assert t.ask(b"\x36\x01\xaa") == bytes.fromhex("7f3624")  # no download active
    assert t.ask(b"\x37") == bytes.fromhex("7f3724")
    seed = t.ask(b"\x27\x01")[2:]
    t.ask(b"\x27\x02" + security_key("bms-secret", seed))
    assert t.ask(bytes.fromhex("3400 44 00001000 00000100")) == bytes.fromhex("7f3470")  # not erased
    assert t.ask(bytes.fromhex("3101ff00 44 00100000 00000100")) == bytes.fromhex("7f3131")  # outside memory
    assert t.ask(bytes.fromhex("3101ff00 44 0000")) == bytes.fromhex("7f3113")
    assert t.ask(bytes.fromhex("3101abcd")) == bytes.fromhex("7f3131")  # unknown routine
    assert t.ask(bytes.fromhex("3103ff00")) == bytes.fromhex("7f3112")
    assert t.ask(bytes.fromhex("3400 44 00001000")) == bytes.fromhex("7f3413")


def _download(t: UdsTester, image: bytes) -> None:
    t.unlock()
    assert t.ask(b"\x2e\xf1\x5a" + bytes.fromhex("261121") + bytes((3,)) + b"2.5") == bytes.fromhex("6ef15a")
    erase = bytes.fromhex("3101ff00 44 00001000") + struct.pack(">I", len(image))
    assert t.ask(erase) == bytes.fromhex("7101ff0000")
    assert t.pending >= 1  # 0x78 response pending while erasing
    request = bytes.fromhex("3400 44 00001000") + struct.pack(">I", len(image))
    assert t.ask(request) == bytes.fromhex("7420 0012")  # maxNumberOfBlockLength 18


def test_full_programming_sequence_with_counter_wrap(bench, tmp_path):
    t, sim = bench
    chunk = 16  # 18 - SID - counter
    image = bytes(range(256)) * 17 + b"tail"  # 4356 bytes: 273 blocks, the counter wraps FF -> 00
    _download(t, image)
    counter = 1
    for offset in range(0, len(image), chunk):
        block = image[offset : offset + chunk]
        assert t.ask(bytes((0x36, counter)) + block) == bytes((0x76, counter))
        if offset == chunk * 3:  # a repeated block is acknowledged and not written twice
            assert t.ask(bytes((0x36, counter)) + b"\xff" * len(block)) == bytes((0x76, counter))
        counter = (counter + 1) & 0xFF
    assert counter == (len(image) + chunk - 1) // chunk + 1 & 0xFF
    assert t.ask(b"\x37") == b"\x77"
    assert t.ask(b"\x31\x01\x02\x02" + b"\x00\x00\x00\x00") == bytes.fromhex("7101020201")  # wrong CRC
    crc = zlib.crc32(image).to_bytes(4, "big")
    assert t.ask(b"\x31\x01\x02\x02" + crc) == bytes.fromhex("7101020200")
    assert t.ask(b"\x31\x01\x02\x02" + crc[:3]) == bytes.fromhex("7f3113")
    assert t.ask(bytes.fromhex("3101ff01")) == bytes.fromhex("7101ff0100")
    assert t.ask(b"\x22\xf1\x89") == b"\x62\xf1\x891.0.0"  # not active before the reset
    assert t.ask(b"\x11\x01") == b"\x51\x01"
    assert t.ask(b"\x3e\x00", timeout=0.1) is None  # really silent while resetting
    time.sleep(0.25)
    assert t.ask(b"\x22\xf1\x89") == b"\x62\xf1\x892.5"
    assert t.ask(b"\x22\xf1\x86") == b"\x62\xf1\x86\x01"
    state = sim.servers["bms"].state
    assert state.banks.active_image() == image


def test_transfer_data_rules(bench):
    t, _ = bench
    image = bytes(40)
    _download(t, image)
    assert t.ask(b"\x36\x02" + bytes(16)) == bytes.fromhex("7f3673")  # wrong counter
    assert t.ask(b"\x36\x01" + bytes(17)) == bytes.fromhex("7f3613")  # longer than the block length
    assert t.ask(b"\x36\x01") == bytes.fromhex("7f3613")  # no data
    assert t.ask(b"\x36\x01" + bytes(16)) == bytes.fromhex("7601")
    assert t.ask(b"\x36\x03" + bytes(16)) == bytes.fromhex("7f3673")
    assert t.ask(b"\x37") == bytes.fromhex("7f3724")  # incomplete
    assert t.ask(b"\x36\x02" + bytes(16)) == bytes.fromhex("7602")
    assert t.ask(b"\x36\x03" + bytes(16)) == bytes.fromhex("7f3671")  # more than requested
    assert t.ask(b"\x34\x00\x44\x00\x00\x10\x00\x00\x00\x00\x10") == bytes.fromhex("7f3422")  # download active
    assert t.ask(b"\x36\x03" + bytes(8)) == bytes.fromhex("7603")
    assert t.ask(b"\x37") == b"\x77"
    assert t.ask(bytes.fromhex("3101ff01")) == bytes.fromhex("7101ff0101")  # not verified yet


def test_s3_timeout_returns_to_default_and_locks(bench):
    t, _ = bench
    t.unlock()
    assert t.ask(b"\x22\xf1\x86") == b"\x62\xf1\x86\x02"
    time.sleep(0.7)
    assert t.ask(b"\x22\xf1\x86") == b"\x62\xf1\x86\x01"
    t.ask(b"\x10\x03")
    assert t.ask(b"\x10\x02")[:2] == b"\x50\x02"
    assert t.ask(bytes.fromhex("3101ff00 44 00001000 00000010")) == bytes.fromhex("7f3133")  # locked again


def test_garbage_on_the_bus_does_not_stop_the_server(bench):
    t, _ = bench
    for data in (b"", b"\xff" * 8, b"\x30\x00\x00", b"\x21\x01\x02", b"\x1f\xff\x00", b"\x00\x00"):
        t.segment.send_frame(t.ecu.request_id, data) if data else t.segment.send_frame(t.ecu.request_id, b"\x00")
    t.segment.send_frame(0x123, b"\x02\x10\x03")
    time.sleep(0.1)
    assert t.ask(b"\x3e\x00") == b"\x7e\x00"
    assert t.ask(b"\x22\xf1\x89") == b"\x62\xf1\x891.0.0"


def test_an_overflow_flow_control_stops_an_answer_not_the_server(bench, caplog):
    """A node answers the ECU's first frame with flow control "overflow" (or a tester gives up):
    the answer is not sent, which is logged as such, not as an internal error; the next
    request is answered."""
    import logging

    t, _ = bench
    t.segment.release(t.phys)  # the attacker, not the tester's stack, sends the flow control
    raw = can.Bus(**t.segment.config.bus)
    try:
        with caplog.at_level(logging.WARNING):
            raw.send(can.Message(arbitration_id=t.ecu.request_id, data=b"\x07\x22\xf1\x87\xf1\x89\xf1\x8c",
                                 is_extended_id=False))
            first = raw.recv(2)
            while first is not None and first.arbitration_id != t.ecu.response_id:
                first = raw.recv(2)
            assert first is not None and first.data[0] >> 4 == 1  # a first frame
            raw.send(can.Message(arbitration_id=t.ecu.request_id, data=b"\x32\x00\x00", is_extended_id=False))
            deadline = time.monotonic() + 3
            while not any("was not sent" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        raw.shutdown()
    assert any("22f187f189f18c was not sent" in r.getMessage() for r in caplog.records), caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    t.phys = t.segment.stack(t.ecu.request_id, t.ecu.response_id)
    assert t.ask(b"\x22\xf1\x89") == b"\x62\xf1\x891.0.0"


def test_reset_and_write_did_nrc_paths(bench):
    t, _ = bench
    assert t.ask(b"\x11\x05") == bytes.fromhex("7f1112")
    assert t.ask(b"\x11\x01\x00") == bytes.fromhex("7f1113")
    assert t.ask(b"\x2e\xf1\x5a\x26\x11\x21\x00") == bytes.fromhex("7f2e7f")  # default session
    t.ask(b"\x10\x03")
    assert t.ask(b"\x2e\xf1\x5a\x26\x11\x21\x00") == bytes.fromhex("7f2e22")  # not programming
    t.unlock()
    assert t.ask(b"\x2e\xf1\x90\x26\x11\x21\x00") == bytes.fromhex("7f2e31")  # not a writable DID
    assert t.ask(b"\x2e\xf1\x5a\x26") == bytes.fromhex("7f2e13")
    assert t.ask(b"\x2e\xf1\x99\x26\x11\x21\x03" + b"7.7") == bytes.fromhex("6ef199")
    assert t.ask(b"\x22\xf1\x5a") == b"\x62\xf1\x5a\x26\x11\x21\x037.7"
    assert t.ask(b"\x11\x81", timeout=0.15) is None  # suppressed positive response, then silent
    time.sleep(0.3)
    assert t.ask(b"\x22\xf1\x86") == b"\x62\xf1\x86\x01"  # after reset: default session


def test_nrc_priority_follows_iso_14229(bench):
    """Service, session, minimum length, sub-function, then the service's own length and
    parameters: an unsupported sub-function is 0x12 whatever else is wrong with the request."""
    t, _ = bench
    assert t.ask(bytes.fromhex("100400")) == bytes.fromhex("7f1012")  # not 0x13 for the extra byte
    assert t.ask(bytes.fromhex("110500")) == bytes.fromhex("7f1112")
    assert t.ask(bytes.fromhex("3e0100")) == bytes.fromhex("7f3e12")
    assert t.ask(bytes.fromhex("1003"))[:2] == b"\x50\x03"
    assert t.ask(bytes.fromhex("31041234")) == bytes.fromhex("7f3112")  # not 0x31 for the unknown routine
    assert t.ask(bytes.fromhex("3103ff00")) == bytes.fromhex("7f3112")  # results of a routine: not supported
    assert t.ask(bytes.fromhex("31011234")) == bytes.fromhex("7f3131")  # a supported type, an unknown routine
    assert t.ask(bytes.fromhex("31")) == bytes.fromhex("7f3113")  # no sub-function at all
    assert t.ask(bytes.fromhex("8504")) == bytes.fromhex("7f8512")
    assert t.ask(bytes.fromhex("2804")) == bytes.fromhex("7f2812")


def test_a_lock_out_survives_a_power_cycle(tmp_path):
    """Three wrong keys lock SecurityAccess; restarting the simulator (a power cycle) does not
    lift it: the count and what is left of the delay are kept in <ecu>/security.json."""
    data = {"segments": {"pt": {"bus": virtual_bus()}},
            "ecus": {"bms": ecu_entry("bms", 0x7E1, 0x7E9, lockout_ms=60_000)}}
    config, sim = start_sim(data, ["bms"], str(tmp_path / "state"))
    tester = UdsTester(config, "bms")
    try:
        tester.ask(b"\x10\x03")
        for expected in ("7f2735", "7f2735", "7f2736"):
            assert tester.ask(b"\x27\x01")[:2] == b"\x67\x01"
            assert tester.ask(b"\x27\x02\xde\xad\xbe\xef") == bytes.fromhex(expected)
    finally:
        tester.close()
        sim.stop()
    config, sim = start_sim(data, ["bms"], str(tmp_path / "state"))
    tester = UdsTester(config, "bms")
    try:
        tester.ask(b"\x10\x03")
        assert tester.ask(b"\x27\x01") == bytes.fromhex("7f2737")  # still locked after the restart
    finally:
        tester.close()
        sim.stop()


def test_delta_base_check_and_a_delta_applied_while_it_arrives(tmp_path):
    """The delta base routine (FF06: base SHA-256, new SHA-256) before the erase; RequestDownload
    with the delta's nibble only after it; the patch applied from the active bank, the transfer
    exit refused (0x72) when what it made is not the announced image."""
    import hashlib

    from agent.protocol.delta import make_delta

    data = {"segments": {"pt": {"bus": virtual_bus()}},
            "ecus": {"bms": ecu_entry("bms", 0x7E1, 0x7E9, max_block_length=258)
                     | {"memory": {"address": 0x1000, "size": 0x10000}, "delta": 13}}}
    config, sim = start_sim(data, ["bms"], str(tmp_path / "state"))
    t = UdsTester(config, "bms")
    try:
        old = bytes(range(256)) * 40
        new = old[:3000] + b"a new function" + old[3000:9000] + b"\x00" * 100
        patch = make_delta(old, new)
        state = sim.servers["bms"].state
        state.banks.erase()  # the running image: as a finished flash left it
        state.banks.begin_write(len(old))
        state.banks.write(0, old)
        state.banks.finish_write(len(old))
        state.banks.pending_version = "2.0.0"
        assert state.banks.check("crc32", zlib.crc32(old).to_bytes(4, "big")) and state.banks.check_dependencies()
        t.ask(b"\x11\x01")
        time.sleep(0.4)
        base, target = hashlib.sha256(old).digest(), hashlib.sha256(new).digest()
        t.unlock()
        assert t.ask(b"\x31\x01\xff\x06" + bytes(32) + target) == bytes.fromhex("7f3122")  # not the base it runs
        assert t.ask(b"\x31\x01\xff\x06" + base) == bytes.fromhex("7f3113")
        erase = bytes.fromhex("3101ff00 44 00001000") + struct.pack(">I", len(new))
        download = bytes.fromhex("34d0 44 00001000") + struct.pack(">I", len(new))
        assert t.ask(erase) == bytes.fromhex("7101ff0000")
        assert t.ask(download) == bytes.fromhex("7f3424")  # no base checked: a sequence error
        for announced, exit_answer in ((bytes(32), "7f3772"), (target, "77")):
            assert t.ask(b"\x31\x01\xff\x06" + base + announced) == bytes.fromhex("7101ff0600")
            assert t.ask(erase) == bytes.fromhex("7101ff0000")
            assert t.ask(download) == bytes.fromhex("7420 0102")
            for counter, offset in enumerate(range(0, len(patch), 256), start=1):
                assert t.ask(bytes((0x36, counter)) + patch[offset : offset + 256]) == bytes((0x76, counter))
            assert t.ask(b"\x37") == bytes.fromhex(exit_answer)
            if exit_answer != "77":
                t.ask(b"\x10\x01")  # out of the session: the download is dropped
                t.unlock()
        assert t.ask(b"\x31\x01\x02\x02" + zlib.crc32(new).to_bytes(4, "big")) == bytes.fromhex("7101020200")
        assert state.banks.path(state.banks.target).read_bytes()[: len(new)] == new
        assert state.banks.active_image() == old  # the base is never written
    finally:
        t.close()
        sim.stop()


def test_an_injected_nrc_to_a_compressed_download_refuses_it_before_it_opens_and_the_next_offer_goes(tmp_path):
    """A fault ``34#1:nrc=0x31`` is a refusal of the compressed offer, as a bootloader without
    that method gives it: nothing was opened, so the gateway's next offer (uncompressed) is taken
    (it used to get 0x22, the first download still open)."""
    from agent.core.faults import parse_fault
    from ecu_sim.flash_banks import FlashBanks
    from gateway.jobs import FlashJob
    from gateway.orchestrator import FlashRun, flash_all

    data = {"segments": {"pt": {"bus": virtual_bus()}}, "gateway": {"results_dir": str(tmp_path / "gw")},
            "ecus": {"vcu": ecu_entry("vcu", 0x7E0, 0x7E8) | {"compression": {"zlib": 1}}}}
    config, sim = start_sim(data, ["vcu"], str(tmp_path / "state"), [parse_fault("vcu:34#1:nrc=0x31")])
    try:
        image = bytes(range(64)) * 256  # compressible
        (result,) = flash_all(config, [FlashJob("vcu", image, "2.0.0")], tmp_path / "out", FlashRun())
        assert (result.result, result.compression, result.compression_refused) == ("success", None, ["zlib"]), result
        assert FlashBanks(tmp_path / "state" / "vcu", "?").active_image() == image
    finally:
        sim.stop()
