"""The compression bootloaders decode (agent/protocol/compression.py): heatshrink's LZSS and
LZMA with a bounded dictionary, end to end into the simulator; and the delta path sending
whichever is smaller, the patch or the compressed full image."""

from __future__ import annotations

import json
import lzma
from pathlib import Path
from typing import Any

import pytest

from agent.core.config import parse_vehicle_config
from agent.errors import ConfigError
from agent.protocol.compression import METHODS, Params, compress, decoder_ram, decompressor
from ecu_sim.flash_banks import FlashBanks
from tests.conftest import Proc, ecu_entry, firmware_like, multicast_bus, next_release, vota

IMAGE = firmware_like(200_000)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_streams_back_to_the_image(method: str) -> None:
    packed = compress(method, IMAGE)
    unpack, out = decompressor(method, len(IMAGE)), b""
    for at in range(0, len(packed), 4093):  # as TransferData blocks arrive
        out += unpack.feed(packed[at : at + 4093], len(IMAGE) - len(out))
    assert out == IMAGE and unpack.finished and len(packed) < len(IMAGE)


def test_lzma_announces_a_dictionary_a_bootloader_can_hold() -> None:
    header = compress("lzma", IMAGE)[:13]  # .lzma: properties, dictionary size (LE), size
    assert int.from_bytes(header[1:5], "little") == 64 * 1024
    small = compress("lzma", IMAGE, Params(lzma_dict_size=16 * 1024))
    assert int.from_bytes(small[1:5], "little") == 16 * 1024
    assert lzma.decompress(small, format=lzma.FORMAT_ALONE) == IMAGE


def test_a_truncated_lzss_stream_is_not_finished() -> None:
    packed = compress("lzss", IMAGE)
    unpack = decompressor("lzss", len(IMAGE))
    assert len(unpack.feed(packed[:-50], len(IMAGE))) < len(IMAGE) and not unpack.finished


def test_decoder_ram_per_method() -> None:
    assert decoder_ram("lzss") == 2048 + 32 and decoder_ram("lzss", Params(lzss_window_bits=8)) == 256 + 32
    assert decoder_ram("lzma") == 64 * 1024 + 15980 and decoder_ram("zlib") == 39 * 1024


@pytest.mark.parametrize("params, key", [({"lzss_window_bits": 16}, "compression_params.lzss_window_bits"),
                                         ({"lzss_lookahead_bits": 11}, "compression_params.lzss_lookahead_bits"),
                                         ({"lzma_dict_kib": 2}, "compression_params.lzma_dict_kib"),
                                         ({"zstd_level": 2}, "compression_params.zstd_level")])
def test_compression_params_are_checked(params: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=f"ecus.e.{key}"):
        parse_vehicle_config({"segments": {"pt": {"bus": {"interface": "virtual"}}},
                              "ecus": {"e": {"segment": "pt", "request_id": 1, "response_id": 2, "compression_params": params}}})


@pytest.fixture
def sim(tmp_path: Path, write_config: Any, procs: list[Proc]) -> Path:
    config = write_config({
        "segments": {"pt": {"bus": multicast_bus()}},
        "gateway": {"results_dir": str(tmp_path / "gw")},
        "ecus": {
            "small": ecu_entry("small", 0x7E0, 0x7E8, accept_compression=["lzss"]) | {
                "compression": {"lzma": 2, "lzss": 3}, "compression_params": {"lzss_window_bits": 10, "lzma_dict_kib": 32}},
            "vcu": ecu_entry("vcu", 0x7E1, 0x7E9) | {"compression": {"lzma": 2}, "delta": 8},
        },
    })
    procs.append(Proc("ecu-sim", "-c", str(config), "--state-dir", str(tmp_path / "state"), log=tmp_path / "sim.log"))
    procs[-1].wait_ready("ecu-sim ready")
    return config


def _flash(config: Path, tmp: Path, ecu: str, image: bytes, version: str, *extra: str) -> dict[str, Any]:
    (tmp / f"{version}.bin").write_bytes(image)
    run = vota("flash", "-c", str(config), "--out", str(tmp / version), "--json", "--no-progress", *extra,
               f"{ecu}={tmp / f'{version}.bin'}@{version}")
    assert run.returncode == 0, run.stdout + run.stderr
    return json.loads(run.stdout)[0]  # type: ignore[no-any-return]


@pytest.mark.slow
def test_lzss_goes_where_lzma_is_refused(sim: Path, tmp_path: Path) -> None:
    result = _flash(sim, tmp_path, "small", IMAGE, "2.0.0")
    assert (result["compression"], result["compression_refused"]) == ("lzss", ["lzma"])
    assert result["bytes_transferred"] == len(compress("lzss", IMAGE, Params(lzss_window_bits=10)))
    assert FlashBanks(tmp_path / "state" / "small", "?").active_image() == IMAGE


@pytest.mark.slow
def test_the_delta_goes_only_when_it_is_smaller_than_the_compressed_image(sim: Path, tmp_path: Path) -> None:
    base = IMAGE[::-1]  # a rebuild that moved everything: the patch is larger than the image compressed
    _flash(sim, tmp_path, "vcu", base, "1.1.0")
    (tmp_path / "base.bin").write_bytes(base)
    full = _flash(sim, tmp_path, "vcu", IMAGE, "2.0.0", "--delta-from", f"vcu={tmp_path / 'base.bin'}")
    assert (full["image_sent"], full["compression"]) == ("full", "lzma")
    assert full["delta_choice"].startswith("full: the lzma-compressed image (") and "smaller than the patch" in full["delta_choice"]
    assert FlashBanks(tmp_path / "state" / "vcu", "?").active_image() == IMAGE
    (tmp_path / "prev.bin").write_bytes(IMAGE)
    release = next_release(IMAGE)  # a few changed bytes: the patch is far smaller
    small = _flash(sim, tmp_path, "vcu", release, "2.0.1", "--delta-from", f"vcu={tmp_path / 'prev.bin'}")
    assert small["image_sent"] == "delta" and small["delta_choice"].startswith("delta: the patch (")
    assert small["bytes_transferred"] < full["bytes_transferred"] // 10
    assert FlashBanks(tmp_path / "state" / "vcu", "?").active_image() == release
