"""The evidence pack (agent/adapters/evidence_pack.py, tbox/evidence.py): made from a TBOX state
directory written by the real update log, checked offline; every kind of change to it caught.
A whole vehicle's pack of a failed campaign: tests/test_hmi.py."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.adapters.evidence_pack import verify_pack, write_pack
from agent.adapters.storage import atomic_write_json
from agent.adapters.update_log import UpdateLog
from tbox.evidence import gather
from tests.conftest import vota

KEY = Ed25519PrivateKey.generate()


def pack_files(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name.split("/", 1)[1]: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]


def _rewrite(path: Path, change: dict[str, bytes | None]) -> None:
    """The pack with some files replaced (None: removed), the rest as it was."""
    files = pack_files(path)
    top = next(iter(tarfile.open(path).getnames())).split("/")[0]
    with tarfile.open(path, "w:gz") as tar:
        for name, data in {**files, **change}.items():
            if data is not None:
                info = tarfile.TarInfo(f"{top}/{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """A TBOX state directory: two campaigns in the update log, one with its directory."""
    log = UpdateLog(tmp_path / "update-log.jsonl", KEY)
    log.append("events", "c-1.state.received.1", {"event": "state", "campaign_id": "c-1", "state": "received"})
    log.append("inventory", "c-1.inventory", {"campaign_id": "c-1", "ecus": [{"ecu": "vcu", "software_version": "1.0"}],
                                              "rxswin": {"R10": "A"}})
    log.append("events", "c-2.state.received.1", {"event": "state", "campaign_id": "c-2", "state": "received"})
    log.append("events", "c-1.hmi.1.offered", {"event": "hmi", "campaign_id": "c-1", "state": "offered",
                                               "information": {"en": {"purpose": "p"}}})
    log.append("events", "c-1.finished", {"event": "finished", "campaign_id": "c-1", "outcome": "success",
                                          "versions": {"vcu": {"software_version": "2.0"}},
                                          "rxswin": {"before": {"R10": "A"}, "after": {"R10": "B"}}})
    record = tmp_path / "campaigns" / "k1"
    atomic_write_json(record / "state.json", {"campaign_id": "c-1", "state": "reported"})
    (record / "flash").mkdir()
    (record / "flash" / "vcu.trace.jsonl").write_text('{"header": 1}\n')
    (record / "packages").mkdir()
    (record / "packages" / "vcu-2.0.bin").write_bytes(b"\x00" * 1000)  # not evidence: its digest is signed
    return tmp_path


def test_a_pack_verifies_and_every_change_is_caught(state: Path, tmp_path: Path) -> None:
    files = gather(state, "c-1")
    assert set(files) == {"update-log.jsonl", "campaign-log.jsonl", "summary.json", "campaign/state.json",
                          "campaign/flash/vcu.trace.jsonl"}
    summary = json.loads(files["summary.json"])
    assert summary["rxswin"] == {"before": {"R10": "A"}, "after": {"R10": "B"}}
    assert summary["versions"] == {"before": {"vcu": "1.0"}, "after": {"vcu": "2.0"}}
    assert [s["state"] for s in summary["shown"]] == ["offered"] and summary["information"] == {"en": {"purpose": "p"}}
    assert files["campaign-log.jsonl"].count(b"\n") == 4 and b"c-2" not in files["campaign-log.jsonl"]
    pack = tmp_path / "p.tar.gz"
    write_pack(pack, "c-1", "VIN1", files, KEY)
    assert verify_pack(pack, KEY.public_key()) == {"ok": True, "campaign_id": "c-1", "vin": "VIN1", "files": 5,
                                                   "problems": []}
    other = Ed25519PrivateKey.generate().public_key()
    assert "manifest.sig does not verify" in verify_pack(pack, other)["problems"][0]

    cases = {
        "a file changed": ({"campaign/flash/vcu.trace.jsonl": b"{}\n"}, "vcu.trace.jsonl: its SHA-256"),
        "a file removed": ({"summary.json": None}, "summary.json: named by the manifest, missing"),
        "a file added": ({"campaign/extra.json": b"{}"}, "extra.json: in the archive, not in the manifest"),
    }
    for what, (change, why) in cases.items():
        tampered = tmp_path / f"{what}.tar.gz"
        tampered.write_bytes(pack.read_bytes())
        _rewrite(tampered, change)
        problems = verify_pack(tampered, KEY.public_key())["problems"]
        assert any(why in p for p in problems), (what, problems)

    # the log changed before the pack was made and signed: the pack's own check still finds it
    lines = files["update-log.jsonl"].splitlines(keepends=True)
    for what, log in (("an entry removed", b"".join(lines[:1] + lines[2:])),
                      ("entries swapped", b"".join([lines[1], lines[0], *lines[2:]]))):
        forged = tmp_path / f"{what}.tar.gz"
        write_pack(forged, "c-1", "VIN1", {**files, "update-log.jsonl": log}, KEY)
        problems = verify_pack(forged, KEY.public_key())["problems"]
        assert any("update-log.jsonl: broken at line" in p for p in problems), (what, problems)
    forged = tmp_path / "extract.tar.gz"
    write_pack(forged, "c-1", "VIN1", {**files, "campaign-log.jsonl": lines[0].replace(b"received", b"verified")}, KEY)
    assert "not in the update log as written" in verify_pack(forged, KEY.public_key())["problems"][0]


def test_hostile_archives_and_bad_usage(state: Path, tmp_path: Path) -> None:
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        for name in ("evidence-c/manifest.json", "evidence-c/../../etc/passwd"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"{}"))
    assert "not a file inside the pack's directory" in verify_pack(evil, None)["problems"][0]
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"\x1f\x8b not really")
    assert "not a readable archive" in verify_pack(junk, None)["problems"][0]

    key = tmp_path / "report.key"
    key.write_bytes(KEY.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    config = tmp_path / "v.yaml"
    config.write_text(f"segments: {{bb: {{bus: {{interface: virtual, channel: x}}}}}}\n"
                      f"deploy: {{segment: bb}}\n"
                      f"tbox: {{vin: VIN1, state_dir: {state}, trusted_keys: [k.pub], cloud: {{report_key: {key}}}}}\n")
    run = vota("evidence", "c-9", "-c", str(config), "--out", str(tmp_path / "x.tar.gz"))
    assert run.returncode == 2 and "no campaign 'c-9'" in run.stderr and "Traceback" not in run.stderr, run.stderr
    run = vota("evidence", "c-1", "-c", str(config), "--out", str(tmp_path / "ok.tar.gz"))
    assert run.returncode == 0, run.stderr
    pub = tmp_path / "report.pub"
    pub.write_bytes(KEY.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    run = vota("evidence", "--verify", str(tmp_path / "ok.tar.gz"), "--key", str(pub))
    assert run.returncode == 0 and "intact: campaign c-1, 5 files, signed" in run.stdout, run.stdout + run.stderr
    run = vota("evidence", "--verify", str(junk))
    assert run.returncode == 1 and "not intact" in run.stdout
    run = vota("evidence", "--verify", str(tmp_path / "missing.tar.gz"))
    assert run.returncode == 2 and "no such evidence pack" in run.stderr
    assert vota("evidence").returncode == 2


def test_a_pack_from_the_cloud_s_store_checks_each_report_against_the_vehicle_s_key(tmp_path: Path) -> None:
    from agent.core.signed_report import sign_report
    from cloud_sim.evidence import gather_store

    vehicle, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    store = tmp_path / "store"
    for n, (kind, body, key) in enumerate([
            ("events", {"event": "state", "campaign_id": "c-1", "state": "received"}, vehicle),
            ("inventory", {"campaign_id": "c-1", "ecus": [], "rxswin": {"R10": "A"}}, vehicle),
            ("events", {"event": "state", "campaign_id": "c-2", "state": "received"}, vehicle),
            ("events", {"event": "finished", "campaign_id": "c-1", "outcome": "success", "versions": {}}, vehicle)]):
        doc = sign_report({"id": f"m{n}", "vin": "VIN1", "type": kind, "ts": 100.0 + n, "body": body}, key)
        atomic_write_json(store / "VIN1" / "messages" / kind / f"{n:010d}-m{n}.json", doc)
    (store / "VIN1" / "traces").mkdir()
    (store / "VIN1" / "traces" / "c-1.flash.vcu.jsonl").write_text("{}\n")
    files = gather_store(store, "VIN1", "c-1")
    assert set(files) == {"reports.jsonl", "summary.json", "traces/c-1.flash.vcu.jsonl"}
    assert files["reports.jsonl"].count(b"\n") == 3 and json.loads(files["summary.json"])["outcome"] == "success"
    pack = tmp_path / "cloud.tar.gz"
    write_pack(pack, "c-1", "VIN1", files, KEY)
    assert verify_pack(pack, KEY.public_key(), vehicle.public_key())["ok"]
    lines = files["reports.jsonl"].splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if b'"finished"' in line)
    forged = json.loads(lines[at])
    forged["body"]["outcome"] = "failed"  # the outcome changed, signed again by someone else
    lines[at] = json.dumps(sign_report({k: v for k, v in forged.items() if k != "signatures"}, other)).encode() + b"\n"
    write_pack(pack, "c-1", "VIN1", {**files, "reports.jsonl": b"".join(lines)}, KEY)
    problems = verify_pack(pack, KEY.public_key(), vehicle.public_key())["problems"]
    assert len(problems) == 1 and problems[0].startswith(f"reports.jsonl line {at + 1}: "), problems
    with pytest.raises(Exception, match="no report of campaign 'c-9'"):
        gather_store(store, "VIN1", "c-9")
