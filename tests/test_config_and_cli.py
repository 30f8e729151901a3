"""Bad input of every kind gets one clear line naming the problem, and a meaningful exit code."""

from __future__ import annotations

import pytest

from agent.adapters.config_files import load_vehicle_config
from agent.core.config import parse_vehicle_config
from agent.core.faults import FaultCounter, parse_fault
from agent.errors import ConfigError, UsageError
from tests.conftest import ecu_entry, multicast_bus, virtual_bus, vota

GOOD = {
    "segments": {"pt": {"bus": {"interface": "virtual", "channel": "x"}}},
    "ecus": {"vcu": {"segment": "pt", "request_id": 0x7E0, "response_id": 0x7E8}},
}


def test_sample_config_loads():
    config = load_vehicle_config("configs/bench.yaml")
    assert set(config.ecus) == {"vcu", "bms", "bcm", "dlp_headlamp"}
    assert config.segments["powertrain"].bus["interface"] == "udp_multicast"
    assert config.ecu("bms").check_memory == "sha256"
    content = config.tbox_config().content
    assert dict(content.targets)["boot_animation"] == "bcm" and content.night == ("19:00", "06:00")


@pytest.mark.parametrize("content, key, words", [
    ({"targets": {"tail_light": "rear_lamp"}}, "tbox.content.targets.tail_light", "unknown ECU 'rear_lamp'"),
    ({"light_sensor": {"ecu": "bcm"}}, "tbox.content.light_sensor.ecu", "unknown ECU 'bcm'"),
    ({"night": {"from": "7pm"}}, "tbox.content.night.from", "HH:MM"),
    ({"tick_ms": 0}, "tbox.content.tick_ms", "positive"),
    ({"vehicle_keys": "k"}, "tbox.content.vehicle_keys", "unknown key"),
])
def test_content_config_errors_name_the_key(content, key, words):
    import copy

    data = copy.deepcopy(GOOD)
    data["tbox"] = {"vin": "V", "trusted_keys": ["k.pub"], "content": content}
    with pytest.raises(ConfigError) as err:
        parse_vehicle_config(data, "vehicle.yaml")
    assert err.value.key == key and words in str(err.value), str(err.value)


@pytest.mark.parametrize("mutate, key, words", [
    (lambda d: d["ecus"]["vcu"].update(reqest_id=1), "ecus.vcu.reqest_id", "unknown key"),
    (lambda d: d["ecus"]["vcu"].pop("request_id"), "ecus.vcu.request_id", "missing"),
    (lambda d: d["ecus"]["vcu"].update(request_id="seven"), "ecus.vcu.request_id", "expected a CAN id"),
    (lambda d: d["ecus"]["vcu"].update(segment="body"), "ecus.vcu.segment", "unknown segment 'body'"),
    (lambda d: d["segments"]["pt"].update(tx_data_length=9), "segments.pt.tx_data_length", "expected 8"),
    (lambda d: d["segments"]["pt"]["bus"].pop("interface"), "segments.pt.bus.interface", "missing"),
    (lambda d: d["segments"]["pt"].update(bitrate="fast"), "segments.pt.bitrate", "bit/s"),
    (lambda d: d["ecus"]["vcu"].update(check_memory="md5"), "ecus.vcu.check_memory", "crc32 or sha256"),
    (lambda d: d["ecus"]["vcu"].update(sim={"erase_ms": -1}), "ecus.vcu.sim.erase_ms", "negative"),
    (lambda d: d["ecus"].update(bms={"segment": "pt", "request_id": 0x7E8, "response_id": 0x7F0}),
     "ecus.bms.request_id", "already used by vcu"),
    (lambda d: d.update(gatway={}), "gatway", "unknown key"),
    (lambda d: d["ecus"]["vcu"].update(delta=16), "ecus.vcu.delta", "outside 1..15"),
    (lambda d: d["ecus"]["vcu"].update(delta=1, compression={"zlib": 1}), "ecus.vcu.delta", "already a compression"),
    (lambda d: d["ecus"]["vcu"].update(sim={"accept_delta": "yes"}), "ecus.vcu.sim.accept_delta", "true/false"),
    (lambda d: d.update(gateway={"arrival_idle_s": 0}), "gateway.arrival_idle_s", "greater than 0"),
    (lambda d: d["segments"]["pt"].update(isotp_backend="kernel"), "segments.pt.isotp_backend", "need interface socketcan"),
    (lambda d: d["segments"]["pt"].update(isotp_backend="fpga"), "segments.pt.isotp_backend", "python or kernel"),
    (lambda d: d.update(tbox={"vin": "V", "trusted_keys": ["k"], "preconditions": {"ecu": "abs"}}),
     "tbox.preconditions.ecu", "unknown ECU 'abs'"),
    (lambda d: d.update(tbox={"vin": "V", "trusted_keys": ["k"], "preconditions": {"charging": "sometimes"}}),
     "tbox.preconditions.charging", "allowed or forbidden"),
    (lambda d: d.update(tbox={"vin": "V", "trusted_keys": ["k"], "preconditions": {"min_soc": "lots"}}),
     "tbox.preconditions.min_soc", "not a number"),
    (lambda d: d.update(tbox={"vin": "V", "trusted_keys": ["k"], "preconditions": {"recheck_s": 0}}),
     "tbox.preconditions.recheck_s", "greater than 0"),
    (lambda d: d["segments"]["pt"].update(isotp_backend="kernel", bitrate=500000, bus={"interface": "socketcan", "channel": "vcan9"}),
     "segments.pt.bitrate", "own timing"),
])
def test_config_errors_name_the_key(mutate, key, words):
    import copy

    data = copy.deepcopy(GOOD)
    mutate(data)
    with pytest.raises(ConfigError) as err:
        parse_vehicle_config(data, "vehicle.yaml")
    assert err.value.key == key
    assert words in str(err.value) and str(err.value).startswith("vehicle.yaml: ")


def test_bitrate_forms():
    data = {**GOOD, "segments": {"pt": {"bus": {"interface": "virtual"}, "bitrate": "500000/2000000", "tx_data_length": 64}}}
    assert parse_vehicle_config(data).segments["pt"].bitrate == (500000, 2000000)


@pytest.mark.parametrize("spec, expect", [
    ("bms:36#5:nrc=0x72", ("flash", "bms", 0x36, 5, False, "nrc", 0x72)),
    ("flash:bms:0x31:delay=6000", ("flash", "bms", 0x31, None, False, "delay", 6000)),
    ("*:36#3+:drop", ("flash", "*", 0x36, 3, True, "drop", None)),
    ("vcu:27#2:wrong_id=0x6F0", ("flash", "vcu", 0x27, 2, False, "wrong_id", 0x6F0)),
    ("activate:bcm:31#2:not_sent", ("activate", "bcm", 0x31, 2, False, "not_sent", None)),
    ("link:GW:31#3+:bad_length", ("link", "GW", 0x31, 3, True, "bad_length", None)),
])
def test_fault_specs(spec, expect):
    f = parse_fault(spec)
    assert (f.stage, f.target, f.service, f.occurrence, f.and_later, f.action, f.arg) == expect


@pytest.mark.parametrize("spec, words", [
    ("bms:36", "expected"),
    ("bms:36:explode", "action 'explode'"),
    ("bms:zz:drop", "service 'zz'"),
    ("bms:36#0:drop", "counts from 1"),
    ("bms:36:nrc", "needs a value"),
    ("cloud:bms:36:drop", "stage 'cloud'"),
    ("bms:99:drop", "0x99 is not a UDS request service .* would never fire"),  # no step sends it
    ("deploy:GW:34:drop", "0x34 is not one of the deploy link's services"),  # the deploy link uses 0x38
    ("activate:bcm:31#4:nrc=0x22", "give it as a flash-stage fault"),  # the ECU counts across stages
    ("link:GW:31#2:delay=1500", "give it as a deploy-stage fault"),  # the gateway's server answers the link
    ("link:GW:34:not_sent", "0x34 is not one of the deploy link's services"),
])
def test_bad_fault_specs(spec, words):
    with pytest.raises(UsageError, match=words):
        parse_fault(spec)


def test_fault_occurrences():
    counter = FaultCounter([parse_fault("x:36#2:drop"), parse_fault("x:31#2+:malformed")])
    assert [bool(counter.next(0x36, "x")) for _ in range(4)] == [False, True, False, False]
    assert [bool(counter.next(0x31, "x")) for _ in range(4)] == [False, True, True, True]
    assert counter.next(0x36, "y") is None and counter.next(0x36, "x") is None  # 5th for x; y never counts


def _one_line_error(run, *words):
    assert run.returncode == 2, (run.returncode, run.stderr)
    assert "Traceback" not in run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, run.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_cli_missing_config():
    _one_line_error(vota("versions", "-c", "nope.yaml"), "nope.yaml", "file not found")


def test_cli_broken_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("segments: [\n  pt: {")
    _one_line_error(vota("ecu-sim", "-c", str(bad)), "bad.yaml", "broken YAML", "line")


def test_cli_wrong_key(tmp_path, write_config):
    data = {"segments": {"pt": {"bus": multicast_bus()}}, "ecus": {"vcu": ecu_entry("vcu", 0x7E0, 0x7E8) | {"colour": 1}}}
    _one_line_error(vota("flash", "-c", str(write_config(data)), "vcu=x.bin"), "ecus.vcu.colour", "unknown key")


def test_cli_unknown_ecu_and_missing_image(tmp_path, write_config):
    config = str(write_config({"segments": {"pt": {"bus": multicast_bus()}}, "ecus": {"vcu": ecu_entry("vcu", 0x7E0, 0x7E8)}}))
    _one_line_error(vota("flash", "-c", config, f"abs={tmp_path}/x.bin"), "unknown ECU 'abs'", "vcu")
    _one_line_error(vota("flash", "-c", config, f"vcu={tmp_path}/x.bin"), "x.bin", "not found")
    _one_line_error(vota("flash", "-c", config, "vcu"), "ECU=IMAGE")
    _one_line_error(vota("ecu-sim", "-c", config, "--fault", "vcu:36:boom"), "boom")
    _one_line_error(vota("bench", "-c", config, "--ecu", "nope"), "unknown ECU 'nope'")


def test_cli_help_lists_commands():
    run = vota("--help")
    assert run.returncode == 0
    for command in ("ecu-sim", "flash", "versions", "bench"):
        assert command in run.stdout
    run = vota("flash", "--help")
    assert "ECU=IMAGE[@VERSION]" in run.stdout


def test_versions_reports_a_silent_ecu(write_config):
    config = str(write_config({"segments": {"pt": {"bus": multicast_bus()}}, "ecus": {"vcu": ecu_entry("vcu", 0x7E0, 0x7E8)}}))
    run = vota("versions", "-c", config)
    assert run.returncode == 1
    assert "(no response)" in run.stdout and "Traceback" not in run.stderr


def test_bus_timing_emulation_parameters():
    from agent.adapters.canbus import Segment, frame_time, isotp_params, physical_goodput
    from agent.core.config import SegmentConfig

    off = isotp_params(SegmentConfig("s", {"interface": "virtual"}))
    assert "rate_limit_enable" not in off and off["blocking_send"] and off["tx_data_length"] == 8
    # the pacing is the segment's own (BusClock), never can-isotp's rate limiter
    classic = isotp_params(SegmentConfig("s", {"interface": "virtual"}, bitrate=(500000, None)))
    assert "rate_limit_enable" not in classic
    segment = Segment(SegmentConfig("s", virtual_bus(), bitrate=(500000, None)))
    try:
        assert segment.clock is not None and segment.clock.nominal == 500000
    finally:
        segment.shutdown()
    assert 115 / 500000 < frame_time(8, 500000) < 117 / 500000  # ~116 bits with stuffing
    assert round(physical_goodput(8, 500000) / 1024, 1) == 29.5
    assert round(physical_goodput(64, 500000, 2000000) / 1024) == 179


def test_ecu_sim_refuses_corrupt_bank_metadata(tmp_path, write_config):
    config = str(write_config({"segments": {"pt": {"bus": multicast_bus()}}, "ecus": {"vcu": ecu_entry("vcu", 0x7E0, 0x7E8)}}))
    meta = tmp_path / "state" / "vcu" / "meta.json"
    meta.parent.mkdir(parents=True)
    meta.write_text('{"active": "a", "banks": ')
    run = vota("ecu-sim", "-c", config, "--state-dir", str(tmp_path / "state"), timeout=30)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert "meta.json: unreadable flash bank metadata" in run.stderr
    assert meta.read_text() == '{"active": "a", "banks": '  # evidence kept, nothing overwritten


def test_bad_input_files_end_in_one_line_and_exit_2(tmp_path, write_config):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\x00\xff\xfe\x01 not text")
    run = vota("versions", "-c", str(binary))
    assert run.returncode == 2 and run.stderr.strip() == f"vota versions: error: {binary}: not UTF-8 text (byte 1): a binary file?"
    bad_bus = write_config({"segments": {"pt": {"bus": {"interface": "udp_multicast", "channel": "no-such-group", "port": 1}}},
                            "ecus": {"vcu": ecu_entry("vcu", 0x7E0, 0x7E8)}}, "bad_bus.yaml")
    run = vota("versions", "-c", str(bad_bus))
    assert run.returncode == 2 and "segment pt: bus: cannot open CAN bus" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    key, campaign = tmp_path / "key.pem", tmp_path / "c.json"
    key.write_text("not a key\n")
    campaign.write_text('{"campaign_id": "c-1"}')
    run = vota("campaign", "sign", "--key", str(key), str(campaign))
    assert run.returncode == 2 and f"{key}: not a PEM private key" in run.stderr and "Traceback" not in run.stderr
    run = vota("--version")
    assert run.returncode == 0 and run.stdout.startswith("vota ")


def test_a_fault_spec_that_cannot_apply_is_refused(write_config):
    config = str(write_config({"segments": {"pt": {"bus": multicast_bus()}}, "deploy": {"segment": "pt"},
                               "ecus": {"vcu": ecu_entry("vcu", 0x7E0, 0x7E8)}}))
    run = vota("ecu-sim", "-c", config, "--fault", "bms:36:drop")  # no such ECU: it would do nothing
    assert run.returncode == 2 and "fault spec 'bms:36:drop': no ECU 'bms' here (ECUs: vcu)" in run.stderr
    run = vota("ecu-sim", "-c", config, "--fault", "vcu:36:not_sent")  # the client's fault, given to the server
    assert run.returncode == 2 and "is injected by the gateway" in run.stderr and "Traceback" not in run.stderr
    run = vota("gateway", "-c", config, "--fault", "vcu:36:drop")
    assert run.returncode == 2 and "is injected by the ECU simulator (vota ecu-sim --fault), not by vota gateway" in run.stderr
    run = vota("gateway", "-c", config, "--fault", "link:GW:31:not_sent")  # the TBOX's calls, given to the gateway
    assert run.returncode == 2 and "is injected by the TBOX (vota tbox --fault), not by vota gateway" in run.stderr
    run = vota("flash", "-c", config, "--fault", "activate:vcu:31:not_sent", f"vcu={config}@1")  # it activates nothing
    assert run.returncode == 2 and "is injected by the gateway (vota gateway --fault), not by vota flash" in run.stderr


def test_a_place_that_cannot_be_written_is_bad_usage_said_before_the_bus_is_touched(tmp_path, write_config):
    """An output or state directory that cannot be written is the command line's fault (exit 2,
    one line naming the option), found before any bus is opened: nothing is flashed, deployed or
    simulated first. A timeout that is not above 0 is refused by the parser."""
    config = str(write_config({"segments": {"pt": {"bus": virtual_bus()}}, "deploy": {"segment": "pt"},
                               "ecus": {"vcu": ecu_entry("vcu", 0x7E0, 0x7E8)}}))
    image = tmp_path / "img.bin"
    image.write_bytes(b"x" * 64)
    for command in (["ecu-sim", "-c", config, "--state-dir", "/proc/vota-test"],
                    ["flash", "-c", config, "--no-progress", "--out", "/proc/vota-test", f"vcu={image}@2.0"],
                    ["deploy", "-c", config, "--no-progress", "--out", "/proc/vota-test", str(image)],
                    ["fleet", "diagnose", str(tmp_path), "--out", "/proc/vota-test"],
                    ["flash", "-c", config, "--capture", "/proc/vota-test", f"vcu={image}@2.0"]):
        run = vota(*command, timeout=20)
        option = "--capture" if "--capture" in command else "--state-dir" if "--state-dir" in command else "--out"
        assert run.returncode == 2 and "Traceback" not in run.stderr, (command, run.stderr)
        (line,) = run.stderr.strip().splitlines()
        assert line.startswith(f"vota {command[0]}: error: {option} /proc/vota-test: "), line
        assert "vcu" not in run.stdout  # no bus was talked to, no result printed
    for bad in ("-1", "0", "soon"):
        run = vota("bench", "--timeout", bad)
        assert run.returncode == 2 and "--timeout" in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_bus_settings_take_interface_names_from_the_environment(monkeypatch):
    """One vehicle.yaml for vehicles whose CAN interfaces are named differently: systemd's
    EnvironmentFile (configs/systemd/vota.env) sets the names."""
    data = {"segments": {"bb": {"bus": {"interface": "socketcan", "channel": "${VOTA_CAN_BACKBONE:-can0}"}},
                         "pt": {"bus": {"interface": "udp_multicast", "channel": "239.9.${VOTA_T_GROUP}.1",
                                        "port": "${VOTA_T_PORT:-43000}"}}}}
    monkeypatch.delenv("VOTA_CAN_BACKBONE", raising=False)
    monkeypatch.delenv("VOTA_T_PORT", raising=False)
    monkeypatch.setenv("VOTA_T_GROUP", "7")
    config = parse_vehicle_config(data, "v.yaml")
    assert config.segments["bb"].bus == {"interface": "socketcan", "channel": "can0"}
    assert config.segments["pt"].bus == {"interface": "udp_multicast", "channel": "239.9.7.1", "port": 43000}
    monkeypatch.setenv("VOTA_CAN_BACKBONE", "can3")
    monkeypatch.setenv("VOTA_T_PORT", "5000")
    config = parse_vehicle_config(data, "v.yaml")
    assert config.segments["bb"].bus["channel"] == "can3" and config.segments["pt"].bus["port"] == 5000
    monkeypatch.delenv("VOTA_T_GROUP")
    with pytest.raises(ConfigError, match=r"v.yaml: segments.pt.bus.channel: environment variable VOTA_T_GROUP is not set"):
        parse_vehicle_config(data, "v.yaml")
    broken = {"segments": {"bb": {"bus": {"interface": "socketcan", "channel": "${VOTA_CAN_BACKBONE"}}}}
    with pytest.raises(ConfigError, match=r"segments.bb.bus.channel: expected \$\{NAME\} or"):
        parse_vehicle_config(broken, "v.yaml")


def test_the_shipped_environment_file_names_what_the_units_use():
    from pathlib import Path

    from tests.conftest import ROOT

    base = Path(ROOT) / "configs" / "systemd"
    env = dict(line.split("=", 1) for line in (base / "vota.env").read_text().splitlines()
               if line.strip() and not line.startswith("#"))
    assert env["VOTA_CONFIG"] == "/etc/vota/vehicle.yaml" and env["VOTA_CAN_BACKBONE"] == "can0"
    for unit in ("vota-gateway.service", "vota-tbox.service"):
        text = (base / unit).read_text()
        assert "EnvironmentFile=-/etc/vota/vota.env" in text and "-c ${VOTA_CONFIG}" in text
        assert "can0" not in text  # no interface name is written in a unit


def test_a_can_interface_that_is_not_there_yet_is_exit_1_not_a_configuration_error(write_config):
    import socket

    try:
        socket.socket(socket.AF_CAN, socket.SOCK_RAW, socket.CAN_RAW).close()
    except (OSError, AttributeError):
        pytest.skip("this kernel has no SocketCAN (AF_CAN): a missing interface cannot be told from a missing family")
    data = {"segments": {"bb": {"bus": {"interface": "socketcan", "channel": "vota-none0"}}},
            "ecus": {"vcu": ecu_entry("vcu", 0x7E0, 0x7E8, "bb")}}
    run = vota("versions", "-c", str(write_config(data)))
    assert run.returncode == 1 and "CAN interface 'vota-none0' does not exist (yet)" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr
