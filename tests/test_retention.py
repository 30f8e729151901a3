"""What the gateway keeps of ended installs (gateway/retention.py): packages an ended install
was given go, those the starting install names stay, owner content stays, old results retire."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from agent.protocol.link import InstallJob, InstallManifest, InstallStatus, encode_manifest
from gateway.retention import MANIFEST_COPY, tidy


def _install(results: Path, packages: Path, cid: str, files: list[str], code: int, age_s: float) -> None:
    out = results / cid
    out.mkdir(parents=True)
    manifest = InstallManifest(cid, tuple(InstallJob(f"e{i}", f, "2.0.0") for i, f in enumerate(files)))
    (out / MANIFEST_COPY).write_bytes(encode_manifest(manifest))
    (out / "install.json").write_text(json.dumps({"campaign_id": cid, "code": code}))
    (out / "summary.json").write_text("{}")
    at = time.time() - age_s
    os.utime(out / "install.json", (at, at))
    for name in [*files, f"install-{cid}.json"]:
        (packages / name).write_bytes(b"x")
    (packages / f"{files[0]}.part").write_bytes(b"half")


def test_ended_installs_give_back_their_packages_and_old_results_retire(tmp_path: Path) -> None:
    results, packages = tmp_path / "results", tmp_path / "packages"
    results.mkdir()
    packages.mkdir()
    (results / "keys").mkdir()  # the key store lives here too: not an install
    (packages / "boot_animation.gif").write_bytes(b"owner content")  # not named by any manifest
    for n in range(5):
        _install(results, packages, f"c-{n}", [f"vcu-{n}.bin", "shared.bin"], InstallStatus.FAILED, age_s=100 - n)
    _install(results, packages, "c-old", ["bms-0.bin"], InstallStatus.SUCCEEDED, age_s=200 * 86400)
    _install(results, packages, "c-run", ["bcm-9.bin"], InstallStatus.RUNNING, age_s=1)
    tidy(packages, results, current="c-5", keep_names=frozenset({"shared.bin"}), keep=3, keep_days=90)
    assert sorted(p.name for p in packages.iterdir()) == ["bcm-9.bin", "bcm-9.bin.part", "boot_animation.gif",
                                                         "install-c-run.json", "shared.bin"]
    assert sorted(p.name for p in results.iterdir()) == ["c-2", "c-3", "c-4", "c-run", "keys"]


def test_the_outbox_gives_back_the_space_of_sent_messages(tmp_path: Path) -> None:
    from agent.adapters.outbox import Outbox

    box = Outbox(tmp_path / "outbox.db")
    for n in range(400):
        box.put("t", os.urandom(2048), f"m{n}")
    for message in box.pending(limit=400):
        box.ack(message.id)
    grown = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert box.compact() is True and len(box) == 0
    assert sum(p.stat().st_size for p in tmp_path.iterdir()) * 10 < grown
    box.put("t", b"after", "m-after")  # still a working outbox
    assert [m.id for m in box.pending()] == ["m-after"]


def test_an_outbox_from_before_the_clouds_acknowledgements_keeps_its_messages(tmp_path: Path) -> None:
    """An outbox written by the previous version (no ``published`` column): opened by this one,
    every message is still there and still to send; one the broker took waits for the cloud,
    and goes out again once the resend time has passed."""
    import sqlite3
    import time

    from agent.adapters.outbox import Outbox

    old = sqlite3.connect(tmp_path / "outbox.db")
    old.executescript("CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, "
                      "topic TEXT NOT NULL, payload BLOB NOT NULL, retain INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL);")
    old.executemany("INSERT INTO outbox (id, topic, payload, created) VALUES (?, 't', ?, ?)",
                    [(f"m{n}", b"x", time.time()) for n in range(3)])
    old.commit()
    old.close()
    box = Outbox(tmp_path / "outbox.db")
    assert [m.id for m in box.pending()] == ["m0", "m1", "m2"] and box.unpublished() == 3
    box.published("m0")
    assert [m.id for m in box.pending(resend_after=60)] == ["m1", "m2"] and len(box) == 3
    time.sleep(0.01)
    assert [m.id for m in box.pending(resend_after=0)][0] == "m0"  # not acknowledged in time: sent again
    box.ack("m0")
    assert len(box) == 2
    box.close()
