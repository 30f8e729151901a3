"""End to end across processes: ECU simulators and the gateway on udp_multicast."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from agent.adapters.trace_files import read_trace
from ecu_sim.flash_banks import FlashBanks
from tests.conftest import Proc, ecu_entry, firmware_like, multicast_bus, next_release, vota

pytestmark = pytest.mark.slow  # separate processes

MiB = 1024 * 1024




def _active_image(state: Path, ecu: str) -> bytes:
    return FlashBanks(state / ecu, "?").active_image()


def test_flash_three_ecus_in_separate_processes(tmp_path, write_config, procs):
    config = write_config({
        "segments": {
            "classic": {"bus": multicast_bus()},
            "fd": {"bus": multicast_bus(fd=True), "tx_data_length": 64},
        },
        "gateway": {"results_dir": str(tmp_path / "gw")},
        "ecus": {
            "vcu": ecu_entry("vcu", 0x7E0, 0x7E8, "classic"),
            "bms": ecu_entry("bms", 0x7E1, 0x7E9, "fd", max_block_length=0x4002) | {"check_memory": "sha256"},
            "adas": ecu_entry("adas", 0x7E2, 0x7EA, "fd", max_block_length=0x4002),
        },
    })
    state = tmp_path / "state"
    for ecu in ("vcu", "bms", "adas"):
        procs.append(Proc("ecu-sim", "-c", str(config), "--ecu", ecu, "--state-dir", str(state), log=tmp_path / f"{ecu}.log"))
    for p in procs:
        p.wait_ready("ecu-sim ready")
    images = {}
    args = []
    for ecu in ("vcu", "bms", "adas"):
        images[ecu] = os.urandom(MiB // 2)
        (tmp_path / f"{ecu}.bin").write_bytes(images[ecu])
        args.append(f"{ecu}={tmp_path / f'{ecu}.bin'}@2.1.{len(args)}")
    out = tmp_path / "flash"
    run = vota("flash", "-c", str(config), "--out", str(out), "--json", *args, timeout=300)
    assert run.returncode == 0, run.stderr
    results = {r["ecu"]: r for r in json.loads(run.stdout)}
    for i, ecu in enumerate(("vcu", "bms", "adas")):
        r = results[ecu]
        assert r["result"] == "success", r
        assert (r["version_before"], r["version_after"]) == ("1.0.0", f"2.1.{i}")
        assert r["bytes_transferred"] == MiB // 2
        assert r["trace_fraction"] < 0.02  # header-only: about 1 % of the image (more response-pending on a busy machine)
        assert _active_image(state, ecu) == images[ecu]  # read back from the ECU's active bank
        saved = json.loads((out / f"{ecu}.result.json").read_text())
        assert saved["result"] == "success" and saved["image_sha256"] == r["image_sha256"]
        trace = read_trace(out / f"{ecu}.trace.jsonl")
        services = [e.service for e in trace.exchanges]
        # the version read before flashing, then the programming sequence, then the read after the reset
        assert services[:8] == [0x22, 0x10, 0x85, 0x28, 0x10, 0x27, 0x27, 0x2E]
        assert (trace.exchanges[0].header, trace.exchanges[0].extra["step"]) == (b"\x22\xf1\x89", "version_before")
        assert (trace.exchanges[-1].header, trace.exchanges[-1].extra["step"]) == (b"\x22\xf1\x89", "verify")
        assert trace.exchanges[-1].response == b"\x62\xf1\x89" + r["version_after"].encode()
        transfers = [e for e in trace.exchanges if e.service == 0x36]
        block = 4093 if ecu == "vcu" else 0x4000
        assert len(transfers) == -(-(MiB // 2) // block)
        assert all(len(e.header) == 2 and e.length <= block + 2 for e in transfers)  # header only
        assert [e.header[1] for e in transfers[:3]] == [1, 2, 3]
        assert all(e.response == bytes((0x76, e.header[1])) for e in transfers)
        erase = next(e for e in trace.exchanges if e.header[:4] == b"\x31\x01\xff\x00")
        assert erase.extra.get("pend"), "erase must show its 0x78 response-pending"
        assert trace.trailer["exchanges"] == len(trace.exchanges) and trace.trailer["result"] == "success"
        if ecu == "vcu":  # the classic segment takes seconds: functional TesterPresent went out meanwhile
            assert len(trace.trailer["tester_present"]) >= 2
    inventory = vota("versions", "-c", str(config), "--json")
    assert inventory.returncode == 0, inventory.stderr
    versions = {e["ecu"]: e["software_version"] for e in json.loads(inventory.stdout)}
    assert versions == {"vcu": "2.1.0", "bms": "2.1.1", "adas": "2.1.2"}


FAULTS = {
    # ecu: (fault spec, failed step, reason fragment, where the trace shows it, diagnosed cause)
    "f_drop": ("f_drop:36#3:drop", "transfer_data", "no response", "no_response", "response_not_sent"),
    "f_late": ("f_late:34:delay=1600", "request_download", "no response", "late", "response_timeout"),
    "f_wrongid": ("f_wrongid:27#2:wrong_id=0x6F0", "security_access", "no response", "stray", "illegal_responder"),
    "f_malformed": ("f_malformed:37:malformed", "transfer_exit", "malformed", "response", "illegal_response_format"),
    "f_nrc": ("f_nrc:36#5:nrc=0x72", "transfer_data", "0x72", "response", "negative_response"),
    "f_mismatch": ("f_mismatch:36#4:mismatch", "transfer_data", "does not match", "response", "unmatched_response"),
}


def test_each_fault_kind_fails_at_the_right_step(tmp_path, write_config, procs):
    ecus = {}
    for i, name in enumerate(FAULTS):
        segment = "a" if i % 2 == 0 else "b"
        ecus[name] = ecu_entry(name, 0x700 + i, 0x710 + i, segment, faults=[FAULTS[name][0]])
    config = write_config({
        "segments": {"a": {"bus": multicast_bus()}, "b": {"bus": multicast_bus()}},
        "gateway": {"late_response_grace_ms": 1500},
        "ecus": ecus,
    })
    procs.append(Proc("ecu-sim", "-c", str(config), "--state-dir", str(tmp_path / "state"), log=tmp_path / "sim.log"))
    procs[0].wait_ready("ecu-sim ready")
    image = tmp_path / "img.bin"
    image.write_bytes(os.urandom(40 * 1024))
    out = tmp_path / "flash"
    run = vota("flash", "-c", str(config), "--out", str(out), "--json", "--no-progress",
               *[f"{n}={image}@9.9" for n in FAULTS], timeout=300)
    assert run.returncode == 3, run.stderr  # 3: at least one ECU failed
    results = {r["ecu"]: r for r in json.loads(run.stdout)}
    for name, (spec, step, reason, evidence, _) in FAULTS.items():
        r = results[name]
        assert r["result"] == "failed" and r["failed_step"] == step, (name, r)
        assert reason in r["reason"], (name, r["reason"])
        trace = read_trace(out / f"{name}.trace.jsonl")
        assert trace.trailer["result"] == "failed"
        last = trace.exchanges[-1]
        assert last.service == int(spec.split(":")[1].split("#")[0], 16), (name, last)
        if evidence == "no_response":
            assert last.response is None and last.dt is None and "timeout" in last.extra["err"]
            assert last.header == b"\x36\x03"
        elif evidence == "late":
            assert last.response is None
            (late_ms, late_hex), = last.extra["late"]
            assert late_hex.startswith("7420") and late_ms >= 1500
        elif evidence == "stray":
            assert last.response is None
            (_, can_id, data), = last.extra["stray"]
            assert can_id == 0x6F0 and data == "6702"
        elif name == "f_malformed":
            assert last.response == b"\x7f"
        elif name == "f_nrc":
            assert last.header == b"\x36\x05" and last.response == b"\x7f\x36\x72"
        elif name == "f_mismatch":
            assert last.header == b"\x36\x04" and last.response == b"\x76\x05"
    # an ECU simulator that answered with faults is still alive and serving
    assert procs[0].p.poll() is None
    # and the diagnosis names each cause, the ECU at fault and the failing request
    diagnosis = vota("diagnose", str(out), "--mode", "all", "--json", "-")
    assert diagnosis.returncode == 0, diagnosis.stderr
    verdict = json.loads(diagnosis.stdout)
    assert verdict["stage"] == "flash" and sorted(verdict["abnormal_packages"]) == sorted(FAULTS)
    found = {f["package"]: f for f in verdict["findings"]}
    for name, (*_, cause) in FAULTS.items():
        f = found[name]
        assert (f["cause"], f["side"], f["unit"], f["packet"]) == (cause, "server", name, name), f
        last = read_trace(out / f"{name}.trace.jsonl").exchanges[-1]
        assert f["request"] == last.header.hex() and f["index"] == len(read_trace(out / f"{name}.trace.jsonl").exchanges) - 1


def _flash_under_way(tmp_path, write_config, procs, out: str, written: int,  # type: ignore[no-untyped-def]
                     size: int = MiB):
    """An ECU simulator and a background flash of ``size`` bytes into it, once ``written`` bytes are in."""
    config = write_config({"segments": {"pt": {"bus": multicast_bus()}},
                           "ecus": {"vcu": ecu_entry("vcu", 0x7E0, 0x7E8, erase_ms=50)}})
    state = tmp_path / "state"
    sim = Proc("ecu-sim", "-c", str(config), "--state-dir", str(state), log=tmp_path / f"sim-{out}.log")
    procs.append(sim)
    sim.wait_ready("ecu-sim ready")
    image = os.urandom(size)
    (tmp_path / "new.bin").write_bytes(image)
    flash = Proc("flash", "-c", str(config), "--out", str(tmp_path / out), "--no-progress",
                 f"vcu={tmp_path / 'new.bin'}@3.0.0", log=tmp_path / f"flash-{out}.log")
    procs.append(flash)
    bank = state / "vcu" / "bank_b.bin"
    deadline = time.monotonic() + 60
    while not (bank.exists() and bank.stat().st_size > written):
        assert time.monotonic() < deadline, "transfer never got that far: " + flash.text()
        time.sleep(0.02)
    return config, state, sim, flash, image


def test_killed_ecu_keeps_old_image_and_flashes_again(tmp_path, write_config, procs):
    config, state, sim, flash, image = _flash_under_way(tmp_path, write_config, procs, "f1", 128 * 1024,
                                                             size=384 * 1024)
    meta = state / "vcu" / "meta.json"
    os.kill(sim.p.pid, signal.SIGKILL)
    sim.stop()
    assert flash.p.wait(timeout=60) == 3
    result = json.loads((tmp_path / "f1" / "vcu.result.json").read_text())
    assert result["result"] == "failed" and result["failed_step"] == "transfer_data"
    assert json.loads(meta.read_text())["active"] == "a"

    sim2 = Proc("ecu-sim", "-c", str(config), "--state-dir", str(state), log=tmp_path / "sim2.log")
    procs.append(sim2)
    sim2.wait_ready("ecu-sim ready")
    versions = vota("versions", "-c", str(config), "--json")
    assert json.loads(versions.stdout)[0]["software_version"] == "1.0.0"  # old image still active
    again = vota("flash", "-c", str(config), "--out", str(tmp_path / "f2"), "--json", f"vcu={tmp_path / 'new.bin'}@3.0.0")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)[0]["version_after"] == "3.0.0"
    assert _active_image(state, "vcu") == image


def _socketcan_available() -> str | None:
    import socket

    if not hasattr(socket, "AF_CAN"):
        return "this Python has no AF_CAN"
    try:
        socket.socket(socket.AF_CAN, socket.SOCK_RAW, socket.CAN_RAW).close()
    except OSError as exc:
        return f"the kernel has no SocketCAN ({exc.strerror})"
    if not Path("/sys/class/net/vcan0").exists():
        return "no vcan0 interface (ip link add dev vcan0 type vcan && ip link set up vcan0)"
    return None


@pytest.mark.socketcan
@pytest.mark.skipif(_socketcan_available() is not None, reason=f"SocketCAN missing: {_socketcan_available()}")
def test_flash_on_vcan0(tmp_path, write_config, procs):
    config = write_config({"segments": {"vcan": {"bus": {"interface": "socketcan", "channel": "vcan0"}}},
                           "ecus": {"vcu": ecu_entry("vcu", 0x7A0, 0x7A8)}})
    procs.append(Proc("ecu-sim", "-c", str(config), "--state-dir", str(tmp_path / "st"), log=tmp_path / "sim.log"))
    procs[0].wait_ready("ecu-sim ready")
    (tmp_path / "img.bin").write_bytes(os.urandom(256 * 1024))
    run = vota("flash", "-c", str(config), "--out", str(tmp_path / "f"), "--json", f"vcu={tmp_path / 'img.bin'}@4.0")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)[0]["version_after"] == "4.0"


def _kernel_isotp_available() -> str | None:
    import socket

    missing = _socketcan_available()
    if missing is not None:
        return missing
    try:
        socket.socket(socket.AF_CAN, socket.SOCK_DGRAM, socket.CAN_ISOTP).close()
    except (OSError, AttributeError) as exc:
        return f"no kernel ISO-TP (CAN_ISOTP, Linux 5.10+, module can-isotp): {exc}"
    return None


@pytest.mark.socketcan
@pytest.mark.skipif(_kernel_isotp_available() is not None, reason=f"kernel ISO-TP missing: {_kernel_isotp_available()}")
def test_flash_on_vcan0_with_kernel_isotp_sockets_on_both_sides(tmp_path, write_config, procs):
    """The gateway and the ECU simulator with ``isotp_backend: kernel``: the same flash, the
    image read back, the trace as with the Python stack (requests, responses, 0x78 pending)."""
    config = write_config({"segments": {"vcan": {"bus": {"interface": "socketcan", "channel": "vcan0"},
                                                  "isotp_backend": "kernel"}},
                           "ecus": {"vcu": ecu_entry("vcu", 0x7A2, 0x7AA)}})
    procs.append(Proc("ecu-sim", "-c", str(config), "--state-dir", str(tmp_path / "st"), log=tmp_path / "sim.log"))
    procs[0].wait_ready("ecu-sim ready")
    image = os.urandom(256 * 1024)
    (tmp_path / "img.bin").write_bytes(image)
    run = vota("flash", "-c", str(config), "--out", str(tmp_path / "f"), "--json", f"vcu={tmp_path / 'img.bin'}@4.1")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)[0]["version_after"] == "4.1"
    assert _active_image(tmp_path / "st", "vcu") == image
    exchanges = read_trace(tmp_path / "f" / "vcu.trace.jsonl").exchanges
    assert [e.header[:1].hex() for e in exchanges if e.service == 0x31][:1] == ["31"]
    assert any(e.extra.get("pend") for e in exchanges if e.service == 0x31)  # the erase's 0x78


def test_sigterm_cancels_a_flash_cleanly(tmp_path, write_config, procs):
    _, _, _, flash, _ = _flash_under_way(tmp_path, write_config, procs, "f", 64 * 1024)
    flash.p.terminate()
    assert flash.p.wait(timeout=20) == 130
    result = json.loads((tmp_path / "f" / "vcu.result.json").read_text())
    assert result["result"] == "failed" and result["reason"] == "cancelled"
    assert "Traceback" not in flash.text()


def test_compressed_transfer_each_method_and_the_fallback(tmp_path, write_config, procs):
    """zlib and lzma through RequestDownload's dataFormatIdentifier: fewer bytes on the bus than
    the image, the image read back identical from the ECU's bank; an ECU whose bootloader does
    not take the method answers NRC 0x31 and gets the image uncompressed; a compressed stream
    damaged on the way fails at that TransferData, and the diagnosis names it."""
    segment = {"bus": multicast_bus()}
    config = write_config({
        "segments": {"pt": segment},
        "gateway": {"results_dir": str(tmp_path / "gw")},
        "ecus": {
            "z": ecu_entry("z", 0x7E0, 0x7E8) | {"compression": {"zlib": 1}},
            "l": ecu_entry("l", 0x7E1, 0x7E9) | {"compression": {"lzma": 2, "zlib": 1}},
            "f": ecu_entry("f", 0x7E2, 0x7EA, accept_compression=[]) | {"compression": {"lzma": 3}},
        },
    })
    state = tmp_path / "state"
    procs.append(Proc("ecu-sim", "-c", str(config), "--state-dir", str(state), log=tmp_path / "sim.log"))
    procs[0].wait_ready("ecu-sim ready")
    image = firmware_like(96 * 1024)
    (tmp_path / "fw.bin").write_bytes(image)
    out = tmp_path / "flash"
    run = vota("flash", "-c", str(config), "--out", str(out), "--json", "--no-progress",
               *[f"{e}={tmp_path / 'fw.bin'}@3.0.0" for e in ("z", "l", "f")], timeout=300)
    assert run.returncode == 0, run.stderr
    results = {r["ecu"]: r for r in json.loads(run.stdout)}
    for ecu, method in (("z", "zlib"), ("l", "lzma"), ("f", None)):
        r = results[ecu]
        assert (r["result"], r["version_after"], r["compression"]) == ("success", "3.0.0", method), r
        assert _active_image(state, ecu) == image  # decompressed by the ECU, identical
    assert results["z"]["bytes_transferred"] < len(image) * 0.6 and results["l"]["bytes_transferred"] < len(image) * 0.6
    assert results["f"]["bytes_transferred"] == len(image) and results["f"]["compression_refused"] == ["lzma"]
    z = [e for e in read_trace(out / "z.trace.jsonl").exchanges if e.service == 0x34]
    assert [(e.header[:2].hex(), e.extra.get("csize")) for e in z] == [("3410", results["z"]["bytes_transferred"])]
    f = [e for e in read_trace(out / "f.trace.jsonl").exchanges if e.service == 0x34]
    assert [(e.header[:2].hex(), (e.response or b"").hex(), bool(e.extra.get("retried"))) for e in f] == [
        ("3430", "7f3431", True), ("3400", "74200fff", False)]
    assert json.loads(vota("diagnose", str(out), "--json", "-").stdout)["abnormal_packages"] == []

    bad = tmp_path / "bad"
    run = vota("flash", "-c", str(config), "--out", str(bad), "--json", "--no-progress", "--fault", "z:36#2:corrupt_data",
               f"z={tmp_path / 'fw.bin'}@3.0.1", timeout=300)
    assert run.returncode == 3, run.stderr
    (r,) = json.loads(run.stdout)
    assert (r["failed_step"], r["nrc"], r["compression"]) == ("transfer_data", 0x31, "zlib"), r
    verdict = json.loads(vota("diagnose", str(bad), "--json", "-").stdout)
    (finding,) = verdict["findings"]
    assert (finding["cause"], finding["nrc"], finding["request"], finding["unit"]) == ("negative_response", 0x31, "3602", "z")
    assert _active_image(state, "z") == image  # the ECU still runs the image it had


def test_segments_flash_at_the_same_time_in_worker_processes_and_a_failure_stays_on_its_segment(tmp_path, write_config,
                                                                                                procs):
    """Two segments, one ECU each, flashed by one `vota flash` with a worker process per segment:
    the two transfers overlap in time, and an ECU that fails on one segment leaves the other
    flashing to the end."""
    config = write_config({
        "segments": {"a": {"bus": multicast_bus()}, "b": {"bus": multicast_bus()}},
        "gateway": {"results_dir": str(tmp_path / "gw"), "segment_workers": "process"},
        # every block answers 0.15 s late: each transfer lasts seconds, whichever worker process
        # starts first on a busy machine; ea refuses its twelfth block
        "ecus": {"ea": ecu_entry("ea", 0x7E0, 0x7E8, "a", faults=["ea:36#12:nrc=0x72", "ea:36#2+:delay=150"]),
                 "eb": ecu_entry("eb", 0x7E1, 0x7E9, "b", faults=["eb:36#2+:delay=150"])},
    })
    procs.append(Proc("ecu-sim", "-c", str(config), "--state-dir", str(tmp_path / "state"), log=tmp_path / "sim.log"))
    procs[0].wait_ready("ecu-sim ready")
    (tmp_path / "img.bin").write_bytes(os.urandom(64 * 1024))
    out = tmp_path / "flash"
    run = vota("flash", "-c", str(config), "--out", str(out), "--json", "--no-progress",
               f"ea={tmp_path / 'img.bin'}@2.0", f"eb={tmp_path / 'img.bin'}@2.0", timeout=300)
    assert run.returncode == 3, run.stderr
    results = {r["ecu"]: r for r in json.loads(run.stdout)}
    assert (results["ea"]["result"], results["ea"]["failed_step"], results["ea"]["nrc"]) == ("failed", "transfer_data", 0x72)
    assert (results["eb"]["result"], results["eb"]["version_after"]) == ("success", "2.0")
    spans = {}
    for ecu in ("ea", "eb"):
        trace = read_trace(out / f"{ecu}.trace.jsonl")
        blocks = [e for e in trace.exchanges if e.service == 0x36]
        spans[ecu] = (trace.header.started + blocks[0].t / 1000, trace.header.started + blocks[-1].t / 1000)
    assert spans["ea"][0] < spans["eb"][1] and spans["eb"][0] < spans["ea"][1], spans  # at the same time
    assert "WARNING flash-a gateway.flash: ea: flash failed" in run.stderr  # logged by segment a's worker process


def test_delta_applied_wrong_base_refused_before_erase_and_the_full_image_sent(tmp_path, write_config, procs):
    """A delta from the running image: far fewer bytes on the bus than the image, applied by the
    ECU from its active bank, the new image identical. A delta from an image the ECU does not run
    is refused at the base check, before the erase (NRC 0x22), and the full image goes instead;
    an ECU whose bootloader takes no deltas answers the check NRC 0x31, likewise."""
    config = write_config({
        "segments": {"pt": {"bus": multicast_bus()}},
        "gateway": {"results_dir": str(tmp_path / "gw")},
        "ecus": {
            "d": ecu_entry("d", 0x7E0, 0x7E8) | {"delta": 13},
            "s": ecu_entry("s", 0x7E1, 0x7E9) | {"delta": 13, "check_memory": "sha256"},
            "n": ecu_entry("n", 0x7E2, 0x7EA, accept_delta=False) | {"delta": 13},
        },
    })
    state = tmp_path / "state"
    procs.append(Proc("ecu-sim", "-c", str(config), "--state-dir", str(state), log=tmp_path / "sim.log"))
    procs[0].wait_ready("ecu-sim ready")
    old = firmware_like(96 * 1024)
    new = next_release(old)
    (tmp_path / "old.bin").write_bytes(old)
    (tmp_path / "new.bin").write_bytes(new)
    (tmp_path / "other.bin").write_bytes(os.urandom(len(old)))
    first = vota("flash", "-c", str(config), "--out", str(tmp_path / "f0"), "--json", "--no-progress",
                 *[f"{e}={tmp_path / 'old.bin'}@3.0.0" for e in ("d", "n")], f"s={tmp_path / 'other.bin'}@3.0.0",
                 timeout=300)
    assert first.returncode == 0, first.stderr

    out = tmp_path / "f1"
    run = vota("flash", "-c", str(config), "--out", str(out), "--json", "--no-progress",
               *[f"{e}={tmp_path / 'new.bin'}@3.1.0" for e in ("d", "s", "n")],
               *[f"--delta-from={e}={tmp_path / 'old.bin'}" for e in ("d", "s", "n")], timeout=300)
    assert run.returncode == 0, run.stderr
    results = {r["ecu"]: r for r in json.loads(run.stdout)}
    for ecu in ("d", "s", "n"):
        assert (results[ecu]["result"], results[ecu]["version_after"]) == ("success", "3.1.0"), results[ecu]
        assert _active_image(state, ecu) == new
    d = results["d"]
    assert (d["image_sent"], d["compression"], d["delta_refused"]) == ("delta", "delta", None)
    assert d["bytes_transferred"] * 5 < len(new), d
    trace = read_trace(out / "d.trace.jsonl").exchanges
    steps = [e.extra.get("step") for e in trace if e.service in (0x31, 0x34)]
    assert [(e.header[:4].hex(), (e.response or b"")[:1].hex()) for e in trace if e.service == 0x31][:2] == [
        ("3101ff06", "71"), ("3101ff00", "71")], steps  # the base check, then the erase
    (rd,) = [e for e in trace if e.service == 0x34]
    assert rd.header[:2].hex() == "34d0" and rd.extra["csize"] == d["bytes_transferred"]
    assert len(json.dumps([e.header.hex() for e in trace])) < 10_000  # header-only: no patch bytes in the trace

    for ecu, nrc in (("s", "22"), ("n", "31")):
        r = results[ecu]
        assert (r["image_sent"], r["bytes_transferred"]) == ("full", len(new)), r
        assert "refused" in r["delta_refused"], r
        checks = [e for e in read_trace(out / f"{ecu}.trace.jsonl").exchanges if e.service == 0x31]
        assert (checks[0].header[:4].hex(), (checks[0].response or b"").hex()) == ("3101ff06", f"7f31{nrc}")
        assert checks[0].extra.get("retried") and checks[1].header[:4].hex() == "3101ff00"  # erased only after
    assert json.loads(vota("diagnose", str(out), "--json", "-").stdout)["abnormal_packages"] == []


def test_ecu_killed_while_a_delta_is_applied_keeps_the_old_image_and_takes_the_delta_again(tmp_path, write_config, procs):
    """kill -9 of the ECU simulator at a random point of a delta (seeded; the seed is printed):
    the old image stays active, and the same delta applies from it after the restart."""
    import random

    seed = int(os.environ.get("VOTA_DELTA_KILL_SEED", random.randrange(1 << 30)))
    print(f"VOTA_DELTA_KILL_SEED={seed}")
    rng = random.Random(seed)
    config = write_config({"segments": {"pt": {"bus": multicast_bus()}},
                           "ecus": {"vcu": ecu_entry("vcu", 0x7E0, 0x7E8, erase_ms=50) | {"delta": 13}}})
    state = tmp_path / "state"
    sim = Proc("ecu-sim", "-c", str(config), "--state-dir", str(state), log=tmp_path / "sim.log")
    procs.append(sim)
    sim.wait_ready("ecu-sim ready")
    old = firmware_like(MiB // 2)
    new = bytearray(next_release(old))
    for at in range(0, len(new) - 4096, 16384):  # a quarter rebuilt: a patch that takes a while on the bus
        new[at : at + 4096] = rng.randbytes(4096)
    (tmp_path / "old.bin").write_bytes(old)
    (tmp_path / "new.bin").write_bytes(new)
    assert vota("flash", "-c", str(config), "--out", str(tmp_path / "f0"), "--no-progress",
                f"vcu={tmp_path / 'old.bin'}@1.5.0", timeout=300).returncode == 0
    active = json.loads((state / "vcu" / "meta.json").read_text())["active"]
    target = state / "vcu" / f"bank_{'a' if active == 'b' else 'b'}.bin"
    args = ("flash", "-c", str(config), "--no-progress", "--json", f"vcu={tmp_path / 'new.bin'}@2.0.0",
            f"--delta-from=vcu={tmp_path / 'old.bin'}")
    flash = Proc(*args, "--out", str(tmp_path / "f1"), log=tmp_path / "flash1.log")
    procs.append(flash)
    at = rng.randrange(4096, len(new) - 32768)
    deadline = time.monotonic() + 60
    while not (target.exists() and target.stat().st_size > at):
        assert time.monotonic() < deadline, f"the delta never wrote {at} bytes (seed {seed}): {flash.text()}"
        time.sleep(0.005)
    os.kill(sim.p.pid, signal.SIGKILL)
    sim.stop()
    assert flash.p.wait(timeout=60) == 3, f"seed {seed}"
    result = json.loads((tmp_path / "f1" / "vcu.result.json").read_text())
    assert (result["result"], result["failed_step"], result["image_sent"]) == ("failed", "transfer_data", "delta"), result
    assert json.loads((state / "vcu" / "meta.json").read_text())["active"] == active

    sim2 = Proc("ecu-sim", "-c", str(config), "--state-dir", str(state), log=tmp_path / "sim2.log")
    procs.append(sim2)
    sim2.wait_ready("ecu-sim ready")
    assert _active_image(state, "vcu") == old, f"seed {seed}"
    again = vota(*args, "--out", str(tmp_path / "f2"), timeout=300)
    assert again.returncode == 0, again.stderr
    (r,) = json.loads(again.stdout)
    assert (r["version_after"], r["image_sent"]) == ("2.0.0", "delta") and r["bytes_transferred"] < len(new) // 2, r
    assert _active_image(state, "vcu") == bytes(new)


def test_a_failed_delta_flash_is_blamed_on_the_exchange_that_failed_not_on_the_base_check(tmp_path, write_config, procs):
    """A delta flash that fails (the ECU refuses a TransferData with 0x72; the gateway skips a
    block counter) is diagnosed at that exchange: the base check (31 01 FF06, 68 bytes) before
    the erase is a legal step of the sequence."""
    config = write_config({"segments": {"pt": {"bus": multicast_bus()}}, "gateway": {"results_dir": str(tmp_path / "gw")},
                           "ecus": {e: ecu_entry(e, 0x7E0 + i, 0x7E8 + i, max_block_length=514) | {"delta": 13}
                                    for i, e in enumerate(("d", "s"))}})
    state = tmp_path / "state"
    old = firmware_like(96 * 1024)
    new = bytearray(old)
    for k in range(12):  # a patch of several blocks
        new[k * 8000 : k * 8000 + 200] = os.urandom(200)
    (tmp_path / "old.bin").write_bytes(old)
    (tmp_path / "new.bin").write_bytes(new)
    sim = Proc("ecu-sim", "-c", str(config), "--state-dir", str(state), log=tmp_path / "sim.log")
    procs.append(sim)
    sim.wait_ready("ecu-sim ready")
    first = vota("flash", "-c", str(config), "--out", str(tmp_path / "f0"), "--no-progress",
                 *[f"{e}={tmp_path / 'old.bin'}@3.0.0" for e in ("d", "s")], timeout=300)
    assert first.returncode == 0, first.stderr
    sim.stop()
    procs.append(Proc("ecu-sim", "-c", str(config), "--state-dir", str(state), "--fault", "d:36#2:nrc=0x72",
                      log=tmp_path / "sim2.log"))
    procs[-1].wait_ready("ecu-sim ready")
    out = tmp_path / "f1"
    run = vota("flash", "-c", str(config), "--out", str(out), "--json", "--no-progress", "--fault", "s:36#2:skip_counter",
               *[f"{e}={tmp_path / 'new.bin'}@3.1.0" for e in ("d", "s")],
               *[f"--delta-from={e}={tmp_path / 'old.bin'}" for e in ("d", "s")], timeout=300)
    results = {r["ecu"]: r for r in json.loads(run.stdout)}
    assert all(r["image_sent"] == "delta" and r["result"] == "failed" for r in results.values()), results
    verdict = json.loads(vota("diagnose", str(out), "--mode", "all", "--json", "-").stdout)
    found = {f["package"]: f for f in verdict["findings"]}
    assert (found["d"]["cause"], found["d"]["nrc"], found["d"]["side"]) == ("negative_response", 0x72, "server"), found
    assert found["d"]["request"].startswith("3602"), found["d"]
    assert found["s"]["side"] == "client" and found["s"]["request"].startswith("36"), found["s"]
    assert not any(f["request"].startswith("3101ff06") for f in verdict["findings"]), verdict["findings"]
