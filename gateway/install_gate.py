"""An install's preconditions as the gateway checks them itself (``InstallPlan.gate``, from the
manifest the TBOX sends; ``gateway/install.py`` says when): read from the ECU that reports the
vehicle's state whenever that ECU is free, watched while the ECUs stage, waited for before the
first step that changes what the vehicle runs. A campaign the TBOX cancelled fails every gate
(``held`` says why), so the install goes back the way it does for unmet preconditions."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any, Iterator

from gateway.install_run import InstallInterrupted, InstallRun

__all__ = ["check", "unmet", "watching", "wait_for_gate", "gate", "held"]

log = logging.getLogger(__name__)


def check(run: InstallRun, phase: str, wait: float = 0.5) -> dict[str, Any] | None:
    """The preconditions now: a check (``met``, ``unmet``, ``values``, ``phase``, ``at``), or None
    when there are none or the ECU that reports them is busy."""
    conditions, signals = run.plan.gate, run.ports.signals
    if conditions is None or signals is None:
        return None
    values = signals(conditions.conditions.ecu or "", wait)
    if values is None:
        return None
    bad = conditions.unmet(values)
    return {"phase": phase, "met": not bad, "unmet": bad, "values": values, "at": round(time.time(), 3)}


def unmet(run: InstallRun, phase: str, wait: float = 0.5) -> dict[str, Any] | None:
    """The check, when the preconditions are known not to hold now."""
    found = check(run, phase, wait)
    return found if found is not None and not found["met"] else None


@contextlib.contextmanager
def watching(run: InstallRun) -> Iterator[threading.Event]:
    """The event that cancels a staging flash: the gateway stopping, the TBOX cancelling the
    campaign, and under a gate the preconditions failing (checked every ``recheck_s``; the check
    is journaled)."""
    cancel, done = threading.Event(), threading.Event()
    every = run.plan.gate.conditions.recheck_s if run.plan.gate is not None else None

    def watch() -> None:
        due = time.monotonic() + (every or 0.0)
        while not done.wait(0.1):
            if run.stop.is_set() or run.cancelled is not None:
                cancel.set()
                return
            if every is None or time.monotonic() < due:
                continue
            found = unmet(run, "stage")
            due = time.monotonic() + every
            if found is not None:
                log.warning("preconditions no longer hold while staging: %s; staging stops", "; ".join(found["unmet"].values()))
                run.journal.hold(found)
                cancel.set()
                return

    watcher = threading.Thread(target=watch, name="preconditions", daemon=True)
    watcher.start()
    try:
        yield cancel
    finally:
        done.set()
        watcher.join()


def wait_for_gate(run: InstallRun, phase: str) -> bool:
    """Before the first activation (or the first ECU flashed in place): True once the
    preconditions hold; False when the install window ended first (the check journaled)."""
    conditions, waiting = run.plan.gate, run.ports.waiting
    if conditions is None or run.ports.signals is None:
        return True
    told: dict[str, str] | None = None
    while True:
        if run.cancelled is not None:
            return False
        found = check(run, phase, wait=5.0)
        if found is not None and found["met"]:
            if told is not None and waiting is not None:
                waiting(None)
                log.info("preconditions hold: the install goes on")
            return True
        if found is not None:
            if time.time() >= conditions.until:
                run.journal.hold(found)
                return False
            if found["unmet"] != told:
                told = found["unmet"]
                log.info("the install waits for its preconditions: %s", "; ".join(told.values()))
            if waiting is not None:  # at every check: the waiting install is alive
                waiting(found)
        if run.stop.wait(conditions.conditions.recheck_s):
            raise InstallInterrupted(f"install {run.plan.campaign_id} stopped waiting for its preconditions")


def gate(run: InstallRun, first: bool, phase: str) -> bool:
    """Before a step that changes what a vehicle runs: the first waits for the preconditions (within
    the install window), a later one goes on only if they hold now. False: the check is journaled,
    or the TBOX cancelled the campaign."""
    if run.cancelled is not None:
        return False
    if run.plan.gate is None:
        return True
    if first:
        return wait_for_gate(run, phase)
    found = unmet(run, phase, wait=5.0)
    if found is None:
        return True
    log.warning("preconditions no longer hold before %s: %s", phase, "; ".join(found["unmet"].values()))
    run.journal.hold(found)
    return False


def held(run: InstallRun) -> str:
    """Why the install was held (or goes back on a cancel), in one line."""
    if run.cancelled is not None:
        return run.cancelled
    found = run.journal.held or {}
    return "preconditions: " + "; ".join((found.get("unmet") or {}).values())
