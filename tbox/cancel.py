"""A failed campaign ends on the gateway too: the install it started there is cancelled.

A campaign can fail on the TBOX while the gateway still runs its install: a pipelined install
waits for a package whose deploy failed, a status poll gave up. Left alone, that install keeps
the ECUs staged, refuses the next campaign (only one install at a time) and comes back after a
gateway restart. So before its end is reported, the TBOX cancels it (routine 0x0304, idempotent:
asked again until the gateway says the install is over) and the ``finished`` event says what the
gateway discarded or rolled back (``cancel``). A gateway that cannot be reached within
``tbox.cancel_timeout_s`` leaves the cancel ``pending`` in the campaign's record: it is delivered
before the next install starts (``deliver_pending``), and the gateway keeps it across restarts.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from agent.errors import TryLater
from agent.protocol.link import InstallStatus
from tbox.campaign_state import CampaignRecord
from tbox.states import Collaborators

__all__ = ["cancel_install", "deliver_pending"]

log = logging.getLogger(__name__)

POLL_S = 0.5
BUSY = 0x21  # busyRepeatRequest: asked again; any other negative response leaves the cancel pending


def needs_cancel(record: CampaignRecord) -> bool:
    """The campaign failed after the gateway was asked to install it, before that install ended."""
    return (record.outcome != "success" and record.install_started and not record.install_ended
            and (record.cancel is None or record.cancel.get("state") == "pending"))


def cancel_install(c: Collaborators, record: CampaignRecord) -> dict[str, Any] | None:
    """Cancel the campaign's install on the gateway, waiting (within ``cancel_timeout_s``) until
    it is over; the outcome, also kept in the record: ``state`` done or pending, the install's
    status, and the ECUs whose staged or activated image was discarded or rolled back."""
    if not needs_cancel(record):
        return record.cancel
    cid = record.campaign_id
    assert cid is not None
    failure = record.failure or {}
    reason = f"{failure.get('stage')}: {failure.get('reason')}" if failure else "the campaign failed"
    deadline = time.monotonic() + c.tbox.cancel_timeout_s
    why = "no answer"
    while True:
        c.beat()
        try:
            status, _, _ = c.gateway.cancel_install(cid, reason)
            if status not in (InstallStatus.RUNNING, InstallStatus.WAITING):
                break
            why = "the install is still winding down"
        except TryLater as exc:
            why = str(exc)
            if getattr(exc, "nrc", None) not in (None, BUSY):  # the gateway answered no: asking again will not help
                deadline = 0.0
        if time.monotonic() > deadline or c.stop.wait(POLL_S):
            log.warning("%s: the cancel of its install on the gateway is pending (%s)", cid, why)
            record.cancel = {"state": "pending", "reason": why}
            record.save()
            return record.cancel
    record.cancel = {"state": "done", "status": InstallStatus(status).name.lower(), **_undone(c, cid, status)}
    record.save()
    log.info("%s: its install on the gateway is cancelled (%s)", cid, record.cancel)
    return record.cancel


def _undone(c: Collaborators, cid: str, status: int) -> dict[str, list[str]]:
    """What the gateway undid, by the phases in its summary."""
    if status == InstallStatus.NONE:
        return {}
    try:
        results = json.loads(c.gateway.read_file(f"{cid}/summary.json"))["results"]
        phases = {str(r["ecu"]): r.get("phase") for r in results}
    except (TryLater, ValueError, KeyError, TypeError) as exc:
        log.warning("%s: the summary of the cancelled install is not readable (%s)", cid, exc)
        return {}
    return {"discarded": sorted(e for e, p in phases.items() if p == "discarded"),
            "rolled_back": sorted(e for e, p in phases.items() if p == "rolled_back")}


def deliver_pending(c: Collaborators) -> None:
    """Before an install starts: cancels that could not reach the gateway when their campaign
    failed, delivered now (TryLater while the gateway still cannot be reached)."""
    for record in c.records():
        if record.cancel is not None and record.cancel.get("state") == "pending":
            done = cancel_install(c, record)
            if done is None or done.get("state") == "pending":
                raise TryLater(f"the cancel of campaign {record.campaign_id} has not reached the gateway yet")
