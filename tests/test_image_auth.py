"""ECUs verify what they boot: the authenticate routine's bytes, the NRCs of an image that is not
signed, signed for another ECU, version or image, or below the ECU's security version counter,
and the counter that only a verified, confirmed image raises (agent/core/image_auth.py)."""

from __future__ import annotations

import hashlib
import struct
import time
import zlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.core.campaign import CampaignRejected, key_id, sign_campaign, verify_campaign
from agent.core.image_auth import ImageAuth, sign_image, verify_image
from agent.protocol.ecu import SecureVersion, decode_secure_version
from tests.conftest import ecu_entry, virtual_bus
from tests.helpers import UdsTester, start_sim


def _pem(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.mark.parametrize("key", [Ed25519PrivateKey.generate(), ec.generate_private_key(ec.SECP256R1())],
                         ids=["ed25519", "ecdsa-p256"])
def test_a_signature_binds_the_ecu_the_version_the_security_version_and_the_image(key):
    digest = hashlib.sha256(b"image").hexdigest()
    auth = sign_image(key, "vcu", "3.0.0", 7, digest)
    assert len(auth.signature) == 64 and len(auth.record()) == 68
    assert ImageAuth.from_record(auth.record()) == auth
    assert verify_image(key.public_key(), auth, "vcu", "3.0.0", digest)
    other = hashlib.sha256(b"other image").hexdigest()
    for ecu, version, security_version, sha in (("bms", "3.0.0", 7, digest), ("vcu", "99.0.0", 7, digest),
                                                ("vcu", "3.0.0", 8, digest), ("vcu", "3.0.0", 7, other)):
        assert not verify_image(key.public_key(), ImageAuth(security_version, auth.signature), ecu, version, sha)
    assert not verify_image(Ed25519PrivateKey.generate().public_key(), auth, "vcu", "3.0.0", digest)


def test_a_campaign_entry_carries_image_auth_or_is_refused_malformed():
    import datetime as _dt

    signer = Ed25519PrivateKey.generate()

    def parse_campaign(doc):
        return verify_campaign(sign_campaign(doc, signer), {key_id(signer.public_key()): signer.public_key()}, vin="V",
                               now=_dt.datetime(2026, 6, 1, tzinfo=_dt.timezone.utc))

    base = {"format": "vota-campaign", "version": 1, "campaign_id": "c1", "vin": "V", "issued": "2026-01-01T00:00:00Z",
            "expires": "2027-01-01T00:00:00Z",
            "packages": [{"name": "vcu.bin", "ecu": "vcu", "version": "3.0.0", "url": "http://x/vcu.bin", "size": 5,
                          "sha256": "0" * 64, "image_auth": {"security_version": 3, "signature": "ab" * 64}}]}
    campaign = parse_campaign(base)
    assert campaign.packages[0].image_auth == ImageAuth(3, bytes([0xAB]) * 64)
    assert campaign.packages[0].to_json()["image_auth"] == {"security_version": 3, "signature": "ab" * 64}
    for bad in ({"security_version": -1, "signature": "ab" * 64}, {"security_version": 3, "signature": "ab" * 63},
                {"security_version": 3, "signature": "zz" * 64}, {"security_version": True, "signature": "ab" * 64},
                {"security_version": 3}, {"security_version": 3, "signature": "ab" * 64, "key": "x"}):
        base["packages"][0]["image_auth"] = bad
        with pytest.raises(CampaignRejected, match=r"malformed.*packages\[0\]\.image_auth"):
            parse_campaign(base)


ADDRESS = 0x1000


@pytest.fixture
def secure_ecu(tmp_path: Path):
    key = Ed25519PrivateKey.generate()
    (tmp_path / "vcu.pub").write_bytes(_pem(key))
    data = {"segments": {"pt": {"bus": virtual_bus()}},
            "ecus": {"vcu": ecu_entry("vcu", 0x7E0, 0x7E8, max_block_length=1026, image_key=str(tmp_path / "vcu.pub"))
                     | {"memory": {"address": ADDRESS, "size": 0x10000}},
                     "bcm": ecu_entry("bcm", 0x740, 0x748)}}
    config, sim = start_sim(data, ["vcu", "bcm"], str(tmp_path / "state"))
    tester = UdsTester(config, "vcu")
    try:
        yield tester, sim, key
    finally:
        tester.close()
        sim.stop()


def _write(t: UdsTester, image: bytes, version: str) -> None:
    """Up to check memory: the image written and checked, nothing staged."""
    t.unlock()
    fingerprint = bytes.fromhex("260101") + bytes((len(version),)) + version.encode()
    assert t.ask(b"\x2e\xf1\x5a" + fingerprint) == bytes.fromhex("6ef15a")
    region = bytes.fromhex("44") + struct.pack(">II", ADDRESS, len(image))
    assert t.ask(b"\x31\x01\xff\x00" + region, timeout=3) == bytes.fromhex("7101ff0000")
    assert t.ask(b"\x34\x00" + region) == bytes.fromhex("74200402")
    for counter, offset in enumerate(range(0, len(image), 1024), start=1):
        assert t.ask(bytes((0x36, counter)) + image[offset : offset + 1024]) == bytes((0x76, counter))
    assert t.ask(b"\x37") == b"\x77"
    assert t.ask(b"\x31\x01\x02\x02" + zlib.crc32(image).to_bytes(4, "big"), timeout=3) == bytes.fromhex("7101020200")


def _secure_version(t: UdsTester) -> SecureVersion | None:
    answer = t.ask(b"\x22\xf1\xa3")
    assert answer is not None and answer[:3] == bytes.fromhex("62f1a3"), answer
    return decode_secure_version(answer[3:])


def _reset(t: UdsTester) -> None:
    assert t.ask(b"\x11\x01") == bytes.fromhex("5101")
    time.sleep(0.5)


def test_the_bootloader_stages_only_an_image_signed_for_it_and_never_one_below_its_counter(secure_ecu):
    t, sim, key = secure_ecu
    assert _secure_version(t) == SecureVersion(False, 0, 0, "1.0.0")  # the factory image: not signed
    image = bytes(range(256)) * 12
    digest = hashlib.sha256(image).hexdigest()
    _write(t, image, "3.0.0")
    assert t.ask(b"\x31\x01\xff\x01") == bytes.fromhex("7f3134")  # not authenticated: never staged
    assert t.ask(b"\x31\x01\xff\x07" + bytes(67)) == bytes.fromhex("7f3113")  # the record is 4 + 64 bytes
    rogue = Ed25519PrivateKey.generate()
    for wrong in (sign_image(rogue, "vcu", "3.0.0", 5, digest),  # another key
                  sign_image(key, "bcm", "3.0.0", 5, digest),  # another ECU model
                  sign_image(key, "vcu", "99.0.0", 5, digest),  # another version than the one written
                  sign_image(key, "vcu", "3.0.0", 5, hashlib.sha256(b"other").hexdigest())):  # another image
        assert t.ask(b"\x31\x01\xff\x07" + wrong.record()) == bytes.fromhex("7f3134")
    assert t.ask(b"\x31\x01\xff\x01") == bytes.fromhex("7f3134")
    good = sign_image(key, "vcu", "3.0.0", 5, digest)
    assert t.ask(b"\x31\x01\xff\x07" + good.record()) == bytes.fromhex("7101ff0700")
    assert t.ask(b"\x31\x01\xff\x01") == bytes.fromhex("7101ff0100")
    _reset(t)  # one ECU at a time: runs at once, confirmed: the counter rises to its security version
    assert t.ask(b"\x22\xf1\x89") == b"\x62\xf1\x893.0.0"
    assert _secure_version(t) == SecureVersion(True, 5, 5, "3.0.0")

    older = bytes(range(255, -1, -1)) * 8  # a genuine, signed, older image: a rollback
    _write(t, older, "2.0.0")
    assert t.ask(b"\x31\x01\xff\x07" + sign_image(key, "vcu", "2.0.0", 4, hashlib.sha256(older).hexdigest()).record()) \
        == bytes.fromhex("7f3122")
    assert t.ask(b"\x31\x01\xff\x01") == bytes.fromhex("7f3134")
    _reset(t)
    assert t.ask(b"\x22\xf1\x89") == b"\x62\xf1\x893.0.0"  # still the verified image
    sim.stop()  # the counter survives a power cycle
    config, again = start_sim({"segments": {"pt": {"bus": virtual_bus()}}, "ecus": {"vcu": _entry_of(sim)}}, ["vcu"],
                              sim.state_dir)
    assert again.servers["vcu"].state.banks.counter == 5
    again.stop()


def _entry_of(sim) -> dict:
    ecu = sim.config.ecu("vcu")
    return ecu_entry("vcu", 0x7E0, 0x7E8, max_block_length=1026, image_key=ecu.sim.image_key) \
        | {"memory": {"address": ADDRESS, "size": 0x10000}}


def test_an_ecu_without_a_trust_anchor_has_neither_the_routine_nor_the_did(secure_ecu):
    _, sim, _ = secure_ecu
    bcm = UdsTester(sim.config, "bcm")
    try:
        bcm.unlock()
        assert bcm.ask(b"\x31\x01\xff\x07" + bytes(68)) == bytes.fromhex("7f3131")
        assert bcm.ask(b"\x22\xf1\xa3") == bytes.fromhex("7f2231")
    finally:
        bcm.close()


@pytest.mark.slow
def test_a_rogue_image_flashed_on_the_segment_never_runs_and_cannot_block_a_signed_campaign(
        tmp_path, mosquitto, write_config, procs):
    """The attack: a node on vcu's segment with the per-model SecurityAccess secret flashes a rogue
    99.0.0 with ``vota flash`` (unsigned, then signed with a key of its own). The bootloader never
    stages it (NRC 0x34), vcu keeps running 1.0.0, and a campaign signed by the OEM (3.0.0, security
    version 2) installs; afterwards the gateway refuses, from the ECU's verified counter, a signed
    older image (security version 1) before anything is erased."""
    import json
    import os

    from tests.conftest import vota
    from tests.vehicle import Vehicle

    oem, attacker = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    (tmp_path / "oem-vcu.pub").write_bytes(_pem(oem))
    for name, key in (("oem-vcu.key", oem), ("attacker.key", attacker)):
        (tmp_path / name).write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
    sim = ecu_entry("vcu", 0x7E0, 0x7E8)["sim"] | {"image_key": str(tmp_path / "oem-vcu.pub")}
    v = Vehicle(tmp_path, mosquitto, write_config, procs, ecu_extra={"vcu": {"sim": sim}})
    try:
        rogue = tmp_path / "rogue.bin"
        rogue.write_bytes(os.urandom(16 * 1024))
        for i, (extra, step) in enumerate((([], "check_dependencies"),
                                           (["--image-key", f"vcu={tmp_path / 'attacker.key'}@9"], "authenticate"))):
            run = vota("flash", "-c", str(v.config), "--out", str(tmp_path / f"attack{i}"), "--json", "--no-progress",
                       f"vcu={rogue}@99.0.0", *extra, timeout=120)
            assert run.returncode == 3, run.stdout + run.stderr
            result = json.loads(run.stdout)[0]
            assert (result["result"], result["failed_step"], result["nrc"]) == ("failed", step, 0x34), result
            verdict = vota("diagnose", str(tmp_path / f"attack{i}"), "--json", "-")
            found = json.loads(verdict.stdout)
            assert (found["cause"], found["side"]) == ("negative_response", "server"), verdict.stdout
        versions = vota("versions", "-c", str(v.config), "--ecu", "vcu", "--json")
        assert json.loads(versions.stdout)[0]["software_version"] == "1.0.0", versions.stdout  # the rogue never ran

        packages = v.packages("3.0.0", size=16 * 1024)
        v.send(v.campaign("signed-3", "3.0.0", packages=packages, image_keys={"vcu": (oem, 2)}))
        finished = v.finished("signed-3")
        assert finished["outcome"] == "success", finished
        versions = vota("versions", "-c", str(v.config), "--ecu", "vcu", "--json")
        assert json.loads(versions.stdout)[0]["software_version"] == "3.0.0"

        old = tmp_path / "vcu-2.9.0.bin"  # genuinely signed, but older than the ECU's counter
        old.write_bytes(os.urandom(8 * 1024))
        run = vota("flash", "-c", str(v.config), "--out", str(tmp_path / "rollback"), "--json", "--no-progress",
                   f"vcu={old}@3.1.0", "--image-key", f"vcu={tmp_path / 'oem-vcu.key'}@1", timeout=120)
        result = json.loads(run.stdout)[0]
        assert (run.returncode, result["failed_step"]) == (3, "rollback_check"), result
        assert "below the ECU's counter 2" in result["reason"]
    finally:
        v.close()
