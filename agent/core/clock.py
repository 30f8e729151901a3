"""A simulated wall clock for benches and tests: the content schedule (C4) runs as if it
were ``start`` when the process began, advancing ``rate`` simulated seconds per real second.
A vehicle runs on the real clock."""

from __future__ import annotations

import datetime as _dt
import time
from typing import Callable

from agent.errors import UsageError

__all__ = ["simulated_clock", "parse_time"]


def parse_time(text: str) -> _dt.datetime:
    try:
        when = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"{text!r} is not an ISO 8601 time such as 2026-05-20T18:30:00+08:00") from None
    if when.tzinfo is None:
        raise UsageError(f"{text!r} needs a UTC offset, e.g. 2026-05-20T18:30:00+08:00")
    return when


def simulated_clock(start: _dt.datetime, rate: float = 1.0) -> Callable[[], _dt.datetime]:
    if rate <= 0:
        raise UsageError(f"the clock rate must be positive, got {rate}")
    origin = time.monotonic()
    return lambda: start + _dt.timedelta(seconds=(time.monotonic() - origin) * rate)
