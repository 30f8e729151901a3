"""The header-only trace format: recording, round trip and bad input."""

from __future__ import annotations

import json

import pytest

from agent.adapters.trace_files import read_trace, write_trace
from agent.core.trace import TraceHeader, TraceRecorder, parse_trace, request_header
from agent.errors import TraceFormatError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _recorder(clock: Clock) -> TraceRecorder:
    return TraceRecorder(TraceHeader("flash", "GW", "bms", "bms", 0x7E1, 0x7E9, 0x7DF, clock.now), clock=clock)


def test_request_header_never_keeps_data():
    assert request_header(b"\x36\x07" + b"\xaa" * 4000) == b"\x36\x07"
    assert request_header(b"\x27\x02\x01\x02\x03\x04") == b"\x27\x02"
    assert request_header(b"\x2e\xf1\x5a" + b"x" * 20) == b"\x2e\xf1\x5a"
    assert request_header(b"\x31\x01\x02\x02\xde\xad\xbe\xef") == b"\x31\x01\x02\x02"
    assert request_header(bytes.fromhex("3400440800000000100000")) == bytes.fromhex("3400440800000000100000")
    # the activation phase's SecurityAccess key is not recorded either
    assert request_header(b"\x27\x02\x9b\x16\x48\xfb", "activate") == b"\x27\x02"
    assert request_header(b"\x31\x01\xff\x02\x00\x01", "activate") == b"\x31\x01\xff\x02"
    # an unknown or garbled service id: its SID only (what follows may be a digest or an image)
    digest = bytes(range(32))
    assert request_header(b"\xba" + digest, "deploy") == b"\xba"
    assert request_header(b"\x77" + digest, "flash") == b"\x77"
    assert request_header(b"\x22\xf1\x89\xf1\x8c", "activate") == b"\x22\xf1\x89\xf1\x8c"  # parameters only


def test_recorder_round_trip(tmp_path):
    clock = Clock()
    rec = _recorder(clock)
    rec.request(bytes.fromhex("3101ff00440800000000100000"))
    clock.now += 0.0034
    rec.response(b"\x7f\x31\x78")
    clock.now += 0.5
    rec.response(b"\x71\x01\xff\x00\x00")
    clock.now += 0.001
    rec.request(b"\x36\x01" + bytes(4093))
    clock.now += 0.0405
    rec.response(b"\x76\x01")
    rec.request(b"\x36\x02" + bytes(4093))
    rec.note("no response (timeout)")
    clock.now += 2.0
    rec.late(b"\x76\x02")
    rec.stray(0x6F0, b"\x76\x02")
    size = write_trace(tmp_path / "t.jsonl", rec, "failed")
    text = (tmp_path / "t.jsonl").read_text()
    assert size == len(text.encode())
    lines = text.splitlines()
    assert json.loads(lines[1]) == [0, "3101ff00", 13, 503.4, "7101ff0000", {"pend": [3.4]}]
    assert json.loads(lines[2]) == [504.4, "3601", 4095, 40.5, "7601"]
    trace = read_trace(tmp_path / "t.jsonl")
    assert trace.header.request_id == 0x7E1 and trace.header.server == "bms"
    last = trace.exchanges[-1]
    assert last.response is None and last.extra["late"] == [[2000, "7602"]] and last.extra["stray"] == [[2000, 0x6F0, "7602"]]
    assert trace.trailer == {"end": True, "exchanges": 3, "result": "failed"}


def test_not_sent_request_is_marked():
    clock = Clock()
    rec = _recorder(clock)
    rec.request(b"\x10\x03")
    rec.not_sent("BlockingSendFailure: timeout")
    assert not rec.exchanges[0].sent and rec.exchanges[0].extra["err"].startswith("BlockingSendFailure")


@pytest.mark.parametrize("text, words", [
    ("", "empty trace"),
    ("garbage\n", "not a JSON trace header"),
    ('{"format": "other"}\n', "not a vota-trace"),
    ('{"format": "vota-trace", "version": 99}\n', "version 99 is not supported"),
    ('{"format": "vota-trace", "version": 1}\n', "bad trace header"),
])
def test_bad_trace_headers(text, words):
    with pytest.raises(TraceFormatError, match=words):
        parse_trace(text, "t.jsonl")


def test_truncated_and_garbage_lines(tmp_path):
    clock = Clock()
    rec = _recorder(clock)
    rec.request(b"\x10\x03")
    rec.response(b"\x50\x03\x00\x32\x01\xf4")
    text = rec.trace().to_text()
    with pytest.raises(TraceFormatError, match="line 2 is not JSON"):
        parse_trace(text[:-8], "t.jsonl")
    with pytest.raises(TraceFormatError, match="line 3: an exchange must be an array"):
        parse_trace(text + '{"what": 1}\n', "t.jsonl")
    with pytest.raises(TraceFormatError, match="line 3"):
        parse_trace(text + '[1, "zz", 2, null, null]\n', "t.jsonl")
    # found by benchmarks/fuzz.py: JSON's 1e999 is infinity, and deep nesting exhausts the parser
    head = text.splitlines()[0]
    with pytest.raises(TraceFormatError, match="bad trace header .*not a finite number"):
        parse_trace(head.replace('"started":', '"started":1e999,"x":') + "\n", "t.jsonl")
    with pytest.raises(TraceFormatError, match="bad trace header .*not a whole number"):
        parse_trace(head.replace('"response_id":', '"response_id":1e999,"x":') + "\n", "t.jsonl")
    with pytest.raises(TraceFormatError, match="line 3: 1e999 is not a whole number|line 3: inf"):
        parse_trace(text + '[1, "10", 1e999, null, null]\n', "t.jsonl")
    with pytest.raises(TraceFormatError, match="line 3: .*not a finite number"):
        parse_trace(text + '[1e999, "10", 2, null, null]\n', "t.jsonl")
    with pytest.raises(TraceFormatError, match="line 3 is not JSON"):
        parse_trace(text + "[" * 50000 + "]" * 50000 + "\n", "t.jsonl")
    (tmp_path / "bin").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(TraceFormatError, match="cannot read trace"):
        read_trace(tmp_path / "bin")
