"""The fault-injection matrix: every one of the eleven causes, in both stages, injected on
the real processes at a non-trivial point, must come out of the diagnosis as exactly that
cause, with the right side, unit and packet or ECU. The point each fault hits is drawn at
random: the service (from the cell's variants) and, for TransferData, the block (seeded:
VOTA_MATRIX_SEED repeats a run; the seed is printed and in every failure)."""

from __future__ import annotations

import json
import os
import random

import pytest

from tests.conftest import Proc, ecu_entry, multicast_bus, vota

pytestmark = pytest.mark.slow  # separate processes

# name: (fault spec variants, cause, side) -- flash stage: server = the ECU, client = the gateway.
# Each run draws one variant per cell (the service and occurrence the fault hits) and, where it
# is TransferData ("36#{n}"), the block: every variant must come out as exactly that cause.
FLASH = {
    "c_notsent": (["36#{n}:not_sent", "34:not_sent", "37:not_sent", "31#1:not_sent"], "request_not_sent", "client"),
    "c_fromid": (["36#{n}:from_id=0x7F5", "34:from_id=0x7F5", "37:from_id=0x7F5"], "illegal_request_sender", "client"),
    "c_format": (["85:bad_format", "10#2:bad_format", "31#1:bad_format", "36#{n}:bad_format"], "illegal_request_format",
                 "client"),
    "c_length": (["36#{n}:bad_length", "34:bad_length", "10#1:bad_length"], "illegal_request_length", "client"),
    "c_flow": (["36#{n}:skip_counter", "31#1:skip_step", "34:skip_step"], "illegal_request_flow", "client"),
    "s_drop": (["36#{n}:drop", "34:drop", "37:drop", "27#1:drop"], "response_not_sent", "server"),
    "s_late": (["36#{n}:delay=1500", "34:delay=1500", "37:delay=1500"], "response_timeout", "server"),
    "s_wrongid": (["27#2:wrong_id=0x6F0", "36#{n}:wrong_id=0x6F0", "34:wrong_id=0x6F0"], "illegal_responder", "server"),
    "s_format": (["37:malformed", "34:malformed", "36#{n}:malformed"], "illegal_response_format", "server"),
    "s_nrc": (["36#{n}:nrc=0x72", "34:nrc=0x70", "31#1:nrc=0x72", "27#2:nrc=0x35"], "negative_response", "server"),
    "s_match": (["36#{n}:mismatch", "31#1:mismatch", "37:mismatch"], "unmatched_response", "server"),
    # the version read after the reset (step verify) is traced: a wrong-id answer there is found
    "s_verify": (["22#2:wrong_id=0x6F2"], "illegal_responder", "server"),
    # a left-out request gets a plausible reply: the client goes on, the next request is out of sequence
    "c_skip10": (["10#2:skip_step"], "illegal_request_flow", "client"),
    "c_skip27": (["27#1:skip_step"], "illegal_request_flow", "client"),
}
# package: (fault spec variants, cause, side) -- deploy stage: server = GW, client = TBOX. The
# deploy packet id in the verdict is the block's (packets count from 0) for TransferData, else none.
DEPLOY = {
    "c_notsent.bin": (["36#{n}:not_sent", "37:not_sent", "38:not_sent"], "request_not_sent", "client"),
    "c_fromid.bin": (["36#{n}:from_id=0x7D5", "37:from_id=0x7D5"], "illegal_request_sender", "client"),
    "c_format.bin": (["36#{n}:bad_format", "38:bad_format"], "illegal_request_format", "client"),
    "c_length.bin": (["36#{n}:bad_length", "38:bad_length"], "illegal_request_length", "client"),
    "c_flow.bin": (["36#{n}:skip_counter"], "illegal_request_flow", "client"),
    "s_drop.bin": (["36#{n}:drop", "38:drop", "37:drop"], "response_not_sent", "server"),
    "s_late.bin": (["36#{n}:delay=1500", "37:delay=1500"], "response_timeout", "server"),
    "s_wrongid.bin": (["36#{n}:wrong_id=0x6F1", "38:wrong_id=0x6F1"], "illegal_responder", "server"),
    "s_format.bin": (["36#{n}:malformed", "38:malformed", "37:malformed"], "illegal_response_format", "server"),
    "s_nrc.bin": (["36#{n}:nrc=0x22", "38:nrc=0x70", "37:nrc=0x72"], "negative_response", "server"),
    "s_match.bin": (["36#{n}:mismatch", "37:mismatch"], "unmatched_response", "server"),
    "c_skip.bin": (["36#{n}:skip_step"], "illegal_request_flow", "client"),
}




def _verdict(path, mode: str) -> dict:  # type: ignore[no-untyped-def]
    run = vota("diagnose", str(path), "--mode", mode, "--json", "-")
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def _draw(rnd: random.Random, target: str, variants: list[str]) -> tuple[str, int | None]:
    """One variant as a spec for ``target``, its TransferData block drawn from the 2nd to the
    5th (16 KiB images: five blocks); and that block's deploy packet (None: not TransferData)."""
    variant = rnd.choice(variants)
    if "{n}" not in variant:
        return f"{target}:{variant}", None
    n = rnd.randint(2, 5)
    return f"{target}:{variant.format(n=n)}", n - 1


def test_matrix_flash_and_deploy(tmp_path, write_config, procs):
    seed = int(os.environ.get("VOTA_MATRIX_SEED") or random.SystemRandom().randrange(10**6))
    rnd = random.Random(seed)
    print(f"matrix seed {seed} (VOTA_MATRIX_SEED={seed} repeats it)")
    flash_cells = {n: (_draw(rnd, n, variants)[0], cause, side) for n, (variants, cause, side) in FLASH.items()}
    deploy_cells = {}
    for n, (variants, cause, side) in DEPLOY.items():
        drawn, packet = _draw(rnd, f"deploy:{n}", variants)
        if packet is not None and "skip_step" in drawn:  # the next packet is the one out of sequence; after the last, the exit
            packet = packet + 1 if packet + 1 < 5 else None
        if "bad_format" in drawn:  # a TransferData header cut to SID and counter: no packet id to name
            packet = None
        deploy_cells[n] = (drawn, cause, side, packet)
    print("cells:", *(spec for spec, *_ in (*flash_cells.values(), *deploy_cells.values())))
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
    procs[0].wait_ready("ecu-sim ready")
    procs[1].wait_ready("gateway ready")

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
            assert (f["cause"], f["side"], f["unit"], f["packet"]) == (cause, side, unit, name), (f"seed {seed}", spec, mode, f)
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
        for name, (spec, cause, side, packet) in deploy_cells.items():
            f = got[name]
            unit = "TBOX" if side == "client" else "GW"
            assert (f["cause"], f["side"], f["unit"], f["packet"]) == (cause, side, unit, packet), (f"seed {seed}", spec, mode, f)
            assert f["index"] > 0
        assert len(deploy["findings"]) == len(deploy_cells)


def test_client_faults_in_the_activation_and_on_the_link_are_injected_and_diagnosed(tmp_path, mosquitto, write_config,
                                                                                      procs):
    """The stages around the transfers have client faults too: the gateway leaves out bcm's
    first activation-phase request (``activate:bcm:31#1:not_sent``), the TBOX every install call
    from its third RoutineControl on (``link:GW:31#3+:not_sent``); each campaign fails and the
    cloud's verdict names the client, the stage and what was not sent."""
    from tests.vehicle import Vehicle

    # the TBOX gives its calls 3 retries and the cancel of the failed campaign 2 s (every call fails)
    v = Vehicle(tmp_path, mosquitto, write_config, procs, tbox_extra={"max_retries": 3, "cancel_timeout_s": 2})
    try:
        v.gateway.stop()
        v.restart_gateway("--fault", "activate:bcm:31#1:not_sent")
        v.send(v.campaign("c-act", "2.0.0"))
        assert v.finished("c-act")["outcome"] == "failed"
        assert v.cloud.collector.wait_for(lambda c: "c-act" in c.verdicts, 10)
        verdict = v.cloud.collector.verdicts["c-act"]
        finding = verdict["findings"][0]
        assert (finding["stage"], finding["package"], finding["cause"], finding["side"]) == (
            "activate", "bcm", "request_not_sent", "client"), verdict
        assert finding["request"].startswith("3101ff02"), finding

        v.gateway.stop()
        v.restart_gateway()
        v.tbox.stop()
        v.tbox = v.start_tbox("--fault", "link:GW:31#3+:not_sent")
        v.send(v.campaign("c-call", "2.1.0"))
        done = v.finished("c-call", timeout=90)
        assert (done["outcome"], done["failure"]["stage"]) == ("failed", "installing"), done
        assert v.cloud.collector.wait_for(lambda c: "c-call" in c.verdicts, 10)
        verdict = v.cloud.collector.verdicts["c-call"]
        assert (verdict["stage"], verdict["cause"], verdict["side"]) == ("link", "request_not_sent", "client"), verdict
        assert verdict["findings"][0]["request"].startswith("3101") or verdict["findings"][0]["request"].startswith("3103")
    finally:
        v.close()


# the cells around the plain programming sequence, each drawn at random from its variants:
# (fault spec variants, cause, side). Delta: vcu takes the delta from the image it runs; the
# server cell on the ECU simulator, the client cell in the gateway. Commit: the fifth
# RoutineControl of a full-image flash (erase, check memory, check dependencies, activate,
# commit) of a drawn ECU. Link: the TBOX's install calls from the third RoutineControl on.
DELTA_SERVER = (["vcu:36#1:nrc=0x72", "vcu:36#1:drop", "vcu:37:malformed", "vcu:34:nrc=0x70"],
                {"nrc": "negative_response", "drop": "response_not_sent", "malformed": "illegal_response_format"}, "server")
DELTA_CLIENT = (["vcu:36#1:skip_counter", "vcu:34:bad_length", "vcu:36#1:bad_format", "vcu:36#1:not_sent"],
                {"skip_counter": "illegal_request_flow", "bad_length": "illegal_request_length",
                 "bad_format": "illegal_request_format", "not_sent": "request_not_sent"}, "client")
COMMIT = (["31#5:nrc=0x22", "31#5:drop", "31#5:malformed"],
          {"nrc": "negative_response", "drop": "response_not_sent", "malformed": "illegal_response_format"}, "server")
LINK_CLIENT = (["link:GW:31#3+:not_sent", "link:GW:31#3+:bad_format", "link:GW:31#3+:bad_length"],
               {"not_sent": "request_not_sent", "bad_format": "illegal_request_format",
                "bad_length": "illegal_request_length"}, "client")


def _cause(spec: str, causes: dict[str, str]) -> str:
    action = spec.rsplit(":", 1)[1].split("=")[0]
    return causes[action]


def test_matrix_delta_commit_and_link_cells(tmp_path, mosquitto, write_config, procs):
    """One drawn variant per cell on one vehicle, each a campaign of its own; the cloud's verdict
    must name exactly the cause and side of the fault, at the exchange it was injected into (the
    delta base check FF06 is never blamed)."""
    from tests.conftest import firmware_like, next_release
    from tests.vehicle import Vehicle

    seed = int(os.environ.get("VOTA_MATRIX_SEED", random.randrange(1 << 30)))
    rnd = random.Random(seed)
    drawn = {"delta_server": rnd.choice(DELTA_SERVER[0]), "delta_client": rnd.choice(DELTA_CLIENT[0]),
             "commit": f"{rnd.choice(['vcu', 'bms', 'bcm'])}:{rnd.choice(COMMIT[0])}", "link": rnd.choice(LINK_CLIENT[0])}
    print("seed", seed, "cells:", drawn)
    v = Vehicle(tmp_path, mosquitto, write_config, procs, ecu_extra={"vcu": {"delta": 13}},
                tbox_extra={"max_retries": 3, "cancel_timeout_s": 2})
    pkgs = v.tmp / "cloud" / "packages"
    old = firmware_like(48 * 1024)
    (pkgs / "old.bin").write_bytes(old)
    (pkgs / "new.bin").write_bytes(next_release(old))

    def verdict(cid: str) -> dict:
        assert v.cloud.collector.wait_for(lambda c: cid in c.verdicts, 15), cid
        return v.cloud.collector.verdicts[cid]

    try:
        v.send(v.campaign("c-base", "2.0.0", packages=[("vcu", pkgs / "old.bin", "2.0.0")]))
        assert v.finished("c-base")["outcome"] == "success"
        for cell, (_variants, causes, side) in (("delta_server", DELTA_SERVER), ("delta_client", DELTA_CLIENT)):
            spec = drawn[cell]
            if side == "server":
                v.restart_sim(spec)
            else:
                v.gateway.stop()
                v.restart_gateway("--fault", spec)
            cid = f"c-{cell}"
            v.send(v.campaign(cid, "2.1.0", packages=[("vcu", pkgs / "new.bin", "2.1.0")], deltas={"vcu": (pkgs / "old.bin", "2.0.0")}))
            assert v.finished(cid)["outcome"] == "failed", (seed, spec)
            (result,) = [r["result"] for r in v.reports("results", cid) if r["stage"] == "flash"]
            images = [e for e in v.reports("events", cid) if e.get("event") == "images"]
            assert result["image_sent"] == "delta", (seed, spec, result, images)
            got = verdict(cid)
            first = got["findings"][0]
            assert (got["stage"], first["package"], got["cause"], got["side"]) == (
                "flash", "vcu", _cause(spec, causes), side), (seed, spec, got)
            assert first["request"][:2] == spec.split(":")[1][:2] and not first["request"].startswith("3101ff06"), (seed, got)
            if side == "server":
                v.restart_sim()
            else:
                v.gateway.stop()
                v.restart_gateway()

        spec = drawn["commit"]
        ecu = spec.split(":")[0]
        v.restart_sim(spec)
        v.send(v.campaign("c-commit", "2.2.0", packages=v.packages("2.2.0", 16 * 1024)))
        assert v.finished("c-commit")["outcome"] == "failed", (seed, spec)
        got = verdict("c-commit")
        first = got["findings"][0]
        assert (first["stage"], first["package"], got["cause"], got["side"], first["step"]) == (
            "activate", ecu, _cause(spec, COMMIT[1]), "server", "commit"), (seed, spec, got)
        assert first["request"].startswith("3101ff05"), (seed, got)
        v.restart_sim()

        spec = drawn["link"]
        v.tbox.stop()
        v.tbox = v.start_tbox("--fault", spec)
        v.send(v.campaign("c-link", "2.3.0", packages=v.packages("2.3.0", 16 * 1024)))
        done = v.finished("c-link", timeout=120)
        assert (done["outcome"], done["failure"]["stage"]) == ("failed", "installing"), (seed, spec, done)
        got = verdict("c-link")
        assert (got["stage"], got["cause"], got["side"]) == ("link", _cause(spec, LINK_CLIENT[1]), "client"), (seed, spec, got)
        assert got["findings"][0]["request"].startswith("31"), (seed, got)
    finally:
        v.close()
