"""A byte-level UDS tester for talking to simulated ECUs over a real python-can bus."""

from __future__ import annotations

import time
from typing import Any

import can

from agent.adapters.canbus import Segment
from agent.core.config import EcuConfig, VehicleConfig, parse_vehicle_config
from agent.protocol.ecu import security_key
from ecu_sim.simulator import EcuSimulator


class UdsTester:
    def __init__(self, config: VehicleConfig, ecu: str) -> None:
        self.ecu: EcuConfig = config.ecu(ecu)
        self.segment = Segment(config.segments[self.ecu.segment])
        self.phys = self.segment.stack(self.ecu.request_id, self.ecu.response_id)
        self.func = self.segment.stack(self.ecu.functional_id, self.ecu.response_id ^ 0x100)
        self.frames: list[can.Message] = []
        self.segment.notifier.add_listener(self.frames.append)

    def ask(self, request: bytes, timeout: float = 1.0, functional: bool = False) -> bytes | None:
        """Send a request; return the final response (0x78 pendings are collected)."""
        self.pending = 0
        while self.phys.available():
            self.phys.recv()
        (self.func if functional else self.phys).send(request)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            data = self.phys.recv(block=True, timeout=left)
            if data is None:
                return None
            data = bytes(data)
            if len(data) == 3 and data[0] == 0x7F and data[2] == 0x78:
                self.pending += 1
                deadline = time.monotonic() + 6.0
                continue
            return data

    def unlock(self) -> None:
        assert self.ask(b"\x10\x03")[:2] == b"\x50\x03"
        assert self.ask(b"\x10\x02")[:2] == b"\x50\x02"
        seed = self.ask(b"\x27\x01")[2:]
        assert self.ask(b"\x27\x02" + security_key(self.ecu.security_secret, seed)) == b"\x67\x02"

    def close(self) -> None:
        self.segment.shutdown()


def start_sim(data: dict[str, Any], names: list[str], state_dir: str, faults: Any = None) -> tuple[VehicleConfig, EcuSimulator]:
    config = parse_vehicle_config(data, "test")
    sim = EcuSimulator(config, names, state_dir, faults)
    sim.start()
    return config, sim
