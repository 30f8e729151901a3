"""The TBOX's campaign state engine: it runs each open campaign from state to state, one handler
per state (``tbox/states.py``), each returning the next state::

    received ──> verified ──> downloading ──> downloaded ──> deploying ──> deployed
       │                          ▲                             │             │
       │ (duplicate)              │ the full image after        │             v
       │                          │ a refused delta       awaiting_install <─────────┐
       │                          │                             │ owner confirmed,   │ staging stopped
       │                          │                             v preconditions met  │ (preconditions)
       │                          └─────────────────────── installing ───────────────┘
       │                                                        │
       v           any state: CampaignFailure ──> failed        v
    reported <──────────────────────────────────────── done | failed  (results, diagnosis, `finished`)

(pipelined: ``deploying`` starts the install before the packages go, and ``installing`` follows
it.) The state is persisted (``tbox/campaign_state.py``) before its handler runs, so an engine
built anew on the same state directory (after a kill, a reboot) resumes where the last one
stopped. What a handler's error means is told by its class (``agent/errors.py``):

- ``TryLater`` (network down, gateway busy or unreachable) or OSError: the same handler runs
  again after a back-off (``retry_delay_s`` doubling up to ``retry_max_delay_s``), at most
  ``max_retries`` times in a row, and no more once the pauses add up to ``retry_give_up_s``
  (about five minutes: the attempts themselves, a long install followed, do not count); then
  the campaign fails with ``retries_exhausted`` (with
  ``locked_out`` when the gateway's last answer was its SecurityAccess lock-out). These
  retries are not entries: the state is entered once.
- the TBOX's own storage full, read-only or failing (``storage_fault``): waited out, no retry
  counted; after ``storage_grace_s`` without progress the campaign fails with ``storage`` (the
  state named), which cancels what the gateway staged once the failure can be written down.
- ``CampaignFailure`` (a ``Refused``): the campaign ends ``failed`` with that stage and reason.
- the loop guard counts entries into a state across restarts only: a state entered more than
  ``max_attempts`` times (the TBOX killed or crashing there again and again) fails the campaign
  with ``loop_guard``. Waiting is no loop (``waits``: for the owner, or for an install the
  gateway runs on its own).
- anything else is a programming error: it is logged with its traceback and the campaign fails
  with ``internal_error``; it is never retried.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping

from agent.adapters.storage import storage_fault
from agent.core.config import TboxConfig
from agent.errors import Refused, TryLater
from tbox.campaign_state import TERMINAL, CampaignRecord
from tbox.ports import CloudPort

__all__ = ["CampaignEngine", "CampaignFailure", "Handler", "Status"]

log = logging.getLogger(__name__)

# the gateway's SecurityAccess answers while it is locked out (exceededNumberOfAttempts,
# requiredTimeDelayNotExpired): a campaign that runs out of retries on them ends ``locked_out``
LOCKED_OUT = (0x36, 0x37)

Handler = Callable[[CampaignRecord], "str | None"]  # the next state; None: waiting, stopping (checkpointed)


class CampaignFailure(Refused):
    """A handler's way to end the campaign: reported with its stage, reason and evidence."""

    def __init__(self, stage: str, reason: str, detail: str, **extra: Any) -> None:
        super().__init__(reason, detail, **extra)
        self.failure = {"stage": stage, "reason": reason, "detail": detail, **extra}


class Status:
    """One line on what the campaign worker does now, for systemd's STATUS=."""

    def __init__(self) -> None:
        self.line = "no campaign open"


class CampaignEngine:
    """``handlers``: state -> handler (every state of ``STATES`` but the terminal one); ``waits(record)``:
    whether the record's state is a wait (entering it again is no loop); ``traced(record)``: the
    context its handler runs in (the link trace of its gateway exchanges)."""

    def __init__(self, tbox: TboxConfig, cloud: CloudPort, handlers: Mapping[str, Handler], *,
                 waits: Callable[[CampaignRecord], bool] = lambda record: False,
                 traced: Callable[[CampaignRecord], ContextManager[None]] = lambda record: contextlib.nullcontext(),
                 stop: threading.Event | None = None, beat: Callable[[], None] | None = None,
                 entered: Callable[[CampaignRecord], None] | None = None, status: Status | None = None) -> None:
        self.tbox, self.cloud, self.handlers, self.waits, self.traced = tbox, cloud, handlers, waits, traced
        self.stop = stop or threading.Event()
        self.beat = beat or (lambda: None)
        self.entered = entered or (lambda record: None)  # called once a state is persisted (tests kill here)
        self.status = status or Status()
        self.campaigns_dir = Path(tbox.state_dir) / "campaigns"
        self._seen: set[tuple[str, str]] = set()  # (campaign, state) this engine has entered or resumed
        self._storage_since: dict[str, float] = {}  # campaign -> since when its storage has been failing
        self._ended: dict[str, CampaignFailure] = {}  # campaigns ended for the storage, their failure not written yet

    def records(self) -> list[CampaignRecord]:
        if not self.campaigns_dir.exists():
            return []
        records = [CampaignRecord.load(d) for d in sorted(self.campaigns_dir.iterdir()) if (d / "state.json").exists()]
        return sorted(records, key=lambda r: r.path.stat().st_mtime)

    def step(self) -> bool:
        """Advance every open campaign as far as it goes now; True when any of them moved."""
        progressed = False
        open_records = [r for r in self.records() if r.state not in TERMINAL]
        if not open_records:
            self.status.line = "no campaign open"
        for record in open_records:
            if self.stop.is_set():
                break
            progressed |= self.advance(record)
        return progressed

    def advance(self, record: CampaignRecord) -> bool:
        """Run the campaign until it ends or waits; False when it waits without having moved."""
        moved = False
        self._end(record)
        while record.state not in TERMINAL and not self.stop.is_set():
            self.beat()
            state = record.state
            self.status.line = f"campaign {record.campaign_id or record.key}: {state}"
            if (record.key, state) not in self._seen and not self._enter(record, state):
                continue  # failed by the loop guard
            nxt = self._run(record, self.handlers[state])
            if nxt is None:  # waiting (a confirm command), stopping, or backing off
                return moved
            record.state = nxt
            if nxt in TERMINAL:
                record.enter(nxt)
            else:  # persisted now: a state entered before (back to waiting) is not entered again below
                record.save()
            moved = True
        return moved

    def _enter(self, record: CampaignRecord, state: str) -> bool:
        """A new state, or one resumed after a restart: counted (unless it is a wait already entered),
        told to the cloud, persisted. False when the loop guard failed the campaign instead."""
        waiting = self.waits(record)
        entries = record.entries.get(state, 0)
        if entries >= self.tbox.max_attempts and state not in ("done", "failed") and not waiting:
            self.fail(record, CampaignFailure(state, "loop_guard", f"state {state} entered {entries} times"))
            return False
        if not waiting or entries == 0:
            record.enter(state)
            self._event(record, state)
        self._seen.add((record.key, state))
        self.entered(record)
        return True

    def _run(self, record: CampaignRecord, handler: Handler) -> str | None:
        """The handler's next state; transient problems are retried here with back-off."""
        state = record.state
        retries, paused = 0, 0.0
        while True:
            try:
                with self.traced(record):
                    nxt = handler(record)
                self._storage_since.pop(record.key, None)
                return nxt
            except CampaignFailure as failure:
                self.fail(record, failure)
                return record.state
            except (TryLater, OSError) as exc:  # OSError: the TBOX's own storage, worth another try too
                if self.stop.is_set():
                    return None  # checkpointed: the state is entered again after the restart
                fault = storage_fault(exc)
                if fault is not None:
                    if self._storage_fault(record, state, fault):
                        return record.state
                    if self.stop.is_set():
                        return None
                    continue
                retries += 1
                if retries > self.tbox.max_retries or paused >= self.tbox.retry_give_up_s:
                    reason = "locked_out" if getattr(exc, "nrc", None) in LOCKED_OUT else "retries_exhausted"
                    self.fail(record, CampaignFailure(state, reason, f"{retries - 1} retries, {paused:.0f} s of pauses: "
                                                                     f"{exc}"))
                    return record.state
                delay = min(self.tbox.retry_max_delay_s, self.tbox.retry_delay_s * 2 ** (retries - 1))
                paused += delay
                log.warning("%s %s: %s; retry %d of %d in %.1f s", record.campaign_id or record.key, state, exc, retries,
                            self.tbox.max_retries, delay)
                self._report_retry(record, state, retries, str(exc))
                self.stop.wait(delay)
                self.beat()
            except Exception as exc:  # noqa: BLE001 - a programming error: surfaced, never retried
                log.exception("%s %s: internal error", record.campaign_id or record.key, state)
                self.fail(record, CampaignFailure(state, "internal_error", f"{type(exc).__name__}: {exc}"))
                return record.state

    def _storage_fault(self, record: CampaignRecord, state: str, fault: str) -> bool:
        """The TBOX's storage cannot take a write: waited out (these are no retries); True when
        the campaign was failed with reason ``storage`` instead, after ``storage_grace_s`` without
        progress. A campaign that is ending already only waits: its failure stays what it was."""
        since = self._storage_since.setdefault(record.key, time.monotonic())
        waited = time.monotonic() - since
        if waited > self.tbox.storage_grace_s and state not in ("done", "failed"):
            log.error("%s %s: the TBOX's storage failed for %.0f s (%s): the campaign ends", record.campaign_id or record.key,
                      state, waited, fault)
            self._storage_since.pop(record.key, None)
            self._ended[record.key] = CampaignFailure(state, "storage", f"the TBOX's storage: {fault}")
            self._end(record)  # raises while the storage still fails: ended at the next step (advance)
            return True
        if waited == 0.0 or int(waited) % 30 == 0:
            log.warning("%s %s: the TBOX's storage cannot take a write (%s); waiting", record.campaign_id or record.key,
                        state, fault)
        self.stop.wait(min(2.0, self.tbox.retry_max_delay_s))
        self.beat()
        return False

    def _end(self, record: CampaignRecord) -> None:
        """A campaign decided ended (the storage) whose failure was not written yet: written now."""
        failure = self._ended.get(record.key)
        if failure is not None:
            if record.state not in ("done", "failed", *TERMINAL):
                self.fail(record, failure)
            del self._ended[record.key]

    def fail(self, record: CampaignRecord, failure: CampaignFailure) -> None:
        record.failure = failure.failure
        record.outcome = "failed"
        record.state = "failed"
        record.save()

    def _report_retry(self, record: CampaignRecord, state: str, retry: int, reason: str) -> None:
        cid = record.campaign_id or record.key
        self.cloud.report("events", {"event": "retry", "campaign_id": record.campaign_id, "state": state,
                                     "retry": retry, "of": self.tbox.max_retries, "reason": reason},
                          msg_id=f"{cid}.retry.{state}.{record.entries.get(state, 0)}.{retry}")

    def _event(self, record: CampaignRecord, state: str) -> None:
        cid = record.campaign_id or record.key
        count = record.entries.get(state, 1)
        self.cloud.report("events", {"event": "state", "campaign_id": record.campaign_id, "state": state,
                                     "attempt": count}, msg_id=f"{cid}.state.{state}.{count}")
