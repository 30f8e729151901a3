"""The content schedule (C3, C4): which item must start, stop or revert at ``now``.

Pure: the persisted item states, ``now`` and the vehicle's day/night signal in; the new
states and the actions the executors must take out. A restart, or a vehicle that was off
across an item's start or expiry, is just a tick at a later ``now``: an item whose window
is open starts, one whose expiry passed is reverted (if it ran) and reported expired, and
nothing that already happened happens twice.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from typing import Mapping

from agent.core.content import Schedule

__all__ = ["ItemState", "Action", "tick", "STATUSES", "is_night"]

# offered -> (policy auto, or accepted) scheduled <-> active -> expired; declined; failed
STATUSES = ("offered", "scheduled", "active", "expired", "declined", "failed")


@dataclass(frozen=True)
class ItemState:
    item: str
    status: str
    policy: str = "auto"
    accepted: bool = False
    ran: bool = False  # it was started at least once (what it left behind is undone at its expiry)

    def with_status(self, status: str) -> "ItemState":
        return ItemState(self.item, status, self.policy, self.accepted, self.ran or status == "active")


@dataclass(frozen=True)
class Action:
    item: str
    action: str  # start | stop | revert
    status: str  # the item's status after it


def is_night(now: _dt.datetime, lux: float | None, threshold: float = 50.0,
             dusk: _dt.time = _dt.time(19, 0), dawn: _dt.time = _dt.time(6, 0)) -> bool:
    """Night from the light sensor when there is a reading, else from the local clock."""
    if lux is not None:
        return lux < threshold
    local = now.time()
    return local >= dusk or local < dawn


def tick(states: Mapping[str, ItemState], schedules: Mapping[str, Schedule], now: _dt.datetime,
         night: bool) -> tuple[dict[str, ItemState], list[Action]]:
    """The next states and the executor actions, in item order."""
    out = dict(states)
    actions: list[Action] = []
    for name, state in states.items():
        schedule = schedules[name]
        wanted = schedule.state(now, night)
        if state.status == "offered":
            if state.policy == "never":
                continue
            if state.policy == "manual" and not state.accepted:
                if wanted == "expired":
                    out[name] = state.with_status("expired")
                    actions.append(Action(name, "none", "expired"))  # never confirmed, now too late
                continue
            state = out[name] = state.with_status("scheduled")
        if state.status == "scheduled":
            if wanted == "active":
                out[name] = state.with_status("active")
                actions.append(Action(name, "start", "active"))
            elif wanted == "expired":
                out[name] = state.with_status("expired")
                # off across the whole window: nothing to undo; it ran in an earlier window: undo what
                # stayed (an installed app)
                actions.append(Action(name, "revert" if state.ran else "none", "expired"))
        elif state.status == "active":
            if wanted == "waiting":
                out[name] = state.with_status("scheduled")
                actions.append(Action(name, "stop", "scheduled"))
            elif wanted == "expired":
                out[name] = state.with_status("expired")
                actions.append(Action(name, "revert", "expired"))
    return out, actions
