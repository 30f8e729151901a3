"""The UDS client never takes the answer to another request for the answer to its own: a
response that names another service (a tester stopped mid-request, a late answer after an ECU
reset) is dropped and noted in the trace; the diagnosis calls a request that got only such
answers an unmatched response."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator

import can
import pytest
from udsoncan.exceptions import TimeoutException

from agent.adapters.canbus import Segment
from agent.adapters.diagnosis_files import load_rules
from agent.adapters.uds_client import UdsLink
from agent.core.config import SegmentConfig
from agent.core.diagnosis.checks import check_trace
from agent.core.trace import TraceHeader, TraceRecorder
from agent.protocol.uds import Session
from tests.conftest import virtual_bus

REQ, RSP = 0x7E0, 0x7E8


class Server:
    """A scripted ECU: to each request, the responses listed for it, in order."""

    def __init__(self, segment: Segment, script: dict[bytes, list[bytes]], delay: float = 0.0) -> None:
        self.stack = segment.stack(RSP, REQ)
        self.script, self.delay = script, delay
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.is_set():
            request = self.stack.recv(block=True, timeout=0.05)
            if request is None:
                continue
            time.sleep(self.delay)
            for response in self.script.get(bytes(request), []):
                self.stack.send(response)
                time.sleep(0.01)


@pytest.fixture
def segments() -> Iterator[tuple[Segment, Segment]]:
    """The tester's segment and the scripted ECU's: two bus objects on one channel."""
    bus = virtual_bus()
    pair = Segment(SegmentConfig("pt", bus)), Segment(SegmentConfig("pt", bus))
    yield pair
    for seg in pair:
        seg.shutdown()


@contextlib.contextmanager
def talking(segments: tuple[Segment, Segment], answers: list[str],
            delay: float = 0.0) -> Iterator[tuple[UdsLink, TraceRecorder]]:
    """A tester's link to a scripted ECU that answers ``10 03`` with ``answers`` (hex), in order,
    ``delay`` seconds after the request."""
    segment, ecu = segments
    server = Server(ecu, {bytes.fromhex("1003"): [bytes.fromhex(a) for a in answers]}, delay)
    recorder = TraceRecorder(TraceHeader("flash", "GW", "vcu", "vcu", REQ, RSP, 0x7DF, time.time()))
    link = UdsLink(segment, REQ, RSP, name="vcu", recorder=recorder, p2=0.3, p2_star=0.3)
    try:
        yield link, recorder
    finally:
        server.stop.set()
        link.close()


def test_an_answer_to_another_service_is_dropped_and_the_right_one_taken(segments: tuple[Segment, Segment]) -> None:
    with talking(segments, ["7101ff0500", "7f3122", "5003003201f4"]) as (link, recorder):
        response = link.client.change_session(Session.extendedDiagnosticSession)
        assert bytes(response.original_payload) == bytes.fromhex("5003003201f4")
        exchange = recorder.exchanges[0]
        assert exchange.response == bytes.fromhex("5003003201f4")
        assert [data for _, data in exchange.extra["other"]] == ["7101ff0500", "7f3122"]
        assert check_trace(recorder.trace("success"), load_rules(), "vcu", "all") == []  # a stale answer is no fault


def test_only_answers_to_other_services_is_an_unmatched_response(segments: tuple[Segment, Segment]) -> None:
    with talking(segments, ["7101ff0500"]) as (link, recorder):
        with pytest.raises(TimeoutException):
            link.client.change_session(Session.extendedDiagnosticSession)
        findings = check_trace(recorder.trace("failed"), load_rules(), "vcu", "first")
        assert [(f.cause, f.side, f.request) for f in findings] == [("unmatched_response", "server", "1003")]


def test_a_malformed_answer_is_still_the_answer(segments: tuple[Segment, Segment]) -> None:
    """A bare 7F names no service: it is this request's (malformed) answer, not dropped."""
    with talking(segments, ["7f"]) as (link, recorder):
        with pytest.raises(Exception) as caught:
            link.client.change_session(Session.extendedDiagnosticSession)
        assert not isinstance(caught.value, TimeoutException)
        assert recorder.exchanges[0].response == bytes.fromhex("7f")


def test_garbage_frames_during_a_request_do_not_stop_the_link(segments: tuple[Segment, Segment]) -> None:
    """One-byte and empty frames, on the response id and on others, while a request waits: the
    request is answered, and the next one too (the receive path survives any frame)."""
    with talking(segments, ["5003003201f4"], delay=0.2) as (link, recorder):
        _, ecu = segments
        for _ in range(2):
            done = threading.Thread(target=link.client.change_session, args=(Session.extendedDiagnosticSession,))
            done.start()
            time.sleep(0.05)
            for can_id, data in ((0x123, b"\x00"), (RSP, b"\x00"), (0x124, b""), (0x125, b"\x00\x00"), (RSP, b"\xff")):
                ecu.bus.send(can.Message(arbitration_id=can_id, data=data, is_extended_id=False))  # unpadded
            done.join(5)
            assert not done.is_alive()
        # both answered: the segment's receive thread lives on
        assert [e.response for e in recorder.exchanges] == [bytes.fromhex("5003003201f4")] * 2


def test_a_left_out_request_gets_a_reply_the_client_library_accepts():
    """skip_step: the reply the client takes instead of the ECU's is laid out as the service's
    real one (udsoncan parses it), so the client goes on to its next request."""
    from udsoncan import Response, services

    from agent.protocol.uds import plausible_reply

    def parsed(service, request: bytes, **kw):  # type: ignore[no-untyped-def]
        response = Response.from_payload(plausible_reply(request))
        assert response.valid and response.positive, request.hex()
        service.interpret_response(response, **kw)
        return response.service_data

    session = parsed(services.DiagnosticSessionControl, b"\x10\x02")
    assert (session.session_echo, session.p2_server_max, session.p2_star_server_max) == (2, 0.05, 5.0)
    assert parsed(services.SecurityAccess, b"\x27\x01", mode=services.SecurityAccess.Mode.RequestSeed).seed
    parsed(services.SecurityAccess, b"\x27\x02" + b"k" * 4, mode=services.SecurityAccess.Mode.SendKey)
    assert parsed(services.RequestDownload, bytes.fromhex("3400440800000000010000")).max_length == 0xFFF
    assert parsed(services.RequestFileTransfer, b"\x38\x03" + bytes(8)).max_length == 0xFFF
    assert parsed(services.RoutineControl, bytes.fromhex("3101ff00")).routine_id_echo == 0xFF00
    assert parsed(services.TransferData, b"\x36\x05" + bytes(10)).sequence_number_echo == 5
    parsed(services.RequestTransferExit, b"\x37")
    parsed(services.ECUReset, b"\x11\x01")
