"""The TBOX's content manager in one process: a real package server, an injected clock,
and a recording executor at the executor port (the real executors run in
tests/test_content_vehicle.py against the whole vehicle)."""

from __future__ import annotations

import base64
import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.core.campaign import key_id
from agent.core.config import ContentConfig
from agent.core.content import decrypt_item, pack_archive, read_archive
from agent.errors import VotaError
from cloud_sim.cloud import content_offer
from cloud_sim.package_server import PackageServer
from cloud_sim.trust import ReviewRefused, TrustPlatform
from tbox.content_exec import Job
from tbox.content_manager import ContentManager, write_inbox

VIN = "LVOTA000000000007"
SHANGHAI = dt.timezone(dt.timedelta(hours=8))
SPEC = {
    "bundle_id": "evening", "bundle_version": 1, "owner": "o", "title": "evening",
    "config": {"mode": "any", "start": "2026-05-20T00:00:00", "expiry": "2026-05-21T00:00:00",
               "tz": "Asia/Shanghai", "window": "19:00-23:00"},
    "items": [{"id": "lamp", "class": "resource", "target": "dlp_headlamp"},
              {"id": "extra", "class": "resource", "target": "tail_light", "policy": "never"}],
}
FILES = {"lamp": b"lamp " * 1000, "extra": b"extra " * 1000}


class Recorder:
    """The executor port: records what the manager asked for."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, bytes]] = []

    def start(self, job: Job) -> str:
        self.calls.append(("start", job.item.id, job.data()))
        return "active"

    def stop(self, job: Job) -> None:
        self.calls.append(("stop", job.item.id, b""))

    def revert(self, job: Job) -> None:
        self.calls.append(("revert", job.item.id, b""))

    def poll(self, job: Job) -> tuple[str, dict[str, Any]] | None:
        return "active", {}


class Car:
    def __init__(self, tmp: Path, server: PackageServer, platform: Ed25519PrivateKey, key: X25519PrivateKey) -> None:
        self.tmp, self.server, self.platform, self.key = tmp, server, platform, key
        self.now = dt.datetime(2026, 5, 20, 18, 0, tzinfo=SHANGHAI)
        self.reports: list[dict[str, Any]] = []
        self.ids: set[str] = set()
        self.recorder = Recorder()
        self.manager = self.boot()

    def boot(self) -> ContentManager:
        def report(body: dict[str, Any], msg_id: str) -> None:
            if msg_id not in self.ids:  # the outbox stores a message id once
                self.ids.add(msg_id)
                self.reports.append(body)

        manager = ContentManager(ContentConfig(), self.tmp / "tbox", VIN, {key_id(self.platform.public_key()): self.platform.public_key()},
                                 report, {"resource": self.recorder}, lambda: self.now, vehicle_key=self.key)
        manager.start()
        return manager

    def offer(self, bundle: bytes, request: bool = True) -> None:
        url = f"http://127.0.0.1:{self.server.port}/packages"
        self.manager.submit(json.loads(content_offer(bundle, self.server.root, url, VIN, request)))

    def at(self, hour: int, minute: int = 0, day: int = 20) -> None:
        self.now = dt.datetime(2026, 5, day, hour, minute, tzinfo=SHANGHAI)
        self.manager.step()
        self.manager.step()

    def status(self, item: str | None = None) -> str:
        doc = json.loads((self.tmp / "tbox" / "content" / "bundles" / "evening-v1" / "state.json").read_text())
        return str(doc["items"][item]["status"] if item else doc["status"])


@pytest.fixture
def car(tmp_path):  # type: ignore[no-untyped-def]
    server = PackageServer(tmp_path / "served").start()
    (tmp_path / "served").mkdir(exist_ok=True)
    platform, key = Ed25519PrivateKey.generate(), X25519PrivateKey.generate()
    trust = TrustPlatform(platform)
    trust.submit(SPEC, FILES)
    assert trust.review("evening", now=dt.datetime(2026, 5, 1, tzinfo=dt.timezone.utc)).status == "approved"
    c = Car(tmp_path, server, platform, key)
    c.offer(trust.bundle_for("evening", VIN, key.public_key()))
    yield c
    server.stop()


def test_window_restart_decline_and_a_never_item_accepted_later(car):
    car.at(18, 30)
    assert car.status() == "downloaded" and car.status("lamp") == "scheduled" and car.status("extra") == "offered"
    assert not any("extra" in r["path"] for r in car.server.requests)  # policy never: not fetched
    car.at(19, 5)
    assert car.recorder.calls == [("start", "lamp", FILES["lamp"])]  # decrypted for the executor
    car.manager = car.boot()  # a TBOX restart in the window: nothing runs twice
    car.at(19, 30)
    assert [c[0] for c in car.recorder.calls] == ["start"]

    write_inbox(car.tmp / "tbox", {"command": "content_accept", "bundle_id": "evening", "item": "extra"})
    car.at(19, 40)
    assert car.status("extra") == "active" and any("extra" in r["path"] for r in car.server.requests)
    write_inbox(car.tmp / "tbox", {"command": "content_decline", "bundle_id": "evening", "item": "lamp"})
    car.at(19, 50)
    assert car.status("lamp") == "declined" and car.recorder.calls[-1][:2] == ("revert", "lamp")
    car.at(23, 30)
    assert car.status("extra") == "scheduled" and car.recorder.calls[-1][:2] == ("stop", "extra")
    car.at(0, 30, day=21)
    assert car.status("extra") == "expired" and car.recorder.calls[-1][:2] == ("revert", "extra")
    assert not (car.tmp / "tbox" / "content" / "bundles" / "evening-v1" / "items").exists()  # ended: files pruned
    lamp = [(r["status"], r.get("at")) for r in car.reports if r.get("item") == "lamp"]
    assert lamp == [("scheduled", "2026-05-20T18:30:00+08:00"), ("active", "2026-05-20T19:05:00+08:00"),
                    ("declined", "2026-05-20T19:50:00+08:00")]


def test_unknown_commands_and_bundles_are_rejected_and_the_manager_goes_on(car):
    car.manager.submit({"command": "content_launch"})
    car.manager.submit({"command": "content_request", "bundle_id": "nothing"})
    car.manager.submit({"command": "content_offer", "manifest": "%%%", "signature": "x", "urls": {}})
    (car.tmp / "tbox" / "content" / "inbox" / "broken.json").write_text("{not json")
    car.at(18, 30)
    reasons = sorted(r["reason"] for r in car.reports if r["event"] == "rejected")
    assert reasons == ["malformed", "malformed", "malformed", "unknown_bundle"]
    assert car.status() == "downloaded"  # the good offer went on regardless
    assert not list((car.tmp / "tbox" / "content" / "inbox").iterdir())


def test_a_command_that_breaks_does_not_cost_the_rest_of_its_batch(car):
    """Every command of a batch gets its event, whatever one of them runs into: here the executor
    of a declined active item fails with an error nobody planned for."""
    car.at(19, 30)
    assert car.status("lamp") == "active"

    def revert_fails(job: Job) -> None:
        raise RuntimeError("the headlamp link broke")

    car.recorder.revert = revert_fails  # type: ignore[method-assign]
    car.manager.submit({"command": "content_accept", "bundle_id": "evening", "item": {"not": "an id"}})
    car.manager.submit({"command": "content_decline", "bundle_id": "evening", "item": "lamp"})
    for n in range(4):
        car.manager.submit({"command": "content_request", "bundle_id": f"after-{n}"})
    car.at(19, 31)
    rejected = [(r["reason"], r.get("bundle_id")) for r in car.reports if r["event"] == "rejected"]
    assert rejected == [("malformed", "evening"), ("internal_error", "evening")] + [
        ("unknown_bundle", f"after-{n}") for n in range(4)]


def test_sharing_rewraps_the_key_and_review_refuses(tmp_path):
    platform = Ed25519PrivateKey.generate()
    trust = TrustPlatform(platform)
    mine, friend = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    trust.submit(SPEC, FILES)
    with pytest.raises(ReviewRefused):
        trust.bundle_for("evening", VIN, mine.public_key())  # not reviewed yet
    trust.review("evening", now=dt.datetime(2026, 5, 1, tzinfo=dt.timezone.utc))
    a = read_archive(trust.bundle_for("evening", VIN, mine.public_key()), 1 << 20)
    b = read_archive(trust.bundle_for("evening", "LVOTA000000000008", friend.public_key()), 1 << 20)
    assert a["items/lamp.bin"] == b["items/lamp.bin"]  # the same ciphertext ...
    meta_a = json.loads(a["manifest.json"])["items"][0]["encryption"]
    meta_b = json.loads(b["manifest.json"])["items"][0]["encryption"]
    assert meta_a["key"]["wrapped"] != meta_b["key"]["wrapped"]  # ... its key wrapped for each vehicle
    assert decrypt_item(b["items/lamp.bin"], meta_b, friend) == FILES["lamp"]
    assert json.loads(b["manifest.json"])["vin"] == "LVOTA000000000008"
    assert base64.b64decode(meta_a["nonce"]) == base64.b64decode(meta_b["nonce"])

    bad = {**SPEC, "bundle_id": "bad", "title": "", "items": [
        {"id": "x", "class": "resource", "target": "windscreen"}, {"id": "y", "class": "software", "target": "vcu"}]}
    trust.submit(bad, {"x": b"1", "y": b"2"})
    problems = trust.review("bad", now=dt.datetime(2026, 6, 1, tzinfo=dt.timezone.utc)).problems
    assert any("title" in p for p in problems) and any("windscreen" in p for p in problems)
    assert any("version" in p for p in problems) and any("expires before" in p for p in problems)


def test_imported_archives_and_a_newer_version_superseding_the_running_one(car):
    from agent.core.content import build_bundle, sign_bundle

    car.at(19, 5)
    assert car.status("lamp") == "active"
    inbox = car.tmp / "tbox" / "content" / "inbox"
    v2 = {**SPEC, "bundle_version": 2, "items": [{"id": "lamp", "class": "resource", "target": "dlp_headlamp", "encrypt": True}]}
    good = sign_bundle(build_bundle(v2, FILES, car.key.public_key(), VIN), car.platform)
    members = read_archive(good, 1 << 20)
    (inbox / "1.tar").write_bytes(pack_archive({**members, "../../outside.bin": b"x"}))
    (inbox / "2.tar").write_bytes(pack_archive({**members, "items/lamp.bin": members["items/lamp.bin"] + b"\0" * 200_000}))
    (inbox / "3.tar").write_bytes(good)
    car.at(19, 10)
    reasons = [r["reason"] for r in car.reports if r["event"] == "rejected"]
    assert reasons == ["unsafe_path", "too_large"]
    assert not (car.tmp / "outside.bin").exists() and not (car.tmp / "tbox" / "outside.bin").exists()
    new = json.loads((car.tmp / "tbox" / "content" / "bundles" / "evening-v2" / "state.json").read_text())
    assert new["status"] == "downloaded" and new["items"]["lamp"]["status"] == "active"
    assert car.status() == "superseded" and car.status("lamp") == "superseded"
    assert [c[:2] for c in car.recorder.calls] == [("start", "lamp"), ("revert", "lamp"), ("start", "lamp")]
    assert json.loads((car.tmp / "tbox" / "content" / "installed.json").read_text()) == {"evening": 2}
    (inbox / "4.tar").write_bytes(good)  # the same again: the version is no longer newer
    car.at(19, 15)
    assert [r["reason"] for r in car.reports if r["event"] == "rejected"][-1] == "rollback"


def test_an_app_bound_for_manual_updates_waits_for_the_owner(tmp_path):
    from agent.core.content import build_bundle, sign_bundle
    from tbox.apps import AppRegistry
    from tbox.content_exec import AppExecutor

    server = PackageServer(tmp_path / "served").start()
    (tmp_path / "served").mkdir(exist_ok=True)
    platform, key = Ed25519PrivateKey.generate(), X25519PrivateKey.generate()
    registry = AppRegistry(tmp_path / "apps")
    registry.install("com.example.music", "2.0", b"old")
    reports: list[dict[str, Any]] = []
    manager = ContentManager(ContentConfig(), tmp_path / "tbox", VIN, {key_id(platform.public_key()): platform.public_key()},
                             lambda body, msg_id: reports.append(body), {"application": AppExecutor(registry)},
                             lambda: dt.datetime(2026, 5, 20, 12, 0, tzinfo=SHANGHAI), vehicle_key=key, registry=registry)
    manager.start()
    try:
        write_inbox(tmp_path / "tbox", {"command": "content_bind", "app": "com.example.music", "auto_update": False})
        app = {"bundle_id": "apps", "bundle_version": 1, "owner": "o", "title": "apps",
               "items": [{"id": "music", "class": "application", "target": "com.example.music", "version": "2.1"}]}
        bundle = sign_bundle(build_bundle(app, {"music": b"new app"}), platform)
        manager.submit(json.loads(content_offer(bundle, server.root, f"http://127.0.0.1:{server.port}/packages", VIN, True)))
        manager.step()
        manager.step()
        assert registry.version("com.example.music") == "2.0"  # bound manual: the update waits
        state = json.loads((tmp_path / "tbox" / "content" / "bundles" / "apps-v1" / "state.json").read_text())
        assert state["items"]["music"] == {**state["items"]["music"], "status": "offered", "policy": "manual"}
        write_inbox(tmp_path / "tbox", {"command": "content_accept", "bundle_id": "apps"})  # one tap
        manager.step()
        manager.step()
        assert registry.version("com.example.music") == "2.1" and registry.package("com.example.music") == b"new app"
        assert {"event": "app", "app": "com.example.music", "auto_update": False} in reports
    finally:
        server.stop()


def test_a_later_item_that_fails_its_check_does_not_stop_the_running_ones(car):
    car.at(19, 5)
    assert car.status("lamp") == "active"
    served = next(p for p in car.server.root.iterdir() if p.name.endswith("-extra.bin"))
    served.write_bytes(served.read_bytes()[::-1])  # changed on the server: same size, other bytes
    write_inbox(car.tmp / "tbox", {"command": "content_accept", "bundle_id": "evening", "item": "extra"})
    car.at(19, 10)
    assert car.status() == "downloaded" and car.status("lamp") == "active" and car.status("extra") == "failed"
    failed = [r for r in car.reports if r.get("item") == "extra" and r["status"] == "failed"]
    assert failed and failed[0]["reason"] == "digest_mismatch"
    assert (car.tmp / "tbox" / "content" / "bundles" / "evening-v1" / "items" / "lamp.bin").exists()
    car.at(23, 30)
    assert car.status("lamp") == "scheduled"  # the schedule goes on


def test_bundle_records_read_back_what_earlier_versions_wrote(tmp_path):
    from tbox.content_state import BundleRecord

    doc = {"schema": 1, "bundle_id": "evening", "version": 2, "title": "t", "owner": "o", "status": "downloaded",
           "changes": 3, "urls": {"lamp": "http://x/lamp"}, "reopened": True,
           "items": {"lamp": {"status": "active", "policy": "auto", "accepted": False, "changes": 2, "ran": True,
                              "delivered": True, "retries": 1},
                     "app": {"status": "installing", "policy": "manual", "accepted": True, "changes": 1,
                             "campaign_id": "content-evening-v2-app"},
                     "maps": {"status": "offered", "policy": "never", "accepted": False, "changes": 0}}}
    (tmp_path / "state.json").write_text(json.dumps(doc))
    record = BundleRecord.load(tmp_path)
    assert record.items["lamp"].delivered and record.items["app"].campaign_id == "content-evening-v2-app"
    assert not record.items["maps"].wanted and record.items["app"].wanted
    assert record.to_json() == doc  # nothing lost, nothing added
    (tmp_path / "state.json").write_text('{"schema": 1, "bundle_id": "x"}')
    with pytest.raises(VotaError, match="unreadable content state"):
        BundleRecord.load(tmp_path)
