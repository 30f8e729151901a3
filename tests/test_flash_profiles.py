"""Flash profiles as data (agent/core/flash_profile.py): the records they build, the checks,
the version they read, and the simulator's sequence written out in docs/flash-profiles.md."""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from typing import Any

import pytest
import yaml

from agent.core.config import EcuConfig, parse_vehicle_config
from agent.core.config._profile import parse_profiles
from agent.core.config._values import _Section
from agent.core.diagnosis import check_trace
from agent.core.diagnosis.rules import with_profile
from agent.core.flash_profile import RecordItem, VersionSpec, check_value, default_profile, profile_flow
from agent.errors import TraceFormatError
from tests.conftest import ROOT
from tests.test_foreign_ecu import ACME_PROFILE


def _profiles(data: dict[str, Any]) -> Any:
    return parse_profiles(_Section("test.yaml", "flash_profiles", data))


def test_the_simulator_profile_in_the_docs_is_the_built_in_one() -> None:
    text = (ROOT / "docs" / "flash-profiles.md").read_text()
    block = re.search(r"## The simulator's profile.*?```yaml\n(.*?)```", text, re.S)
    assert block is not None
    documented = _profiles(yaml.safe_load(block.group(1))["flash_profiles"])["my-sim-copy"]
    built_in = default_profile(EcuConfig("vcu", "pt", 0x7E0, 0x7E8))
    assert dataclasses.replace(documented, name="vota-sim") == built_in


def test_records_are_built_from_named_fields() -> None:
    acme = _profiles({"acme": ACME_PROFILE})["acme"]
    fingerprint = next(s for s in acme.pre if s.name == "fingerprint")
    ctx = acme.context(version="2.1.0", today=dt.date(2026, 12, 5))
    assert fingerprint.payload(ctx).hex() == "2ef184" + "0a0b" + "261205" + b"2.1.0".ljust(16).hex()
    erase = acme.block[0]
    assert erase.payload(acme.context(block=2)).hex() == "3101ff0002"
    check = acme.block[2]
    data = b"123456789"
    assert check.payload(acme.context(block=1, check=check_value("crc16", data))).hex() == "31010202" + "01" + "29b1"
    comm = next(s for s in acme.pre if s.name == "comm_off")
    assert comm.payload(ctx).hex() == "288301"  # suppressPosRsp bit set


def test_numbers_keep_their_low_bytes_and_text_its_start() -> None:
    ctx = default_profile(EcuConfig("x", "pt", 1, 2)).context(address=0x12345678, version="1.2.3-rc1")
    assert RecordItem(field="address", length=2).encode(ctx) == b"\x56\x78"
    assert RecordItem(field="version", length=4, align="left").encode(ctx) == b"1.2."
    assert RecordItem(field="version", length=12, pad=b" ", align="left").encode(ctx) == b"1.2.3-rc1   "


@pytest.mark.parametrize("algorithm, value", [("crc16", "29b1"), ("crc32", "cbf43926"), ("none", "")])
def test_check_algorithms_match_their_published_check_values(algorithm: str, value: str) -> None:
    assert check_value(algorithm, b"123456789").hex() == value


def test_a_padded_fixed_length_version_reads_as_the_version() -> None:
    spec = VersionSpec(length=16)
    assert spec.decode(b"2.1.0" + b" " * 11) == "2.1.0"
    assert VersionSpec(length=7).decode(b"2.1.0\x00\x00" + b"garbage after the DID") == "2.1.0"


def test_the_flow_lets_optional_steps_out_and_blocks_repeat() -> None:
    acme = _profiles({"acme": ACME_PROFILE})["acme"]
    flow = profile_flow(acme)["flow"]
    assert set(flow["check_preconditions"]) == {"8502", "2883", "1002", "31010203"}  # optional/functional skippable
    assert flow["check_block"]["3101ff00"] == "erase_block"  # the next block
    assert flow["check_dependencies"] == {"1101": "reset", "3101ff01": "check_dependencies"}
    assert flow["unlock:seed"]["2712"] == "unlock"


def test_a_header_with_a_broken_profile_is_a_trace_error() -> None:
    from agent.adapters.diagnosis_files import load_rules

    stage = load_rules().stages["flash"]
    with pytest.raises(TraceFormatError, match="no state 'nowhere'"):
        with_profile(stage, {"flow": {"start": {"10": "nowhere"}}, "subfunctions": {}})
    with pytest.raises(TraceFormatError, match="cannot be read"):
        with_profile(stage, {"flow": "x"})
    assert check_trace  # the checker applies it to flash traces whose header declares a profile


def test_an_ecu_with_a_memory_map_and_a_profile(tmp_path: Any) -> None:
    config = parse_vehicle_config({
        "segments": {"pt": {"bus": {"interface": "virtual"}}},
        "flash_profiles": {"acme": ACME_PROFILE},
        "ecus": {"a": {"segment": "pt", "request_id": 1, "response_id": 2, "profile": "acme",
                       "memory": {"blocks": [{"address": 16, "size": 32, "number": 7}]}}},
    })
    ecu = config.ecu("a")
    assert ecu.flash_profile.name == "acme" and ecu.memory_map[0].number == 7
    with pytest.raises(Exception, match=r"ecus\.a\.profile: unknown flash profile 'nope' \(known: vota-sim, acme\)"):
        parse_vehicle_config({"segments": {"pt": {"bus": {"interface": "virtual"}}}, "flash_profiles": {"acme": ACME_PROFILE},
                              "ecus": {"a": {"segment": "pt", "request_id": 1, "response_id": 2, "profile": "nope"}}})


@pytest.mark.parametrize("change, why", [
    (lambda p: p["steps"]["pre"].append({"name": "w", "service": 0x2E, "did": 1,
                                         "record": [{"field": "version", "length": 2**34}]}),
     r"record\[0\]\.length: expected .*outside 1\.\.4095"),
    (lambda p: p.update(version={"did": 0xF189, "length": 10**12}), r"version\.length: expected .*outside 0\.\.4092"),
])
def test_a_length_no_uds_message_carries_is_refused_before_anything_is_built(change: Any, why: str) -> None:
    """Found by the flash-profiles fuzzing: a field 2**34 bytes long was built (the process died of memory)."""
    import copy

    from agent.errors import ConfigError

    profile = copy.deepcopy(ACME_PROFILE)
    change(profile)
    with pytest.raises(ConfigError, match=why):
        parse_vehicle_config({"segments": {"pt": {"bus": {"interface": "virtual"}}}, "flash_profiles": {"acme": profile},
                              "ecus": {"a": {"segment": "pt", "request_id": 1, "response_id": 2, "profile": "acme"}}})


@pytest.mark.slow
def test_an_ecu_that_answers_but_refuses_its_version_is_in_boot_mode(tmp_path: Any, write_config: Any, procs: list[Any]) -> None:
    """The bootloader runs (no valid application): it answers every read, refusing them. That
    is reported as boot mode, reachable, not as an ECU that is silent."""
    import json

    from tests.conftest import Proc, ecu_entry, multicast_bus, vota

    config = write_config({"segments": {"pt": {"bus": multicast_bus()}},
                           "ecus": {"vcu": ecu_entry("vcu", 0x7E0, 0x7E8), "bms": ecu_entry("bms", 0x7E1, 0x7E9)}})
    procs.append(Proc("ecu-sim", "-c", str(config), "--state-dir", str(tmp_path / "state"), "--fault", "vcu:22:nrc=0x22",
                      log=tmp_path / "sim.log"))
    procs[-1].wait_ready("ecu-sim ready")
    run = vota("versions", "-c", str(config), "--json")
    assert run.returncode == 0, run.stdout + run.stderr
    found = {e["ecu"]: e for e in json.loads(run.stdout)}
    assert (found["vcu"]["reachable"], found["vcu"].get("mode"), found["vcu"]["software_version"]) == (True, "boot", None)
    assert found["bms"]["software_version"] == "1.0.0" and "mode" not in found["bms"]
    table = vota("versions", "-c", str(config)).stdout
    assert "(boot mode)" in next(line for line in table.splitlines() if line.startswith("vcu"))
