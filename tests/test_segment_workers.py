"""Flash worker processes as the gateway supervises them (gateway/segment_worker.py): a worker
that stops answering in the middle of a transfer (frozen with SIGSTOP: alive, but stuck) is
found by its missed pong and killed, one killed with SIGKILL is found gone; either way its job
ends as a failed result at the step it was in, with its trace so far, the segment's next job
gets a new worker, and the other segment is not touched."""

from __future__ import annotations

import multiprocessing
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from agent.adapters.trace_files import read_trace
from gateway.jobs import FlashJob
from gateway.orchestrator import FlashRun, flash_all
from tests.conftest import ecu_entry, multicast_bus
from tests.helpers import start_sim

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("resource_tracker")]


@pytest.fixture(scope="module")
def resource_tracker() -> None:
    """multiprocessing's resource tracker (one helper process for this interpreter's life, started
    with the first worker's events): started before the leak check counts this test's children."""
    from multiprocessing import resource_tracker as tracker

    tracker.ensure_running()


@pytest.mark.parametrize(("sig", "problem"), [(signal.SIGSTOP, "did not answer for 2 s"), (signal.SIGKILL, "ended (exit code -9)")],
                         ids=["stuck", "died"])
def test_a_lost_worker_is_killed_and_its_job_fails_at_its_step(tmp_path: Path, sig: int, problem: str) -> None:
    data: dict[str, Any] = {
        "segments": {"a": {"bus": multicast_bus()}, "b": {"bus": multicast_bus()}},
        "gateway": {"results_dir": str(tmp_path / "gw"), "segment_workers": "process", "worker_pong_s": 2},
        "ecus": {"ea": ecu_entry("ea", 0x7E0, 0x7E8, "a"), "ec": ecu_entry("ec", 0x7E2, 0x7EA, "a"),
                 "eb": ecu_entry("eb", 0x7E1, 0x7E9, "b")},
    }
    config, sim = start_sim(data, ["ea", "ec", "eb"], str(tmp_path / "state"))
    frozen: list[int] = []

    def progress(ecu: str, step: str, done: int, total: int) -> None:
        if ecu == "ea" and step == "transfer_data" and done > 0 and not frozen:
            worker = next(p for p in multiprocessing.active_children() if p.name == "vota-flash-a")
            assert worker.pid is not None
            os.kill(worker.pid, sig)  # SIGSTOP: alive, holding its pipe, answering nothing
            frozen.append(worker.pid)

    image = os.urandom(48 * 1024)
    jobs = [FlashJob("ea", image, "2.0"), FlashJob("ec", image, "2.0"), FlashJob("eb", image, "2.0")]
    try:
        results = {r.ecu: r for r in flash_all(config, jobs, tmp_path / "out", FlashRun(progress=progress))}
    finally:
        sim.stop()
    assert frozen, "the transfer was never seen"
    stuck = results["ea"]
    assert (stuck.result, stuck.failed_step) == ("failed", "transfer_data"), stuck
    assert stuck.reason == f"the flash worker of segment a {problem}: stopped"
    trace = read_trace(tmp_path / "out" / "ea.trace.jsonl")
    assert trace.trailer is not None and trace.trailer["result"] == "failed"
    assert any(e.service == 0x34 for e in trace.exchanges)  # what it did before it froze is kept
    assert trace.exchanges[-1].extra["err"] == stuck.reason
    with pytest.raises(ProcessLookupError):
        os.kill(frozen[0], 0)  # killed, not left stopped
    assert (results["ec"].result, results["ec"].version_after) == ("success", "2.0")  # a new worker
    assert (results["eb"].result, results["eb"].version_after) == ("success", "2.0")  # the other segment
