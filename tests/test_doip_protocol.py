"""ISO 13400-2 framing and payloads (agent/protocol/doip.py), checked against python-doipclient's
own message classes (a DoIP stack we did not write) and the header rules of the standard."""

from __future__ import annotations

from typing import Any

from doipclient import messages as ref
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.protocol.doip import (
    Framer,
    Message,
    Nack,
    PayloadType,
    Problem,
    diagnostic_ack,
    diagnostic_message,
    encode,
    parse_diagnostic,
    parse_routing_activation,
    routing_activation_response,
    vehicle_identification,
)


def _feed(framer: Framer, data: bytes, cuts: list[int]) -> list[Any]:
    out, at = [], 0
    for cut in sorted(set(c % (len(data) + 1) for c in cuts)) + [len(data)]:
        out += framer.feed(data[at:cut])
        at = cut
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 10_000), max_size=12))
def test_messages_come_out_whole_however_the_stream_is_cut(cuts: list[int]) -> None:
    stream = (encode(PayloadType.ROUTING_ACTIVATION_REQUEST, ref.RoutingActivationRequest(0x0E80, 0).pack())
              + encode(PayloadType.DIAGNOSTIC_MESSAGE, diagnostic_message(0x0E80, 0x0010, b"\x22\xf1\x89"))
              + encode(PayloadType.ALIVE_CHECK_RESPONSE, b"\x0e\x80"))
    got = _feed(Framer(4096), stream, cuts)
    assert [m.payload_type for m in got] == [0x0005, 0x8001, 0x0008]
    assert parse_routing_activation(got[0].payload) == (0x0E80, 0, None)
    assert parse_diagnostic(got[1].payload) == (0x0E80, 0x0010, b"\x22\xf1\x89")


def test_the_header_rules_of_the_standard() -> None:
    framer = Framer(100)
    unknown = encode(0x1234, b"abc")
    too_large = encode(PayloadType.DIAGNOSTIC_MESSAGE, b"\x0e\x80\x00\x10" + b"\x36" * 200)
    alive = encode(PayloadType.ALIVE_CHECK_REQUEST, b"")
    got = framer.feed(unknown + too_large + alive)  # skipped, skipped, then read: the connection stays
    assert [(g.nack, g.close) if isinstance(g, Problem) else g.payload_type for g in got] == [
        (Nack.UNKNOWN_PAYLOAD_TYPE, False), (Nack.MESSAGE_TOO_LARGE, False), 0x0007]
    assert Framer(100, room=10).feed(encode(PayloadType.DIAGNOSTIC_MESSAGE, b"\x0e\x80\x00\x10" + b"\x36" * 20))[0] \
        .nack == Nack.OUT_OF_MEMORY
    bad_length = Framer(100)
    assert bad_length.feed(encode(PayloadType.ROUTING_ACTIVATION_REQUEST, b"\x0e\x80\x00\x00") + alive) == [
        Problem(Nack.INVALID_PAYLOAD_LENGTH, True, "4 bytes of payload for type 0x0005")]
    assert bad_length.closed and bad_length.feed(alive) == []  # nothing more is read
    pattern = Framer(100).feed(b"\x02\xfc" + encode(0x0007, b"")[2:])
    assert pattern[0].nack == Nack.INCORRECT_PATTERN and pattern[0].close
    assert Framer(100).feed(encode(PayloadType.VEHICLE_ID_REQUEST, b"", version=0xFF)) == [Message(0xFF, 1, b"")]
    assert Framer(100).feed(encode(PayloadType.ALIVE_CHECK_REQUEST, b"", version=0xFF))[0].nack == Nack.INCORRECT_PATTERN


def test_payloads_read_as_the_reference_reads_them() -> None:
    vid = ref.VehicleIdentificationResponse.unpack(
        vehicle_identification("LVOTA000000000001", 0x0010, b"\x02\x00\x00\x00\x00\x01", b"\x02\x00\x00\x00\x00\x01"), 32)
    assert (vid.vin, vid.logical_address, vid.further_action_required) == ("LVOTA000000000001", 0x0010, 0)
    answer = ref.RoutingActivationResponse.unpack(routing_activation_response(0x0E80, 0x0010, 0x10), 9)
    assert (answer.client_logical_address, answer.logical_address, answer.response_code) == (0x0E80, 0x0010, 0x10)
    ack = ref.DiagnosticMessagePositiveAcknowledgement.unpack(diagnostic_ack(0x0010, 0x0E80, b"\x22\xf1"), 7)
    assert (ack.source_address, ack.target_address, ack.ack_code, ack.previous_message_data) == (
        0x0010, 0x0E80, 0, b"\x22\xf1")
    request = ref.DiagnosticMessage(0x0E80, 0x0010, b"\x10\x03").pack()
    assert parse_diagnostic(request) == (0x0E80, 0x0010, b"\x10\x03")
