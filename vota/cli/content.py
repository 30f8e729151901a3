"""``vota content``: the trust platform's tools (keys, build, sign, verify, review) and the vehicle
side's view and choices (list, show, accept, decline, bind, import)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from agent.errors import UsageError
from vota.cli.inputs import read_input, threshold_role, trusted_keys

__all__ = ["cmd_content"]


def cmd_content(args: argparse.Namespace) -> int:
    if args.content_command in ("list", "show", "accept", "decline", "import", "bind"):
        return _content_on_vehicle(args)
    action = {"keygen": _keygen, "build": _build, "review": _review, "sign": _sign}.get(args.content_command, _verify)
    return action(args)


def _keygen(args: argparse.Namespace) -> int:
    import os

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from agent.adapters.storage import atomic_write_bytes

    key = X25519PrivateKey.generate()
    out = Path(args.out)
    atomic_write_bytes(out / "vehicle.key", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                              serialization.NoEncryption()))
    os.chmod(out / "vehicle.key", 0o600)
    atomic_write_bytes(out / "vehicle.pub", key.public_key().public_bytes(serialization.Encoding.PEM,
                                                                          serialization.PublicFormat.SubjectPublicKeyInfo))
    print(f"{out / 'vehicle.key'} (stays in the vehicle), {out / 'vehicle.pub'} (for the trust platform)")
    return 0


def _build(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

    from agent.adapters.storage import atomic_write_bytes
    from agent.core.content import build_bundle
    from vota.bench.content import load_content_spec

    spec, files = load_content_spec(args.spec)
    vehicle = None
    if args.vehicle_key:
        pub = serialization.load_pem_public_key(read_input(args.vehicle_key, "vehicle key"))
        if not isinstance(pub, X25519PublicKey):
            raise UsageError(f"{args.vehicle_key}: not an X25519 public key")
        vehicle = pub
    atomic_write_bytes(args.out, build_bundle(spec, files, vehicle, args.vin))
    return 0


def _review(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from agent.core.clock import parse_time
    from cloud_sim.trust import TrustPlatform
    from vota.bench.content import load_content_spec

    spec, files = load_content_spec(args.spec)
    trust = TrustPlatform(Ed25519PrivateKey.generate())  # the review signs nothing
    trust.submit(spec, files)
    reviewed = trust.review(str(spec["bundle_id"]), now=parse_time(args.at) if args.at else None)
    if reviewed.status != "approved":
        for problem in reviewed.problems:
            print(f"{args.spec}: {problem}")
        return 1
    print(f"{args.spec}: approved ({len(spec['items'])} items)")
    return 0


def _sign(args: argparse.Namespace) -> int:
    from agent.adapters.storage import atomic_write_bytes
    from agent.core.campaign import load_private_key
    from agent.core.content import sign_bundle

    keys = [load_private_key(read_input(path, "key"), path) for path in args.key]
    atomic_write_bytes(args.out, sign_bundle(read_input(args.bundle, "bundle"), keys))
    return 0


def _verify(args: argparse.Namespace) -> int:
    import datetime as _dt

    from agent.core import content as c

    trusted = threshold_role(trusted_keys(args.trusted), args.threshold)
    data = read_input(args.bundle, "bundle")
    probe = c.read_archive(data, len(data) + c.SLACK)
    bid = json.loads(probe.get("manifest.json", b"{}") or b"{}").get("bundle_id", "")
    bundle = c.verify_bundle(data, trusted, vin=args.vin, now=_dt.datetime.now(_dt.timezone.utc),
                             installed={bid: args.installed} if args.installed is not None else None)
    print(f"bundle {bundle.bundle_id} v{bundle.bundle_version} verified: " + ", ".join(
        f"{i.id} ({i.cls} -> {i.target}, {i.policy}{', encrypted' if i.encryption else ''})" for i in bundle.items))
    return 0


def _content_on_vehicle(args: argparse.Namespace) -> int:
    """C8: the vehicle side lists, shows, accepts and declines content."""
    from agent.adapters.config_files import load_vehicle_config
    from tbox.content_state import load_records, write_inbox

    state_dir = load_vehicle_config(args.config).tbox_config().state_dir
    if args.content_command == "import":
        import time

        from agent.adapters.storage import atomic_write_bytes

        data = read_input(args.bundle, "bundle")
        atomic_write_bytes(Path(state_dir) / "content" / "inbox" / f"{time.time_ns()}.tar", data)
        print(f"{args.bundle}: handed to the TBOX ({len(data)} bytes); vota content list shows what it made of it")
        return 0
    if args.content_command == "bind":
        write_inbox(state_dir, {"command": "content_bind", "app": args.app, "auto_update": args.auto_update})
        print(f"{args.app}: {'automatic' if args.auto_update else 'manual'} updates, handed to the TBOX")
        return 0
    records = [(r.dir, r.to_json()) for r in load_records(state_dir)]
    if args.content_command == "list":
        if args.json:
            print(json.dumps([{k: v for k, v in doc.items() if k != "urls"} for _, doc in records], indent=2))
            return 0
        if not records:
            print("no content offered")
        for _, doc in records:
            items = ", ".join(f"{i} {e['status']}" for i, e in doc["items"].items())
            print(f"{doc['bundle_id']} v{doc['version']}  {doc['status']:<10}  {doc.get('title', '')}  [{items}]")
        return 0
    found = [(d, doc) for d, doc in records if doc["bundle_id"] == args.bundle_id]
    if not found:
        raise UsageError(f"no content {args.bundle_id!r} on this vehicle (vota content list shows what there is)")
    directory, doc = found[-1]
    if args.content_command == "show":
        manifest = json.loads((directory / "manifest.json").read_text())
        print(f"{doc['bundle_id']} v{doc['version']}: {doc.get('title', '')} (owner {doc.get('owner', '')}), {doc['status']}"
              + (f" ({doc.get('reason')}: {doc.get('detail')})" if doc.get("reason") else ""))
        print(f"  configuration: {json.dumps(manifest.get('config', {}), sort_keys=True)}")
        for item in manifest["items"]:
            entry = doc["items"][item["id"]]
            extra = f", config {json.dumps(item['config'], sort_keys=True)}" if item.get("config") else ""
            print(f"  {item['id']}: {item['class']} -> {item['target']}, policy {entry['policy']}, {item.get('size', 0)} bytes"
                  f"{', encrypted' if item.get('encryption') else ''}{extra}: {entry['status']}"
                  + (f" ({entry.get('reason')})" if entry.get("reason") else ""))
        return 0
    if args.item is not None and args.item not in doc["items"]:
        raise UsageError(f"{args.bundle_id} has no item {args.item!r} (items: {', '.join(doc['items'])})")
    command = {"command": f"content_{args.content_command}", "bundle_id": args.bundle_id}
    if args.item is not None:
        command["item"] = args.item
    write_inbox(state_dir, command)
    print(f"{args.content_command} {args.bundle_id}{' ' + args.item if args.item else ''}: handed to the TBOX")
    return 0
