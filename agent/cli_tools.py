"""The ``vota`` commands that play the cloud and its trust platform: campaign keys and
signatures, the stand-in cloud, custom service content bundles."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from agent.cli import _serve
from agent.errors import UsageError

__all__ = ["cmd_campaign", "cmd_cloud", "cmd_content", "read_input"]


def read_input(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{path}: {what} not found") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read {what} ({exc.strerror})") from None


def _trusted(paths: list[str]) -> dict[str, Any]:
    """``--trusted`` public key files, by key id."""
    from agent.campaign import key_id, load_public_key

    keys = {}
    for path in paths:
        key = load_public_key(read_input(path, "public key"), path)
        keys[key_id(key)] = key
    return keys


def cmd_campaign(args: argparse.Namespace) -> int:
    import datetime as _dt
    import os

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from agent import campaign as c
    from agent.storage import atomic_write_bytes

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
    trusted = _trusted(args.trusted)
    installed = dict(item.partition("=")[::2] for item in args.installed)
    campaign = c.verify_campaign(read_input(args.envelope, "campaign"), trusted, vin=args.vin,
                                 now=_dt.datetime.now(_dt.timezone.utc), installed=installed)
    print(f"campaign {campaign.campaign_id} verified: {len(campaign.packages)} package(s), install {campaign.install}, "
          f"expires {campaign.expires.isoformat()}")
    return 0


def cmd_cloud(args: argparse.Namespace) -> int:
    import datetime as _dt

    from agent.campaign import load_private_key
    from agent.storage import atomic_write_bytes
    from cloud_sim.cloud import CloudSim, make_campaign, publish

    if args.cloud_command == "broker":
        from cloud_sim.broker import run_broker

        run_broker("127.0.0.1", args.port, ready=lambda: print(f"broker ready on 127.0.0.1:{args.port}", flush=True))
        return 0
    if args.cloud_command == "serve":
        sim = CloudSim(args.broker, args.store, args.packages, args.http_port, args.mqtt_version)
        return _serve(f"cloud (packages at {sim.base_url})", sim.start, sim.stop)
    if args.cloud_command == "campaign":
        key = load_private_key(read_input(args.key, "key"), args.key)
        packages = []
        for item in args.packages:
            ecu, _, rest = item.partition("=")
            path_text, _, version = rest.partition("@")
            if not ecu or not path_text or not version:
                raise UsageError(f"expected ECU=FILE@VERSION, got {item!r}")
            packages.append((ecu, Path(path_text), version))
        envelope = make_campaign(vin=args.vin, packages=packages, base_url=args.base_url, key=key,
                                 campaign_id=args.campaign_id, install=args.install,
                                 valid_for=_dt.timedelta(days=args.valid_days))
        if args.out:
            atomic_write_bytes(args.out, envelope)
        else:
            sys.stdout.write(envelope.decode())
        return 0
    if args.cloud_command == "publish":
        publish(args.broker, args.vin, "campaign", read_input(args.campaign, "campaign"), args.mqtt_version)
        return 0
    if args.cloud_command == "offer-content":
        from cloud_sim.cloud import content_offer

        Path(args.packages).mkdir(parents=True, exist_ok=True)
        offer = content_offer(read_input(args.bundle, "bundle"), Path(args.packages), args.base_url, args.vin, args.request)
        publish(args.broker, args.vin, "command", offer, args.mqtt_version)
        return 0
    if args.cloud_command == "request-content":
        body = json.dumps({"command": "content_request", "bundle_id": args.bundle_id, "vin": args.vin}).encode()
        publish(args.broker, args.vin, "command", body, args.mqtt_version)
        return 0
    body = json.dumps({"command": args.command, "campaign_id": args.campaign_id, "vin": args.vin}).encode()
    publish(args.broker, args.vin, "command", body, args.mqtt_version)
    return 0


def cmd_content(args: argparse.Namespace) -> int:
    import datetime as _dt
    import os

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

    from agent import content as c
    from agent.campaign import load_private_key
    from agent.storage import atomic_write_bytes

    if args.content_command in ("list", "show", "accept", "decline", "import", "bind"):
        return _content_on_vehicle(args)
    if args.content_command == "keygen":
        key = X25519PrivateKey.generate()
        out = Path(args.out)
        atomic_write_bytes(out / "vehicle.key", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                                  serialization.NoEncryption()))
        os.chmod(out / "vehicle.key", 0o600)
        atomic_write_bytes(out / "vehicle.pub", key.public_key().public_bytes(serialization.Encoding.PEM,
                                                                              serialization.PublicFormat.SubjectPublicKeyInfo))
        print(f"{out / 'vehicle.key'} (stays in the vehicle), {out / 'vehicle.pub'} (for the trust platform)")
        return 0
    if args.content_command == "build":
        from agent.bench_content import load_content_spec

        spec, files = load_content_spec(args.spec)
        vehicle = None
        if args.vehicle_key:
            pub = serialization.load_pem_public_key(read_input(args.vehicle_key, "vehicle key"))
            if not isinstance(pub, X25519PublicKey):
                raise UsageError(f"{args.vehicle_key}: not an X25519 public key")
            vehicle = pub
        atomic_write_bytes(args.out, c.build_bundle(spec, files, vehicle, args.vin))
        return 0
    if args.content_command == "review":
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        from agent.bench_content import load_content_spec
        from agent.clock import parse_time
        from cloud_sim.trust import TrustPlatform

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
    if args.content_command == "sign":
        platform_key = load_private_key(read_input(args.key, "key"), args.key)
        atomic_write_bytes(args.out, c.sign_bundle(read_input(args.bundle, "bundle"), platform_key))
        return 0
    trusted = _trusted(args.trusted)
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
    from agent.config import load_vehicle_config
    from tbox.content_manager import load_records, write_inbox

    state_dir = load_vehicle_config(args.config).tbox_config().state_dir
    if args.content_command == "import":
        import time

        from agent.storage import atomic_write_bytes

        data = read_input(args.bundle, "bundle")
        atomic_write_bytes(Path(state_dir) / "content" / "inbox" / f"{time.time_ns()}.tar", data)
        print(f"{args.bundle}: handed to the TBOX ({len(data)} bytes); vota content list shows what it made of it")
        return 0
    if args.content_command == "bind":
        write_inbox(state_dir, {"command": "content_bind", "app": args.app, "auto_update": args.auto_update})
        print(f"{args.app}: {'automatic' if args.auto_update else 'manual'} updates, handed to the TBOX")
        return 0
    records = load_records(state_dir)
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
