"""Standard CAN captures beside the traces: `vota flash --capture` writes every frame of the
flash as the gateway sent and received it, in BLF, ASC and candump's log format, which
python-can's own readers open; the gateway's frames are exactly the ISO-TP frames of the
requests its header-only trace lists (TesterPresent aside), at the trace's times."""

from __future__ import annotations

import os
from pathlib import Path

import can
import pytest

from agent.adapters.trace_files import read_trace
from tests.conftest import Proc, ecu_entry, multicast_bus, vota

pytestmark = pytest.mark.slow  # separate processes


def _frames(length: int) -> int:
    """ISO-TP frames of a payload on classic CAN: a single frame, or a first frame and its
    consecutive frames."""
    return 1 if length <= 7 else 1 + -(-(length - 6) // 7)


@pytest.mark.parametrize("fmt", ["blf", "asc", "log"])
def test_a_flash_capture_holds_every_frame_of_the_trace(tmp_path: Path, write_config, procs, fmt: str) -> None:  # type: ignore[no-untyped-def]
    config = write_config({"segments": {"pt": {"bus": multicast_bus()}}, "gateway": {"results_dir": str(tmp_path / "gw")},
                           "ecus": {"vcu": ecu_entry("vcu", 0x7E0, 0x7E8, "pt", max_block_length=1026)}})
    procs.append(Proc("ecu-sim", "-c", str(config), "--state-dir", str(tmp_path / "state"), log=tmp_path / "sim.log"))
    procs[-1].wait_ready("ecu-sim ready")
    (tmp_path / "new.bin").write_bytes(os.urandom(12 * 1024))
    out, capture = tmp_path / "flash", tmp_path / "capture"
    run = vota("flash", "-c", str(config), "--out", str(out), "--no-progress", "--capture", str(capture),
               "--capture-format", fmt, f"vcu={tmp_path / 'new.bin'}@2.0.0", timeout=120)
    assert run.returncode == 0, run.stderr
    (path,) = capture.iterdir()
    assert path.name == f"flash-pt.{fmt}"
    frames = list(can.LogReader(str(path), **({"relative_timestamp": False} if fmt == "asc" else {})))
    own = [(f.arbitration_id, bytes(f.data)) for f in frames if not f.is_rx]
    echoed = [(f.arbitration_id, bytes(f.data)) for f in frames if f.is_rx and f.arbitration_id == 0x7E0]
    assert own and not echoed, echoed[:3]  # udp_multicast hands the gateway its frames back: recorded once
    trace = read_trace(out / "vcu.trace.jsonl")
    head = trace.header
    sent = [f for f in frames if not f.is_rx and f.arbitration_id in (head.request_id, head.functional_id)]
    # TesterPresent (the session kept alive, the ECU polled back after its reset) is not traced
    data = [f for f in sent if f.data[0] >> 4 in (0, 1, 2) and not (f.data[0] >> 4 == 0 and f.data[1] == 0x3E)]
    assert len(data) == sum(_frames(e.length) for e in trace.exchanges), (len(data), len(trace.exchanges))
    answers = [f for f in frames if f.is_rx and f.arbitration_id == head.response_id]
    assert len(answers) >= len(trace.exchanges)  # a response each, and the pending ones
    # each request's first frame is where the trace says it was sent, on the same clock
    starts = [f for f in data if f.data[0] >> 4 in (0, 1)]
    assert len(starts) == len(trace.exchanges)
    for frame, exchange in zip(starts, trace.exchanges, strict=True):
        first = bytes(frame.data[1:]) if frame.data[0] >> 4 == 0 else bytes(frame.data[2:])
        assert first.startswith(exchange.header[:len(first)][:3]), (frame, exchange.header.hex())
        assert abs(frame.timestamp - (head.started + exchange.t / 1000.0)) < 1.0, (frame.timestamp, head.started, exchange.t)
