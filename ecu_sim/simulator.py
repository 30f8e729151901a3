"""Runs one or more simulated ECUs, each a UDS server on its own addresses."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from agent.adapters.bus_signals import BroadcastSignals
from agent.adapters.canbus import Segment
from agent.adapters.storage import InstanceLock
from agent.adapters.uds_server import UdsServer
from agent.core.config import EcuConfig, VehicleConfig
from agent.core.faults import FaultSpec, parse_fault
from agent.core.image_auth import ImageKey, load_image_key
from agent.errors import UsageError
from ecu_sim.content import ContentStore
from ecu_sim.flash_banks import FlashBanks
from ecu_sim.services import SERVICES, EcuState

__all__ = ["EcuSimulator"]

log = logging.getLogger(__name__)


def _trust_anchor(ecu: EcuConfig) -> ImageKey | None:
    """``ecus.<name>.sim.image_key``: the OEM's public key this ECU's bootloader checks images with."""
    if ecu.sim.image_key is None:
        return None
    path = Path(ecu.sim.image_key)
    try:
        return load_image_key(path.read_bytes(), f"ecus.{ecu.name}.sim.image_key: {path}")
    except OSError as exc:
        raise UsageError(f"ecus.{ecu.name}.sim.image_key: {path}: cannot read the trust anchor ({exc.strerror})") from None


class EcuSimulator:
    """The ECUs of one process: one Segment per CAN segment, one UdsServer per ECU."""

    def __init__(
        self,
        config: VehicleConfig,
        names: list[str],
        state_dir: str | None = None,
        faults: list[FaultSpec] | None = None,
    ) -> None:
        self.config = config
        self.ecus = [config.ecu(n) for n in names]
        self.segments: dict[str, Segment] = {}
        self.servers: dict[str, UdsServer[EcuState]] = {}
        self.state_dir = state_dir
        self.extra_faults = list(faults or [])
        self.locks: list[InstanceLock] = []  # one simulator per ECU state directory
        self._stopped = threading.Event()

    def start(self) -> None:
        try:
            for ecu in self.ecus:
                if ecu.segment not in self.segments:
                    self.segments[ecu.segment] = Segment(self.config.segments[ecu.segment])
                base = Path(self.state_dir or ecu.sim.state_dir)
                self.locks.append(InstanceLock(base / ecu.name, f"ECU simulator for {ecu.name}").acquire())
                banks = FlashBanks(base / ecu.name, ecu.sim.software_version, single=ecu.banks == 1)
                faults = [parse_fault(f) for f in ecu.sim.faults] + self.extra_faults
                mine = [f for f in faults if f.applies_to("flash", ecu.name, "server")]
                server = UdsServer(
                    name=ecu.name,
                    segment=self.segments[ecu.segment],
                    request_id=ecu.request_id,
                    response_id=ecu.response_id,
                    functional_id=ecu.functional_id,
                    services=SERVICES,
                    state=EcuState(ecu, banks, content=ContentStore(base / ecu.name / "content", ecu.sim.max_block_length),
                                   sensors=base / ecu.name / "sensors.json", signals=base / ecu.name / "signals.json",
                                   security_file=base / ecu.name / "security.json", image_key=_trust_anchor(ecu)),
                    s3=ecu.sim.s3_ms / 1000.0,
                    pending_interval=ecu.sim.pending_interval_ms / 1000.0,
                    faults=mine,
                    fault_targets=("*", ecu.name),
                )
                self.servers[ecu.name] = server
                server.state.load_security(server.clock())
                server.start()
                log.info(
                    "ECU %s on %s: requests 0x%X, responses 0x%X, software %s%s",
                    ecu.name,
                    ecu.segment,
                    ecu.request_id,
                    ecu.response_id,
                    banks.active_info.version,
                    f", faults {', '.join(f.text for f in mine)}" if mine else "",
                )
            self._broadcast()
        except BaseException:
            self.stop()
            raise

    def _broadcast(self) -> None:
        """The ECUs with ``sim.broadcast``: the vehicle_signals DBC's messages on its segment."""
        signals = self.config.signals
        for ecu in self.ecus:
            if not ecu.sim.broadcast:
                continue
            if signals is None:
                raise UsageError(f"ecus.{ecu.name}.sim.broadcast needs a vehicle_signals section (its DBC and segment)")
            if signals.segment not in self.segments:
                self.segments[signals.segment] = Segment(self.config.segments[signals.segment])
            base = Path(self.state_dir or ecu.sim.state_dir)
            sender = BroadcastSignals(signals.dbc, self.segments[signals.segment], base / ecu.name / "signals.json",
                                      self._stopped)
            sender.thread.start()
            log.info("ECU %s broadcasts %s on %s", ecu.name, ", ".join(m.name for m in sender.messages), signals.segment)

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        for server in self.servers.values():
            server.stop()
            server.state.banks.close()
        for segment in self.segments.values():
            segment.shutdown()
        for lock in self.locks:
            lock.release()

    def wait(self) -> None:
        self._stopped.wait()
