"""The vehicle's state as the install preconditions judge it, read by the gateway itself from the
ECU that reports it (the signal DIDs F1C2-F1C7, agent/protocol/ecu.py: SIGNALS), so that an
install can be checked while it stages and before each activation without the TBOX in the loop.

A signal the ECU does not report (a negative response, a value out of its range) is None and
fails every condition on it; an ECU that does not answer reports nothing. While the ECU is held
by other work (it, or its whole segment, is being flashed), there is no reading: ``None``, and
the caller checks again when it is free.
"""

from __future__ import annotations

import logging
from typing import Any

from agent.adapters.bus_signals import BusSignals
from agent.adapters.uds_client import RawCodec, UdsLink, describe_failure
from agent.core.config import VehicleConfig
from agent.protocol.ecu import SIGNALS, decode_signal
from gateway.buses import Buses, EcuBusy

__all__ = ["read_signals"]

log = logging.getLogger(__name__)


def read_signals(config: VehicleConfig, buses: Buses, ecu_name: str, wait: float = 0.5,
                 bus: BusSignals | None = None) -> dict[str, Any] | None:
    """Every signal's value (None where it is not reported), or None when the ECU is busy. With
    ``bus`` (vehicle_signals), what the broadcast frames carry is taken from them (``stale`` says
    why one is unknown) and only the rest is asked of the ECU."""
    values: dict[str, Any] = dict.fromkeys(SIGNALS)
    asked = set(SIGNALS)
    if bus is not None:
        heard, stale = bus.read()
        values.update(heard)
        if stale:
            values["stale"] = stale
        asked -= bus.covered
        if not asked:
            return values
    ecu = config.ecu(ecu_name)
    try:
        with buses.ecu(ecu.name, "vehicle state", wait=wait) as segment, \
                UdsLink(segment, ecu.request_id, ecu.response_id, name=ecu.name, p2=ecu.p2_ms / 1000.0,
                        p2_star=ecu.p2_star_ms / 1000.0, dids={did: RawCodec() for did, _ in SIGNALS.values()}) as link:
            for name, (did, _) in SIGNALS.items():
                if name not in asked:
                    continue
                for attempt in (1, 2):  # once more after no answer: another tester may have held the ECU
                    try:
                        raw = bytes(link.client.read_data_by_identifier(did).service_data.values[did])
                        values[name] = decode_signal(name, raw)
                    except ValueError:
                        pass  # not a value the signal can have
                    except Exception as exc:  # noqa: BLE001 - an unreadable signal fails what depends on it
                        reason, nrc = describe_failure(exc)
                        if nrc is None and attempt == 1:
                            continue
                        if nrc is None:  # no (sane) answer at all, twice: the rest would fare no better
                            log.warning("vehicle state from %s: %s", ecu.name, reason)
                            return values
                    break
    except EcuBusy:
        return None
    return values
