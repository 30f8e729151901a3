"""An ECU the project did not write: PyPI's ``python-uds-server`` configured as a single-bank
bootloader of another dialect, on the same python-can bus as the vehicle (a process of its own).

    python -m tests.foreign_ecu VEHICLE.yaml ECU

Its dialect (the flash profile ``acme-boot`` in tests/test_foreign_ecu.py speaks it):
- SecurityAccess level 0x11, key = the seed XOR the ECU's ``seed_key_params.mask`` (4 bytes),
  byte order reversed (tests/plugins/acme-seedkey is the plug-in);
- routines: 0x0203 check programming preconditions, 0xFF00 erase by logical block number
  (option: one byte), 0x0202 check memory (option: block number, CRC-16/CCITT of what was
  written into the block; status 00 ok, 01 wrong), 0xFF01 check dependencies;
- fingerprint in DID F184: tester id (2), date BCD (3), version (16, space-padded);
- software version in DID F189: 16 bytes, space-padded; it becomes the fingerprint's version at
  the reset after every written block checked out;
- two logical blocks: 1 at 0x10000 (32 KiB), 2 at 0x20000 (16 KiB); writing an unerased block
  is a programming failure (0x72).
Where the server deviates from ISO 14229 (no ControlDTCSetting: 0x11; a compressed download:
0x13, not 0x31; no 0x78) the profile works around it. The stock ISO-TP transport listens on
one address: ``DualTransport`` adds the functional one (the package's transport plug-in point).
"""

from __future__ import annotations

import binascii
import socket
import sys
import threading
import time
from typing import Any

import can
import isotp
import yaml
from uds_server import (
    AccessRule,
    CommunicationControlDefinition,
    DidAccess,
    DidDefinition,
    EcuResetDefinition,
    MemoryRegionDefinition,
    ProgrammingFailure,
    RoutineDefinition,
    SecurityLevel,
    UdsServer,
)
from uds_server.session import DiagnosticSession

BLOCKS = {1: (0x10000, 0x8000), 2: (0x20000, 0x4000)}
PROGRAMMING = AccessRule(allowed_sessions=frozenset({0x02}), allowed_security_levels=frozenset({0x11}))


def acme_key(seed: bytes, mask: int) -> bytes:
    return bytes(b ^ m for b, m in zip(seed, mask.to_bytes(4, "big"), strict=True))[::-1]


class DualTransport:
    """Requests on the physical and the functional id; answers on the physical response id."""

    def __init__(self, physical: Any, functional: Any) -> None:
        self.layers = (physical, functional)

    def open(self) -> None:
        for layer in self.layers:
            layer.start()

    def close(self) -> None:
        for layer in self.layers:
            layer.stop()

    def receive(self, timeout: float | None = None) -> bytes | None:
        deadline = time.monotonic() + (timeout or 0.0)
        while True:
            for layer in self.layers:
                if layer.available():
                    return bytes(layer.recv())
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.001)

    def send(self, payload: bytes) -> None:
        self.layers[0].send(payload)


class Bootloader:
    def __init__(self, version: str, mask: int) -> None:
        self.memory = {n: bytearray(b"\xff" * size) for n, (_, size) in BLOCKS.items()}
        self.erased: set[int] = set()
        self.written: dict[int, tuple[int, int]] = {}  # block -> the range written (offsets in the block)
        self.checked: set[int] = set()
        self.version = version.encode().ljust(16)
        self.pending = b""
        self.mask = mask
        self.lock = threading.Lock()

    def erase(self, option: bytes) -> bytes:
        if len(option) != 1 or option[0] not in BLOCKS:
            raise ValueError("unknown block")  # -> 0x10
        block = option[0]
        self.memory[block][:] = b"\xff" * len(self.memory[block])
        self.erased.add(block)
        self.written.pop(block, None)
        self.checked.discard(block)
        return b"\x00"

    def write(self, address: int, data: bytes) -> None:
        for block, (start, size) in BLOCKS.items():
            if start <= address and address + len(data) <= start + size:
                if block not in self.erased:
                    raise ProgrammingFailure("block not erased")
                offset = address - start
                self.memory[block][offset : offset + len(data)] = data
                lo, hi = self.written.get(block, (offset, offset))
                self.written[block] = (min(lo, offset), max(hi, offset + len(data)))
                return
        raise KeyError("outside every block")

    def check(self, option: bytes) -> bytes:
        if len(option) != 3 or option[0] not in self.written:
            return b"\x01"
        block = option[0]
        lo, hi = self.written[block]
        crc = binascii.crc_hqx(bytes(self.memory[block][lo:hi]), 0xFFFF)
        if crc != int.from_bytes(option[1:3], "big"):
            return b"\x01"
        self.checked.add(block)
        return b"\x00"

    def fingerprint(self, value: bytes) -> None:
        self.pending = value[5:21]

    def reset(self) -> None:
        if self.pending and self.erased and self.erased <= self.checked:
            self.version = self.pending
        self.erased, self.pending = set(), b""


def build(config: dict[str, Any], name: str) -> tuple[UdsServer, can.BusABC, can.Notifier]:
    ecu = config["ecus"][name]
    bus_settings = dict(config["segments"][ecu["segment"]]["bus"])
    bus = can.Bus(**bus_settings)
    sock = getattr(bus, "_multicast", None)
    raw = getattr(sock, "_socket", None)
    if isinstance(raw, socket.socket):
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    notifier = can.Notifier(bus, [], timeout=0.05)
    params = {"blocksize": 8, "stmin": 0, "tx_padding": 0xCC}
    physical = isotp.NotifierBasedCanStack(bus, notifier, address=isotp.Address(
        isotp.AddressingMode.Normal_11bits, txid=ecu["response_id"], rxid=ecu["request_id"]), params=params)
    functional = isotp.NotifierBasedCanStack(bus, notifier, address=isotp.Address(
        isotp.AddressingMode.Normal_11bits, txid=ecu["response_id"], rxid=ecu.get("functional_id", 0x7DF)), params=params)
    mask = int(ecu["seed_key_params"]["mask"])
    boot = Bootloader(str(ecu.get("sim", {}).get("software_version", "1.0.0")), mask)
    server = UdsServer(
        transport=DualTransport(physical, functional),
        sessions=(DiagnosticSession(0x01), DiagnosticSession(0x02, s3_server_timeout_ms=10000),
                  DiagnosticSession(0x03, s3_server_timeout_ms=10000)),
        dids=(DidDefinition(0xF189, 16, DidAccess.READ, read_callback=lambda: bytes(boot.version)),
              DidDefinition(0xF184, 21, DidAccess.WRITE, write_callback=boot.fingerprint, access_rule=PROGRAMMING)),
        security_levels=(SecurityLevel(0x11, seed_callback=lambda: __import__("os").urandom(4),
                                       key_validator=lambda seed, key: key == acme_key(seed, mask)),),
        routines=(RoutineDefinition(0x0203, start_callback=lambda option: b"\x00"),
                  RoutineDefinition(0xFF00, start_callback=boot.erase, access_rule=PROGRAMMING),
                  RoutineDefinition(0x0202, start_callback=boot.check, access_rule=PROGRAMMING),
                  RoutineDefinition(0xFF01, start_callback=lambda option: b"\x00")),
        memory_regions=tuple(MemoryRegionDefinition(start, size, write_callback=boot.write, access_rule=PROGRAMMING)
                             for start, size in BLOCKS.values()),
        communication_controls=(CommunicationControlDefinition(0x00), CommunicationControlDefinition(0x03)),
        resets=(EcuResetDefinition(0x01, callback=boot.reset),),
        max_transfer_block_length=0x402,
    )
    return server, bus, notifier


def main(argv: list[str]) -> int:
    config = yaml.safe_load(open(argv[0], encoding="utf-8"))
    server, bus, notifier = build(config, argv[1])
    server.start()
    print(f"foreign ecu {argv[1]} ready", flush=True)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        notifier.stop()
        bus.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
