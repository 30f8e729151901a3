"""The content schedule with an injected clock: windows, night-only content, restarts and
a vehicle that was off across a start or an expiry."""

from __future__ import annotations

import datetime as dt

from agent.core.content import parse_schedule
from agent.core.schedule import ItemState, is_night, tick

TZ = dt.timezone(dt.timedelta(hours=8))
PROJECTION = parse_schedule({"mode": "night", "start": "2026-05-20T00:00:00", "expiry": "2026-05-21T00:00:00",
                             "tz": "Asia/Shanghai", "window": "19:00-23:00"})
BOOT = parse_schedule({"start": "2026-06-01T00:00:00", "expiry": "2026-06-04T00:00:00", "tz": "Asia/Shanghai"})
SCHEDULES = {"heart": PROJECTION, "boot": BOOT}


def at(month: int, day: int, hour: int, minute: int = 0) -> dt.datetime:
    return dt.datetime(2026, month, day, hour, minute, tzinfo=TZ)


def run(states, times, night=True):  # type: ignore[no-untyped-def]
    log = []
    for now in times:
        states, actions = tick(states, SCHEDULES, now, night)
        log += [(now.strftime("%m-%d %H:%M"), a.item, a.action) for a in actions]
    return states, log


def fresh(**kw):  # type: ignore[no-untyped-def]
    return {n: ItemState(n, "offered", **kw) for n in SCHEDULES}


def test_the_evening_projection_and_the_boot_animation():
    times = [at(5, 20, 18), at(5, 20, 19), at(5, 20, 22), at(5, 20, 23), at(5, 21, 0), at(5, 31, 12),
             at(6, 1, 0), at(6, 3, 12), at(6, 4, 0)]
    states, log = run(fresh(), times)
    assert log == [("05-20 19:00", "heart", "start"), ("05-20 23:00", "heart", "stop"), ("05-21 00:00", "heart", "revert"),
                   ("06-01 00:00", "boot", "start"), ("06-04 00:00", "boot", "revert")]
    assert {n: s.status for n, s in states.items()} == {"heart": "expired", "boot": "expired"}


def test_night_only_content_waits_for_night():
    states, log = run(fresh(), [at(5, 20, 20)], night=False)
    assert log == [] and states["heart"].status == "scheduled"
    states, log = run(states, [at(5, 20, 21)], night=True)
    assert log == [("05-20 21:00", "heart", "start")]


def test_restart_in_the_middle_of_a_window_does_not_start_twice():
    states, log = run(fresh(), [at(5, 20, 20)])
    assert log == [("05-20 20:00", "heart", "start")]
    restored = {n: ItemState(s.item, s.status, s.policy, s.accepted) for n, s in states.items()}  # read back from disk
    states, log = run(restored, [at(5, 20, 20, 30), at(5, 20, 22)])
    assert log == [] and states["heart"].status == "active"


def test_vehicle_off_across_the_start_and_across_the_expiry():
    states, log = run(fresh(), [at(5, 19, 12), at(5, 20, 21, 30)])  # off from the 19th to 21:30 on the 20th
    assert log == [("05-20 21:30", "heart", "start")]
    states, log = run(states, [at(5, 22, 8)])  # off again until after the expiry: reverted, expired
    assert log == [("05-22 08:00", "heart", "revert")] and states["heart"].status == "expired"
    states, log = run(fresh(), [at(6, 10, 9)])  # off across the whole boot animation: never shown
    assert ("06-10 09:00", "boot", "none") in log and states["boot"].status == "expired"


def test_policies():
    states, log = run(fresh(policy="never"), [at(5, 20, 20), at(6, 2, 12)])
    assert log == [] and {s.status for s in states.values()} == {"offered"}
    states, log = run(fresh(policy="manual"), [at(5, 20, 20)])
    assert log == [] and states["heart"].status == "offered"  # waits for the owner's confirmation
    states["heart"] = ItemState("heart", "offered", "manual", accepted=True)
    states, log = run(states, [at(5, 20, 20, 5)])
    assert log == [("05-20 20:05", "heart", "start")]


def test_day_night_signal():
    assert is_night(at(5, 20, 12), lux=10.0) and not is_night(at(5, 20, 21), lux=800.0)
    assert is_night(at(5, 20, 21), lux=None) and not is_night(at(5, 20, 12), lux=None)  # the clock fallback


def test_an_item_that_ran_is_reverted_at_expiry_even_when_it_was_waiting_then():
    """The projection ran on the evening of 20 May and was stopped at 23:00; at its expiry what
    it left behind is undone (revert), while an item that never ran only expires."""
    states = {"heart": ItemState("heart", "scheduled"), "boot": ItemState("boot", "offered")}
    states, log = run(states, [at(5, 20, 20), at(5, 20, 23, 30), at(5, 21, 0, 5)])
    assert log == [("05-20 20:00", "heart", "start"), ("05-20 23:30", "heart", "stop"),
                   ("05-21 00:05", "heart", "revert")]
    assert states["heart"].status == "expired" and states["heart"].ran
    never_ran = {"heart": ItemState("heart", "scheduled")}
    _, log = run(never_ran, [at(5, 21, 0, 5)])  # the vehicle was off the whole window
    assert log == [("05-21 00:05", "heart", "none")]
