"""``vota campaign``: what the cloud does with campaigns (keys, signing) and the vehicle's check."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from agent.cli.inputs import read_input, trusted_keys
from agent.errors import UsageError

__all__ = ["cmd_campaign"]


def cmd_campaign(args: argparse.Namespace) -> int:
    import datetime as _dt
    import os

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from agent.adapters.storage import atomic_write_bytes
    from agent.core import campaign as c

    if args.campaign_command == "keygen":
        key = Ed25519PrivateKey.generate()
        out = Path(args.out)
        private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        atomic_write_bytes(out / "signing.key", private)
        os.chmod(out / "signing.key", 0o600)
        atomic_write_bytes(out / "signing.pub", public)
        print(f"key id {c.key_id(key.public_key())}: {out / 'signing.key'} (keep secret), {out / 'signing.pub'} (give to vehicles)")
        return 0
    if args.campaign_command == "sign":
        key = c.load_private_key(read_input(args.key, "key"), args.key)
        try:
            doc = json.loads(read_input(args.campaign, "campaign"))
        except ValueError as exc:
            raise UsageError(f"{args.campaign}: not JSON ({exc})") from None
        envelope = c.sign_campaign(doc, key)
        if args.out:
            atomic_write_bytes(args.out, envelope)
        else:
            sys.stdout.write(envelope.decode())
        return 0
    trusted = trusted_keys(args.trusted)
    # without --installed the versions are not checked; with it, every target ECU needs one
    installed = dict(item.partition("=")[::2] for item in args.installed) if args.installed else None
    campaign = c.verify_campaign(read_input(args.envelope, "campaign"), trusted, vin=args.vin,
                                 now=_dt.datetime.now(_dt.timezone.utc), installed=installed)
    print(f"campaign {campaign.campaign_id} verified: {len(campaign.packages)} package(s), install {campaign.install}, "
          f"expires {campaign.expires.isoformat()}")
    return 0
