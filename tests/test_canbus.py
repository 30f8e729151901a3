"""The CAN segment's ISO-TP stacks on a python-can ``virtual`` bus."""

from __future__ import annotations

import random
import time

import pytest

from agent.adapters.canbus import Segment
from agent.core.config import SegmentConfig
from tests.conftest import virtual_bus


def test_a_single_frame_held_back_by_the_bus_timing_still_completes_its_send():
    """can-isotp 2.0.7 leaves a blocking send of a single frame waiting for ever when its rate
    limiter held the frame back (a 37 after a long TransferData at 500 kbit/s: an install stuck
    at transfer_exit, seen once in many suite runs). Reproduced here within ~20 rounds before the
    fix (40 are run); every send must now return."""
    bus = virtual_bus()
    timed = Segment(SegmentConfig("pt", bus, bitrate=(500000, None)))
    peer = Segment(SegmentConfig("pt", bus))
    try:
        receiver = peer.stack(0x7E8, 0x7E0)
        sender = timed.stack(0x7E0, 0x7E8)
        block = bytes(4095)
        for _ in range(40):  # a send that never returns raises BlockingSendTimeout (generous: a busy machine is slow)
            sender.send(block, send_timeout=30)
            sender.send(b"\x37", send_timeout=15)  # hung for ever before the fix
        received = 0
        while receiver.available():
            receiver.recv()
            received += 1
        assert received > 0
    finally:
        timed.shutdown()
        peer.shutdown()


def test_emulated_bus_timing_never_runs_ahead_of_the_bus_and_never_hangs():
    """Many short transfers both ways on a segment at 500 kbit/s: every one arrives whole and
    in order, every send returns (a send that never completes would fail here by its timeout),
    and the frames never leave faster than the bus carries them."""
    from agent.adapters.canbus import BusClock, frame_time

    bus = virtual_bus()
    a = Segment(SegmentConfig("pt", bus, bitrate=(500000, None)))
    b = Segment(SegmentConfig("pt", bus, bitrate=(500000, None)))
    rng = random.Random(7)
    try:
        tester, ecu = a.stack(0x7E0, 0x7E8), b.stack(0x7E8, 0x7E0)
        for i in range(300):
            size = rng.choice((1, 2, 7, 8, 20, 62, 63, 300))
            payload = bytes((i + k) & 0xFF for k in range(size))
            tester.send(payload, send_timeout=5)
            assert ecu.recv(block=True, timeout=5) == payload, i
            ecu.send(payload[::-1], send_timeout=5)
            assert tester.recv(block=True, timeout=5) == payload[::-1], i
    finally:
        a.shutdown()
        b.shutdown()
    clock = BusClock(500000, None, False)
    started = time.monotonic()
    for _ in range(1000):
        clock.take(8)
    # the last frame may start up to ``burst`` early: its own slot on the bus is still to come
    assert time.monotonic() - started >= 1000 * frame_time(8, 500000) - clock.burst - frame_time(8, 500000)


def test_a_segment_lent_to_a_worker_closes_this_process_bus_unless_it_is_pinned():
    """While a worker process flashes a segment, the gateway's own bus on it is closed (it would
    decode every frame for nothing) and every ECU on it is held; the deploy link's segment is
    pinned: its bus stays open, the deploy server goes on listening."""
    from agent.core.config import parse_vehicle_config
    from gateway.buses import Buses, EcuBusy

    config = parse_vehicle_config({"segments": {"pt": {"bus": virtual_bus()}, "bb": {"bus": virtual_bus()}},
                                   "ecus": {"a": {"segment": "pt", "request_id": 0x7E0, "response_id": 0x7E8},
                                            "b": {"segment": "pt", "request_id": 0x7E1, "response_id": 0x7E9},
                                            "g": {"segment": "bb", "request_id": 0x7E2, "response_id": 0x7EA}}}, "test")
    buses = Buses(config)
    try:
        buses.pin("bb")
        pt, bb = buses.segment("pt"), buses.segment("bb")
        with buses.lend("pt", "flash"), buses.lend("bb", "flash"):
            assert buses.busy("a") == buses.busy("b") == buses.busy("g") == "flash"
            try:
                with buses.ecu("b", "content", wait=0.1):
                    raise AssertionError("an ECU of a lent segment was free")
            except EcuBusy:
                pass
        assert buses.segment("bb") is bb  # pinned: the same open bus
        assert buses.segment("pt") is not pt  # closed while lent, opened again on its next use
    finally:
        buses.shutdown()


def test_work_waiting_for_an_ecu_says_so_until_it_gets_it_or_its_wait_ends() -> None:
    """A tester holds an ECU; an install waiting for it is told every second who holds it (the
    installer keeps its heartbeat with that), gets it when it is let go; a bounded wait ends busy."""
    import threading
    import time

    from agent.core.config import parse_vehicle_config
    from gateway.buses import Buses, EcuBusy

    config = parse_vehicle_config({"segments": {"pt": {"bus": virtual_bus()}},
                                   "ecus": {"a": {"segment": "pt", "request_id": 0x7E0, "response_id": 0x7E8}}}, "test")
    buses = Buses(config)
    told: list[tuple[str, str]] = []
    buses.on_wait = lambda ecu, holder: told.append((ecu, holder))
    taken = threading.Event()
    let_go = threading.Event()

    def tester() -> None:
        with buses.ecu("a", "DoIP tester 0x0E00"):
            taken.set()
            let_go.wait(10)

    thread = threading.Thread(target=tester)
    thread.start()
    try:
        assert taken.wait(5)
        with pytest.raises(EcuBusy, match=r"a is busy \(DoIP tester 0x0E00\)"):
            with buses.ecu("a", "content", wait=1.5):
                pass
        assert set(told) <= {("a", "DoIP tester 0x0E00")} and len(told) <= 1  # a slice of 1 s, then the end
        told.clear()
        began = time.monotonic()
        threading.Timer(2.5, let_go.set).start()
        with buses.ecu("a", "flash"):
            assert time.monotonic() - began >= 2.5  # waited for the tester, as long as it took
        assert len(told) >= 2 and set(told) == {("a", "DoIP tester 0x0E00")}  # told at every slice of 1 s
    finally:
        let_go.set()
        thread.join(5)
        buses.shutdown()
