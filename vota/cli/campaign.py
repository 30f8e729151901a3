"""``vota campaign``: what the cloud does with campaigns (keys, signing) and the vehicle's check."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from agent.errors import UsageError
from agent.protocol.files import is_name
from vota.cli.inputs import read_input, threshold_role, trusted_keys

__all__ = ["cmd_campaign"]


def cmd_campaign(args: argparse.Namespace) -> int:
    action = {"keygen": _keygen, "sign": _sign, "keys": _keys, "export": _media, "import": _media}.get(
        args.campaign_command, _verify)
    return action(args)


def _keygen(args: argparse.Namespace) -> int:
    import os

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from agent.adapters.storage import atomic_write_bytes
    from agent.core.campaign import key_id

    if not is_name(args.name):
        raise UsageError(f"--name {args.name!r}: a plain file name is needed")
    key = Ed25519PrivateKey.generate()
    out = Path(args.out)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    secret, shared = out / f"{args.name}.key", out / f"{args.name}.pub"
    atomic_write_bytes(secret, private)
    os.chmod(secret, 0o600)
    atomic_write_bytes(shared, public)
    print(f"key id {key_id(key.public_key())}: {secret} (keep secret), {shared} (give to the other side)")
    return 0


def _sign(args: argparse.Namespace) -> int:
    from agent.core import campaign as c

    keys = [c.load_private_key(read_input(path, "key"), path) for path in args.key]
    try:
        doc = json.loads(read_input(args.campaign, "campaign"))
    except ValueError as exc:
        raise UsageError(f"{args.campaign}: not JSON ({exc})") from None
    return _write(args.out, c.sign_campaign(doc, keys))


def _keys(args: argparse.Namespace) -> int:
    from agent.core import campaign as c
    from agent.core import roles

    def pubs(paths: list[str]) -> list[Any]:
        return [c.load_public_key(read_input(path, "public key"), path) for path in paths]

    doc = roles.key_list_doc(args.version, {
        "root": (pubs(args.root), args.root_threshold), "campaign": (pubs(args.campaign), args.campaign_threshold),
        "content": (pubs(args.content), args.content_threshold)}, _expiry(args.valid_days))
    signers = [c.load_private_key(read_input(path, "key"), path) for path in args.key]
    try:
        envelope = roles.sign_key_list(doc, signers)
    except roles.KeysRejected as exc:
        raise UsageError(str(exc)) from None
    return _write(args.out, envelope)


def _expiry(days: float) -> Any:
    import datetime as _dt

    if days < 0:
        raise UsageError(f"--valid-days must be 0 (never) or more, got {days:g}")
    return _dt.datetime.now(_dt.timezone.utc) + _dt.timedelta(days=days) if days else None


def _write(out: str | None, envelope: bytes) -> int:
    """The envelope to ``out``, or to stdout."""
    from agent.adapters.storage import atomic_write_bytes

    if out:
        atomic_write_bytes(out, envelope)
    else:
        sys.stdout.write(envelope.decode())
    return 0


def _verify(args: argparse.Namespace) -> int:
    import datetime as _dt

    from agent.core.campaign import verify_campaign

    trusted = threshold_role(trusted_keys(args.trusted), args.threshold)
    # without --installed the versions are not checked; with it, every target ECU needs one
    installed = dict(item.partition("=")[::2] for item in args.installed) if args.installed else None
    campaign = verify_campaign(read_input(args.envelope, "campaign"), trusted, vin=args.vin,
                               now=_dt.datetime.now(_dt.timezone.utc), installed=installed)
    print(f"campaign {campaign.campaign_id} verified: {len(campaign.packages)} package(s), install {campaign.install}, "
          f"expires {campaign.expires.isoformat()}")
    return 0


def _media(args: argparse.Namespace) -> int:
    """``export``: a signed campaign and its packages to a directory; ``import``: such a directory to the TBOX."""
    import datetime as _dt
    import time

    from tbox.offline import export_campaign, import_campaign

    if args.campaign_command == "export":
        names = export_campaign(read_input(args.envelope, "campaign"), Path(args.packages), Path(args.out))
        print(f"campaign and {len(names)} package(s) written to {args.out}")
        return 0
    from agent.adapters.config_files import load_vehicle_config
    from agent.adapters.keys import KeyStore, initial_key_list
    from agent.core.campaign import verify_campaign
    from tbox.campaign_state import TERMINAL, CampaignRecord

    config = load_vehicle_config(args.config)
    t = config.tbox_config()
    state = Path(t.state_dir)
    keys = KeyStore(state / "keys", initial_key_list((t.trusted_keys, t.signature_threshold),
                                                     (t.content.trusted_keys, t.content.signature_threshold),
                                                     (t.root_keys, t.root_threshold)))
    media = Path(args.media)
    if not media.is_dir():
        raise UsageError(f"{media}: not a directory")

    def check(envelope: bytes) -> None:  # what the TBOX checks first of a campaign that arrives over MQTT
        verify_campaign(envelope, keys.current.role("campaign"), vin=t.vin, now=_dt.datetime.now(_dt.timezone.utc),
                        known_ecus=set(config.ecus))

    record = import_campaign(media, state / "campaigns", check)
    print(f"campaign imported from {media}: the TBOX runs it ({record.dir})", flush=True)
    if args.wait <= 0:
        return 0
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        record = CampaignRecord.load(record.dir)
        if record.state in TERMINAL:
            failure = record.failure or {}
            print(f"campaign {record.campaign_id}: {record.outcome}"
                  + (f" ({failure.get('stage')}: {failure.get('reason')}: {failure.get('detail')})" if failure else ""))
            return 0 if record.outcome == "success" else 1
        time.sleep(0.5)
    print(f"campaign {record.campaign_id or record.key}: still {record.state} after {args.wait:g} s (is the TBOX running?)")
    return 1
