"""The fault-injection matrix: every one of the eleven causes, in both stages, injected on
the real processes at a non-trivial point, must come out of the diagnosis as exactly that
cause, with the right side, unit and packet or ECU. The TransferData block each fault hits
is drawn at random (seeded: VOTA_MATRIX_SEED repeats a run; the seed is in every failure)."""

from __future__ import annotations

import json
import os
import random
import re
import time

import pytest

from tests.conftest import Proc, ecu_entry, multicast_bus, vota

pytestmark = pytest.mark.slow  # separate processes

# name: (fault spec, cause, side) -- flash stage: server = the ECU, client = the gateway
FLASH = {
    "c_notsent": ("c_notsent:36#3:not_sent", "request_not_sent", "client"),
    "c_fromid": ("c_fromid:36#2:from_id=0x7F5", "illegal_request_sender", "client"),
    "c_format": ("c_format:85:bad_format", "illegal_request_format", "client"),
    "c_length": ("c_length:36#2:bad_length", "illegal_request_length", "client"),
    "c_flow": ("c_flow:36#3:skip_counter", "illegal_request_flow", "client"),
    "s_drop": ("s_drop:36#3:drop", "response_not_sent", "server"),
    "s_late": ("s_late:36#2:delay=1500", "response_timeout", "server"),
    "s_wrongid": ("s_wrongid:27#2:wrong_id=0x6F0", "illegal_responder", "server"),
    "s_format": ("s_format:37:malformed", "illegal_response_format", "server"),
    "s_nrc": ("s_nrc:36#3:nrc=0x72", "negative_response", "server"),
    "s_match": ("s_match:36#2:mismatch", "unmatched_response", "server"),
    # the version read after the reset (step verify) is traced: a wrong-id answer there is found
    "s_verify": ("s_verify:22#2:wrong_id=0x6F2", "illegal_responder", "server"),
    # a left-out request gets a plausible reply: the client goes on, the next request is out of sequence
    "c_skip10": ("c_skip10:10#2:skip_step", "illegal_request_flow", "client"),
    "c_skip27": ("c_skip27:27#1:skip_step", "illegal_request_flow", "client"),
}
# package: (fault spec, cause, side, deploy packet id) -- deploy stage: server = GW, client = TBOX
DEPLOY = {
    "c_notsent.bin": ("deploy:c_notsent.bin:36#3:not_sent", "request_not_sent", "client", 2),
    "c_fromid.bin": ("deploy:c_fromid.bin:36#2:from_id=0x7D5", "illegal_request_sender", "client", 1),
    "c_format.bin": ("deploy:c_format.bin:36#2:bad_format", "illegal_request_format", "client", None),
    "c_length.bin": ("deploy:c_length.bin:36#2:bad_length", "illegal_request_length", "client", 1),
    "c_flow.bin": ("deploy:c_flow.bin:36#3:skip_counter", "illegal_request_flow", "client", 2),
    "s_drop.bin": ("deploy:s_drop.bin:36#3:drop", "response_not_sent", "server", 2),
    "s_late.bin": ("deploy:s_late.bin:36#2:delay=1500", "response_timeout", "server", 1),
    "s_wrongid.bin": ("deploy:s_wrongid.bin:36#3:wrong_id=0x6F1", "illegal_responder", "server", 2),
    "s_format.bin": ("deploy:s_format.bin:36#2:malformed", "illegal_response_format", "server", 1),
    "s_nrc.bin": ("deploy:s_nrc.bin:36#3:nrc=0x22", "negative_response", "server", 2),
    "s_match.bin": ("deploy:s_match.bin:36#2:mismatch", "unmatched_response", "server", 1),
    "c_skip.bin": ("deploy:c_skip.bin:36#2:skip_step", "illegal_request_flow", "client", 2),
    # a fault named by its package fires on the RequestFileTransfer that opens it too
    "s_nrc38.bin": ("deploy:s_nrc38.bin:38:nrc=0x70", "negative_response", "server", None),
}


def _ready(proc: Proc, word: str) -> None:
    deadline = time.monotonic() + 30
    while word not in proc.text():
        assert proc.p.poll() is None and time.monotonic() < deadline, proc.text()
        time.sleep(0.05)


def _verdict(path, mode: str) -> dict:  # type: ignore[no-untyped-def]
    run = vota("diagnose", str(path), "--mode", mode, "--json", "-")
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def _at_random(rnd: random.Random, spec: str) -> tuple[str, int | None]:
    """The spec with its TransferData occurrence drawn from the 2nd to the 5th block (16 KiB
    images: five blocks), and the deploy packet that block carries (packets count from 0)."""
    match = re.search(r":36#(\d+):", spec)
    if match is None:
        return spec, None
    n = rnd.randint(2, 5)
    return spec[: match.start()] + f":36#{n}:" + spec[match.end():], n - 1


def test_matrix_flash_and_deploy(tmp_path, write_config, procs):
    seed = int(os.environ.get("VOTA_MATRIX_SEED") or random.SystemRandom().randrange(10**6))
    rnd = random.Random(seed)
    print(f"matrix seed {seed} (VOTA_MATRIX_SEED={seed} repeats it)")
    flash_cells = {n: (_at_random(rnd, spec)[0], cause, side) for n, (spec, cause, side) in FLASH.items()}
    deploy_cells = {}
    for n, (spec, cause, side, packet) in DEPLOY.items():
        drawn, block = _at_random(rnd, spec)
        if block is not None and packet is not None:
            packet = block
            if "skip_step" in spec:  # the next packet is the one out of sequence; after the last, the exit is
                packet = block + 1 if block + 1 < 5 else None
        deploy_cells[n] = (drawn, cause, side, packet)
    segments = {f"s{i}": {"bus": multicast_bus()} for i in range(3)}
    segments["bb"] = {"bus": multicast_bus()}
    ecus = {}
    for i, (name, (spec, _, side)) in enumerate(flash_cells.items()):
        ecus[name] = ecu_entry(name, 0x700 + i, 0x720 + i, f"s{i % 3}", faults=[spec] if side == "server" else [])
    config = write_config({"segments": segments, "ecus": ecus,
                           "deploy": {"segment": "bb", "package_dir": str(tmp_path / "gw" / "packages")},
                           "gateway": {"results_dir": str(tmp_path / "gw" / "results"), "late_response_grace_ms": 1500},
                           })
    procs.append(Proc("ecu-sim", "-c", str(config), "--state-dir", str(tmp_path / "ecu"), log=tmp_path / "ecu.log"))
    gw_args = ["gateway", "-c", str(config)]
    for spec, _, side, _ in deploy_cells.values():
        if side == "server":
            gw_args += ["--fault", spec]
    procs.append(Proc(*gw_args, log=tmp_path / "gw.log"))
    _ready(procs[0], "ecu-sim ready")
    _ready(procs[1], "gateway ready")

    # -- flash stage: the gateway's client faults on the command line, the ECUs' in their config
    image = tmp_path / "img.bin"
    image.write_bytes(os.urandom(16 * 1024))
    flash_args = ["flash", "-c", str(config), "--out", str(tmp_path / "flash"), "--json", "--no-progress"]
    for spec, _, side in flash_cells.values():
        if side == "client":
            flash_args += ["--fault", spec]
    run = vota(*flash_args, *[f"{n}={image}@9.0" for n in flash_cells], timeout=300)
    assert run.returncode == 3, run.stderr
    assert all(r["result"] == "failed" for r in json.loads(run.stdout))

    # -- deploy stage: the TBOX's client faults on the command line, the gateway's at its start
    deploy_args = ["deploy", "-c", str(config), "--out", str(tmp_path / "deploy"), "--json", "--no-progress", "--keep-going"]
    for spec, _, side, _ in deploy_cells.values():
        if side == "client":
            deploy_args += ["--fault", spec]
    for name in deploy_cells:
        (tmp_path / name).write_bytes(os.urandom(16 * 1024))
        deploy_args.append(str(tmp_path / name))
    run = vota(*deploy_args, timeout=300)
    assert run.returncode == 3, run.stderr
    assert [r["result"] for r in json.loads(run.stdout)] == ["failed"] * len(deploy_cells)

    for mode in ("first", "all"):
        flash = _verdict(tmp_path / "flash", mode)
        assert flash["stage"] == "flash" and sorted(flash["abnormal_packages"]) == sorted(flash_cells)
        groups: dict[str, list[dict]] = {}
        for f in flash["findings"]:
            groups.setdefault(f["package"], []).append(f)
        for name, (spec, cause, side) in flash_cells.items():
            f = groups[name][0]
            unit = "GW" if side == "client" else name
            assert (f["cause"], f["side"], f["unit"], f["packet"]) == (cause, side, unit, name), (f"seed {seed}", mode, f)
            assert f["index"] > 0  # not the first request
            # exactly one cause per injected fault; a client that went on after a left-out request
            # (skip_step) sends every later request out of sequence, each one a flow finding
            if "skip_step" not in spec:
                assert len(groups[name]) == 1, (f"seed {seed}", mode, groups[name])
            else:
                assert {g["cause"] for g in groups[name]} == {cause}, (f"seed {seed}", mode, groups[name])

        deploy = _verdict(tmp_path / "deploy", mode)
        assert deploy["stage"] == "deploy" and sorted(deploy["abnormal_packages"]) == sorted(deploy_cells)
        got = {}
        for f in deploy["findings"]:
            got.setdefault(f["package"], f)
        for name, (_, cause, side, packet) in deploy_cells.items():
            f = got[name]
            unit = "TBOX" if side == "client" else "GW"
            assert (f["cause"], f["side"], f["unit"], f["packet"]) == (cause, side, unit, packet), (f"seed {seed}", mode, f)
            assert f["index"] > 0
        assert len(deploy["findings"]) == len(deploy_cells)
