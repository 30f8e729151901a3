"""Campaign format, signing and every reason a vehicle refuses one."""

from __future__ import annotations

import base64
import copy
import datetime as dt
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.core.campaign import CampaignRejected, compare_versions, key_id, sign_campaign, verify_campaign
from tests.conftest import vota

NOW = dt.datetime(2026, 11, 21, 12, 0, tzinfo=dt.timezone.utc)
KEY = Ed25519PrivateKey.generate()
TRUSTED = {key_id(KEY.public_key()): KEY.public_key()}
DOC = {
    "format": "vota-campaign", "version": 1, "campaign_id": "c-0001", "vin": "LVOTA000000000001",
    "issued": "2026-11-21T10:00:00Z", "expires": "2026-12-31T00:00:00Z", "install": "immediate",
    "packages": [{"name": "vcu-2.0.0.bin", "ecu": "vcu", "version": "2.0.0", "url": "http://127.0.0.1:1/vcu",
                  "size": 1024, "sha256": "ab" * 32}],
}

DELTA = {"name": "vcu-2.0.0.from-1.0.0.delta", "url": "http://127.0.0.1:1/d", "size": 99, "sha256": "cd" * 32,
         "base_sha256": "ef" * 32, "base_version": "1.0.0", "image_crc32": 7}


def test_a_package_may_carry_a_delta():
    doc = copy.deepcopy(DOC)
    doc["packages"][0]["delta"] = DELTA
    (package,) = verify(sign_campaign(doc, KEY)).packages
    assert package.delta is not None and package.delta.to_json() == DELTA and package.to_json()["delta"] == DELTA


def verify(envelope: bytes, **kw):  # type: ignore[no-untyped-def]
    args = {"vin": "LVOTA000000000001", "now": NOW, "installed": {"vcu": "1.0.0"}, "known_ecus": {"vcu", "bms"}}
    args.update(kw)
    return verify_campaign(envelope, TRUSTED, **args)


def test_sign_and_verify():
    campaign = verify(sign_campaign(DOC, KEY))
    assert campaign.campaign_id == "c-0001" and campaign.packages[0].version == "2.0.0"
    assert campaign.install == "immediate"


def _reason(envelope: bytes, **kw) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(CampaignRejected) as err:
        verify(envelope, **kw)
    return err.value.reason


def test_rejections():
    good = sign_campaign(DOC, KEY)
    env = json.loads(good)
    assert _reason(good, vin="LOTHER") == "wrong_vehicle"
    assert _reason(good, now=dt.datetime(2027, 1, 1, tzinfo=dt.timezone.utc)) == "expired"
    assert _reason(good, installed={"vcu": "2.0.10"}) == "downgrade"
    assert _reason(good, known_ecus={"bms"}) == "unknown_ecu"
    assert _reason(json.dumps({**env, "signatures": []}).encode()) == "unsigned"
    other = Ed25519PrivateKey.generate()
    assert _reason(sign_campaign(DOC, other)) == "untrusted_key"
    tampered = json.loads(base64.b64decode(env["payload"]))
    tampered["packages"][0]["sha256"] = "cd" * 32
    env_t = {**env, "payload": base64.b64encode(json.dumps(tampered).encode()).decode()}
    assert _reason(json.dumps(env_t).encode()) == "bad_signature"
    assert _reason(b"not json") == "malformed"
    assert _reason(b"{}") == "malformed"
    assert _reason(b"x" * (2 << 20)) == "malformed"


@pytest.mark.parametrize("mutate", [
    lambda d: d.update(format="other"),
    lambda d: d.update(colour="red"),
    lambda d: d.update(install="sometime"),
    lambda d: d.update(expires="2026-01-01T00:00:00Z"),
    lambda d: d.update(issued="yesterday"),
    lambda d: d["packages"][0].update(size=-1),
    lambda d: d["packages"][0].update(name="../evil"),
    lambda d: d["packages"][0].update(sha256="xyz"),
    lambda d: d["packages"][0].update(url="file:///etc/passwd"),
    lambda d: d.update(packages=[]),
    lambda d: d["packages"][0].update(delta={**DELTA, "name": "../evil"}),
    lambda d: d["packages"][0].update(delta={**DELTA, "base_sha256": "AB" * 32}),
    lambda d: d["packages"][0].update(delta={**DELTA, "image_crc32": 1 << 32}),
    lambda d: d["packages"][0].update(delta={**DELTA, "size": 0}),
    lambda d: d["packages"][0].update(delta={**DELTA, "url": "ftp://x"}),
    lambda d: d["packages"][0].update(delta={**DELTA, "extra": 1}),
    lambda d: d["packages"][0].update(delta={k: v for k, v in DELTA.items() if k != "base_version"}),
    lambda d: d["packages"][0].update(delta={**DELTA, "name": "vcu-2.0.0.bin"}),  # the package's own name
])
def test_malformed_campaigns_cannot_be_signed(mutate):
    doc = copy.deepcopy(DOC)
    mutate(doc)
    with pytest.raises(CampaignRejected) as err:
        sign_campaign(doc, KEY)
    assert err.value.reason == "malformed"


def test_version_order():
    assert compare_versions("2.0.10", "2.0.9") == 1
    assert compare_versions("1.0.0", "1.0.0") == 0
    assert compare_versions("1.2", "1.10") == -1


def test_cli_keygen_sign_verify(tmp_path):
    assert vota("campaign", "keygen", "--out", str(tmp_path / "keys")).returncode == 0
    (tmp_path / "c.json").write_text(json.dumps({**DOC, "expires": "2099-01-01T00:00:00Z"}))
    signed = tmp_path / "c.signed.json"
    run = vota("campaign", "sign", str(tmp_path / "c.json"), "--key", str(tmp_path / "keys/signing.key"), "--out", str(signed))
    assert run.returncode == 0, run.stderr
    ok = vota("campaign", "verify", str(signed), "--trusted", str(tmp_path / "keys/signing.pub"), "--vin", "LVOTA000000000001")
    assert ok.returncode == 0 and "c-0001 verified" in ok.stdout
    bad = vota("campaign", "verify", str(signed), "--trusted", str(tmp_path / "keys/signing.pub"), "--vin", "X",
               "--installed", "vcu=1.0")
    assert bad.returncode == 1 and "wrong_vehicle" in bad.stderr and "Traceback" not in bad.stderr
    down = vota("campaign", "verify", str(signed), "--trusted", str(tmp_path / "keys/signing.pub"),
                "--vin", "LVOTA000000000001", "--installed", "vcu=3.0.0")
    assert down.returncode == 1 and "downgrade" in down.stderr
    missing = vota("campaign", "sign", str(tmp_path / "nope.json"), "--key", str(tmp_path / "keys/signing.key"))
    assert missing.returncode == 2 and "not found" in missing.stderr


def _two(**changes):  # type: ignore[no-untyped-def]
    doc = copy.deepcopy(DOC)
    doc["packages"].append({"name": "bms-2.0.0.bin", "ecu": "bms", "version": "2.0.0", "url": "http://127.0.0.1:1/bms",
                            "size": 512, "sha256": "cd" * 32})
    for i, extra in changes.items():
        doc["packages"][int(i[1:])].update(extra)
    return doc


def test_install_order_requirements_and_activation():
    one = verify(sign_campaign(DOC, KEY))
    assert one.activation == "per_ecu" and one.packages[0].order == 0 and one.packages[0].requires == ()
    two = verify(sign_campaign(_two(p0={"order": 1, "requires": {"bms": "2.0.0"}}), KEY),
                 installed={"vcu": "1.0.0", "bms": "1.0.0"})
    assert two.activation == "atomic"  # the default with more than one package
    assert two.packages[0].order == 1 and two.packages[0].requires == (("bms", "2.0.0"),)
    assert two.packages[0].to_json()["requires"] == {"bms": "2.0.0"}
    doc = _two()
    doc["activation"] = "per_ecu"
    assert verify(sign_campaign(doc, KEY), installed={"vcu": "1.0.0", "bms": "1.0.0"}).activation == "per_ecu"
    for bad in ({"order": -1}, {"order": "first"}, {"requires": ["bms"]}, {"requires": {"bms": 2}}, {"colour": "red"}):
        with pytest.raises(CampaignRejected) as err:
            verify(sign_campaign(_two(p1=bad), KEY), installed={"vcu": "1.0.0", "bms": "1.0.0"}) if "colour" not in bad \
                else sign_campaign(_two(p1=bad), KEY)
        assert err.value.reason == "malformed"
    doc["activation"] = "sometimes"
    with pytest.raises(CampaignRejected, match="activation"):
        sign_campaign(doc, KEY)


def test_requirements_are_checked_against_the_vehicle_after_the_campaign():
    needs_new_bms = sign_campaign(_two(p0={"requires": {"bms": "2.0.0"}}), KEY)
    assert verify(needs_new_bms, installed={"vcu": "1.0.0", "bms": "1.0.0"})  # the campaign brings bms 2.0.0 itself
    needs_bcm = sign_campaign(_two(p0={"requires": {"bcm": "3.1"}}), KEY)
    with pytest.raises(CampaignRejected) as err:
        verify(needs_bcm, installed={"vcu": "1.0.0", "bms": "1.0.0", "bcm": "3.0.9"})
    assert err.value.reason == "dependency" and "it would run 3.0.9" in str(err.value)
    with pytest.raises(CampaignRejected) as err:
        verify(needs_bcm, installed={"vcu": "1.0.0", "bms": "1.0.0"})  # bcm did not answer the inventory
    assert err.value.reason == "dependency" and "not known" in str(err.value)
    assert verify(needs_bcm, installed={"vcu": "1.0.0", "bms": "1.0.0", "bcm": "3.10"}).campaign_id == "c-0001"
    with pytest.raises(CampaignRejected) as err:  # a target ECU that did not tell its version: no downgrade check skipped
        verify(needs_new_bms, installed={"vcu": "1.0.0"})
    assert err.value.reason == "unknown_version" and "bms: its installed version could not be read" in str(err.value)


def test_a_document_two_parsers_read_differently_is_refused():
    """Found by benchmarks/fuzz.py: a repeated key in the envelope (Python keeps the last one,
    other parsers the first) still verified. Signed documents now have one meaning or none."""
    good = sign_campaign(DOC, KEY).decode()
    sig = json.loads(good)["signatures"][0]["sig"]
    twice = good.replace(f'"sig": "{sig}"', f'"sig": "AAAA", "sig": "{sig}"')
    assert twice != good
    with pytest.raises(CampaignRejected, match=r"not JSON \(the key 'sig' appears twice in one object\)") as err:
        verify(twice.encode())
    assert err.value.reason == "malformed"
    payload = json.dumps(DOC)[:-1] + ', "version": 1}'  # a key repeated inside the signed payload
    env = {**json.loads(good), "payload": base64.b64encode(payload.encode()).decode()}
    with pytest.raises(CampaignRejected, match="appears twice"):
        verify(json.dumps(env).encode())
    env = {**json.loads(good), "payload": base64.b64encode(json.dumps({**DOC, "x": float("nan")}).encode()).decode()}
    with pytest.raises(CampaignRejected, match="NaN is not a JSON number"):
        verify(json.dumps(env).encode())


def test_cloud_campaign_makes_a_delta_beside_the_package(tmp_path):
    import hashlib
    import zlib

    from agent.protocol.delta import apply_delta

    assert vota("campaign", "keygen", "--out", str(tmp_path)).returncode == 0
    old = bytes(range(256)) * 64
    new = old[:5000] + b"patched" + old[5000:]
    (tmp_path / "vcu-1.0.0.bin").write_bytes(old)
    (tmp_path / "vcu-2.0.0.bin").write_bytes(new)
    base = ["cloud", "campaign", "--vin", "LVOTA000000000001", "--key", str(tmp_path / "signing.key"),
            "--base-url", "http://127.0.0.1:1/p", "--id", "c-delta", f"vcu={tmp_path / 'vcu-2.0.0.bin'}@2.0.0"]
    run = vota(*base, "--delta-from", f"vcu={tmp_path / 'vcu-1.0.0.bin'}@1.0.0", "--out", str(tmp_path / "c.json"))
    assert run.returncode == 0, run.stderr
    (package,) = json.loads(base64.b64decode(json.loads((tmp_path / "c.json").read_text())["payload"]))["packages"]
    delta = package["delta"]
    patch = (tmp_path / "vcu-2.0.0.bin.from-1.0.0.delta").read_bytes()
    assert delta == {"name": "vcu-2.0.0.bin.from-1.0.0.delta", "url": "http://127.0.0.1:1/p/vcu-2.0.0.bin.from-1.0.0.delta",
                     "size": len(patch), "sha256": hashlib.sha256(patch).hexdigest(),
                     "base_sha256": hashlib.sha256(old).hexdigest(), "base_version": "1.0.0", "image_crc32": zlib.crc32(new)}
    assert apply_delta(old, patch) == new and len(patch) < len(new) // 10
    for bad, words in ((f"bms={tmp_path / 'vcu-1.0.0.bin'}@1.0.0", "no package for bms"), ("vcu=nothing@1.0.0", "cannot read"),
                       ("vcu", "expected ECU=OLD_IMAGE@VERSION")):
        run = vota(*base, "--delta-from", bad)
        assert run.returncode == 2 and words in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_export_writes_only_the_packages_the_campaign_signs(tmp_path):
    import hashlib

    from agent.errors import UsageError
    from tbox.offline import CAMPAIGN_FILE, export_campaign

    data = b"image" * 100
    doc = copy.deepcopy(DOC)
    doc["packages"][0].update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    envelope = sign_campaign(doc, KEY)
    (tmp_path / "pkgs").mkdir()
    (tmp_path / "pkgs" / "vcu-2.0.0.bin").write_bytes(data[:-1] + b"X")
    with pytest.raises(UsageError, match="not the package the campaign signs"):
        export_campaign(envelope, tmp_path / "pkgs", tmp_path / "stick")
    assert not (tmp_path / "stick" / CAMPAIGN_FILE).exists()
    (tmp_path / "pkgs" / "vcu-2.0.0.bin").write_bytes(data)
    assert export_campaign(envelope, tmp_path / "pkgs", tmp_path / "stick") == ["vcu-2.0.0.bin"]
    assert (tmp_path / "stick" / CAMPAIGN_FILE).read_bytes() == envelope
    assert (tmp_path / "stick" / "packages" / "vcu-2.0.0.bin").read_bytes() == data
    with pytest.raises(UsageError, match="not a signed campaign"):
        export_campaign(b"{}", tmp_path / "pkgs", tmp_path / "stick2")
