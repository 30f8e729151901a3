"""The diagnosis engine on hand-written traces: every check, every cause, both modes."""

from __future__ import annotations

import json
from typing import Any

import pytest

from agent.adapters.config_files import load_yaml
from agent.adapters.diagnosis_files import load_rules
from agent.core.diagnosis import CAUSES, DOIP_CAUSES, StageInput, check_trace, diagnose, parse_rules, render_markdown
from agent.core.trace import parse_trace
from agent.errors import ConfigError
from tests.conftest import ROOT

RULES_FILE = ROOT / "agent" / "core" / "diagnosis" / "rules.yaml"

RULES = load_rules()

FLASH_HEAD = {"format": "vota-trace", "version": 1, "stage": "flash", "client": "GW", "server": "bms", "packet": "bms",
              "request_id": 0x7E1, "response_id": 0x7E9, "functional_id": 0x7DF, "started": 0.0}
DEPLOY_HEAD = {**FLASH_HEAD, "stage": "deploy", "client": "TBOX", "server": "GW", "packet": "vcu.bin",
               "request_id": 0x7D0, "response_id": 0x7D8, "functional_id": None}

# A clean flash: 3 TransferData blocks of 4095 bytes (4093 bytes of image each: 12279 announced).
FLASH = [
    [0, "1003", 2, 1, "5003003201f4"], [2, "8502", 2, 1, "c502"], [4, "280301", 3, 1, "6803"],
    [6, "1002", 2, 1, "5002003201f4"], [8, "2701", 2, 1, "670112345678"], [10, "2702", 6, 1, "6702"],
    [12, "2ef15a", 12, 1, "6ef15a"], [14, "3101ff00", 13, 500, "7101ff0000", {"pend": [3]}],
    [520, "3400440800000000002ff7", 11, 2, "74200fff"],
    [530, "3601", 4095, 30, "7601"], [570, "3602", 4095, 30, "7602"], [610, "3603", 4095, 30, "7603"],
    [650, "37", 1, 2, "77"], [660, "31010202", 8, 100, "7101020200", {"pend": [2]}],
    [770, "3101ff01", 4, 1, "7101ff0100"], [780, "1101", 2, 1, "5101", {"back": 300}],
    [1100, "1003", 2, 1, "5003003201f4"], [1102, "280003", 3, 1, "6800"], [1104, "8501", 2, 1, "c501"],
    [1106, "1001", 2, 1, "5001003201f4"],
]
# A clean deploy: packets 0..2 of 4089 bytes (block 4095 - SID - counter - packet id): 12267 announced.
DEPLOY = [
    [0, "1003", 2, 1, "5003003201f4"], [2, "38030006" + "vc.bin".encode().hex() + "0004" + "00002feb" * 2, 20, 2, "7803020fff00"],
    [10, "360100000000", 4095, 25, "7601"], [40, "360200000001", 4095, 25, "7602"], [70, "360300000002", 4095, 25, "7603"],
    [100, "37", 33, 3, "77"],
]


def trace(rows: list[list[Any]], head: dict[str, Any] = FLASH_HEAD, trailer: str = "failed"):  # type: ignore[no-untyped-def]
    text = "\n".join(json.dumps(r) for r in [head, *rows, {"end": True, "exchanges": len(rows), "result": trailer}])
    return parse_trace(text + "\n")


def with_row(rows: list[list[Any]], index: int, row: list[Any] | None) -> list[list[Any]]:
    out = [list(r) for r in rows]
    if row is None:
        del out[index]
    else:
        out[index] = row
    return out[: index + 1] if row is not None and row[3] is None else out


def one(rows, head=FLASH_HEAD, mode="first"):  # type: ignore[no-untyped-def]
    """The finding for the injected fault. These hand-made traces go on after the fault where
    a real client would have stopped, so mode "all" also reports what follows from it."""
    findings = check_trace(trace(rows, head), RULES, head["packet"], mode)
    if mode == "first":
        assert len(findings) == 1, [(f.cause, f.detail) for f in findings]
    else:
        assert findings and findings == check_trace(trace(rows, head), RULES, head["packet"], "all")
        assert findings[0] == check_trace(trace(rows, head), RULES, head["packet"], "first")[0]
    return findings[0]


def test_clean_traces_pass():
    assert check_trace(trace(FLASH, trailer="success"), RULES, "bms", "all") == []
    assert check_trace(trace(DEPLOY, DEPLOY_HEAD, "success"), RULES, "vcu.bin", "all") == []


FLASH_CASES = [
    # (row index, replacement row, cause, side, unit)
    (10, [570, "3602", 4095, None, None, {"sent": False, "err": "BlockingSendFailure"}], "request_not_sent", "client", "GW"),
    (10, [570, "3602", 4095, None, None, {"id": 0x7F1}], "illegal_request_sender", "client", "GW"),
    (6, [12, "2ef1", 2, 1, "7f2e13"], "illegal_request_length", "client", "GW"),
    (4, [8, "2705", 2, 1, "7f2712"], "illegal_request_format", "client", "GW"),
    (10, [570, "3601", 4095 + 10, 1, "7f3613"], "illegal_request_length", "client", "GW"),
    (10, [570, "3603", 4095, 1, "7f3673"], "illegal_request_flow", "client", "GW"),
    (8, [520, "37", 1, 1, "7f3724"], "illegal_request_flow", "client", "GW"),
    (10, [570, "3602", 4095, None, None, {"err": "no response (timeout)"}], "response_not_sent", "server", "bms"),
    (10, [570, "3602", 4095, None, None, {"late": [[1600, "7602"]]}], "response_timeout", "server", "bms"),
    (7, [14, "3101ff00", 13, 7200, "7101ff0000", {"pend": [3, 7000]}], "response_timeout", "server", "bms"),
    (10, [570, "3602", 4095, None, None, {"stray": [[2, 0x6F0, "7602"]]}], "illegal_responder", "server", "bms"),
    (12, [650, "37", 1, 1, "7f"], "illegal_response_format", "server", "bms"),
    (10, [570, "3602", 4095, 1, "76"], "illegal_response_format", "server", "bms"),
    (10, [570, "3602", 4095, 1, "7f3672"], "negative_response", "server", "bms"),
    (10, [570, "3602", 4095, 1, "7603"], "unmatched_response", "server", "bms"),
    (0, [0, "1003", 2, 1, "5004003201f4"], "unmatched_response", "server", "bms"),
]


@pytest.mark.parametrize("mode", ["first", "all"])
@pytest.mark.parametrize("index, row, cause, side, unit", FLASH_CASES)
def test_flash_causes(index, row, cause, side, unit, mode):
    f = one(with_row(FLASH, index, row), mode=mode)
    assert (f.cause, f.side, f.unit, f.index, f.stage, f.packet) == (cause, side, unit, index, "flash", "bms")
    assert any(r["index"] == index for r in f.context) and len(f.context) <= 7
    if cause == "negative_response":
        assert (f.nrc, f.nrc_name) == (0x72, "GeneralProgrammingFailure")


DEPLOY_CASES = [
    (3, [40, "360200000001", 4095, None, None, {"sent": False}], "request_not_sent", "client", "TBOX", 1),
    (3, [40, "360200000001", 4095, None, None, {"id": 0x7D1}], "illegal_request_sender", "client", "TBOX", 1),
    (3, [40, "3602", 4095, 1, "7f3613"], "illegal_request_format", "client", "TBOX", None),
    (3, [40, "360200000001", 4200, 1, "7f3613"], "illegal_request_length", "client", "TBOX", 1),
    (3, [40, "360300000001", 4095, 1, "7f3673"], "illegal_request_flow", "client", "TBOX", 1),
    (3, [40, "360200000002", 4095, 1, "7f3631"], "illegal_request_flow", "client", "TBOX", 2),
    (3, [40, "360200000001", 4095, None, None], "response_not_sent", "server", "GW", 1),
    (3, [40, "360200000001", 4095, None, None, {"late": [[2500, "7602"]]}], "response_timeout", "server", "GW", 1),
    (3, [40, "360200000001", 4095, None, None, {"stray": [[3, 0x7E8, "7602"]]}], "illegal_responder", "server", "GW", 1),
    (3, [40, "360200000001", 4095, 1, "7f36"], "illegal_response_format", "server", "GW", 1),
    (3, [40, "360200000001", 4095, 1, "7f3622"], "negative_response", "server", "GW", 1),
    (3, [40, "360200000001", 4095, 1, "7603"], "unmatched_response", "server", "GW", 1),
]


@pytest.mark.parametrize("mode", ["first", "all"])
@pytest.mark.parametrize("index, row, cause, side, unit, packet", DEPLOY_CASES)
def test_deploy_causes(index, row, cause, side, unit, packet, mode):
    f = one(with_row(DEPLOY, index, row), DEPLOY_HEAD, mode)
    assert (f.cause, f.side, f.unit, f.index, f.packet) == (cause, side, unit, index, packet)


DOIP_HEAD = {**DEPLOY_HEAD, "request_id": 0x0E80, "response_id": 0x1010, "transport": "doip",
             "doip": {"host": "192.168.10.1", "port": 13400, "source": 0x0E80, "target": 0x1010}}
ASKED = "360200000001"
DOIP_CASES = [  # what the TBOX's DoIP channel recorded (x.doip) -> cause, side, unit, words of the detail
    ({"sent": False, "err": "x", "doip": {"act": 0x00}}, "routing_activation_refused", "client", "TBOX", "unknown source"),
    ({"sent": False, "err": "x", "doip": {"act": 0x03}}, "routing_activation_refused", "client", "TBOX", "another socket"),
    ({"sent": False, "err": "x", "doip": {"act": 0x01}}, "routing_activation_refused", "server", "GW", "all sockets"),
    ({"sent": False, "err": "x", "doip": {"nack": 0x03}}, "diagnostic_message_nack", "client", "TBOX", "unknown target"),
    ({"sent": False, "err": "x", "doip": {"nack": 0x06}}, "diagnostic_message_nack", "server", "GW", "unreachable"),
    ({"sent": False, "err": "x", "doip": {"gnack": 0x04}}, "diagnostic_message_nack", "client", "TBOX", "generic NACK"),
    ({"err": "x", "doip": {"closed": "alive_check"}}, "alive_check_timeout", "client", "TBOX", "alive check"),
    ({"err": "x", "doip": {"closed": "peer"}}, "doip_connection_failure", "server", "GW", "closed the connection"),
    ({"sent": False, "err": "x", "doip": {"conn": "unreachable"}}, "doip_connection_failure", "server", "GW",
     "could not be reached"),
    ({"sent": False, "err": "x", "doip": {"timeout": "ack"}}, "doip_connection_failure", "server", "GW", "acknowledge"),
]


@pytest.mark.parametrize("mode", ["first", "all"])
@pytest.mark.parametrize("extra, cause, side, unit, words", DOIP_CASES)
def test_doips_own_failures_are_causes_on_the_side_whose_doing_they_are(extra, cause, side, unit, words, mode):
    f = one(with_row(DEPLOY, 3, [40, ASKED, 4095, None, None, extra]), DOIP_HEAD, mode)
    assert (f.cause, f.side, f.unit, f.index, f.check.startswith("doip.")) == (cause, side, unit, 3, True)
    assert words in f.detail, f.detail


def test_a_link_the_client_closed_itself_is_judged_as_any_exchange():
    f = one(with_row(DEPLOY, 3, [40, ASKED, 4095, None, None, {"doip": {"closed": "client"}}]), DOIP_HEAD)
    assert (f.cause, f.side) == ("response_not_sent", "server")


def test_rules_without_doip_causes_still_diagnose_doip_failures():
    data = load_yaml(RULES_FILE)
    data["causes"] = {k: v for k, v in data["causes"].items() if not k.startswith("doip.")}
    rules = parse_rules(data, "old-rules.yaml")
    rows = with_row(DEPLOY, 3, [40, ASKED, 4095, None, None, {"sent": False, "doip": {"act": 0}}])
    (f,) = check_trace(trace(rows, DOIP_HEAD), rules, "vcu.bin")
    assert f.cause == "routing_activation_refused"
    data["causes"]["doip.nack"] = {"cause": "negative_response", "side": "client"}
    with pytest.raises(ConfigError, match="causes.doip.nack: needs a cause out of routing_activation_refused"):
        parse_rules(data, "bad-rules.yaml")


def test_every_cause_is_covered_in_both_stages():
    assert {c[1] for c in DOIP_CASES} == set(DOIP_CAUSES)
    assert {c[2] for c in FLASH_CASES} == set(CAUSES)
    assert {c[2] for c in DEPLOY_CASES} == set(CAUSES)


def test_resumed_deploy_counts_packets_from_the_file_position():
    rows = [[0, "1003", 2, 1, "5003003201f4"],
            [2, "38060006" + "vc.bin".encode().hex() + "0004" + "00002feb" * 2, 20, 2,
             "7806020fff00" + (4089 * 2).to_bytes(8, "big").hex()],
            [10, "360100000002", 4095, 25, "7601"], [40, "37", 33, 3, "77"]]
    assert check_trace(trace(rows, DEPLOY_HEAD), RULES, "vcu.bin", "all") == []
    rows[2] = [10, "360100000001", 4095, 25, "7601"]
    assert one(rows, DEPLOY_HEAD).detail == "deploy packet 1, expected 2"


def test_all_mode_reports_every_failure():
    rows = [list(r) for r in FLASH]
    rows[4] = [8, "2701", 2, None, None, {"late": [[1500, "670112345678"]]}]
    rows[10] = [570, "3602", 4095, 1, "7f3672"]
    first = check_trace(trace(rows), RULES, "bms", "first")
    every = check_trace(trace(rows), RULES, "bms", "all")
    assert [f.cause for f in first] == ["response_timeout"]
    # both injected faults, then the client going on after a refused block (also illegal), and
    # ending the transfer with the refused and the following block's bytes missing
    assert [f.cause for f in every] == ["response_timeout", "negative_response", "illegal_request_flow",
                                        "illegal_request_flow"]
    assert every[-1].request == "37" and "after 4093 of the 12279 bytes" in every[-1].detail


def test_a_late_answer_after_response_pending_names_p2_star():
    rows = with_row(FLASH, 7, [14, "3101ff00", 13, None, None, {"pend": [3], "late": [[6500, "7101ff0000"]]}])
    f = one(rows)
    assert f.cause == "response_timeout" and f.detail.endswith("when the client had given up (P2* 6000 ms)")
    f = one(with_row(FLASH, 10, [570, "3602", 4095, None, None, {"late": [[1600, "7602"]]}]))
    assert f.detail.endswith("(P2 1000 ms)")


def test_transfers_are_accounted_byte_by_byte():
    """The size RequestDownload / RequestFileTransfer announced against the TransferData bytes:
    an exit before the last block, or a block past the announced size, is the client's flow or
    length fault at that exchange (not the ECU's answer to it)."""
    short = [list(r) for r in FLASH]
    del short[11]  # the last block left out; the ECU refuses the exit
    short[11] = [650, "37", 1, 2, "7f3724"]
    f = one(short)
    assert (f.cause, f.side, f.unit, f.index, f.request) == ("illegal_request_flow", "client", "GW", 11, "37")
    assert f.detail == "0x37 ends the transfer after 8186 of the 12279 bytes announced by 0x34"
    long = [list(r) for r in FLASH]
    long[8] = [520, "3400440800000000002ff0", 11, 2, "74200fff"]  # 7 bytes fewer announced
    f = one(long)
    assert (f.cause, f.index, f.request) == ("illegal_request_length", 11, "3603")
    assert "12279 bytes with this block, 12272 announced by 0x34" in f.detail
    retried = [list(r) for r in FLASH]
    retried.insert(11, [600, "3602", 4095, 30, "7602"])  # a block sent again: counted once
    assert check_trace(trace(retried, trailer="success"), RULES, "bms", "all") == []
    deploy = [list(r) for r in DEPLOY]
    del deploy[4]
    f = one(deploy, DEPLOY_HEAD)
    assert (f.cause, f.side, f.unit, f.request, f.packet) == ("illegal_request_flow", "client", "TBOX", "37", None)
    assert "after 8178 of the 12267 bytes announced by 0x38" in f.detail


def test_d5_stage_selection_and_report():
    ok_flash = StageInput("flash", "vcu", {"result": "success"}, trace(FLASH, trailer="success"))
    bad_flash = StageInput("flash", "bms", {"result": "failed"}, trace(with_row(FLASH, 10, [570, "3602", 4095, 1, "7f3672"])))
    bad_deploy = StageInput("deploy", "vcu.bin", {"result": "failed"},
                            trace(with_row(DEPLOY, 3, [40, "360200000001", 4095, 1, "7f3622"]), DEPLOY_HEAD))
    ok_deploy = StageInput("deploy", "bms.bin", {"result": "success"}, trace(DEPLOY, DEPLOY_HEAD, "success"))
    v = diagnose([ok_deploy, bad_deploy, ok_flash, bad_flash], RULES)
    assert v.stage == "deploy" and v.abnormal == ["vcu.bin"] and v.cause == "negative_response"  # deploy only
    v = diagnose([ok_deploy, ok_flash, bad_flash], RULES, campaign_id="c-9")
    assert v.stage == "flash" and v.abnormal == ["bms"] and v.findings[0].unit == "bms"
    doc = v.to_json()
    assert doc["schema"] == "vota-diagnosis/1" and doc["cause"] == "negative_response" and doc["side"] == "server"
    text = render_markdown(v)
    assert "`negative_response` 0x72 GeneralProgrammingFailure" in text and ">> #10" in text
    clean = diagnose([ok_deploy, ok_flash], RULES)
    assert clean.abnormal == [] and clean.cause is None and "No abnormal package" in render_markdown(clean)


def test_unanalysable_input_is_reported_not_crashed():
    v = diagnose([StageInput("flash", "bms", {"result": "failed"}, None, "bms.trace.jsonl: line 4 is not JSON")], RULES)
    assert v.findings == [] and v.unanalysed[0]["reason"].endswith("line 4 is not JSON")
    v = diagnose([StageInput("flash", "bms", {"result": "failed"}, trace(FLASH))], RULES)
    assert "every exchange passed" in v.unanalysed[0]["reason"]


def test_rules_errors_name_the_key():
    data = load_yaml(RULES_FILE)
    data["causes"]["response.type"] = {"cause": "gremlins", "side": "server"}
    with pytest.raises(ConfigError, match="causes.response.type"):
        parse_rules(data, "d.yaml")
    data = load_yaml(RULES_FILE)
    data["stages"]["flash"]["flow"]["start"]["1003"] = "nowhere"
    with pytest.raises(ConfigError, match="unknown state 'nowhere'"):
        parse_rules(data, "d.yaml")


def test_cli_on_bad_input(tmp_path):
    from tests.conftest import vota

    assert vota("diagnose", str(tmp_path / "nope")).returncode == 2
    (tmp_path / "empty").mkdir()
    run = vota("diagnose", str(tmp_path / "empty"))
    assert run.returncode == 2 and "no deploy, flash or link results" in run.stderr
    d = tmp_path / "run"
    d.mkdir()
    (d / "bms.result.json").write_text(json.dumps({"schema": "vota-flash-result/1", "ecu": "bms", "result": "failed",
                                                   "trace_file": "bms.trace.jsonl"}))
    good = trace(with_row(FLASH, 10, [570, "3602", 4095, 1, "7f3672"])).to_text()
    (d / "bms.trace.jsonl").write_text(good[: len(good) // 2])  # truncated in the middle of a line
    (d / "vcu.result.json").write_text("{not json")
    run = vota("diagnose", str(d), "--json", str(tmp_path / "v.json"))
    assert run.returncode == 0 and "Traceback" not in run.stderr
    verdict = json.loads((tmp_path / "v.json").read_text())
    reasons = " ".join(u["reason"] for u in verdict["unanalysed"])
    assert "is not JSON (truncated or garbage)" in reasons and "unreadable result file" in reasons
    (d / "bms.trace.jsonl").write_text(good.replace('"version":1', '"version":7'))
    run = vota("diagnose", str(d), "--json", "-")
    assert "version 7 is not supported" in json.loads(run.stdout)["unanalysed"][0]["reason"]
    (d / "bms.trace.jsonl").write_text(good)
    run = vota("diagnose", str(d))
    assert run.returncode == 0 and "## `negative_response` 0x72 GeneralProgrammingFailure" in run.stdout
    bad_rules = tmp_path / "rules.yaml"
    bad_rules.write_text("version: 2\n")
    run = vota("diagnose", str(d), "--rules", str(bad_rules))
    assert run.returncode == 2 and "rules.yaml: version" in run.stderr


def test_state_names_and_where_packet_ids_are_carried_are_data():
    """Renaming the deploy flow's states in the rules changes nothing in the verdicts: the engine
    knows no state by name (the initial state and the packet-carrying states are rules too)."""
    data = load_yaml(RULES_FILE)
    deploy = data["stages"]["deploy"]
    renamed = {"start": "idle", "session": "open", "seed": "asking", "receiving": "taking", "reading": "giving"}
    deploy["flow"] = {renamed[s]: {k: renamed[v] for k, v in moves.items()} for s, moves in deploy["flow"].items()}
    deploy["initial"], deploy["packet"]["in"] = "idle", ["taking"]
    rules = parse_rules(data, "renamed.yaml")
    assert check_trace(trace(DEPLOY, DEPLOY_HEAD), rules, "vc.bin") == []
    skipped = with_row(DEPLOY, 3, [40, "360200000002", 4095, 25, "7602"])  # packet 2 where 1 comes next
    finding = check_trace(trace(skipped, DEPLOY_HEAD), rules, "vc.bin")[0]
    assert finding == check_trace(trace(skipped, DEPLOY_HEAD), RULES, "vc.bin")[0]
    assert finding.cause == "illegal_request_flow" and finding.index == 3
    del deploy["packet"]["in"]
    with pytest.raises(ConfigError, match="stages.deploy.packet.in"):
        parse_rules(data, "d.yaml")
    deploy["packet"]["in"], deploy["initial"] = ["taking"], "nowhere"
    with pytest.raises(ConfigError, match="stages.deploy.initial"):
        parse_rules(data, "d.yaml")


def test_a_deploy_with_security_access_is_a_clean_flow():
    """deploy.security_secret set: 27 01 / 27 02 (key not recorded, 34 bytes long) before the
    transfer is the normal flow, not an illegal one."""
    unlocked = [DEPLOY[0], [0.5, "2701", 2, 1, "6701" + "ab" * 16], [1.0, "2702", 34, 1, "6702"], *DEPLOY[1:]]
    assert check_trace(trace(unlocked, DEPLOY_HEAD), RULES, "vc.bin") == []
    early = [DEPLOY[0], [0.5, "2702", 34, 1, "6702"], *DEPLOY[1:]]  # a key before any seed
    (finding,) = check_trace(trace(early, DEPLOY_HEAD), RULES, "vc.bin", "first")
    assert finding.cause == "illegal_request_flow" and finding.request == "2702"


def test_a_failure_no_rule_explains_gets_the_verdict_unexplained():
    """Never silence: a failed flash whose trace passes every check (the failed step is not
    traced), or a campaign that failed before anything was deployed, is `unexplained`, with
    what failed and why the evidence does not show it."""
    clean = trace(FLASH, trailer="failed")
    verdict = diagnose([StageInput("flash", "bms", {"result": "failed", "failed_step": "verify",
                                                     "reason": "the ECU answered from another id"}, clean)], RULES)
    doc = verdict.to_json()
    assert (doc["cause"], doc["side"], doc["findings"]) == ("unexplained", None, [])
    assert doc["unexplained"]["failed_step"] == "verify" and "is not in the trace" in doc["unexplained"]["why"]
    text = render_markdown(verdict)
    assert "## `unexplained`" in text and "failed at `verify`" in text
    failure = {"stage": "download", "reason": "package_refused", "detail": "vcu-2.0.bin: the digest does not match"}
    before = diagnose([], RULES, "first", "c-1", failure).to_json()
    assert before["cause"] == "unexplained" and before["unexplained"]["failed_step"] == "package_refused"
    assert "failed in its download stage" in before["unexplained"]["why"]
    assert "no traced exchange shows this failure" in before["unexplained"]["why"]
    assert diagnose([], RULES, "first", "c-1").to_json()["cause"] is None  # nothing failed: no verdict to give


def test_the_version_reads_are_traced_and_judged():
    """The version read after the reset (step verify) is in the trace: a wrong-id answer to it is
    the ECU's illegal_responder there; a read the client asked again with success is no cause."""
    verify = [1110, "22f189", 3, None, None, {"stray": [[2, 0x7F9, "62f189322e30"]], "step": "verify"}]
    f = one([*FLASH, verify])
    assert (f.cause, f.side, f.unit, f.index, f.request) == ("illegal_responder", "server", "bms", len(FLASH), "22f189")
    retried = [[0, "22f189", 3, None, None, {"err": "no response (timeout)", "retried": True, "step": "version_before"}],
               [1, "22f189", 3, 1, "62f189312e302e30", {"step": "version_before"}]]
    assert check_trace(trace(retried + FLASH, trailer="success"), RULES, "bms", "all") == []
    assert one(retried[:1] + [[1, "22f189", 3, None, None, {"step": "version_before"}]] + FLASH).index == 1


def test_an_answer_the_client_asked_again_is_not_judged_its_last_attempt_is():
    busy = [570, "3602", 4095, 1, "7f3621", {"retried": True}]  # busyRepeatRequest, asked again
    rows = [list(r) for r in FLASH]
    rows.insert(10, busy)
    assert check_trace(trace(rows, trailer="success"), RULES, "bms", "all") == []
    rows[11] = [600, "3602", 4095, 1, "7f3672"]  # the last attempt refused: that is the finding
    f = one(rows)
    assert (f.cause, f.index, f.nrc) == ("negative_response", 11, 0x72)


def test_an_nrc_the_step_tolerated_is_not_judged():
    """A step that accepts a negative answer (an ECU without ControlDTCSetting answering 0x11) is
    marked x.tolerated by the sequence engine: no finding; the same answer not tolerated is one."""
    rows = [list(r) for r in FLASH]
    rows[1] = [2, "8502", 2, 1, "7f8511", {"tolerated": True}]
    assert check_trace(trace(rows, trailer="success"), RULES, "bms", "all") == []
    rows[1] = [2, "8502", 2, 1, "7f8511"]
    f = one(rows)
    assert (f.cause, f.index, f.nrc) == ("negative_response", 1, 0x11)


LINK_HEAD = {**DEPLOY_HEAD, "stage": "link", "packet": "installing"}
LINK = [  # the TBOX polls the install status twice (the second poll folded into the first), then reads a file
    [0, "1003", 2, 1, "5003003201f4", {"step": "install status", "rep": 1}], [2, "2701", 2, 1, "670112345678",
                                                                          {"step": "install status"}],
    [4, "2702", 34, 1, "6702", {"step": "install status"}], [6, "31030301", 9, 1, "710303010100000003",
                                                             {"step": "install status"}],
    [900, "1003", 2, 1, "5003003201f4", {"step": "read summary.json"}],
    [902, "38040010" + "summary.json".encode().hex(), 18, 1, "7804020fff00000400000da200000da2",
     {"step": "read summary.json"}],
    [904, "3601", 2, 5, "7601", {"step": "read summary.json", "rlen": 3492}],
    [910, "37", 1, 1, "77", {"step": "read summary.json"}],
]


def test_link_exchanges_are_judged_after_deploy_and_flash_with_their_step():
    ok = StageInput("link", "installing", {"result": "success"}, trace(LINK, LINK_HEAD, "success"))
    assert check_trace(ok.trace, RULES, "installing", "all") == []
    bad = StageInput("link", "installing", {"result": "failed"},
                     trace(with_row(LINK, 3, [6, "31030301", 9, 1, "7f3122", {"step": "install status"}]), LINK_HEAD))
    v = diagnose([ok, bad], RULES, campaign_id="c-1")
    assert (v.stage, v.abnormal, v.cause) == ("link", ["installing"], "negative_response")
    f = v.findings[0]
    assert (f.unit, f.side, f.step, f.stage, f.nrc) == ("GW", "server", "install status", "link", 0x22)
    assert "link exchanges of installing, step `install status`" in render_markdown(v)
    flash = StageInput("flash", "bms", {"result": "failed"}, trace(with_row(FLASH, 10, [570, "3602", 4095, 1, "7f3672"])))
    assert diagnose([bad, flash], RULES).stage == "flash"  # a failed transfer comes first: link exchanges only explain the rest
    too_long = with_row(LINK, 6, [904, "3601", 2, 5, "7601", {"step": "read summary.json", "rlen": 5000}])
    (finding,) = check_trace(trace(too_long, LINK_HEAD), RULES, "installing", "first")  # the real length is judged
    assert finding.cause == "illegal_response_format" and "5000 bytes" in finding.detail


def test_a_link_trace_never_records_the_data_of_a_file_it_reads():
    from agent.core.trace import TraceHeader, TraceRecorder

    rec = TraceRecorder(TraceHeader("link", "TBOX", "GW", "installing", 0x7D0, 0x7D8, None, 0.0), clock=lambda: 1.0)
    rec.request(bytes.fromhex("3601"))
    rec.response(bytes.fromhex("7601") + b'{"secret": "the file content"}')
    (row,) = [e.to_json() for e in rec.exchanges]
    assert row[4] == "7601" and row[5] == {"rlen": 32}
