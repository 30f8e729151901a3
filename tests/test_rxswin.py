"""RXSWIN (UN R156 7.2): the vehicle's set, kept by the gateway, read by any tester on a DID
(scapy's UDS stack here), changed only by a verified campaign with its commit, never by a
failed one or by a tester's WriteDataByIdentifier, and a campaign made for other values refused."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import pytest

from agent.adapters.canbus import Segment
from agent.adapters.config_files import load_vehicle_config
from agent.core.campaign import CampaignRejected, sign_campaign, verify_campaign
from agent.core.config import parse_vehicle_config
from agent.core.rxswin import decode_did, encode_did, mismatch, parse_changes
from agent.errors import ConfigError
from tbox.gateway_client import GatewayClient, GatewayError, InstallStatus
from tests.conftest import ecu_entry, virtual_bus
from tests.scapy_tester import read_rxswin, scapy_requests
from tests.test_vehicle_campaigns import running
from tests.vehicle import VIN, Vehicle

FACTORY = {"R10": "R10-VOTA-EMC-0001", "R149": "R149-VOTA-DLP-0001"}


def test_the_did_layout_and_the_campaign_rules(tmp_path):
    values = {"R10": "R10-VOTA-EMC-0001", "UN-R155": "x" * 64}
    data = encode_did(values)
    assert data[:1] == b"\x02" and data[1:5] == b"\x03R10" and decode_did(data) == values
    for broken, why in ((b"", "empty"), (data[:-1], "shorter"), (data + b"\x00", "after the last")):
        with pytest.raises(ValueError, match=why):
            decode_did(broken)
    changes = parse_changes({"R10": {"before": "A", "after": "B"}})
    assert changes == (("R10", "A", "B"),)
    assert mismatch(changes, {"R10": "A"}) is None
    assert "made for 'A'" in str(mismatch(changes, {"R10": "Z"}))
    assert "no approval under R10" in str(mismatch(changes, {"R79": "A"}))
    for doc, why in (({"R10": {"before": "A"}}, "needs before and after"), ({"R 10": {"before": "A", "after": "B"}},
                                                                            "not a regulation"),
                     ({"R10": {"before": "A", "after": "\u00e9"}}, "printable ASCII"), ([], "must map")):
        with pytest.raises(ValueError, match=why):
            parse_changes(doc)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    doc = {"format": "vota-campaign", "version": 1, "campaign_id": "c-1", "vin": VIN, "install": "immediate",
           "issued": "2026-11-21T10:00:00Z", "expires": "2099-12-31T00:00:00Z", "activation": "per_ecu",
           "rxswin": {"R10": {"before": "A", "after": "B"}},
           "packages": [{"name": f"{e}.bin", "ecu": e, "version": "2", "url": "http://c/x", "size": 1, "sha256": "0" * 64}
                        for e in ("vcu", "bms")]}
    with pytest.raises(CampaignRejected, match="installs atomically"):  # half installed, it would name software not run
        sign_campaign(doc, key)
    signed = sign_campaign({**doc, "activation": "atomic"}, key)
    import datetime as _dt

    from agent.core.campaign import key_id

    campaign = verify_campaign(signed, {key_id(key.public_key()): key.public_key()}, vin=VIN, now=_dt.datetime.now(_dt.timezone.utc))
    assert campaign.rxswin == (("R10", "A", "B"),)


@pytest.mark.parametrize("approvals, key, why", [
    ([{"regulation": "R10", "rxswin": "A", "ecus": ["nope"]}], "approvals[0].ecus", "unknown ECU 'nope'"),
    ([{"regulation": "R10", "rxswin": "A", "ecus": ["vcu"]}] * 2, "approvals[1].regulation", "unique"),
    ([{"regulation": "R10", "rxswin": "", "ecus": ["vcu"]}], "approvals[0].rxswin", "non-empty"),
    ([{"regulation": "R10", "rxswin": "A", "ecus": ["vcu"], "did": 1}], "approvals[0].did", "unknown key"),
    ({"R10": "A"}, "approvals", "expected a list"),
])
def test_approvals_in_the_configuration_are_checked(approvals: Any, key: str, why: str) -> None:
    data = {"segments": {"pt": {"bus": virtual_bus()}}, "ecus": {"vcu": ecu_entry("vcu", 0x7E0, 0x7E8)},
            "approvals": approvals}
    with pytest.raises(ConfigError) as caught:
        parse_vehicle_config(data, "v.yaml")
    assert key in str(caught.value) and why in str(caught.value), caught.value
    with pytest.raises(ConfigError, match="boot id"):
        parse_vehicle_config({**data, "approvals": None, "gateway": {"rxswin_did": 0xF1B0}}, "v.yaml")


def _manifest(v: Vehicle, cid: str, rxswin: dict[str, tuple[str, str]]) -> tuple[bytes, list[tuple[str, bytes]]]:
    """A signed campaign's install manifest, for the gateway alone (no TBOX in between), and its packages."""
    packages = v.packages("3.0.0", size=4096)
    envelope = v.campaign(cid, "3.0.0", packages=packages, activation="atomic", rxswin=rxswin)
    campaign = json.loads(base64.b64decode(json.loads(envelope)["payload"]))
    manifest = {"format": "vota-install", "version": 1, "campaign_id": cid, "activation": "atomic",
                "jobs": [{"ecu": p["ecu"], "package": p["name"], "version": p["version"]} for p in campaign["packages"]],
                "proof": {"campaign": base64.b64encode(envelope).decode()}}
    return json.dumps(manifest).encode(), [(path.name, path.read_bytes()) for _, path, _ in packages]


@pytest.mark.slow
def test_a_campaign_changes_the_rxswin_with_its_commit_and_a_failed_one_does_not(vehicle):
    v: Vehicle = vehicle
    bus = v.backbone["bus"]
    assert read_rxswin(bus) == FACTORY  # any tester, default session, no SecurityAccess
    # a tester cannot write it, in any session
    answers = scapy_requests(bus, [b"\x2e\xf1\xef" + encode_did({"R10": "FORGED"}), b"\x10\x03",
                                   b"\x2e\xf1\xef" + encode_did({"R10": "FORGED"}), b"\x2e\xf1"])
    assert [a.hex() for a in answers] == ["7f2e31", "5003003201f4", "7f2e31", "7f2e13"]
    assert read_rxswin(bus) == FACTORY

    new = {"R10": ("R10-VOTA-EMC-0001", "R10-VOTA-EMC-0002")}
    v.send(v.campaign("c-rx-1", "2.0.0", rxswin=new))
    done = v.finished("c-rx-1")
    assert done["outcome"] == "success", done
    after = {**FACTORY, "R10": "R10-VOTA-EMC-0002"}
    assert done["rxswin"] == {"before": FACTORY, "after": after}
    assert read_rxswin(bus) == after
    inventory = v.reports("inventory", "c-rx-1")
    assert inventory and inventory[0]["rxswin"] == FACTORY  # as it was when the campaign arrived

    # made for the old values: the TBOX refuses it before anything is downloaded
    v.send(v.campaign("c-rx-stale", "3.0.0", rxswin=new))
    rejected = v.rejected("c-rx-stale")
    assert rejected["reason"] == "rxswin" and "R10-VOTA-EMC-0002" in rejected["detail"], rejected
    assert not (v.tmp / "gw" / "packages" / "vcu-3.0.0.bin").exists()

    # ... and so does the gateway, when a node on the backbone sends it the manifest itself
    manifest, files = _manifest(v, "c-rx-direct", new)
    config = load_vehicle_config(str(v.config))
    with Segment(config.segments["bb"]) as segment:
        gw = GatewayClient(segment, config.deploy_link())
        for name, data in [*files, ("install-c-rx-direct.json", manifest)]:
            (v.tmp / name).write_bytes(data)
            assert gw.deploy(name, v.tmp / name, hashlib.sha256(data).hexdigest()).result == "success"
        with pytest.raises(GatewayError, match="0x22"):
            gw.start_install("install-c-rx-direct.json")
        assert gw.install_status("c-rx-direct")[0] == InstallStatus.REFUSED
        status = json.loads(gw.read_file("c-rx-direct/install.json"))
        assert "RXSWIN: R10 is 'R10-VOTA-EMC-0002' on this vehicle" in status["error"], status
        assert gw.rxswin() == after  # the TBOX's own read of the DID

    # a campaign whose activation fails on bcm: rolled back, the RXSWIN as it was
    before = running(v)
    v.restart_sim("bcm:31#4:nrc=0x22")
    v.send(v.campaign("c-rx-fail", "3.0.0", rxswin={"R10": ("R10-VOTA-EMC-0002", "R10-VOTA-EMC-0003"),
                                                     "R149": ("R149-VOTA-DLP-0001", "R149-VOTA-DLP-0002")}))
    done = v.finished("c-rx-fail", timeout=180)
    assert done["outcome"] == "failed" and done["rxswin"] == {"before": after, "after": after}, done
    assert running(v) == before
    assert read_rxswin(bus) == after
    kept = json.loads((v.tmp / "gw" / "results" / "rxswin.json").read_text())
    assert [h["campaign_id"] for h in kept["history"]] == ["c-rx-1"]
