"""ECU software as it is delivered: Intel HEX, S-record and VBF files read into memory segments
(agent/protocol/images.py) and programmed block by block, each block with its own erase,
download and check (gateway/flash.py), into the simulator and read back from its flash bank."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import bincopy
import pytest

from agent.adapters.trace_files import read_trace
from agent.protocol.images import ImageError, read_image, write_vbf
from ecu_sim.flash_banks import FlashBanks
from tests.conftest import Proc, ecu_entry, firmware_like, multicast_bus, vota

BASE = 0x08000000
SEGMENTS = [(BASE, firmware_like(9000)), (BASE + 0x10000, firmware_like(30_000)[-5000:])]


def _hex(segments: list[tuple[int, bytes]], kind: str = "ihex") -> bytes:
    f = bincopy.BinFile()
    for address, data in segments:
        f.add_binary(data, address=address)
    return (f.as_ihex() if kind == "ihex" else f.as_srec()).encode()


@pytest.mark.parametrize("kind", ["ihex", "srec"])
def test_hex_and_srecord_files_give_their_segments(kind: str) -> None:
    image = read_image(_hex(SEGMENTS, kind), f"app.{kind}")
    assert (image.format, image.segments) == (kind, tuple(SEGMENTS))


def test_a_vbf_file_gives_its_blocks_header_and_erase_list() -> None:
    image = read_image(write_vbf(SEGMENTS, "32184521 AA", erase=[(BASE, 0x20000)]), "app.vbf")
    assert image.format == "vbf" and image.segments == tuple(SEGMENTS)
    assert image.header["sw_part_number"] == "32184521 AA" and image.header["sw_part_type"] == "EXE"
    assert image.erase == ((BASE, 0x20000),)


def test_anything_else_is_a_raw_binary() -> None:
    assert read_image(b"\x7fELF" + bytes(100)).format == "binary"
    assert read_image(b":not hex \xff").format == "binary"  # not text: a binary that starts with a colon


@pytest.mark.parametrize("damage, message", [
    (lambda v: v[:-3] + bytes((v[-3] ^ 1,)) + v[-2:], "VBF block 1 at 0x8010000: checksum"),
    (lambda v: v[:-100], "VBF block 1 at 0x8010000 announces 5000 bytes; the file ends first"),
    (lambda v: v.replace(b"file_checksum = 0x", b"file_checksum = 0x1"), "VBF file checksum"),
    (lambda v: v.replace(b"header {", b"header ["), "VBF without a header"),
])
def test_a_damaged_vbf_is_refused_naming_what_is_wrong(damage: Any, message: str) -> None:
    with pytest.raises(ImageError, match=message.replace("(", r"\(")):
        read_image(damage(write_vbf(SEGMENTS, "P1")), "app.vbf")


def test_a_broken_hex_record_is_refused() -> None:
    text = _hex(SEGMENTS)
    broken = text[:20] + (b"0" if text[20:21] != b"0" else b"1") + text[21:]
    with pytest.raises(ImageError, match="not a valid Intel HEX file"):
        read_image(broken, "app.hex")


@pytest.fixture
def sim(tmp_path: Path, write_config: Any, procs: list[Proc]) -> Path:
    config = write_config({
        "segments": {"pt": {"bus": multicast_bus()}},
        "gateway": {"results_dir": str(tmp_path / "gw")},
        "ecus": {"vcu": ecu_entry("vcu", 0x7E0, 0x7E8, "pt") | {"compression": {"zlib": 1}, "memory": {
            "address": BASE, "size": 0x40000,
            "blocks": [{"address": BASE, "size": 0x10000, "number": 0}, {"address": BASE + 0x10000, "size": 0x30000,
                                                                         "number": 1}]}}},
    })
    procs.append(Proc("ecu-sim", "-c", str(config), "--state-dir", str(tmp_path / "state"), log=tmp_path / "sim.log"))
    procs[-1].wait_ready("ecu-sim ready")
    return config


@pytest.mark.slow
@pytest.mark.parametrize("name, make", [("app.hex", lambda: _hex(SEGMENTS)), ("app.vbf", lambda: write_vbf(SEGMENTS, "P1"))])
def test_a_multi_segment_image_is_flashed_block_by_block(sim: Path, tmp_path: Path, name: str, make: Any) -> None:
    (tmp_path / name).write_bytes(make())
    out = tmp_path / "out"
    run = vota("flash", "-c", str(sim), "--out", str(out), "--json", "--no-progress", f"vcu={tmp_path / name}@3.0.0")
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(run.stdout)[0]
    assert (result["result"], result["version_after"], result["image_size"]) == ("success", "3.0.0", 14_000)
    assert [(b["number"], b["address"], b["size"]) for b in result["blocks"]] == [(0, BASE, 9000), (1, BASE + 0x10000, 5000)]
    assert all(b["compression"] == "zlib" and b["bytes_transferred"] < b["size"] for b in result["blocks"])
    assert result["bytes_transferred"] == sum(b["bytes_transferred"] for b in result["blocks"])
    bank = FlashBanks(tmp_path / "state" / "vcu", "?").active_image()  # every block read back where it belongs
    for address, data in SEGMENTS:
        assert bank[address - BASE : address - BASE + len(data)] == data
    trace = read_trace(out / "vcu.trace.jsonl")
    erases = [x.header.hex() for x in trace.exchanges if x.header[:4] == b"\x31\x01\xff\x00"]
    downloads = [x for x in trace.exchanges if x.service == 0x34]
    checks = [x for x in trace.exchanges if x.header[:4] == b"\x31\x01\x02\x02"]
    assert len(erases) == len(downloads) == len(checks) == 2
    assert all(x.response is not None and x.response[-1:] == b"\x00" for x in checks)
    assert json.loads(vota("diagnose", "--json", "-", str(out)).stdout)["findings"] == []


@pytest.mark.slow
def test_a_corrupted_vbf_block_is_refused_before_anything_is_erased(sim: Path, tmp_path: Path) -> None:
    vbf = bytearray(write_vbf(SEGMENTS, "P1"))
    vbf[-2] ^= 0xFF  # the last block's CRC
    (tmp_path / "bad.vbf").write_bytes(bytes(vbf))
    before = FlashBanks(tmp_path / "state" / "vcu", "?").active_image()
    run = vota("flash", "-c", str(sim), "--out", str(tmp_path / "out"), "--no-progress", f"vcu={tmp_path / 'bad.vbf'}@3.0.0")
    assert run.returncode == 2 and "VBF block 1" in run.stderr and "checksum" in run.stderr
    assert not (tmp_path / "out").exists()  # nothing went on the bus: no trace, no result
    meta = json.loads((tmp_path / "state" / "vcu" / "meta.json").read_text())
    assert meta["banks"]["b"]["state"] == "empty" and FlashBanks(tmp_path / "state" / "vcu", "?").active_image() == before



def test_vbf_numbers_may_be_decimal_with_leading_zeros() -> None:
    """Found by fuzzing: ``{0x9000, 00000300}`` in the erase list stopped the reader."""
    vbf = write_vbf(SEGMENTS, "P1").replace(b"0x00002328}", b"00000300}", 1)
    assert read_image(vbf, "app.vbf").erase == ((BASE, 300), (BASE + 0x10000, 0x1388))


def test_a_segment_over_two_memory_blocks_is_split_at_their_bound() -> None:
    from agent.core.config import EcuConfig
    from agent.core.flash_profile import MemoryBlock
    from gateway.jobs import FlashJob

    ecu = EcuConfig("e", "pt", 1, 2, memory_address=0x1000, memory_size=0x300,
                    memory_blocks=(MemoryBlock(0x1000, 0x100, 1), MemoryBlock(0x1100, 0x200, 2)))
    job = FlashJob("e", b"", "1", segments=((0x10F0, bytes(range(48))),))  # adjacent blocks: one run of records
    assert [(b.number, b.address, b.data) for b in job.blocks(ecu)] == [(1, 0x10F0, bytes(range(16))),
                                                                        (2, 0x1100, bytes(range(16, 48)))]
    with pytest.raises(Exception, match="segment at 0x1300 lies outside e's memory map"):
        FlashJob("e", b"", "1", segments=((0x12F0, bytes(32)),)).blocks(ecu)
