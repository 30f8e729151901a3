"""Owner content on a whole vehicle (C1-C8): the stand-in cloud reviews, signs and offers;
the owner's request makes the TBOX download, verify and decrypt; the schedule runs on a
simulated clock; the ECU simulators show what they were told; every state change reaches
the cloud."""

from __future__ import annotations

import datetime as dt
import json
import time

from tests.conftest import vota
from tests.vehicle import VIN

PROJECTION = {
    "bundle_id": "dlp-520", "bundle_version": 1, "owner": "owner-42", "title": "20 May projection",
    "config": {"mode": "night", "start": "2026-05-20T00:00:00", "expiry": "2026-05-21T00:00:00",
               "tz": "Asia/Shanghai", "window": "19:00-23:00"},
    "items": [
        {"id": "heart", "class": "resource", "target": "dlp_headlamp", "policy": "auto"},
        {"id": "music", "class": "application", "target": "com.example.music", "policy": "manual", "version": "2.1",
         "config": {"mode": "any", "window": None}},
        {"id": "maps", "class": "software", "target": "vcu", "version": "9.0.0", "policy": "never"},
    ],
}
FILES = {"heart": b"\x89projection frame " * 900, "music": b"app package " * 300, "maps": b"map data " * 5000}
HEART = "c-dlp-520-v1-heart.bin"


def _until(predicate, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_projection_runs_on_the_evening_of_20_may_at_night_only(bare_vehicle):
    v = bare_vehicle
    trust = v.cloud.trust
    trust.submit(PROJECTION, FILES)
    reviewed = trust.review("dlp-520", now=dt.datetime(2026, 5, 18, tzinfo=dt.timezone.utc))  # submitted two days before
    assert reviewed.status == "approved", reviewed.problems
    v.set_light(800)  # daylight: the night-only projection must wait even inside its window
    # 18:50 Shanghai time on 20 May, 15 simulated minutes per real second
    v.tbox = v.start_tbox("--clock", "2026-05-20T18:50:00+08:00", "--clock-rate", "900")
    v.cloud.offer_content("dlp-520", VIN)
    state = v.wait_content("dlp-520", lambda s: s.get("bundle") == "offered")
    assert v.shown() is None and not (v.tmp / "tbox" / "content" / "bundles" / "dlp-520-v1" / "items").exists()

    v.cloud.request_content(VIN, "dlp-520")  # the owner's phone
    state = v.wait_content("dlp-520", lambda s: s.get("heart") == "scheduled")
    assert state["bundle"] == "downloaded"
    served = [r["path"] for r in v.cloud.packages.requests]
    assert not any("maps" in p for p in served), served  # policy never: not downloaded
    assert state.get("music") is None  # manual: waits for the owner
    time.sleep(2)  # 19:20 by now: inside the window, but the light sensor says day
    assert v.shown() is None and v.cloud.content_state(VIN, "dlp-520")["heart"] == "scheduled"

    v.set_light(3)  # dusk
    v.wait_content("dlp-520", lambda s: s.get("heart") == "active", timeout=20)
    assert v.shown() == HEART
    assert (v.ecu_state("dlp_headlamp") / "content" / HEART).read_bytes() == FILES["heart"]  # decrypted on the way
    relay = v.tmp / "gw" / "results" / "content"  # the gateway's exchange with the lamp, traced with its step
    assert json.loads((relay / "dlp_headlamp.show.link.result.json").read_text())["result"] == "success"
    rows = [json.loads(line) for line in (relay / "dlp_headlamp.show.link.trace.jsonl").read_text().splitlines()[1:-1]]
    assert [(row[1][:8], row[5]["step"]) for row in rows] == [("1003", "show"), ("31010401", "show")], rows

    run = vota("content", "accept", "-c", str(v.config), "dlp-520", "music")
    assert run.returncode == 0, run.stderr
    v.wait_content("dlp-520", lambda s: s.get("music") == "active", timeout=20)
    registry = json.loads((v.tmp / "tbox" / "apps" / "registry.json").read_text())
    assert registry["apps"]["com.example.music"]["version"] == "2.1"
    listing = vota("content", "list", "-c", str(v.config))
    assert "dlp-520 v1  downloaded" in listing.stdout and "heart active" in listing.stdout and "maps offered" in listing.stdout

    # 23:00: the window closes and the lamp stops; midnight: expired, the app reverted
    v.wait_content("dlp-520", lambda s: s.get("heart") == "scheduled", timeout=40)
    assert v.shown() is None
    v.wait_content("dlp-520", lambda s: s.get("heart") == "expired" and s.get("music") == "expired", timeout=30)
    registry = json.loads((v.tmp / "tbox" / "apps" / "registry.json").read_text())
    assert registry["apps"]["com.example.music"]["version"] is None
    heart = [e["status"] for e in v.cloud.content_events(VIN, "dlp-520") if e.get("item") == "heart"]
    assert heart == ["scheduled", "active", "scheduled", "expired"]


BOOT = {
    "bundle_id": "boot-601", "bundle_version": 1, "owner": "owner-42", "title": "Children's Day boot animation",
    "config": {"mode": "any", "start": "2026-06-01T00:00:00", "expiry": "2026-06-03T00:00:00", "tz": "Asia/Shanghai"},
    "items": [{"id": "anim", "class": "resource", "target": "boot_animation", "policy": "auto"}],
}
ANIM = "c-boot-601-v1-anim.bin"


def test_boot_animation_across_restarts_and_a_vehicle_that_was_off(bare_vehicle):
    v = bare_vehicle
    v.cloud.trust.submit(BOOT, {"anim": b"frames " * 3000})
    assert v.cloud.trust.review("boot-601", now=dt.datetime(2026, 5, 30, tzinfo=dt.timezone.utc)).status == "approved"
    v.tbox = v.start_tbox("--clock", "2026-05-31T20:00:00+08:00")  # the evening before
    v.cloud.offer_content("boot-601", VIN, request=True)
    v.wait_content("boot-601", lambda s: s.get("anim") == "scheduled")
    assert v.shown("bcm") is None
    assert v.tbox.stop() == 0  # the vehicle is switched off across the start on 1 June

    v.tbox = v.start_tbox("--clock", "2026-06-02T08:00:00+08:00")
    v.wait_content("boot-601", lambda s: s.get("anim") == "active")
    assert v.shown("bcm") == ANIM  # the boot animation ECU (the BCM here) shows it
    v.tbox.stop(sig_kill=True)  # killed in the middle of the window

    v.tbox = v.start_tbox("--clock", "2026-06-02T09:00:00+08:00")
    time.sleep(2)
    assert v.shown("bcm") == ANIM
    events = [e["status"] for e in v.cloud.content_events(VIN, "boot-601") if e.get("item") == "anim"]
    assert events == ["scheduled", "active"]  # nothing happened twice
    assert v.tbox.stop() == 0  # off again, across the expiry on 3 June

    v.tbox = v.start_tbox("--clock", "2026-06-04T07:30:00+08:00")
    v.wait_content("boot-601", lambda s: s.get("anim") == "expired")
    assert v.shown("bcm") is None  # reverted: the default animation again ...
    assert not list((v.ecu_state("bcm") / "content").glob("c-*"))  # ... and the material deleted from the ECU
    owner_view = json.loads((v.tmp / "cloud" / "store" / VIN / "content" / "boot-601.json").read_text())
    assert owner_view["status"] == "downloaded" and owner_view["items"]["anim"]["status"] == "expired"
    assert owner_view["items"]["anim"]["at"].startswith("2026-06-04T07:30")
    show = vota("content", "show", "-c", str(v.config), "boot-601")
    assert "anim: resource -> boot_animation, policy auto" in show.stdout and "expired" in show.stdout


def _signed_offer(v, spec, files, key=None, version_tamper=None):  # type: ignore[no-untyped-def]
    from agent.core.content import build_bundle, sign_bundle

    return sign_bundle(build_bundle(spec, files, v.vehicle_key.public_key(), VIN), key or v.platform)


def _rejections(v):  # type: ignore[no-untyped-def]
    return {m["body"].get("bundle_id") or m["body"].get("detail"): m["body"]["reason"] for m in v.cloud.collector.messages
            if m["body"].get("event") == "rejected" and m["body"].get("topic") == "content"}


def test_bad_bundles_are_refused_with_their_reason_and_nothing_is_lost(bare_vehicle):
    import io
    import tarfile

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from agent.core.content import BundleRejected, pack_archive, read_archive

    v = bare_vehicle
    v.tbox = v.start_tbox()
    keep = {"bundle_id": "keep", "bundle_version": 2, "owner": "o", "title": "kept",
            "items": [{"id": "logo", "class": "resource", "target": "dlp_headlamp", "encrypt": True}]}
    v.cloud.offer_bundle(VIN, _signed_offer(v, keep, {"logo": b"logo " * 500}), request=True)
    v.wait_content("keep", lambda s: s.get("logo") == "active")
    assert v.shown() == "c-keep-v2-logo.bin"

    def spec(bid, **kw):  # type: ignore[no-untyped-def]
        return {"bundle_id": bid, "bundle_version": 1, "owner": "o", "title": bid, **kw,
                "items": [{"id": "x", "class": "resource", "target": "dlp_headlamp", "encrypt": True}]}

    good = {"x": b"payload " * 400}
    # tampered manifest: the title changed after signing
    members = read_archive(_signed_offer(v, spec("tampered"), good), 1 << 20)
    members["manifest.json"] = members["manifest.json"].replace(b'"title":"tampered"', b'"title":"tampereD"')
    v.cloud.offer_bundle(VIN, pack_archive(members), request=True)
    # wrong signer; expired; an older version of the installed bundle (replay)
    v.cloud.offer_bundle(VIN, _signed_offer(v, spec("stranger"), good, key=Ed25519PrivateKey.generate()), request=True)
    v.cloud.offer_bundle(VIN, _signed_offer(v, spec("old", config={"expiry": "2020-01-01T00:00:00Z"}), good), request=True)
    v.cloud.offer_bundle(VIN, _signed_offer(v, {**keep, "bundle_version": 1}, {"logo": b"evil " * 500}), request=True)
    # a manifest (validly signed by a careless platform) whose item points outside the bundle
    members = read_archive(_signed_offer(v, spec("escape"), good), 1 << 20)
    doc = json.loads(members["manifest.json"])
    doc["items"][0]["file"] = "../../etc/escape.bin"
    members["manifest.json"] = json.dumps(doc).encode()
    members["manifest.sig.json"] = _sign(v.platform, members["manifest.json"])
    v.cloud.offer_bundle(VIN, pack_archive(members), request=True)
    expected = {"tampered": "bad_signature", "stranger": "untrusted_key", "old": "expired", "keep": "rollback",
                "escape": "unsafe_path"}
    assert v.cloud.collector.wait_for(lambda c: all(k in _rejections(v) for k in expected), 30), _rejections(v)
    assert {k: _rejections(v)[k] for k in expected} == expected

    # an archive with ../ members never leaves the cloud
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        info = tarfile.TarInfo("../evil")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    try:
        v.cloud.offer_bundle(VIN, out.getvalue())
        raise AssertionError("offered")
    except BundleRejected as exc:
        assert exc.reason == "unsafe_path"

    # items that are not what the manifest says: changed on the server, or larger than declared
    for bid, change in (("swapped", lambda d: bytes(reversed(d))), ("bloated", lambda d: d + b"more" * 100)):
        bundle = _signed_offer(v, spec(bid), good)
        v.cloud.offer_bundle(VIN, bundle)
        v.wait_content(bid, lambda s: s.get("bundle") == "offered")
        served = v.tmp / "cloud" / "packages" / f"content-{bid}-v1-{VIN}-x.bin"
        served.write_bytes(change(served.read_bytes()))
        v.cloud.request_content(VIN, bid)
    v.wait_content("swapped", lambda s: s.get("bundle") == "failed")
    v.wait_content("bloated", lambda s: s.get("bundle") == "failed")
    reasons = {e["bundle_id"]: e.get("reason") for e in v.cloud.content_events(VIN) if e["status"] == "failed" and "item" not in e}
    assert reasons == {"swapped": "digest_mismatch", "bloated": "too_large"}

    # a target no ECU of this vehicle shows: the item fails with the reason, the rest stands
    nowhere = {"bundle_id": "nowhere", "bundle_version": 1, "owner": "o", "title": "t",
               "items": [{"id": "x", "class": "resource", "target": "tail_light"}]}
    v.cloud.offer_bundle(VIN, _signed_offer(v, nowhere, good), request=True)
    v.wait_content("nowhere", lambda s: s.get("x") == "failed")
    failed = [e for e in v.cloud.content_events(VIN, "nowhere") if e.get("item") == "x"][-1]
    assert failed["reason"] == "unknown_target" and "tail_light" in failed["detail"]

    # nothing of them ran, nothing already there was lost
    assert v.shown() == "c-keep-v2-logo.bin"
    assert sorted(p.name for p in (v.ecu_state("dlp_headlamp") / "content").glob("c-*")) == ["c-keep-v2-logo.bin"]
    listing = json.loads(vota("content", "list", "-c", str(v.config), "--json").stdout)
    assert {(b["bundle_id"], b["status"]) for b in listing} == {("keep", "downloaded"), ("swapped", "failed"),
                                                               ("bloated", "failed"), ("nowhere", "downloaded")}
    assert v.tbox.p.poll() is None  # the daemon kept running


def _sign(key, manifest: bytes) -> bytes:  # type: ignore[no-untyped-def]
    import base64

    from agent.core.campaign import key_id

    return json.dumps({"keyid": key_id(key.public_key()),
                       "sig": base64.b64encode(key.sign(b"vota-content-v1\n" + manifest)).decode()}).encode()


def test_software_items_flash_their_ecu_and_a_fault_there_is_diagnosed(tmp_path, mosquitto, write_config, procs):
    from tests.vehicle import Vehicle

    v = Vehicle(tmp_path, mosquitto, write_config, procs, tbox=False, tbox_extra={"diagnose": True},
                ecu_faults=("bcm:36#2:nrc=0x72",))
    try:
        fw = {"bundle_id": "fw", "bundle_version": 1, "owner": "owner-42", "title": "configuration data",
              "items": [{"id": "vcu-cal", "class": "software", "target": "vcu", "version": "2.0.0"},
                        {"id": "bcm-cal", "class": "software", "target": "bcm", "version": "2.0.0"},
                        {"id": "bms-old", "class": "software", "target": "bms", "version": "0.9.0"}]}
        v.cloud.trust.submit(fw, {"vcu-cal": b"\x01" * 20_000, "bcm-cal": b"\x02" * 20_000, "bms-old": b"\x03" * 1000})
        assert v.cloud.trust.review("fw").status == "approved"
        v.tbox = v.start_tbox()
        v.cloud.offer_content("fw", VIN, request=True)
        state = v.wait_content("fw", lambda s: s.get("vcu-cal") in ("active", "failed") and s.get("bcm-cal") in ("active", "failed"),
                               timeout=120)
        assert (state["vcu-cal"], state["bcm-cal"]) == ("active", "failed")
        v.wait_content("fw", lambda s: s.get("bms-old") == "failed")
        older = [e for e in v.cloud.content_events(VIN, "fw") if e.get("item") == "bms-old"][-1]
        assert older["reason"] == "downgrade" and "older than the installed 1.0.0" in older["detail"]
        failed = [e for e in v.cloud.content_events(VIN, "fw") if e.get("status") == "failed" and e["item"] == "bcm-cal"][0]
        assert failed["campaign_id"] == "content-fw-v1-bcm-cal" and failed["reason"] == "flash_failed"
        assert failed["cause"] == "negative_response"  # the TBOX's own diagnosis
        flashed = {m["body"]["ecu"]: m["body"]["result"] for m in v.cloud.collector.messages
                   if m["type"] == "results" and m["body"].get("stage") == "flash"}
        assert flashed["vcu"]["result"] == "success" and flashed["vcu"]["version_after"] == "2.0.0"
        assert flashed["bcm"]["result"] == "failed" and flashed["bcm"]["nrc"] == 0x72
        assert v.cloud.collector.wait_for(lambda c: "content-fw-v1-bcm-cal" in c.verdicts, 30)
        verdict = v.cloud.collector.verdicts["content-fw-v1-bcm-cal"]  # the cloud's diagnosis, as for any campaign
        assert (verdict["cause"], verdict["side"], verdict["unit"]) == ("negative_response", "server", "bcm")
    finally:
        v.close()


def test_a_lamp_that_does_not_answer_gets_its_material_when_it_is_back(bare_vehicle):
    from tests.conftest import Proc

    v = bare_vehicle
    sim = v.procs[0]
    assert sim.stop() == 0  # every ECU simulator is off (asleep, unplugged)
    v.tbox = v.start_tbox()
    now = {"bundle_id": "now", "bundle_version": 1, "owner": "o", "title": "now",
           "items": [{"id": "glow", "class": "resource", "target": "dlp_headlamp"}]}
    v.cloud.offer_bundle(VIN, _signed_offer(v, now, {"glow": b"glow " * 2000}), request=True)
    v.wait_content("now", lambda s: s.get("glow") == "scheduled")
    time.sleep(4)  # several attempts: the ECU does not answer, the item is not failed
    assert v.cloud.content_state(VIN, "now")["glow"] == "scheduled"
    assert "will retry" in v.tbox.text()

    sim = Proc("ecu-sim", "-c", str(v.config), "--state-dir", str(v.tmp / "ecu"), log=v.tmp / "ecu2.log")
    v.procs.append(sim)
    sim.wait_ready("ecu-sim ready")
    v.wait_content("now", lambda s: s.get("glow") == "active", timeout=90)
    assert v.shown() == "c-now-v1-glow.bin"
    assert not list((v.tmp / "gw" / "packages").glob("c-now-*"))  # the gateway's copy went once the ECU held it
    transfers = v.tmp / "gw" / "results" / "content"
    assert json.loads((transfers / "c-now-v1-glow.bin.deploy.result.json").read_text())["result"] == "success"
    verdict = vota("diagnose", str(transfers), "--json", "-")  # the gateway -> ECU transfer's header-only trace
    assert verdict.returncode == 0 and json.loads(verdict.stdout)["cause"] is None, verdict.stdout + verdict.stderr
    assert v.cloud.collector.wait_for(lambda c: any(
        m["type"] == "results" and m["body"].get("stage") == "content" and m["body"]["result"]["result"] == "success"
        for m in c.messages), 20)  # the TBOX read the transfer back and reported it, with its trace
    stored = list((v.tmp / "cloud" / "store" / VIN / "traces").glob("content.dlp_headlamp.c-now-v1-glow.bin.*.jsonl"))
    traces = [p.read_bytes() for p in stored]
    assert (transfers / "c-now-v1-glow.bin.deploy.trace.jsonl").read_bytes() in traces
    assert any(b'"failed"' in t for t in traces)  # the attempts while the lamp was off are evidence too
