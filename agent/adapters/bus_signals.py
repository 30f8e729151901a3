"""The vehicle's state from its broadcast CAN frames, as a real vehicle gives it: the messages of
a DBC file (``vehicle_signals.dbc``) decoded with cantools as they pass on their segment. Each
signal of ``agent/protocol/ecu.py: SIGNALS`` the DBC carries (by that name) is taken from the
bus; a value older than ``stale_ms`` (else three times its message's cycle time) is stale, and
stale or never seen counts as unknown, named in ``stale`` (what the preconditions report as
unmet). The signals the DBC does not carry are read from the preconditions ECU's DIDs as before.
No request is sent for what the bus carries: nothing collides with another tester.

``BroadcastSignals`` is the other end, for the ECU simulator: it sends the DBC's messages at their
cycle times with the values of a ``signals.json``.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import can

from agent.adapters.canbus import Segment
from agent.core.config import VehicleSignalsConfig
from agent.errors import ConfigError
from agent.protocol.ecu import SIGNALS

__all__ = ["BusSignals", "BroadcastSignals", "load_dbc"]

DEFAULT_CYCLE_MS = 1000


def load_dbc(path: str) -> Any:
    """The DBC database; ConfigError naming the file and what is wrong with it."""
    import cantools

    try:
        return cantools.database.load_file(path, database_format="dbc", strict=True)
    except OSError as exc:
        raise ConfigError(path, None, f"cannot read the DBC file ({exc.strerror})") from None
    except Exception as exc:  # noqa: BLE001 - cantools raises its own parse errors (and ValueError, KeyError)
        raise ConfigError(path, None, f"not a usable DBC file: {exc}") from None


def _value(value: Any) -> Any:
    """A decoded value as the preconditions compare it: names of enumerations as text, whole
    numbers as int, the rest as float."""
    if hasattr(value, "name") and hasattr(value, "value"):  # cantools' NamedSignalValue
        return str(value.name)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


class BusSignals:
    """Listens on ``segment`` for the DBC's messages that carry SIGNALS."""

    def __init__(self, cfg: VehicleSignalsConfig, segment: Segment) -> None:
        self.cfg, self.db = cfg, load_dbc(cfg.dbc)
        self._lock = threading.Lock()
        self._last: dict[str, tuple[Any, float]] = {}
        self._limit: dict[str, float] = {}
        self._message: dict[str, str] = {}
        ids = []
        for message in self.db.messages:
            carried = [s.name for s in message.signals if s.name in SIGNALS]
            if not carried:
                continue
            ids.append(message.frame_id)
            for name in carried:
                self._limit[name] = (cfg.stale_ms or 3 * (message.cycle_time or DEFAULT_CYCLE_MS)) / 1000.0
                self._message[name] = message.name
        if not ids:
            raise ConfigError(cfg.dbc, None, f"no message carries a signal named {', '.join(SIGNALS)}")
        segment.watch(ids, self._frame)

    @property
    def covered(self) -> set[str]:
        return set(self._limit)

    def _frame(self, msg: can.Message) -> None:
        try:
            decoded = self.db.decode_message(msg.arbitration_id, bytes(msg.data), decode_choices=True)
        except Exception:  # noqa: BLE001 - a frame that does not decode is no reading (it goes stale)
            return
        now = time.monotonic()
        with self._lock:
            for name, value in decoded.items():
                if name in self._limit:
                    self._last[name] = (_value(value), now)

    def read(self) -> tuple[dict[str, Any], dict[str, str]]:
        """(each covered signal's fresh value or None, why each None is: stale or never seen)."""
        now = time.monotonic()
        values: dict[str, Any] = {}
        stale: dict[str, str] = {}
        with self._lock:
            for name, limit in self._limit.items():
                seen = self._last.get(name)
                if seen is None:
                    values[name], stale[name] = None, f"no {self._message[name]} frame on {self.cfg.segment} yet"
                elif now - seen[1] > limit:
                    values[name] = None
                    stale[name] = f"stale: no {self._message[name]} frame for {now - seen[1]:.1f} s"
                else:
                    values[name] = seen[0]
        return values, stale


class BroadcastSignals:
    """The ECU simulator's broadcast: each DBC message with a SIGNALS signal, every cycle, its values
    read from ``signals`` (a message whose signals are not all there is not sent: it goes stale)."""

    def __init__(self, dbc: str, segment: Segment, signals: Path, stop: threading.Event) -> None:
        self.db, self.segment, self.signals, self.stop = load_dbc(dbc), segment, signals, stop
        self.messages = [m for m in self.db.messages if any(s.name in SIGNALS for s in m.signals)]
        self.thread = threading.Thread(target=self._run, name="broadcast", daemon=True)

    def _run(self) -> None:
        due = {m.frame_id: 0.0 for m in self.messages}
        while not self.stop.is_set():
            now = time.monotonic()
            try:
                values = json.loads(self.signals.read_text())
            except (OSError, ValueError):
                values = {}
            values = values if isinstance(values, dict) else {}
            for message in self.messages:
                if now < due[message.frame_id]:
                    continue
                due[message.frame_id] = now + (message.cycle_time or DEFAULT_CYCLE_MS) / 1000.0
                wanted = {s.name: values.get(s.name) for s in message.signals}
                if any(v is None for v in wanted.values()):
                    continue
                try:
                    data = message.encode(wanted, strict=True)
                except Exception:  # noqa: BLE001 - a value the DBC cannot carry: not sent (goes stale)
                    continue
                try:
                    self.segment.send_frame(message.frame_id, data)
                except Exception:  # noqa: BLE001 - a bus error: the next cycle tries again
                    pass
            self.stop.wait(0.02)
