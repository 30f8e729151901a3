"""The sequence engine (agent/adapters/uds_sequence.py) against real UDS servers on a python-can
virtual bus: the ECU simulator and the gateway's deploy server, with faults injected at the
server. One retry policy for every sequence (busyRepeatRequest asked again, responsePending
waited out), tolerated NRCs, late answers recorded, cancellation; and the same behaviour on the
three sequences built on it (deploy, flash, activation) and the TBOX's link calls."""

from __future__ import annotations

import hashlib
import itertools
import os
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from agent.adapters.canbus import Segment
from agent.adapters.file_client import PackageDeployer
from agent.adapters.trace_files import read_trace
from agent.adapters.uds_sequence import Peer, StepResult, StepSpec, UdsSequence
from agent.core.config import VehicleConfig, parse_vehicle_config
from agent.core.faults import parse_fault
from agent.core.trace import Exchange, TraceHeader
from gateway.activation import EcuAction
from gateway.daemon import GatewayDaemon
from gateway.flash import EcuFlasher
from gateway.jobs import FlashJob
from tbox.gateway_client import GatewayClient, GatewayError
from tests.conftest import ecu_entry, virtual_bus
from tests.helpers import start_sim

IMAGE = os.urandom(3000)  # 6 blocks of 512


def _vehicle(tmp_path: Path, **timing: int) -> dict[str, Any]:
    bms = ecu_entry("bms", 0x7E1, 0x7E9, max_block_length=514, reset_ms=100, erase_ms=20) | {
        "memory": {"address": 0x1000, "size": 0x10000}}
    if timing:
        bms["timing"] = timing
    return {"segments": {"pt": {"bus": virtual_bus()}}, "ecus": {"bms": bms},
            "gateway": {"results_dir": str(tmp_path / "gw"), "reset_wait_ms": 3000}}


class Ecu:
    """The ECU simulator in this process and the gateway's end of its segment."""

    def __init__(self, tmp_path: Path, faults: list[str], **timing: int) -> None:
        self.config, self.sim = start_sim(_vehicle(tmp_path, **timing), ["bms"], str(tmp_path / "ecu"),
                                          [parse_fault(f) for f in faults])
        self.ecu = self.config.ecu("bms")
        self.segment = Segment(self.config.segments["pt"])

    def close(self) -> None:
        self.segment.shutdown()
        self.sim.stop()


@pytest.fixture
def ecus(tmp_path: Path) -> Iterator[Any]:
    made: list[Ecu] = []

    def make(*faults: str, **timing: int) -> Ecu:
        made.append(Ecu(tmp_path, list(faults), **timing))
        return made[-1]

    yield make
    for e in made:
        e.close()


class Steps(UdsSequence[StepResult]):
    """The smallest sequence: the steps it is given, as data (``StepSpec``)."""

    def __init__(self, ecu: Ecu, specs: list[StepSpec], peer: Peer | None = None, **kw: Any) -> None:
        e = ecu.ecu
        header = TraceHeader(stage="flash", client="GW", server=e.name, packet=e.name, request_id=e.request_id,
                             response_id=e.response_id, functional_id=e.functional_id, started=time.time())
        super().__init__(ecu.segment, peer or Peer.ecu(e), header, **kw)
        self.specs, self.answers = specs, []  # type: ignore[var-annotated]

    def new_result(self) -> StepResult:
        return StepResult()

    def sequence(self, result: StepResult) -> None:
        for spec in self.specs:
            self.answers.append(self.request(spec))


READ_VERSION = bytes.fromhex("22f189")


def _rows(exchanges: list[Exchange]) -> list[tuple[str, str | None, dict[str, Any]]]:
    return [(e.header.hex(), None if e.response is None else e.response.hex(), e.extra) for e in exchanges]


def test_busy_is_asked_again_and_pending_waited_out_each_ending_on_the_final_answer(ecus: Any) -> None:
    ecu = ecus("bms:22#1:nrc=0x21", "bms:22#3:pending=300")
    run = Steps(ecu, [StepSpec("read", READ_VERSION), StepSpec("read_again", READ_VERSION)])
    result = run.run()
    assert result.result == "success", result
    assert run.answers == [bytes.fromhex("62f189") + b"1.0.0"] * 2
    rows = _rows(run.recorder.exchanges)
    assert [(h, r) for h, r, _ in rows] == [("22f189", "7f2221"), ("22f189", "62f189312e302e30"), ("22f189", "62f189312e302e30")]
    assert rows[0][2] == {"retried": True}  # asked again: not judged
    assert "retried" not in rows[1][2] and len(rows[2][2]["pend"]) >= 1  # waited out, then the answer


def test_busy_until_the_retries_are_spent_fails_the_step_with_its_nrc(ecus: Any) -> None:
    ecu = ecus("bms:22#1+:nrc=0x21")
    result = Steps(ecu, [StepSpec("read", READ_VERSION)], retries=2).run()
    assert (result.result, result.failed_step, result.nrc) == ("failed", "read", 0x21)


def test_a_tolerated_nrc_ends_the_step_and_the_sequence_goes_on(ecus: Any) -> None:
    ecu = ecus()
    run = Steps(ecu, [StepSpec("dtc_setting_off", bytes.fromhex("8502"), tolerate=frozenset({0x7F})),
                      StepSpec("read", READ_VERSION)])
    result = run.run()
    assert result.result == "success" and run.answers[0] is None and run.answers[1] is not None
    assert _rows(run.recorder.exchanges)[0] == ("8502", "7f857f", {"tolerated": True})
    untolerated = Steps(ecu, [StepSpec("dtc_setting_off", bytes.fromhex("8502"))]).run()
    assert (untolerated.failed_step, untolerated.nrc) == ("dtc_setting_off", 0x7F)


def test_an_answer_after_the_client_gave_up_is_recorded_as_late_and_a_stop_ends_at_the_next_step(ecus: Any) -> None:
    ecu = ecus("bms:22#1:delay=500")
    run = Steps(ecu, [StepSpec("read", READ_VERSION)], peer=Peer("bms", 0x7E1, 0x7E9, p2_s=0.15), late_grace_s=1.0)
    result = run.run()
    assert (result.result, result.failed_step, result.reason) == ("failed", "read", "no response (timeout)")
    (only,) = run.recorder.exchanges
    assert only.response is None and only.extra["late"][0][1] == "62f189312e302e30"
    assert only.extra["err"] == "no response (timeout)"
    stop = threading.Event()
    stop.set()
    cancelled = Steps(ecu, [StepSpec("read", READ_VERSION)], stop=stop)
    assert (cancelled.run().failed_step, cancelled.run().reason) == ("read", "cancelled")
    assert cancelled.recorder.exchanges == []  # nothing was sent


# ---- the same policy on every sequence built on the engine ------------------------------

def _retried_then_answered(exchanges: list[Exchange], sid: int) -> bool:
    """An exchange of ``sid`` answered busyRepeatRequest, marked retried, asked again at once and answered."""
    for first, again in itertools.pairwise(exchanges):
        if (first.header[:1] == bytes((sid,)) and first.response == bytes((0x7F, sid, 0x21))
                and first.extra.get("retried") and again.header == first.header and again.response is not None
                and again.response[:1] == bytes((sid + 0x40,))):
            return True
    return False


def _pending_then_answered(exchanges: list[Exchange], sid: int) -> bool:
    return any(e.header[:1] == bytes((sid,)) and e.extra.get("pend") and e.response is not None
               and e.response[:1] == bytes((sid + 0x40,)) for e in exchanges)


def test_busy_and_pending_are_handled_alike_when_flashing(ecus: Any) -> None:
    ecu = ecus("bms:36#2:nrc=0x21", "bms:36#4:pending=300", "bms:31#2:nrc=0x21")
    flasher = EcuFlasher(ecu.segment, ecu.ecu, ecu.config.gateway, FlashJob("bms", IMAGE, "2.0.0"))
    result = flasher.run()
    assert result.result == "success" and result.version_after == "2.0.0", result
    exchanges = flasher.recorder.exchanges
    assert _retried_then_answered(exchanges, 0x36) and _retried_then_answered(exchanges, 0x31)
    assert _pending_then_answered(exchanges, 0x36)


def test_busy_and_pending_are_handled_alike_when_activating(ecus: Any, tmp_path: Path) -> None:
    # staging: routines #1-#3 and reads #1-#3; the activation's routine is the 4th, its reads the 4th and 5th
    ecu = ecus("bms:31#4:nrc=0x21", "bms:22#4:pending=300")
    job = FlashJob("bms", IMAGE, "2.0.0", stage_only=True)
    assert EcuFlasher(ecu.segment, ecu.ecu, ecu.config.gateway, job).run().result == "success"
    action = EcuAction(ecu.segment, ecu.ecu, ecu.config.gateway, "activate", expect=("2.0.0", job.sha256))
    result = action.run(tmp_path)
    assert result.result == "success" and result.version_after == "2.0.0", result
    trace = read_trace(tmp_path / "bms.activate.trace.jsonl")
    assert _retried_then_answered(trace.exchanges, 0x31) and _pending_then_answered(trace.exchanges, 0x22)
    assert {e.extra["step"] for e in trace.exchanges} == {"extended_session", "security_access", "activate",
                                                          "ecu_reset", "verify"}


class Backbone:
    """The gateway's deploy server in this process and the TBOX's end of the backbone."""

    def __init__(self, tmp_path: Path, faults: list[str], **timing: int) -> None:
        data = {"segments": {"bb": {"bus": virtual_bus()}},
                "deploy": {"segment": "bb", "max_block_length": 262, "package_dir": str(tmp_path / "pk"),
                           **({"timing": timing} if timing else {})},
                "gateway": {"results_dir": str(tmp_path / "gw")}}
        self.config: VehicleConfig = parse_vehicle_config(data, "test")
        self.daemon = GatewayDaemon(self.config, [parse_fault(f) for f in faults])
        self.daemon.start()
        self.link = self.config.deploy_link()
        self.segment = Segment(self.config.segments["bb"])

    def close(self) -> None:
        self.segment.shutdown()
        self.daemon.stop()


@pytest.fixture
def backbone(tmp_path: Path) -> Iterator[Any]:
    made: list[Backbone] = []

    def make(*faults: str, **timing: int) -> Backbone:
        made.append(Backbone(tmp_path, list(faults), **timing))
        return made[-1]

    yield make
    for b in made:
        b.close()


def test_busy_and_pending_are_handled_alike_when_deploying(backbone: Any, tmp_path: Path) -> None:
    bb = backbone("deploy:GW:36#2:nrc=0x21", "deploy:GW:36#4:pending=300")
    package = tmp_path / "vcu.bin"
    package.write_bytes(IMAGE)
    deployer = PackageDeployer(bb.segment, bb.link, "vcu.bin", package, hashlib.sha256(IMAGE).hexdigest())
    result = deployer.run()
    assert result.result == "success", result
    assert (tmp_path / "pk" / "vcu.bin").read_bytes() == IMAGE
    exchanges = deployer.recorder.exchanges
    assert _retried_then_answered(exchanges, 0x36) and _pending_then_answered(exchanges, 0x36)


def test_the_tbox_link_calls_retry_busy_and_record_late_answers(backbone: Any, tmp_path: Path) -> None:
    bb = backbone("deploy:GW:22#1:nrc=0x21", "deploy:GW:22#3:delay=600", p2_ms=150)
    client = GatewayClient(bb.segment, bb.link)
    with client.traced(tmp_path / "link", "probe"):
        assert len(client.boot_id()) > 0  # busy first, asked again
        with pytest.raises(GatewayError, match="boot id: no response"):
            client.boot_id()
    trace = read_trace(tmp_path / "link" / "probe.link.trace.jsonl")
    reads = [e for e in trace.exchanges if e.header[:1] == b"\x22"]
    assert reads[0].response == bytes.fromhex("7f2221") and reads[0].extra["retried"]
    assert reads[-1].response is None and reads[-1].extra["late"][0][1].startswith("62")
    assert {e.extra["step"] for e in trace.exchanges} == {"boot id"}


def test_a_late_answer_is_recorded_in_the_activation_trace(ecus: Any, tmp_path: Path) -> None:
    ecu = ecus("bms:10#1:delay=500", p2_ms=150)
    result = EcuAction(ecu.segment, ecu.ecu, ecu.config.gateway, "commit").run(tmp_path)
    assert (result.result, result.failed_step, result.reason) == ("failed", "extended_session", "no response (timeout)")
    first = read_trace(tmp_path / "bms.commit.trace.jsonl").exchanges[0]
    assert first.header == b"\x10\x03" and first.response is None and first.extra["late"][0][1].startswith("5003")


def test_a_profile_step_answered_for_another_request_fails_it(ecus: Any) -> None:
    """A routine or DID step as data: a positive answer that echoes another routine (or DID) is
    not this step's answer."""
    ecu = ecus("bms:31#1:mismatch")
    result = EcuFlasher(ecu.segment, ecu.ecu, ecu.config.gateway, FlashJob("bms", IMAGE, "2.0.0")).run()
    assert (result.result, result.failed_step, result.nrc) == ("failed", "erase", None)
    assert result.reason is not None and result.reason.startswith("response does not match the request")
