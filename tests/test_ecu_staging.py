"""Two-phase flashing in the ECU simulator, exact bytes: an image is staged (written, checked,
consistent) without running; the activate routine selects it for the next reset (on trial),
rollback goes back to the image it replaced, commit confirms it, discard forgets a staged one.
Everything persists: a simulator stopped and started again finds the same banks."""

from __future__ import annotations

import hashlib
import struct
import time
import zlib
from pathlib import Path
from typing import Any, Iterator

import pytest

from agent.protocol.ecu import STAGED, STAGED_NONE, STAGED_SELECTED, StagedImage, decode_staged_image, security_key
from tests.conftest import ecu_entry, virtual_bus
from tests.helpers import UdsTester, start_sim

IMAGE = bytes(range(256)) * 3  # 768 bytes, 48 blocks of 16


class Bench:
    def __init__(self, tmp_path: Path) -> None:
        self.data: dict[str, Any] = {
            "segments": {"pt": {"bus": virtual_bus()}},
            "ecus": {"bms": ecu_entry("bms", 0x7E1, 0x7E9, max_block_length=18, reset_ms=100)
                     | {"memory": {"address": 0x1000, "size": 0x10000}}},
        }
        self.state = str(tmp_path / "state")
        self.start()

    def start(self) -> None:
        self.config, self.sim = start_sim(self.data, ["bms"], self.state)
        self.t = UdsTester(self.config, "bms")

    def stop(self) -> None:
        self.t.close()
        self.sim.stop()

    def ask(self, hex_or_bytes: str | bytes) -> bytes | None:
        return self.t.ask(bytes.fromhex(hex_or_bytes) if isinstance(hex_or_bytes, str) else hex_or_bytes)

    def unlock_extended(self) -> None:
        assert self.ask("1003")[:2] == b"\x50\x03"
        seed = self.ask("2701")[2:]
        assert self.ask(b"\x27\x02" + security_key("bms-secret", seed)) == b"\x67\x02"

    def stage(self, image: bytes = IMAGE, version: str = "2.5") -> None:
        self.t.unlock()
        fingerprint = bytes.fromhex("261122") + bytes((len(version),)) + version.encode()
        assert self.ask(b"\x2e\xf1\x5a" + fingerprint) == bytes.fromhex("6ef15a")
        assert self.ask(bytes.fromhex("3101ff00 44 00001000") + struct.pack(">I", len(image))) == bytes.fromhex("7101ff0000")
        assert self.ask(bytes.fromhex("3400 44 00001000") + struct.pack(">I", len(image))) == bytes.fromhex("74200012")
        for n, offset in enumerate(range(0, len(image), 16), start=1):
            assert self.ask(bytes((0x36, n & 0xFF)) + image[offset : offset + 16]) == bytes((0x76, n & 0xFF))
        assert self.ask("37") == b"\x77"
        assert self.ask(b"\x31\x01\x02\x02" + zlib.crc32(image).to_bytes(4, "big")) == bytes.fromhex("7101020200")
        assert self.ask("3101ff01") == bytes.fromhex("7101ff0100")
        assert self.ask("1003")[:2] == b"\x50\x03"  # out of programming: the image waits, staged

    def reset(self) -> None:
        assert self.ask("1101") == b"\x51\x01"
        time.sleep(0.2)

    def version(self) -> bytes:
        return self.ask("22f189")[3:]

    def staged(self) -> StagedImage | None:
        response = self.ask("22f1a1")
        assert response is not None and response[:3] == bytes.fromhex("62f1a1")
        return decode_staged_image(response[3:])

    def bank_status(self) -> bytes:
        return self.ask("22f1a2")[3:]  # confirmed, previous image kept


@pytest.fixture
def bench(tmp_path: Path) -> Iterator[Bench]:
    b = Bench(tmp_path)
    try:
        yield b
    finally:
        b.stop()


def test_staged_is_not_run_until_activated_then_rolled_back(bench: Bench) -> None:
    assert bench.staged() == StagedImage(STAGED_NONE)
    assert bench.ask("22f1a1") == bytes.fromhex("62f1a1 00 00000000") + bytes(32)
    bench.stage()
    digest = hashlib.sha256(IMAGE).hexdigest()
    assert bench.ask("22f1a1") == bytes.fromhex("62f1a1 01 00000300") + bytes.fromhex(digest) + b"2.5"
    bench.reset()  # a reset alone does not run a staged image
    assert bench.version() == b"1.0.0" and bench.staged() == StagedImage(STAGED, 768, digest, "2.5")
    bench.unlock_extended()
    assert bench.ask("3101ff02") == bytes.fromhex("7101ff0200")
    assert bench.staged().status == STAGED_SELECTED
    bench.reset()
    assert bench.version() == b"2.5" and bench.ask("22f1a0")[3:].hex() == digest
    assert bench.bank_status() == b"\x00\x01"  # on trial, the old image kept
    assert bench.staged() == StagedImage(STAGED_NONE)
    bench.unlock_extended()
    assert bench.ask("3101ff04") == bytes.fromhex("7101ff0400")  # rollback
    bench.reset()
    assert bench.version() == b"1.0.0" and bench.bank_status() == b"\x01\x00"
    bench.unlock_extended()
    assert bench.ask("3101ff04") == bytes.fromhex("7f3122")  # nothing to go back to


def test_commit_confirms_and_drops_the_old_image(bench: Bench) -> None:
    bench.stage()
    bench.unlock_extended()
    assert bench.ask("3101ff02") == bytes.fromhex("7101ff0200")
    bench.reset()
    bench.unlock_extended()
    assert bench.ask("3101ff05") == bytes.fromhex("7101ff0500")
    assert bench.ask("3101ff05") == bytes.fromhex("7101ff0500")  # asked again after a restart: done already
    assert bench.bank_status() == b"\x01\x00" and bench.version() == b"2.5"
    assert bench.ask("3101ff04") == bytes.fromhex("7f3122")  # committed: no way back


def test_discard_and_the_routines_nrcs(bench: Bench) -> None:
    assert bench.ask("3101ff02") == bytes.fromhex("7f317f")  # default session
    assert bench.ask("1003")[:2] == b"\x50\x03"
    assert bench.ask("3101ff03") == bytes.fromhex("7f3133")  # security locked
    bench.unlock_extended()
    assert bench.ask("3101ff02") == bytes.fromhex("7f3122")  # nothing staged
    bench.stage()
    bench.unlock_extended()
    assert bench.ask("3102ff02") == bytes.fromhex("7f3112")
    assert bench.ask("3101ff0200") == bytes.fromhex("7f3113")
    assert bench.ask("3101ff02") == bytes.fromhex("7101ff0200")
    assert bench.ask("3101ff03") == bytes.fromhex("7101ff0300")  # discard, the selection with it
    assert bench.ask("3101ff03") == bytes.fromhex("7101ff0300")
    assert bench.staged() == StagedImage(STAGED_NONE)
    bench.reset()
    assert bench.version() == b"1.0.0"


def test_the_banks_survive_a_restart_in_every_phase(bench: Bench) -> None:
    bench.stage()
    bench.stop()  # staged, and the simulator goes away
    bench.start()
    assert bench.staged().status == STAGED and bench.version() == b"1.0.0"
    bench.unlock_extended()
    assert bench.ask("3101ff02") == bytes.fromhex("7101ff0200")
    bench.stop()  # selected, and gone before the reset
    bench.start()
    assert bench.staged().status == STAGED_SELECTED
    bench.reset()
    assert bench.version() == b"2.5" and bench.bank_status() == b"\x00\x01"
    bench.stop()  # on trial across a restart: still on trial, the old image still kept
    bench.start()
    assert bench.version() == b"2.5" and bench.bank_status() == b"\x00\x01"


def test_one_ecu_at_a_time_keeps_todays_behaviour(bench: Bench) -> None:
    """Reset in the same programming session: the staged image runs at once, confirmed."""
    bench.t.unlock()
    image = IMAGE
    assert bench.ask(b"\x2e\xf1\x5a" + bytes.fromhex("261122") + b"\x033.0") == bytes.fromhex("6ef15a")
    assert bench.ask(bytes.fromhex("3101ff00 44 00001000") + struct.pack(">I", len(image))) == bytes.fromhex("7101ff0000")
    assert bench.ask(bytes.fromhex("3400 44 00001000") + struct.pack(">I", len(image))) == bytes.fromhex("74200012")
    for n, offset in enumerate(range(0, len(image), 16), start=1):
        assert bench.ask(bytes((0x36, n)) + image[offset : offset + 16]) == bytes((0x76, n))
    assert bench.ask("37") == b"\x77"
    assert bench.ask(b"\x31\x01\x02\x02" + zlib.crc32(image).to_bytes(4, "big")) == bytes.fromhex("7101020200")
    assert bench.ask("3101ff01") == bytes.fromhex("7101ff0100")
    bench.reset()
    assert bench.version() == b"3.0" and bench.bank_status() == b"\x01\x00"


def test_a_single_bank_ecu_is_flashed_in_place_and_has_no_staging_routines(tmp_path: Path) -> None:
    b = Bench.__new__(Bench)
    b.data = {"segments": {"pt": {"bus": virtual_bus()}},
              "ecus": {"bms": ecu_entry("bms", 0x7E1, 0x7E9, max_block_length=18, reset_ms=100)
                       | {"memory": {"address": 0x1000, "size": 0x10000}, "banks": 1}}}
    b.state = str(tmp_path / "state")
    b.start()
    try:
        assert b.ask("22f1a1") == bytes.fromhex("7f2231")  # nothing can be staged: no such DID
        b.unlock_extended()
        for routine in ("ff02", "ff03", "ff04", "ff05"):
            assert b.ask("3101" + routine) == bytes.fromhex("7f3131")
        b.stage()  # the programming sequence, written over the running application
        assert b.version() == b""  # erased: only the bootloader answers until the reset
        b.reset()
        assert b.version() == b"2.5" and b.ask("22f1a0")[3:].hex() == hashlib.sha256(IMAGE).hexdigest()
        b.stop()
        b.start()  # persisted
        assert b.version() == b"2.5"
    finally:
        b.stop()
