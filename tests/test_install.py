"""Install through the gateway: the TBOX deploys packages and a manifest, starts the
install, the gateway flashes the ECUs and hands back results, traces and the inventory."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.adapters.canbus import Segment
from agent.adapters.config_files import load_vehicle_config
from agent.adapters.file_client import PackageDeployer
from agent.core.campaign import sign_campaign
from agent.core.trace import parse_trace
from agent.protocol.link import ContentOp
from tbox.gateway_client import GatewayClient, GatewayError, InstallStatus
from tests.conftest import Proc, ecu_entry, multicast_bus

VIN = "LVOTAINSTALL00001"
KEY = Ed25519PrivateKey.generate()


def _trust(tmp_path: Path) -> dict[str, Any]:
    """The gateway section's trust: the campaign key and the VIN it verifies installs against."""
    pub = tmp_path / "signing.pub"
    pub.write_bytes(KEY.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return {"trusted_keys": [str(pub)], "vin": VIN}


def _manifest(cid: str, packages: dict[str, tuple[str, bytes, str]], key: Ed25519PrivateKey = KEY,
              signed_images: dict[str, bytes] | None = None, expires: str = "2099-12-31T00:00:00Z") -> bytes:
    """An install manifest for ``packages`` (ECU -> file name, image, version) carrying the signed
    campaign; ``signed_images`` signs other images than those deployed (a swapped package)."""
    campaign = {"format": "vota-campaign", "version": 1, "campaign_id": cid, "vin": VIN, "install": "immediate",
                "issued": "2026-11-01T00:00:00Z", "expires": expires, "activation": "per_ecu",
                "packages": [{"name": name, "ecu": ecu, "version": version, "url": f"http://cloud/{name}",
                              "size": len((signed_images or {}).get(ecu, data)),
                              "sha256": hashlib.sha256((signed_images or {}).get(ecu, data)).hexdigest()}
                             for ecu, (name, data, version) in packages.items()]}
    return json.dumps({"format": "vota-install", "version": 1, "campaign_id": cid, "activation": "per_ecu",
                       "jobs": [{"ecu": e, "package": n, "version": v} for e, (n, _, v) in packages.items()],
                       "proof": {"campaign": base64.b64encode(sign_campaign(campaign, key)).decode()}}).encode()


def _refused(nrc: str, call: Any, what: str) -> None:
    """``call`` is answered with the negative response ``nrc``; ``what`` it would mean if it were not."""
    try:
        call()
    except GatewayError as exc:
        assert nrc in str(exc), exc
        return
    raise AssertionError(what)


def _deploy(segment: Segment, link: Any, tmp_path: Path, name: str, data: bytes) -> None:
    (tmp_path / name).write_bytes(data)
    assert PackageDeployer(segment, link, name, tmp_path / name, hashlib.sha256(data).hexdigest()).run().result == "success"


def _start(tmp_path, path, procs):  # type: ignore[no-untyped-def]
    """The ECU simulators and the gateway of ``path`` as processes; the config and the deploy link."""
    procs.append(Proc("ecu-sim", "-c", str(path), "--state-dir", str(tmp_path / "ecu"), log=tmp_path / "ecu.log"))
    procs.append(Proc("gateway", "-c", str(path), log=tmp_path / "gw.log"))
    procs[0].wait_ready("ecu-sim ready")
    procs[1].wait_ready("gateway ready")
    config = load_vehicle_config(path)
    return config, config.deploy_link()


def _two_ecus(tmp_path, write_config, procs):  # type: ignore[no-untyped-def]
    """vcu and bms behind a gateway that trusts KEY for VIN."""
    path = write_config({
        "segments": {"bb": {"bus": multicast_bus()}, "pt": {"bus": multicast_bus()}},
        "deploy": {"segment": "bb", "package_dir": str(tmp_path / "gw" / "packages")},
        "gateway": {"results_dir": str(tmp_path / "gw" / "results"), **_trust(tmp_path)},
        "ecus": {"vcu": ecu_entry("vcu", 0x7E0, 0x7E8, "pt"), "bms": ecu_entry("bms", 0x7E1, 0x7E9, "pt")},
    })
    return _start(tmp_path, path, procs)


def test_install_flashes_and_results_come_back(tmp_path, write_config, procs):
    config, link = _two_ecus(tmp_path, write_config, procs)
    images = {"vcu": os.urandom(100_000), "bms": os.urandom(70_000)}
    with Segment(config.segments["bb"]) as segment:
        gw = GatewayClient(segment, link)
        for ecu, data in images.items():
            _deploy(segment, link, tmp_path, f"{ecu}-2.0.bin", data)
        _deploy(segment, link, tmp_path, "install-c-7.json",
                _manifest("c-7", {e: (f"{e}-2.0.bin", data, "2.0") for e, data in images.items()}))
        assert gw.install_status("c-7")[0] == InstallStatus.NONE
        gw.start_install("install-c-7.json")
        assert gw.wait_install("c-7", timeout=120) == InstallStatus.SUCCEEDED
        assert gw.install_status("c-7") == (InstallStatus.SUCCEEDED, 2, 2)
        summary = json.loads(gw.read_file("c-7/summary.json"))
        assert [(r["ecu"], r["result"], r["version_after"]) for r in summary["results"]] == [
            ("vcu", "success", "2.0"), ("bms", "success", "2.0")]
        trace = parse_trace(gw.read_file("c-7/vcu.trace.jsonl").decode())
        assert trace.header.server == "vcu" and trace.trailer["result"] == "success"
        inventory = {e["ecu"]: e["software_version"] for e in gw.inventory()}
        assert inventory == {"vcu": "2.0", "bms": "2.0"}
        _refused("0x31", lambda: gw.read_file("../secrets"), "a path outside the results was served")
        _refused("0x31", lambda: gw.start_install("missing.json"), "a missing manifest started an install")
        # a signed campaign older than what the ECUs run: checked per ECU before anything is erased
        old = os.urandom(50_000)
        _deploy(segment, link, tmp_path, "vcu-1.5.bin", old)
        _deploy(segment, link, tmp_path, "install-c-old.json", _manifest("c-old", {"vcu": ("vcu-1.5.bin", old, "1.5")}))
        gw.start_install("install-c-old.json")
        assert gw.wait_install("c-old", timeout=60) == InstallStatus.FAILED
        (result,) = json.loads(gw.read_file("c-old/summary.json"))["results"]
        assert (result["failed_step"], result["reason"]) == ("rollback_check", "the ECU runs 2.0, newer than 1.5: not flashed")
        assert {e["ecu"]: e["software_version"] for e in gw.inventory()}["vcu"] == "2.0"
        # cancel (routine 0x0304): an install that ended stays as it ended; one never started never starts
        assert gw.cancel_install("c-7", "late")[0] == InstallStatus.SUCCEEDED
        assert gw.cancel_install("c-never", "deploy: deploy_failed") == (InstallStatus.NONE, 0, 0)
        _deploy(segment, link, tmp_path, "vcu-3.0.bin", old)
        _deploy(segment, link, tmp_path, "install-c-never.json", _manifest("c-never", {"vcu": ("vcu-3.0.bin", old, "3.0")}))
        _refused("0x22", lambda: gw.start_install("install-c-never.json"), "a cancelled campaign's install started")
        assert json.loads(gw.read_file("c-never/install.json"))["error"] == "the TBOX cancelled this campaign"
        # the gateway decides for itself: a replayed manifest of an installed campaign, an expired campaign
        c7 = _manifest("c-7", {e: (f"{e}-2.0.bin", data, "2.0") for e, data in images.items()})
        _deploy(segment, link, tmp_path, "install-c-7.json", c7)
        _refused("0x22", lambda: gw.start_install("install-c-7.json"), "a campaign installed before ran again")
        newer = os.urandom(40_000)
        _deploy(segment, link, tmp_path, "vcu-4.0.bin", newer)
        _deploy(segment, link, tmp_path, "install-c-late.json", _manifest("c-late", {"vcu": ("vcu-4.0.bin", newer, "4.0")},
                                                                            expires="2026-11-02T00:00:00Z"))
        _refused("0x22", lambda: gw.start_install("install-c-late.json"), "an expired campaign was installed")
        assert json.loads(gw.read_file("c-late/install.json"))["error"].startswith("expired: ")
        _refused("0x31", lambda: gw.cancel_install("../c-7", "x"), "a campaign id that is no name was taken")


def test_an_ecu_that_does_not_tell_its_version_is_not_flashed(tmp_path, write_config, procs):
    """Rollback (Uptane): the gateway never skips the downgrade check. An ECU whose version read
    (22 F189) is lost once is asked again and flashed; one that never answers it is refused at
    rollback_check before anything is erased, its bank untouched."""
    path = write_config({
        "segments": {"bb": {"bus": multicast_bus()}, "pt": {"bus": multicast_bus()}},
        "deploy": {"segment": "bb", "package_dir": str(tmp_path / "gw" / "packages")},
        "gateway": {"results_dir": str(tmp_path / "gw" / "results"), **_trust(tmp_path)},
        "ecus": {"vcu": ecu_entry("vcu", 0x7E0, 0x7E8, "pt", faults=["vcu:22:drop"]),
                 "bms": ecu_entry("bms", 0x7E1, 0x7E9, "pt", faults=["bms:22#1:drop"])},
    })
    config, link = _start(tmp_path, path, procs)
    images = {"vcu": os.urandom(20_000), "bms": os.urandom(20_000)}
    before = (tmp_path / "ecu" / "vcu" / "meta.json").read_text()
    with Segment(config.segments["bb"]) as segment:
        gw = GatewayClient(segment, link)
        for ecu, data in images.items():
            _deploy(segment, link, tmp_path, f"{ecu}-2.0.bin", data)
        _deploy(segment, link, tmp_path, "install-c-9.json",
                _manifest("c-9", {e: (f"{e}-2.0.bin", data, "2.0") for e, data in images.items()}))
        gw.start_install("install-c-9.json")
        assert gw.wait_install("c-9", timeout=120) == InstallStatus.FAILED
        results = {r["ecu"]: r for r in json.loads(gw.read_file("c-9/summary.json"))["results"]}
    assert (results["bms"]["result"], results["bms"]["version_before"], results["bms"]["version_after"]) == \
        ("success", "1.0.0", "2.0")
    assert results["vcu"]["failed_step"] == "rollback_check" and "did not tell its version" in results["vcu"]["reason"]
    assert (tmp_path / "ecu" / "vcu" / "meta.json").read_text() == before  # nothing erased, nothing written


def test_the_gateway_flashes_only_what_a_trusted_party_signed(tmp_path, write_config, procs):
    """Any node on the backbone can deploy files and start an install: the gateway checks each
    install against the signed campaign it carries, and refuses, before erasing anything, an
    unsigned one, one signed by another key, one whose deployed image is not the signed one,
    one that adds or leaves out an ECU; the reason is kept for the TBOX to read."""
    config, link = _two_ecus(tmp_path, write_config, procs)
    evil, good = os.urandom(20_000), os.urandom(20_000)
    unsigned = json.dumps({"format": "vota-install", "version": 1, "campaign_id": "x-1",
                           "jobs": [{"ecu": "vcu", "package": "vcu-6.6.6.bin", "version": "6.6.6"}]}).encode()
    attempts = {
        "x-1": (unsigned, "not signed: the install manifest carries no signed campaign"),
        "x-2": (_manifest("x-2", {"vcu": ("vcu-6.6.6.bin", evil, "6.6.6")}, key=Ed25519PrivateKey.generate()),
                "untrusted_key"),
        "x-3": (_manifest("x-3", {"vcu": ("vcu-6.6.6.bin", evil, "6.6.6")}, signed_images={"vcu": good}),
                "vcu-6.6.6.bin: the deployed file is not the signed package"),
    }
    with Segment(config.segments["bb"]) as segment:
        gw = GatewayClient(segment, link)
        _deploy(segment, link, tmp_path, "vcu-6.6.6.bin", evil)
        _deploy(segment, link, tmp_path, "bms-2.0.bin", good)
        both = json.loads(_manifest("x-4", {"vcu": ("vcu-6.6.6.bin", evil, "6.6.6"), "bms": ("bms-2.0.bin", good, "2.0")}))
        both["jobs"] = both["jobs"][:1]  # the signed campaign's bms left out (mix-and-match)
        attempts["x-4"] = (json.dumps(both).encode(), "the jobs are not the signed campaign's packages")
        for cid, (manifest, why) in attempts.items():
            _deploy(segment, link, tmp_path, f"install-{cid}.json", manifest)
            try:
                gw.start_install(f"install-{cid}.json")
                raise AssertionError(f"{cid} started")
            except GatewayError as exc:
                assert "0x22" in str(exc)  # conditionsNotCorrect
            assert gw.install_status(cid)[0] == InstallStatus.REFUSED
            assert why in json.loads(gw.read_file(f"{cid}/install.json"))["error"]
        assert {e["ecu"]: e["software_version"] for e in gw.inventory()} == {"vcu": "1.0.0", "bms": "1.0.0"}


def test_a_key_revoked_by_a_signed_key_list_stays_revoked_on_the_gateway(tmp_path, write_config, procs):
    """Key compromise on the backbone: once an install carried a key list (signed by the root key)
    that revokes KEY, the gateway refuses KEY's campaigns, also when a later manifest leaves the
    list out and after a restart; a list not signed by the root is refused with the install."""
    from agent.core.roles import key_list_doc, sign_key_list

    root, new = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    (tmp_path / "root.pub").write_bytes(root.public_key().public_bytes(serialization.Encoding.PEM,
                                                                       serialization.PublicFormat.SubjectPublicKeyInfo))
    path = write_config({
        "segments": {"bb": {"bus": multicast_bus()}, "pt": {"bus": multicast_bus()}},
        "deploy": {"segment": "bb", "package_dir": str(tmp_path / "gw" / "packages")},
        "gateway": {"results_dir": str(tmp_path / "gw" / "results"), **_trust(tmp_path),
                    "root_keys": [str(tmp_path / "root.pub")]},
        "ecus": {"vcu": ecu_entry("vcu", 0x7E0, 0x7E8, "pt")},
    })
    config, link = _start(tmp_path, path, procs)

    def key_list() -> str:  # version 1: KEY revoked, ``new`` signs campaigns
        doc = key_list_doc(1, {"root": ([root.public_key()], 1), "campaign": ([new.public_key()], 1),
                               "content": ([new.public_key()], 1)})
        return base64.b64encode(sign_key_list(doc, [root])).decode()

    def with_keys(manifest: bytes, keys: str) -> bytes:
        doc = json.loads(manifest)
        doc["proof"]["keys"] = [keys]
        return json.dumps(doc).encode()

    image = os.urandom(20_000)
    vcu = {"vcu": ("vcu-2.0.bin", image, "2.0")}
    forged = json.loads(base64.b64decode(key_list()))
    payload = base64.b64decode(forged["payload"])  # the root's key id on another key's signature
    forged["signatures"] = [{"keyid": forged["signatures"][0]["keyid"],
                             "sig": base64.b64encode(new.sign(b"vota-keys-v1\n" + payload)).decode()}]
    attempts = [
        ("k-1", with_keys(_manifest("k-1", vcu, key=new), base64.b64encode(json.dumps(forged).encode()).decode()),
         "key list rejected (bad_signature)"),
        ("k-2", with_keys(_manifest("k-2", vcu), key_list()), "untrusted_key"),  # the list is taken, KEY revoked
        ("k-3", _manifest("k-3", vcu), "untrusted_key"),  # the list left out: still revoked
    ]
    with Segment(config.segments["bb"]) as segment:
        gw = GatewayClient(segment, link)
        _deploy(segment, link, tmp_path, "vcu-2.0.bin", image)
        for cid, manifest, why in attempts:
            _deploy(segment, link, tmp_path, f"install-{cid}.json", manifest)
            try:
                gw.start_install(f"install-{cid}.json")
                raise AssertionError(f"{cid} started")
            except GatewayError:
                pass
            assert why in json.loads(gw.read_file(f"{cid}/install.json"))["error"], cid
    assert sorted(p.name for p in (tmp_path / "gw" / "results" / "keys").iterdir()) == ["keys-000001.json"]
    procs[1].stop()
    procs.append(Proc("gateway", "-c", str(path), log=tmp_path / "gw2.log"))
    procs[-1].wait_ready("gateway ready")
    with Segment(config.segments["bb"]) as segment:
        gw = GatewayClient(segment, link)
        _deploy(segment, link, tmp_path, "install-k-4.json", _manifest("k-4", vcu))
        try:
            gw.start_install("install-k-4.json")
            raise AssertionError("k-4 started: the revoked key is back after a restart")
        except GatewayError:
            pass
        assert "untrusted_key" in json.loads(gw.read_file("k-4/install.json"))["error"]
        _deploy(segment, link, tmp_path, "install-k-5.json", _manifest("k-5", vcu, key=new))  # the new key
        gw.start_install("install-k-5.json")
        assert gw.wait_install("k-5", timeout=120) == InstallStatus.SUCCEEDED
        assert {e["ecu"]: e["software_version"] for e in gw.inventory()} == {"vcu": "2.0"}


def test_content_for_an_ecu_that_is_being_flashed_waits_for_the_flash(tmp_path, write_config, procs):
    """One conversation per ECU: a content delivery that arrives during a flash of the same ECU is
    answered "try later" (status 02) and not interleaved with the flash; after it, it goes through."""
    path = write_config({
        "segments": {"bb": {"bus": multicast_bus()}, "body": {"bus": multicast_bus(), "bitrate": 500000}},
        "deploy": {"segment": "bb", "package_dir": str(tmp_path / "gw" / "packages")},
        "gateway": {"results_dir": str(tmp_path / "gw" / "results"), **_trust(tmp_path)},
        "ecus": {"bcm": ecu_entry("bcm", 0x740, 0x748, "body")},
    })
    config, link = _start(tmp_path, path, procs)
    image, material = os.urandom(96_000), os.urandom(3_000)  # ~3 s of TransferData at 500 kbit/s
    files = {"bcm-2.0.bin": image, "lamp.frames": material}
    files["install-c-8.json"] = _manifest("c-8", {"bcm": ("bcm-2.0.bin", image, "2.0")})
    with Segment(config.segments["bb"]) as segment:
        gw = GatewayClient(segment, link)
        for name, data in files.items():
            (tmp_path / name).write_bytes(data)
            assert PackageDeployer(segment, link, name, tmp_path / name, hashlib.sha256(data).hexdigest()).run().result == "success"
        gw.start_install("install-c-8.json")
        time.sleep(0.5)
        assert gw.install_status("c-8")[0] == InstallStatus.RUNNING  # bcm is being flashed now
        try:
            gw.content(ContentOp.STORE, "bcm", b"lamp.frames")
            raise AssertionError("content went to bcm in the middle of its flash")
        except GatewayError as exc:
            assert "bcm is busy (flash)" in str(exc)  # a GatewayError: try later, not a refusal
        assert gw.wait_install("c-8", timeout=120) == InstallStatus.SUCCEEDED
        summary = json.loads(gw.read_file("c-8/summary.json"))
        assert [(r["ecu"], r["result"], r["version_after"]) for r in summary["results"]] == [("bcm", "success", "2.0")]
        gw.content(ContentOp.STORE, "bcm", b"lamp.frames")  # the ECU is free again
    assert (tmp_path / "ecu" / "bcm" / "content" / "lamp.frames").read_bytes() == material
