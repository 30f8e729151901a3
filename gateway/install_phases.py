"""The phases of an install (``gateway/install.py`` describes them): ``per_ecu`` flashes each
install-order group whole; ``atomic`` stages every ECU, activates them in order, rolls back and
discards when one fails, flashes single-bank ECUs last, and commits. Each phase is journaled before
it starts, so a resumed install goes on in the phase the journal names; what each ECU holds is
read back from the ECU, never taken from the journal alone."""

from __future__ import annotations

import dataclasses

from gateway.arrivals import STEP as ARRIVAL
from gateway.install_gate import gate, held, watching
from gateway.install_run import InstallRun
from gateway.jobs import FlashResult

__all__ = ["per_ecu", "atomic"]


def per_ecu(run: InstallRun) -> bool:
    for n, group in enumerate(run.plan.groups()):
        if run.cancelled is not None:  # an ECU flashed in place is finished, never left half-written
            run.not_started(group, run.cancelled)
            continue
        if any(r.result != "success" for r in run.results.values()) or run.journal.held is not None:
            run.not_started(group, "an earlier install group failed" if run.journal.held is None else held(run))
            continue
        todo = [job for job in group if job.ecu not in run.results]  # not finished before an interruption
        if todo and not gate(run, first=n == 0 or len(run.results) == 0, phase="flash"):
            run.not_started(group, held(run))
            continue
        run.flash_whole(todo)
    return all(r.result == "success" for r in run.results.values()) and run.journal.held is None and run.cancelled is None


def atomic(run: InstallRun) -> bool:
    if run.journal.phase == "stage":
        _stage(run)
    if run.journal.phase == "activate" and run.cancelled is not None:  # before anything, or between activations
        run.journal.set_phase("rollback" if not _nothing_activated(run) else "discard", run.cancelled)
    if run.journal.phase == "activate" and _nothing_activated(run) and not gate(run, first=True, phase="activate"):
        run.journal.set_phase("discard", held(run))
    if run.journal.phase == "activate":
        _activate(run)
    if run.journal.phase == "flash_last":
        _flash_last(run)
    if run.journal.phase == "rollback":
        _roll_back(run)
    if run.journal.phase == "discard":
        _discard(run)
        return False
    if run.journal.phase == "commit":
        for job in run.plan.in_order():
            if run.results[job.ecu].phase != "committed" and not run.single(job.ecu):
                run.act(job.ecu, "commit", None)
        return all(r.phase == "committed" for r in run.results.values())
    return False


def _stage(run: InstallRun) -> None:
    """Every ECU gets its image staged, group after group; then the journal says activate, or
    (an ECU failed to stage) discard."""
    for group in run.plan.groups():
        group = [j for j in group if not run.single(j.ecu)]
        if run.cancelled is not None:
            break
        if any(r.result != "success" for r in run.results.values()):
            run.not_started(group, "an ECU failed to stage")
            continue
        todo = []
        for job in group:
            done = run.results.get(job.ecu)
            if done is not None and done.result != "success":
                continue  # failed before the interruption
            if run.resumed:  # the journal says where it got to; the ECU says what it holds
                images = run.images(job.ecu)
                if images.holds_staged(job.version, job.on_ecu_sha256):
                    if done is None or done.phase != "staged":
                        run.set(FlashResult.of(job, "success",
                                            version_before=images.version, phase="staged",
                                            reason="found staged when the install resumed"))
                    continue
            elif done is not None:
                continue
            todo.append(dataclasses.replace(job, stage_only=True))
        if todo and run.journal.held is None and gate(run, first=False, phase="stage"):  # else journaled: it stops
            with watching(run) as cancel:
                run.flash(todo, "stage", cancel)
        if run.journal.held is not None or run.cancelled is not None:
            _stop_staging(run)
            return
    if run.cancelled is not None:
        _stop_staging(run)
        return
    if all(run.results.get(e) is not None and run.results[e].phase == "staged" for e in run.staging()):
        run.journal.set_phase("activate")
        return
    culprit = next(r for r in run.results.values() if r.result != "success" and r.failed_step != "not_started")
    run.not_started([j for j in run.plan.in_order() if run.single(j.ecu)], "an ECU failed to stage")
    run.journal.set_phase("discard", f"{culprit.ecu} failed to stage at {culprit.failed_step}", culprit.ecu)


def _nothing_activated(run: InstallRun) -> bool:
    """No ECU was told to run its new image yet (after a restart: none is found running it)."""
    if any(r.phase == "activated" for r in run.results.values()):
        return False
    if not run.resumed or run.plan.gate is None:
        return True
    return not any(run.images(j.ecu).runs(j.version, j.on_ecu_sha256) for j in run.plan.in_order() if not run.single(j.ecu))


def _stop_staging(run: InstallRun) -> None:
    """The preconditions failed while staging (or the TBOX cancelled the campaign): what was cut
    off, and what was not reached, say so; everything staged is discarded (nothing was activated)."""
    why = held(run)
    for r in list(run.results.values()):
        if r.result != "success" and r.reason == "cancelled":
            run.set(dataclasses.replace(r, reason=f"staging stopped: {why}"))
    run.not_started([j for j in run.plan.in_order()], why)
    run.journal.set_phase("discard", why)


def _activate(run: InstallRun) -> None:
    """In install order: each ECU runs its staged image and says so; the first that does not
    turns the install back (journal: rollback)."""
    for job in run.plan.in_order():
        ecu = job.ecu
        if run.single(ecu) or run.results[ecu].phase == "activated":
            continue
        if run.cancelled is not None:
            run.journal.set_phase("rollback", run.cancelled)
            return
        if run.resumed and run.images(ecu).runs(job.version, job.on_ecu_sha256):  # the reset was done before the kill
            run.set(dataclasses.replace(run.results[ecu], phase="activated", version_after=job.version))
            continue
        if any(r.phase == "activated" for r in run.results.values()) and not gate(run, first=False, phase="activate"):
            run.journal.set_phase("rollback", held(run))  # as a failed activation: back to the old set
            return
        done = run.act(ecu, "activate", (job.version, job.on_ecu_sha256))
        if done.result == "success":
            run.set(dataclasses.replace(run.results[ecu], phase="activated", version_after=done.version_after))
            continue
        r = run.results[ecu]
        run.set(dataclasses.replace(r, result="failed", failed_step=f"activate: {done.failed_step}",
                                    reason=done.reason, nrc=done.nrc))
        run.journal.set_phase("rollback", f"{ecu} failed to activate at {done.failed_step}", ecu)
        return
    run.journal.set_phase("flash_last" if any(run.single(e) for e in run.jobs) else "commit")


def _flash_last(run: InstallRun) -> None:
    """The single-bank ECUs, flashed in place once every other ECU runs its new image (on trial):
    if one fails, the others go back (it cannot)."""
    if not gate(run, first=not any(r.phase == "activated" for r in run.results.values()), phase="flash_last"):
        run.not_started([j for j in run.plan.in_order() if run.single(j.ecu)], held(run))
        run.journal.set_phase("rollback", held(run))
        return
    for group in run.plan.groups():
        run.flash_whole([j for j in group if run.single(j.ecu) and (
            j.ecu not in run.results or run.results[j.ecu].failed_step == "not_started")])  # not done before an interruption
        failed = [r for e, r in run.results.items() if run.single(e) and r.result != "success"]
        if failed:
            culprit = failed[0]
            run.not_started([j for j in run.plan.in_order() if run.single(j.ecu)], f"{culprit.ecu} failed")
            run.journal.set_phase("rollback", f"{culprit.ecu} (a single flash bank) failed at {culprit.failed_step}",
                                  culprit.ecu)
            return
    run.journal.set_phase("commit")


def _roll_back(run: InstallRun) -> None:
    """Back to the old set: the failed ECU and those activated, in reverse order; then discard."""
    order = [job.ecu for job in run.plan.in_order()]
    culprit = run.journal.culprit
    back = [e for e in reversed(order) if run.results[e].phase == "activated" and e != culprit]
    for ecu in [e for e in (culprit,) if e and not run.single(e)] + back:  # the failing one too: it may run its new image on trial
        r = run.results[ecu]
        if r.phase == "rolled_back":
            continue  # done before the interruption
        before = r.version_before
        run.act(ecu, "rollback", (before, None) if before else None)
    run.journal.set_phase("discard")


def _discard(run: InstallRun) -> None:
    """Nothing staged is left behind: every ECU this install touched, the culprit last."""
    culprit = run.journal.culprit
    untouched = ("not_started", ARRIVAL)  # never reached, or its package never came: nothing of it was erased
    touched = [e for e in run.staging() if e in run.results and run.results[e].failed_step not in untouched]
    for ecu in [e for e in reversed(touched) if e != culprit] + [e for e in (culprit,) if e in touched]:
        r = run.results[ecu]
        discarded = any(a.get("action") == "discard" and a.get("result") == "success" for a in r.actions)
        if not discarded and (r.phase != "rolled_back" or ecu == culprit):  # a rolled-back ECU holds nothing staged
            run.act(ecu, "discard", None)
