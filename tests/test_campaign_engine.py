"""The campaign state engine on its own (tbox/engine.py), with trivial handlers: every state is
persisted before its handler runs, transient errors are retried with back-off up to the budget,
a failure ends the campaign with its stage and reason, a crash is an internal error, the loop
guard counts entries across restarts (waits excepted), and a stop checkpoints."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Callable

from agent.core.config import TboxConfig
from agent.errors import TryLater
from tbox.campaign_state import CampaignRecord
from tbox.engine import CampaignEngine, CampaignFailure


class Cloud:
    def __init__(self) -> None:
        self.reports: list[dict[str, Any]] = []

    def report(self, kind: str, body: dict[str, Any], msg_id: str | None = None) -> str:
        self.reports.append(body)
        return msg_id or ""

    def report_trace(self, trace_id: str, trace: bytes, meta: dict[str, Any]) -> list[str]:
        return []

    def states(self) -> list[str]:
        return [b["state"] for b in self.reports if b.get("event") == "state"]


def _engine(tmp: Path, handlers: dict[str, Callable[[CampaignRecord], str | None]], **kw: Any) -> tuple[CampaignEngine, Cloud]:
    cloud = Cloud()
    tbox = TboxConfig("VIN1", state_dir=str(tmp), retry_delay_s=0.001, retry_max_delay_s=0.002, max_retries=2, max_attempts=2)
    chain = {"received": "verified", "verified": "downloading", "downloading": "downloaded", "downloaded": "deploying",
             "deploying": "deployed", "deployed": "awaiting_install", "awaiting_install": "installing", "installing": "done"}
    table: dict[str, Callable[[CampaignRecord], str | None]] = {s: (lambda r, n=n: n) for s, n in chain.items()}
    table.update(done=lambda r: "reported", failed=lambda r: "reported")
    table.update(handlers)
    return CampaignEngine(tbox, cloud, table, **kw), cloud


def _record(tmp: Path) -> CampaignRecord:
    record = CampaignRecord("k1", tmp / "campaigns" / "k1", campaign_id="c-1")
    record.save()
    return record


def _on_disk(record: CampaignRecord) -> str:
    return str(json.loads(record.path.read_text())["state"])


def test_each_state_is_persisted_before_its_handler_runs(tmp_path: Path) -> None:
    seen: list[tuple[str, str]] = []

    def deploying(record: CampaignRecord) -> str:
        seen.append((record.state, _on_disk(record)))
        return "deployed"

    engine, cloud = _engine(tmp_path, {"deploying": deploying})
    _record(tmp_path)
    assert engine.step() is True
    assert seen == [("deploying", "deploying")]
    assert cloud.states() == ["received", "verified", "downloading", "downloaded", "deploying", "deployed",
                              "awaiting_install", "installing", "done"]
    (record,) = engine.records()
    assert record.state == "reported" and engine.step() is False and engine.status.line == "no campaign open"


def test_transient_errors_are_retried_then_the_campaign_fails_with_retries_exhausted(tmp_path: Path) -> None:
    calls = []

    def flaky(record: CampaignRecord) -> str:
        calls.append(1)
        if len(calls) <= 2:
            raise TryLater("gateway busy")
        return "downloaded"

    engine, cloud = _engine(tmp_path, {"downloading": flaky})
    _record(tmp_path)
    engine.step()
    assert len(calls) == 3 and engine.records()[0].outcome is None  # two retries, then it went on
    assert [b["retry"] for b in cloud.reports if b.get("event") == "retry"] == [1, 2]
    assert cloud.states().count("downloading") == 1  # retries are not entries

    engine, cloud = _engine(tmp_path / "b", {"downloading": lambda r: (_ for _ in ()).throw(TryLater("down"))})
    _record(tmp_path / "b")
    engine.step()
    (record,) = engine.records()
    assert (record.outcome, record.failure["reason"], record.failure["stage"]) == ("failed", "retries_exhausted", "downloading")
    assert "2 retries" in record.failure["detail"] and record.failure["detail"].endswith(": down")


def test_retries_give_up_once_their_pauses_add_up_to_retry_give_up_s_whatever_the_count(tmp_path: Path) -> None:
    """A gateway that never answers in ``received``: the campaign ends within a bounded time
    (the pauses, not the count), under its id, with the reason."""
    import dataclasses

    calls = []

    def unreachable(record: CampaignRecord) -> str:
        calls.append(1)
        raise TryLater("the gateway does not answer")

    engine, cloud = _engine(tmp_path, {"received": unreachable})
    engine.tbox = dataclasses.replace(engine.tbox, retry_delay_s=0.01, retry_max_delay_s=0.04, max_retries=1000,
                                      retry_give_up_s=0.2)
    _record(tmp_path)
    engine.step()
    (record,) = engine.records()
    assert (record.outcome, record.failure["stage"], record.failure["reason"]) == ("failed", "received", "retries_exhausted")
    assert record.campaign_id == "c-1" and 5 < len(calls) < 20, len(calls)  # 0.01 + 0.02 + 0.04 * n >= 0.2


def test_a_failure_ends_the_campaign_and_a_crash_is_an_internal_error(tmp_path: Path) -> None:
    def refuse(record: CampaignRecord) -> str:
        raise CampaignFailure("deploy", "deploy_failed", "vcu.bin: transfer_data: negative response", packet=3)

    finished: list[dict[str, Any] | None] = []
    engine, cloud = _engine(tmp_path, {"deploying": refuse, "failed": lambda r: finished.append(r.failure) or "reported"})
    _record(tmp_path)
    engine.step()
    assert finished == [{"stage": "deploy", "reason": "deploy_failed", "detail": "vcu.bin: transfer_data: negative response",
                         "packet": 3}]
    assert "deployed" not in cloud.states()

    engine, _ = _engine(tmp_path / "b", {"verified": lambda r: {}["missing"]})
    _record(tmp_path / "b")
    engine.step()
    (record,) = engine.records()
    assert (record.failure["reason"], record.failure["stage"]) == ("internal_error", "verified")
    assert record.failure["detail"] == "KeyError: 'missing'"


class Killed(BaseException):
    pass


def test_the_loop_guard_counts_entries_across_restarts_but_not_waits(tmp_path: Path) -> None:
    def die(record: CampaignRecord) -> str:
        raise Killed

    _record(tmp_path)
    for _ in range(2):  # the TBOX dies in downloading twice: each start enters it again
        engine, _ = _engine(tmp_path, {"downloading": die})
        try:
            engine.step()
        except Killed:
            pass
    engine, cloud = _engine(tmp_path, {})
    engine.step()
    (record,) = engine.records()
    assert (record.failure["reason"], record.failure["detail"]) == ("loop_guard", "state downloading entered 2 times")

    waiting_dir = tmp_path / "w"
    for _ in range(3):  # waiting for the owner, across three restarts: no loop
        engine, cloud = _engine(waiting_dir, {"awaiting_install": lambda r: None},
                                waits=lambda r: r.state == "awaiting_install")
        if not engine.records():
            _record(waiting_dir)
        engine.step()
    (record,) = engine.records()
    assert record.state == "awaiting_install" and record.entries["awaiting_install"] == 1 and record.failure is None


def test_a_stop_while_backing_off_checkpoints_the_state(tmp_path: Path) -> None:
    stop = threading.Event()

    def stopping(record: CampaignRecord) -> str:
        stop.set()  # SIGTERM arrives while the gateway is unreachable
        raise TryLater("unreachable")

    engine, cloud = _engine(tmp_path, {"deploying": stopping}, stop=stop)
    _record(tmp_path)
    assert engine.step() is True  # it moved up to deploying, then stopped there
    (record,) = engine.records()
    assert record.state == "deploying" and record.failure is None and not [b for b in cloud.reports if b.get("event") == "retry"]
