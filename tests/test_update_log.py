"""The vehicle's update log: hash-chained, signed, bounded; any change on disk is named."""

from __future__ import annotations

import json
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.adapters.update_log import UpdateLog, verify_log
from tests.conftest import vota

KEY = Ed25519PrivateKey.generate()


def _log(path: Path, n: int = 6, **kw: int) -> UpdateLog:
    log = UpdateLog(path, KEY, **kw)
    for i in range(n):
        log.append("events", f"c-1.state.{i}", {"event": "state", "campaign_id": "c-1", "state": f"s{i}"})
    return log


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_an_intact_log_verifies_and_a_repeated_report_is_logged_once(tmp_path: Path) -> None:
    path = tmp_path / "update-log.jsonl"
    log = _log(path)
    log.append("events", "c-1.state.2", {"event": "state", "campaign_id": "c-1", "state": "again"})
    found = verify_log(path, KEY.public_key())
    assert (found["ok"], found["entries"], found["first_seq"], found["last_seq"], found["campaigns"]) == (
        True, 6, 1, 6, ["c-1"])
    assert verify_log(path, Ed25519PrivateKey.generate().public_key())["broken"]["line"] == 1  # another vehicle's key


def test_an_entry_changed_removed_moved_or_cut_from_the_head_is_named(tmp_path: Path) -> None:
    path = tmp_path / "update-log.jsonl"
    _log(path)
    good = _lines(path)
    changed = json.loads(good[2])
    changed["body"]["state"] = "success"  # a failure rewritten as a success
    cases = {
        "changed": (good[:2] + [json.dumps(changed, sort_keys=True, separators=(",", ":")).encode() + b"\n"] + good[3:], 3),
        "removed": (good[:2] + good[3:], 3),
        "moved": (good[:2] + [good[3], good[2]] + good[4:], 3),
        "head removed": (good[1:], 1),
    }
    for what, (lines, line) in cases.items():
        path.write_bytes(b"".join(lines))
        found = verify_log(path, KEY.public_key())
        assert not found["ok"] and found["broken"]["line"] == line, (what, found)
        unsigned = verify_log(path, None)  # the chain alone catches it too, one line later at most
        assert not unsigned["ok"] and unsigned["broken"]["line"] in (line, line + 1), (what, unsigned)


def test_a_line_cut_by_a_kill_is_dropped_and_the_log_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "update-log.jsonl"
    _log(path, 3)
    with open(path, "ab") as handle:
        handle.write(b'{"seq": 4, "ts": 1.0, "body": {"ev')  # killed in the middle of a write
    assert verify_log(path, KEY.public_key())["broken"]["why"].endswith("(cut off)")
    log = UpdateLog(path, KEY)
    log.append("events", "c-2.finished", {"event": "finished", "campaign_id": "c-2", "outcome": "success"})
    found = verify_log(path, KEY.public_key())
    assert found["ok"] and found["entries"] == 4 and found["campaigns"] == ["c-1", "c-2"], found


def test_a_pruned_log_still_verifies_and_a_forged_prune_does_not(tmp_path: Path) -> None:
    path = tmp_path / "update-log.jsonl"
    _log(path, 25, max_entries=10)
    lines = _lines(path)
    head = json.loads(lines[0])
    assert head["type"] == "pruned" and len(lines) <= 11, head
    found = verify_log(path, KEY.public_key())
    assert found["ok"] and found["last_seq"] == 25 and found["first_seq"] == head["seq"] + 1, found
    head["pruned"]["through_seq"] += 1  # hiding one more entry than was pruned
    path.write_bytes(json.dumps(head, sort_keys=True, separators=(",", ":")).encode() + b"\n" + b"".join(lines[1:]))
    assert verify_log(path, KEY.public_key())["broken"]["line"] == 1


def test_vota_log_verify_says_intact_or_where_it_breaks(tmp_path: Path) -> None:
    path = tmp_path / "update-log.jsonl"
    _log(path)
    pub = tmp_path / "report.pub"
    pub.write_bytes(KEY.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    run = vota("log", "verify", str(path), "--key", str(pub))
    assert run.returncode == 0 and "intact: 6 entries (seq 1 to 6), 1 campaigns, every signature verified" in run.stdout
    lines = _lines(path)
    path.write_bytes(b"".join(lines[:3] + lines[4:]))
    run = vota("log", "verify", str(path), "--key", str(pub))
    assert run.returncode == 1 and "broken at line 4 (seq 5)" in run.stdout, run.stdout
    run = vota("log", "verify", str(tmp_path / "missing.jsonl"))
    assert run.returncode == 2 and "no such log" in run.stderr


def test_a_full_disk_keeps_entries_in_memory_and_writes_them_when_there_is_room(small_disk) -> None:  # type: ignore[no-untyped-def]
    """On a real full file system (a tmpfs filled up): nothing is lost, nothing is torn, the
    chain verifies at every point, and a log opened again after a kill in the full state holds
    exactly the whole entries that were written."""
    disk = small_disk(1)
    path = disk.path / "update-log.jsonl"
    log = _log(path, n=3)
    disk.fill()
    big = "x" * 3000  # entries larger than what a full page of the file can still take
    for i in range(3, 8):
        log.append("events", f"c-1.state.{i}", {"event": "state", "campaign_id": "c-1", "state": f"s{i}", "pad": big})
        found = verify_log(path, KEY.public_key())
        assert found["ok"], found  # whole lines only, whatever the disk took
    on_disk = verify_log(path, KEY.public_key())["entries"]
    assert 3 <= on_disk < 8, on_disk  # the full disk took some at most
    reopened = UpdateLog(path, KEY)  # a TBOX killed meanwhile: what reached the disk, whole
    assert reopened.seq == on_disk
    disk.free()
    log.append("events", "c-1.state.8", {"event": "state", "campaign_id": "c-1", "state": "s8"})
    found = verify_log(path, KEY.public_key())
    assert found["ok"] and found["entries"] == 9 and found["last_seq"] == 9, found
    assert [json.loads(line)["body"]["state"] for line in _lines(path)] == [f"s{i}" for i in range(9)]
