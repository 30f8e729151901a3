"""Custom service content: bundles signed and encrypted by the trust platform, verified by
the vehicle, and scheduled by their configuration parameters (injected clock)."""

from __future__ import annotations

import datetime as dt
import io
import json
import tarfile

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.core.campaign import key_id
from agent.core.content import BundleRejected, build_bundle, pack_archive, parse_schedule, read_archive, sign_bundle, verify_bundle

SHANGHAI = dt.timezone(dt.timedelta(hours=8))
VIN = "LVOTA000000000001"
PLATFORM = Ed25519PrivateKey.generate()
TRUSTED = {key_id(PLATFORM.public_key()): PLATFORM.public_key()}
VEHICLE = X25519PrivateKey.generate()
NOW = dt.datetime(2026, 5, 18, 12, 0, tzinfo=SHANGHAI)

SPEC = {
    "bundle_id": "dlp-520", "bundle_version": 3, "owner": "owner-42", "title": "20 May projection",
    "config": {"mode": "night", "start": "2026-05-20T00:00:00", "expiry": "2026-05-21T00:00:00",
               "tz": "Asia/Shanghai", "window": "19:00-23:00"},
    "items": [
        {"id": "heart", "class": "resource", "target": "dlp_headlamp", "policy": "auto", "encrypt": True},
        {"id": "music", "class": "application", "target": "com.example.music", "policy": "manual",
         "config": {"mode": "any", "window": None}},
        {"id": "navi-maps", "class": "software", "target": "ivi", "policy": "never"},
    ],
}
FILES = {"heart": b"projection material " * 200, "music": b"app package " * 100, "navi-maps": b"big " * 1000}


def signed(spec=SPEC, files=FILES, key=PLATFORM) -> bytes:  # type: ignore[no-untyped-def]
    return sign_bundle(build_bundle(spec, files, VEHICLE.public_key(), VIN), key)


def verify(data: bytes, **kw):  # type: ignore[no-untyped-def]
    return verify_bundle(data, TRUSTED, **{"vin": VIN, "now": NOW, **kw})


def test_build_sign_verify_and_decrypt():
    bundle = verify(signed())
    assert (bundle.bundle_id, bundle.bundle_version, bundle.vin) == ("dlp-520", 3, VIN)
    heart, music, maps = bundle.items
    assert heart.encryption is not None and bundle.files[heart.file] != FILES["heart"]  # encrypted in the archive
    assert bundle.item_data(heart, VEHICLE) == FILES["heart"]
    assert bundle.item_data(music, None) == FILES["music"]
    assert (maps.policy, music.policy) == ("never", "manual")
    with pytest.raises(BundleRejected) as err:
        bundle.item_data(heart, X25519PrivateKey.generate())  # another vehicle's key
    assert err.value.reason == "cannot_decrypt"


def at(day: int, hour: int, minute: int = 0, month: int = 5) -> dt.datetime:
    return dt.datetime(2026, month, day, hour, minute, tzinfo=SHANGHAI)


def test_20_may_evening_window_starts_and_stops_the_projection():
    s = parse_schedule(SPEC["config"])
    assert s.state(at(19, 20), night=True) == "waiting"  # the day before
    assert s.state(at(20, 18, 59), night=True) == "waiting"
    assert s.state(at(20, 19, 0), night=True) == "active"
    assert s.state(at(20, 22, 59), night=True) == "active"
    assert s.state(at(20, 23, 0), night=True) == "waiting"  # window closed
    assert s.state(at(21, 0, 0), night=True) == "expired"
    assert s.state(at(20, 20), night=False) == "waiting"  # night-only content waits for night


def test_1_june_boot_animation_expires_after_3_june():
    s = parse_schedule({"start": "2026-06-01T00:00:00", "expiry": "2026-06-04T00:00:00", "tz": "Asia/Shanghai"})
    assert s.state(at(31, 23, 59), night=False) == "waiting"
    assert s.state(at(1, 0, 0, month=6), night=False) == "active"
    assert s.state(at(3, 23, 59, month=6), night=True) == "active"
    assert s.state(at(4, 0, 0, month=6), night=False) == "expired"


def test_window_across_midnight_and_per_item_override():
    s = parse_schedule({"window": "22:00-02:00", "tz": "Asia/Shanghai"})
    assert [s.state(at(20, h), True) for h in (21, 22, 1, 2)] == ["waiting", "active", "active", "waiting"]
    item = parse_schedule(SPEC["config"], {"mode": "any", "window": None})
    assert item.state(at(20, 12), night=False) == "active"


def _tamper(data: bytes, name: str, change) -> bytes:  # type: ignore[no-untyped-def]
    members = read_archive(data, 10 << 20)
    members[name] = change(members[name])
    return pack_archive(members)


def _reason(data: bytes, **kw) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(BundleRejected) as err:
        verify(data, **kw)
    return err.value.reason


def test_refusals():
    good = signed()
    assert _reason(_tamper(good, "manifest.json", lambda b: b.replace(b'"bundle_version":3', b'"bundle_version":9'))) \
        == "bad_signature"
    assert _reason(_tamper(good, "items/music.bin", lambda b: b"x" + b[1:])) == "digest_mismatch"
    twice = _tamper(good, "manifest.json", lambda b: b.replace(b'"bundle_version":3', b'"bundle_version":9,"bundle_version":3'))
    with pytest.raises(BundleRejected, match="the key 'bundle_version' appears twice"):  # one meaning or none
        verify(twice)
    assert _reason(signed(key=Ed25519PrivateKey.generate())) == "untrusted_key"
    assert _reason(good, now=dt.datetime(2026, 6, 1, tzinfo=SHANGHAI)) == "expired"
    assert _reason(good, installed={"dlp-520": 3}) == "rollback"
    assert _reason(good, installed={"dlp-520": 5}) == "rollback"
    assert verify(good, installed={"dlp-520": 2}).bundle_version == 3
    assert _reason(good, vin="LOTHER") == "wrong_vehicle"
    assert _reason(build_bundle(SPEC, FILES, VEHICLE.public_key(), VIN)) == "unsigned"
    assert _reason(_tamper(good, "items/music.bin", lambda b: b + b"y" * 100_000)) == "too_large"


def test_archive_with_paths_outside_and_links_is_refused():
    for member in ("../evil", "/etc/passwd", "items/../../x"):
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w") as tar:
            info = tarfile.TarInfo(member)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
        assert _reason(out.getvalue()) == "unsafe_path"
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        link = tarfile.TarInfo("items/link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/shadow"
        tar.addfile(link)
    assert _reason(out.getvalue()) == "unsafe_path"
    assert _reason(b"not a tar at all" * 100) == "malformed"


def test_far_larger_than_declared_is_refused_while_reading():
    with pytest.raises(BundleRejected) as err:
        read_archive(signed(), limit=1000)
    assert err.value.reason == "too_large"


@pytest.mark.parametrize("change", [
    lambda s: s["config"].update(mode="dusk"),
    lambda s: s["config"].update(tz="Mars/Olympus"),
    lambda s: s["config"].update(window="7pm-11pm"),
    lambda s: s["items"][0].update({"class": "firmware"}),
    lambda s: s["items"][1].update(policy="sometimes"),
    lambda s: s.update(bundle_version="3"),
])
def test_malformed_specs_are_not_built(change):
    spec = json.loads(json.dumps(SPEC))
    change(spec)
    with pytest.raises(BundleRejected) as err:
        build_bundle(spec, FILES, VEHICLE.public_key(), VIN)
    assert err.value.reason == "malformed"


def test_cli_keygen_build_sign_verify(tmp_path):
    import yaml

    from tests.conftest import vota

    assert vota("campaign", "keygen", "--out", str(tmp_path / "platform")).returncode == 0
    assert vota("content", "keygen", "--out", str(tmp_path / "car")).returncode == 0
    (tmp_path / "heart.bin").write_bytes(FILES["heart"])
    (tmp_path / "music.apk").write_bytes(FILES["music"])
    spec = {**SPEC, "items": [{**SPEC["items"][0], "source": "heart.bin"}, {**SPEC["items"][1], "source": "music.apk"}]}
    spec["config"] = {**SPEC["config"], "expiry": "2099-01-01T00:00:00"}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    run = vota("content", "build", str(tmp_path / "spec.yaml"), "--vehicle-key", str(tmp_path / "car" / "vehicle.pub"),
               "--vin", VIN, "--out", str(tmp_path / "b.tar"))
    assert run.returncode == 0, run.stderr
    run = vota("content", "sign", str(tmp_path / "b.tar"), "--key", str(tmp_path / "platform" / "signing.key"),
               "--out", str(tmp_path / "b.signed.tar"))
    assert run.returncode == 0, run.stderr
    ok = vota("content", "verify", str(tmp_path / "b.signed.tar"), "--trusted", str(tmp_path / "platform" / "signing.pub"),
              "--vin", VIN)
    assert ok.returncode == 0 and "heart (resource -> dlp_headlamp, auto, encrypted)" in ok.stdout
    old = vota("content", "verify", str(tmp_path / "b.signed.tar"), "--trusted", str(tmp_path / "platform" / "signing.pub"),
               "--vin", VIN, "--installed", "3")
    assert old.returncode == 1 and "rollback" in old.stderr and "Traceback" not in old.stderr
    unsigned = vota("content", "verify", str(tmp_path / "b.tar"), "--trusted", str(tmp_path / "platform" / "signing.pub"),
                    "--vin", VIN)
    assert unsigned.returncode == 1 and "unsigned" in unsigned.stderr


def test_cli_review_of_the_sample_content():
    from tests.conftest import vota

    run = vota("content", "review", "configs/content/may20.yaml", "--at", "2026-05-01T00:00:00+08:00")
    assert run.returncode == 0 and "approved (3 items)" in run.stdout, run.stdout + run.stderr
    late = vota("content", "review", "configs/content/may20.yaml", "--at", "2026-06-01T00:00:00+08:00")
    assert late.returncode == 1 and "heart: expires before it could run" in late.stdout
    bad = vota("content", "review", "configs/content/may20.yaml", "--at", "tomorrow")
    assert bad.returncode == 2 and "ISO 8601" in bad.stderr and "Traceback" not in bad.stderr


def test_an_archive_of_too_many_members_is_refused_before_it_is_read():
    many = pack_archive({f"items/f{i}": b"" for i in range(1001)})
    with pytest.raises(BundleRejected) as caught:
        read_archive(many, 1 << 20)
    assert caught.value.reason == "too_large" and "more than 1000 archive members" in str(caught.value)
