"""``vota evidence``: a campaign's type-approval evidence pack, made on the vehicle (tbox/evidence.py)
or checked offline (agent/adapters/evidence_pack.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from agent.errors import UsageError


def cmd_evidence(args: argparse.Namespace) -> int:
    from agent.core.campaign import load_public_key
    from vota.cli.inputs import read_input

    if args.verify is not None:
        from agent.adapters.evidence_pack import verify_pack

        key = load_public_key(read_input(args.key, "public key"), args.key) if args.key else None
        vehicle = (load_public_key(read_input(args.vehicle_key, "vehicle key"), args.vehicle_key) if args.vehicle_key
                   else None)
        path = Path(args.verify)
        if not path.is_file():
            raise UsageError(f"{path}: no such evidence pack")
        found = verify_pack(path, key, vehicle)
        if args.json:
            print(json.dumps(found, indent=2))
        elif found["ok"]:
            print(f"{path}: intact: campaign {found['campaign_id']}, {found['files']} files, "
                  + ("signed by the key given" if key else "digests only (no --key)"))
        else:
            print(f"{path}: not intact:\n  " + "\n  ".join(found["problems"]))
        return 0 if found["ok"] else 1
    if args.campaign is None:
        raise UsageError("name the CAMPAIGN to gather, or --verify PACK")
    return _make(args)


def _make(args: argparse.Namespace) -> int:
    if args.store is not None:
        return _from_store(args)
    from agent.adapters.config_files import load_vehicle_config
    from agent.adapters.evidence_pack import write_pack
    from agent.adapters.examples import resolve_config
    from agent.core.campaign import load_private_key
    from tbox.evidence import gather
    from vota.cli.inputs import read_input

    tbox = load_vehicle_config(resolve_config(args.vehicle_config)).tbox_config()
    key_file = args.key or tbox.cloud.report_key
    if not key_file:
        raise UsageError("no key to sign the pack with: --key PEM, or tbox.cloud.report_key")
    key = load_private_key(read_input(key_file, "signing key"), key_file)
    state_dir = Path(args.state_dir or tbox.state_dir)
    files = gather(state_dir, args.campaign)
    out = Path(args.out or f"evidence-{args.campaign}.tar.gz")
    manifest = write_pack(out, args.campaign, tbox.vin, files, key)
    print(f"{out}: evidence of campaign {args.campaign}: {len(manifest['files'])} files, signed by {manifest['signer']}")
    return 0


def _from_store(args: argparse.Namespace) -> int:
    """The pack from the cloud's store, signed with the key given (the OEM's)."""
    from agent.adapters.evidence_pack import write_pack
    from agent.core.campaign import load_private_key
    from cloud_sim.evidence import gather_store
    from vota.cli.inputs import read_input

    if not args.vin or not args.key:
        raise UsageError("--store needs --vin (the vehicle) and --key (the signing key)")
    key = load_private_key(read_input(args.key, "signing key"), args.key)
    files = gather_store(Path(args.store), args.vin, args.campaign)
    out = Path(args.out or f"evidence-{args.campaign}.tar.gz")
    manifest = write_pack(out, args.campaign, args.vin, files, key)
    print(f"{out}: evidence of campaign {args.campaign} from the cloud's store: {len(manifest['files'])} files, "
          f"signed by {manifest['signer']}")
    return 0
