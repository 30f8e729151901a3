"""Key compromise (Uptane): a threshold of distinct keys per role, and signed key lists that
rotate and revoke keys, kept across restarts and refused when rolled back or not signed by
the root keys in force."""

from __future__ import annotations

import base64
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.adapters.keys import KeyStore, initial_key_list
from agent.core.campaign import CampaignRejected, sign_campaign, verify_campaign
from agent.core.content import BundleRejected, build_bundle, sign_bundle, verify_bundle
from agent.core.roles import KeyList, KeysRejected, Role, key_id, key_list_doc, sign_key_list, verify_key_list

VIN = "LVOTAKEYS00000001"
NOW = dt.datetime(2026, 11, 23, tzinfo=dt.timezone.utc)
A, B, C = (Ed25519PrivateKey.generate() for _ in range(3))
ROOT1, ROOT2, ROOT3 = (Ed25519PrivateKey.generate() for _ in range(3))


def _campaign(cid: str = "c-1") -> dict:
    return {"format": "vota-campaign", "version": 1, "campaign_id": cid, "vin": VIN, "install": "immediate",
            "issued": "2026-11-01T00:00:00Z", "expires": "2026-12-31T00:00:00Z",
            "packages": [{"name": "vcu-2.0.bin", "ecu": "vcu", "version": "2.0", "url": "http://c/vcu-2.0.bin",
                          "size": 1, "sha256": "00" * 32}]}


def _role(*keys: Ed25519PrivateKey, threshold: int = 1) -> Role:
    return Role({key_id(k.public_key()): k.public_key() for k in keys}, threshold)


def _reason(fn) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises((CampaignRejected, BundleRejected, KeysRejected)) as info:
        fn()
    return info.value.reason


def test_a_campaign_needs_a_threshold_of_distinct_trusted_keys():
    two_of_three = _role(A, B, C, threshold=2)
    one = sign_campaign(_campaign(), A)
    assert _reason(lambda: verify_campaign(one, two_of_three, vin=VIN, now=NOW)) == "threshold"
    env = json.loads(one)
    env["signatures"] *= 2  # the same key twice is still one key
    assert _reason(lambda: verify_campaign(json.dumps(env).encode(), two_of_three, vin=VIN, now=NOW)) == "threshold"
    stranger = Ed25519PrivateKey.generate()
    with_stranger = sign_campaign(_campaign(), [A, stranger])  # a key nobody trusts does not count
    assert _reason(lambda: verify_campaign(with_stranger, two_of_three, vin=VIN, now=NOW)) == "threshold"
    assert verify_campaign(sign_campaign(_campaign(), [A, C]), two_of_three, vin=VIN, now=NOW).campaign_id == "c-1"
    forged = json.loads(sign_campaign(_campaign(), [A, B]))
    forged["signatures"][1]["sig"] = forged["signatures"][0]["sig"]  # B's entry with A's signature
    assert _reason(lambda: verify_campaign(json.dumps(forged).encode(), two_of_three, vin=VIN, now=NOW)) == "threshold"
    assert _reason(lambda: verify_campaign(sign_campaign(_campaign(), stranger), two_of_three, vin=VIN,
                                           now=NOW)) == "untrusted_key"


def test_a_content_bundle_needs_a_threshold_too():
    bundle = build_bundle({"bundle_id": "b", "bundle_version": 1, "owner": "o", "title": "t",
                           "items": [{"id": "app", "class": "application", "target": "nav", "source": "x"}]},
                          {"app": b"app"}, None, VIN)
    once = sign_bundle(bundle, A)
    assert _reason(lambda: verify_bundle(once, _role(A, B, threshold=2), vin=VIN, now=NOW)) == "threshold"
    twice = sign_bundle(once, B)  # a second signer adds to the first
    assert verify_bundle(twice, _role(A, B, threshold=2), vin=VIN, now=NOW).bundle_id == "b"


def _list(version: int, campaign: list[Ed25519PrivateKey], root: list[Ed25519PrivateKey], signers: list[Ed25519PrivateKey],
          campaign_threshold: int = 1, root_threshold: int = 1) -> bytes:
    doc = key_list_doc(version, {"root": ([k.public_key() for k in root], root_threshold),
                                 "campaign": ([k.public_key() for k in campaign], campaign_threshold),
                                 "content": ([k.public_key() for k in campaign], 1)})
    return sign_key_list(doc, signers)


def _initial() -> KeyList:
    return KeyList(0, {"root": _role(ROOT1), "campaign": _role(A), "content": _role(A)})


def test_a_key_list_rotates_and_revokes_keys():
    v1 = verify_key_list(_list(1, [B, C], [ROOT1], [ROOT1], campaign_threshold=2), _initial())
    assert (v1.version, v1.role("campaign").threshold) == (1, 2)
    signed_by_a = sign_campaign(_campaign(), A)
    assert _reason(lambda: verify_campaign(signed_by_a, v1.role("campaign"), vin=VIN, now=NOW)) == "untrusted_key"
    assert verify_campaign(sign_campaign(_campaign(), [B, C]), v1.role("campaign"), vin=VIN, now=NOW)
    # the root itself rotates: the old root vouches for the new one, the new one signs too
    v2 = verify_key_list(_list(2, [B, C], [ROOT2, ROOT3], [ROOT1, ROOT2, ROOT3], root_threshold=2), v1)
    assert sorted(v2.role("root").keys) == sorted(key_id(k.public_key()) for k in (ROOT2, ROOT3))
    # refused: an older version, a list the current root did not sign, one its own root did not sign
    assert _reason(lambda: verify_key_list(_list(1, [A], [ROOT1], [ROOT1]), v1)) == "rollback"
    assert _reason(lambda: verify_key_list(_list(3, [A], [ROOT2, ROOT3], [ROOT2], root_threshold=2), v2)) == "threshold"
    assert _reason(lambda: verify_key_list(_list(2, [A], [ROOT2], [ROOT2]), v1)) == "untrusted_key"
    assert _reason(lambda: verify_key_list(_list(2, [A], [ROOT2], [ROOT1]), v1)) == "untrusted_key"  # ROOT2 never signed
    assert _reason(lambda: verify_key_list(_list(2, [A], [ROOT1], [A]), v1)) == "untrusted_key"  # a campaign key
    no_root = KeyList(0, {"campaign": _role(A), "content": _role(A)})
    assert _reason(lambda: verify_key_list(_list(1, [B], [ROOT1], [ROOT1]), no_root)) == "no_root"
    bad = json.loads(_list(3, [A], [ROOT1], [ROOT1]))
    doc = json.loads(base64.b64decode(bad["payload"]))
    doc["roles"]["campaign"]["threshold"] = 5  # more than its keys: nobody could ever sign
    bad["payload"] = base64.b64encode(json.dumps(doc).encode()).decode()
    assert _reason(lambda: verify_key_list(json.dumps(bad).encode(), v1)) == "malformed"


def test_the_key_store_keeps_what_it_took_and_checks_it_again_at_every_start(tmp_path: Path):
    store = KeyStore(tmp_path / "keys", _initial())
    v1, v2 = _list(1, [B], [ROOT1], [ROOT1]), _list(2, [C], [ROOT1], [ROOT1])
    assert store.accept(v1).version == 1
    assert store.accept(v1).version == 1  # the same list again: no change
    assert store.accept(v2).version == 2
    with pytest.raises(KeysRejected):
        store.accept(v1)  # a rollback
    again = KeyStore(tmp_path / "keys", _initial())  # a restart
    assert again.current.version == 2 and list(again.current.role("campaign").keys) == [key_id(C.public_key())]
    assert again.chain() == [v1, v2]
    # a follower (the gateway) takes the chain and skips what it has
    follower = KeyStore(tmp_path / "gw", _initial())
    assert follower.follow(again.chain()).version == 2
    assert follower.follow([v1]).version == 2
    # a list changed on disk is not taken (and the ones before it still are)
    (tmp_path / "keys" / "keys-000002.json").write_bytes(_list(2, [A], [ROOT1], [A]))
    tampered = KeyStore(tmp_path / "keys", _initial())
    assert tampered.current.version == 1 and list(tampered.current.role("campaign").keys) == [key_id(B.public_key())]


def test_the_configured_thresholds_are_checked(tmp_path: Path):
    pub = tmp_path / "a.pub"
    pub.write_bytes(A.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    initial = initial_key_list(((str(pub),), 1), ((), 1), ((), 1))
    assert list(initial.role("content").keys) == [key_id(A.public_key())]  # content falls back to the campaign keys
    from agent.errors import UsageError

    with pytest.raises(UsageError, match="threshold is 2 but only 1"):
        initial_key_list(((str(pub),), 2), ((), 1), ((), 1))


def test_the_cli_makes_a_key_list_and_verifies_a_threshold(tmp_path: Path):
    def write(name: str, key: Ed25519PrivateKey) -> tuple[str, str]:
        private, public = tmp_path / f"{name}.key", tmp_path / f"{name}.pub"
        private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
        public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                         serialization.PublicFormat.SubjectPublicKeyInfo))
        return str(private), str(public)

    root, a, b = write("root", ROOT1), write("a", A), write("b", B)

    def vota(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "vota", *args], capture_output=True, text=True, timeout=60)

    made = vota("campaign", "keys", "--version", "1", "--root", root[1], "--campaign", a[1], "--campaign", b[1],
                "--campaign-threshold", "2", "--content", a[1], "--key", root[0], "--out", str(tmp_path / "keys.json"))
    assert made.returncode == 0, made.stderr
    listed = verify_key_list((tmp_path / "keys.json").read_bytes(), _initial())
    assert listed.role("campaign").threshold == 2
    (tmp_path / "c.json").write_text(json.dumps(_campaign()))
    signed = vota("campaign", "sign", str(tmp_path / "c.json"), "--key", a[0], "--out", str(tmp_path / "c.signed"))
    assert signed.returncode == 0, signed.stderr
    verify = ["campaign", "verify", str(tmp_path / "c.signed"), "--trusted", a[1], "--trusted", b[1], "--vin", VIN]
    refused = vota(*verify, "--threshold", "2")
    assert refused.returncode != 0 and "(threshold)" in refused.stderr and "Traceback" not in refused.stderr
    assert vota("campaign", "sign", str(tmp_path / "c.json"), "--key", a[0], "--key", b[0], "--out",
                str(tmp_path / "c.signed")).returncode == 0
    assert vota(*verify, "--threshold", "2").returncode == 0
    too_many = vota(*verify, "--threshold", "3")
    assert too_many.returncode == 2 and "--threshold must be from 1 to" in too_many.stderr
    bad = vota("campaign", "keys", "--version", "1", "--root", root[1], "--campaign", a[1], "--campaign-threshold", "2",
               "--content", a[1], "--key", root[0])
    assert bad.returncode == 2 and "threshold" in bad.stderr and "Traceback" not in bad.stderr


def test_a_vehicle_takes_a_key_list_from_the_cloud_and_the_revoked_key_signs_nothing(tmp_path, mosquitto, write_config,
                                                                                       procs):
    """The whole vehicle: the cloud sends a key list signed by the root key; from then on the old
    campaign key is refused by the TBOX, one new key is not enough (threshold 2), two are, and the
    gateway verifies the install with the new keys (it follows the list the TBOX passes on); a
    list not signed by the root is refused and reported."""
    from cloud_sim.cloud import publish
    from tests.vehicle import VIN as CAR
    from tests.vehicle import Vehicle

    root = Ed25519PrivateKey.generate()
    (tmp_path / "root.pub").write_bytes(root.public_key().public_bytes(serialization.Encoding.PEM,
                                                                       serialization.PublicFormat.SubjectPublicKeyInfo))
    v = Vehicle(tmp_path, mosquitto, write_config, procs, tbox_extra={"root_keys": [str(tmp_path / "root.pub")],
                                                                          "max_retries": 3})  # locked out: fails in ~2 s
    try:
        def send_keys(envelope: bytes) -> None:
            publish(v.broker, CAR, "command", json.dumps({"command": "keys_update", "vin": CAR,
                                                          "keys": base64.b64encode(envelope).decode()}).encode())

        def keys_event(status: str) -> dict:
            def find(c) -> bool:  # type: ignore[no-untyped-def]
                return any(m["body"].get("event") == "keys" and m["body"].get("status") == status for m in c.messages)
            assert v.cloud.collector.wait_for(find, 30), v.tbox.text()[-3000:]
            return next(m["body"] for m in v.cloud.collector.messages
                        if m["body"].get("event") == "keys" and m["body"].get("status") == status)

        doc = key_list_doc(1, {"root": ([root.public_key()], 1), "campaign": ([B.public_key(), C.public_key()], 2),
                               "content": ([v.platform.public_key()], 1)})
        send_keys(sign_key_list(doc, [B]))  # not the root's signature
        assert keys_event("rejected")["reason"] == "untrusted_key"
        send_keys(sign_key_list(doc, [root]))
        taken = keys_event("accepted")
        assert taken["version"] == 1 and taken["campaign"]["threshold"] == 2
        v.send(v.campaign("c-old-key", "2.0.0"))  # signed by the configured key, now revoked
        assert v.rejected("c-old-key")["reason"] == "untrusted_key"
        v.send(v.campaign("c-one-key", "2.0.0", key=B))
        assert v.rejected("c-one-key")["reason"] == "threshold"
        # version 2, retained on the keys topic, already expired: a vehicle kept away from newer
        # lists stops trusting campaigns instead of trusting its keys for ever
        lists = {n: key_list_doc(n, {"root": ([root.public_key()], 1), "campaign": ([B.public_key(), C.public_key()], 2),
                                     "content": ([v.platform.public_key()], 1)}, expires=expires)
                 for n, expires in ((2, dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=1)),
                                    (3, dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=30)))}
        publish(v.broker, CAR, "keys", sign_key_list(lists[2], [root]), retain=True)
        assert v.cloud.collector.wait_for(lambda c: any(m["body"].get("version") == 2 for m in c.messages
                                                        if m["body"].get("event") == "keys"), 30)
        two_keys = v.campaign("c-two-keys", "2.0.0", key=[B, C])
        v.send(two_keys)
        assert v.rejected("c-two-keys")["reason"] == "keys_expired"
        # the TBOX offline while the cloud publishes a fresh list: it finds it retained when it is back
        v.tbox.stop()
        publish(v.broker, CAR, "keys", sign_key_list(lists[3], [root]), retain=True)
        v.tbox = v.start_tbox()
        assert v.cloud.collector.wait_for(lambda c: any(m["body"].get("version") == 3 for m in c.messages
                                                        if m["body"].get("event") == "keys"), 30)
        v.send(two_keys)  # the same campaign again: refused before, nothing of it was kept
        done = v.finished("c-two-keys")
        assert done["outcome"] == "success", done
        assert (tmp_path / "gw" / "results" / "keys" / "keys-000003.json").exists()  # the gateway followed
        # a node on the backbone without the secret locks the gateway's SecurityAccess out: the
        # next campaign cannot pass it and ends locked_out, reported under its own id
        _lock_out(yaml.safe_load(v.config.read_text())["segments"]["bb"]["bus"],
                  tmp_path / "gw" / "results" / "deploy-security.json")
        v.send(v.campaign("c-locked-out", "3.0.0", key=[B, C]))
        locked = v.finished("c-locked-out")
        assert (locked["outcome"], locked["failure"]["reason"]) == ("failed", "locked_out"), locked
    finally:
        v.close()


def _lock_out(bus: dict, security_file: Path) -> None:
    """Wrong SecurityAccess keys from scapy's UDS stack on the deploy link's ids until the gateway is locked."""
    from scapy.config import conf

    conf.contribs["CANSocket"] = {"use-python-can": True}
    conf.contribs["ISOTP"] = {"use-can-isotp-kernel-module": False}
    from scapy.contrib.automotive.uds import UDS
    from scapy.contrib.cansocket_python_can import PythonCANSocket
    from scapy.contrib.isotp import ISOTPSocket

    def locked() -> bool:
        return security_file.exists() and json.loads(security_file.read_text())["locked_until"] > time.time()

    sock = PythonCANSocket(**{k: v for k, v in bus.items() if k != "fd"})
    try:
        with ISOTPSocket(sock, tx_id=0x7D0, rx_id=0x7D8, basecls=UDS, padding=True) as node:
            deadline = time.monotonic() + 30
            while not locked() and time.monotonic() < deadline:
                for request in ("1001", "1003", "2701", "2702" + "00" * 16):  # a new session starts locked
                    node.sr1(UDS(bytes.fromhex(request)), timeout=1, verbose=False)
    finally:
        sock.close()
    assert locked()


def test_openssl_verifies_every_signature_of_an_envelope(tmp_path: Path):
    """A tool we did not write checks the signed bytes as docs/security.md describes them: the domain
    line plus the decoded payload, Ed25519 (campaigns and key lists alike)."""
    import shutil

    openssl = shutil.which("openssl")
    assert openssl, "openssl is installed by make sysdeps"
    for domain, envelope in ((b"vota-campaign-v1\n", sign_campaign(_campaign(), [A, B])),
                             (b"vota-keys-v1\n", _list(1, [B], [ROOT1], [ROOT1]))):
        env = json.loads(envelope)
        (tmp_path / "msg").write_bytes(domain + base64.b64decode(env["payload"]))
        signers = {key_id(k.public_key()): k for k in (A, B, ROOT1)}
        for entry in env["signatures"]:
            pub = signers[entry["keyid"]].public_key()
            (tmp_path / "pub.pem").write_bytes(pub.public_bytes(serialization.Encoding.PEM,
                                                                serialization.PublicFormat.SubjectPublicKeyInfo))
            (tmp_path / "sig").write_bytes(base64.b64decode(entry["sig"]))
            args = [openssl, "pkeyutl", "-verify", "-pubin", "-inkey", str(tmp_path / "pub.pem"), "-rawin",
                    "-in", str(tmp_path / "msg"), "-sigfile", str(tmp_path / "sig")]
            assert subprocess.run(args, capture_output=True).returncode == 0
            (tmp_path / "msg").write_bytes(domain + base64.b64decode(env["payload"]) + b" ")
            assert subprocess.run(args, capture_output=True).returncode != 0  # one byte more: refused
            (tmp_path / "msg").write_bytes(domain + base64.b64decode(env["payload"]))
