"""``vota campaign``: what the cloud does with campaigns (keys, signing) and the vehicle's check."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from agent.cli.inputs import read_input, threshold_role, trusted_keys
from agent.errors import UsageError
from agent.protocol.files import is_name

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
        if not is_name(args.name):
            raise UsageError(f"--name {args.name!r}: a plain file name is needed")
        secret, shared = out / f"{args.name}.key", out / f"{args.name}.pub"
        atomic_write_bytes(secret, private)
        os.chmod(secret, 0o600)
        atomic_write_bytes(shared, public)
        print(f"key id {c.key_id(key.public_key())}: {secret} (keep secret), {shared} (give to the other side)")
        return 0
    if args.campaign_command == "sign":
        keys = [c.load_private_key(read_input(path, "key"), path) for path in args.key]
        try:
            doc = json.loads(read_input(args.campaign, "campaign"))
        except ValueError as exc:
            raise UsageError(f"{args.campaign}: not JSON ({exc})") from None
        envelope = c.sign_campaign(doc, keys)
        if args.out:
            atomic_write_bytes(args.out, envelope)
        else:
            sys.stdout.write(envelope.decode())
        return 0
    if args.campaign_command == "keys":
        from agent.core import roles

        def pubs(paths: list[str]) -> list[Any]:
            return [c.load_public_key(read_input(path, "public key"), path) for path in paths]

        doc = roles.key_list_doc(args.version, {
            "root": (pubs(args.root), args.root_threshold), "campaign": (pubs(args.campaign), args.campaign_threshold),
            "content": (pubs(args.content), args.content_threshold)})
        signers = [c.load_private_key(read_input(path, "key"), path) for path in args.key]
        try:
            envelope = roles.sign_key_list(doc, signers)
        except roles.KeysRejected as exc:
            raise UsageError(str(exc)) from None
        if args.out:
            atomic_write_bytes(args.out, envelope)
        else:
            sys.stdout.write(envelope.decode())
        return 0
    trusted = threshold_role(trusted_keys(args.trusted), args.threshold)
    # without --installed the versions are not checked; with it, every target ECU needs one
    installed = dict(item.partition("=")[::2] for item in args.installed) if args.installed else None
    campaign = c.verify_campaign(read_input(args.envelope, "campaign"), trusted, vin=args.vin,
                                 now=_dt.datetime.now(_dt.timezone.utc), installed=installed)
    print(f"campaign {campaign.campaign_id} verified: {len(campaign.packages)} package(s), install {campaign.install}, "
          f"expires {campaign.expires.isoformat()}")
    return 0
