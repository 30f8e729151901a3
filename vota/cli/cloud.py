"""``vota cloud``: the stand-in cloud (package server, collector), campaigns and commands to a vehicle."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from agent.errors import UsageError
from vota.cli.daemons import serve
from vota.cli.inputs import read_input

__all__ = ["cmd_cloud"]


def cmd_cloud(args: argparse.Namespace) -> int:
    import datetime as _dt

    from agent.adapters.storage import atomic_write_bytes
    from agent.core.campaign import load_private_key
    from cloud_sim.cloud import CloudSim, make_campaign, publish

    if args.cloud_command == "broker":
        from cloud_sim.broker import run_broker

        run_broker("127.0.0.1", args.port, ready=lambda: print(f"broker ready on 127.0.0.1:{args.port}", flush=True))
        return 0
    if args.cloud_command == "serve":
        sim = CloudSim(args.broker, args.store, args.packages, args.http_port, args.mqtt_version,
                       require_signed=args.report_keys is not None)
        if args.report_keys is not None:
            from agent.core.campaign import load_public_key

            directory = Path(args.report_keys)
            if not directory.is_dir():
                raise UsageError(f"{directory}: not a directory of <VIN>.pub report keys")
            for path in sorted(directory.glob("*.pub")):
                sim.register_vehicle(path.stem, load_public_key(read_input(str(path), "report key"), str(path)))
        return serve(f"cloud (packages at {sim.base_url})", sim.start, sim.stop)
    if args.cloud_command == "campaign":
        key = load_private_key(read_input(args.key, "key"), args.key)
        packages = []
        for item in args.packages:
            ecu, _, rest = item.partition("=")
            path_text, _, version = rest.partition("@")
            if not ecu or not path_text or not version:
                raise UsageError(f"expected ECU=FILE@VERSION, got {item!r}")
            packages.append((ecu, Path(path_text), version))
        deltas = {}
        for item in args.delta_from:
            ecu, _, rest = item.partition("=")
            path_text, _, version = rest.partition("@")
            if not ecu or not path_text or not version:
                raise UsageError(f"--delta-from: expected ECU=OLD_IMAGE@VERSION, got {item!r}")
            if ecu not in {e for e, _, _ in packages}:
                raise UsageError(f"--delta-from {item}: the campaign has no package for {ecu}")
            deltas[ecu] = (Path(path_text), version)
        preconditions: dict[str, Any] = {}
        for item in args.precondition:
            name, eq, text = item.partition("=")
            if not name or not eq or not text:
                raise UsageError(f"--precondition: expected KEY=VALUE, got {item!r}")
            try:
                preconditions[name] = json.loads(text)  # numbers, true, false
            except ValueError:
                preconditions[name] = text  # allowed, forbidden
        envelope = make_campaign(vin=args.vin, packages=packages, base_url=args.base_url, key=key,
                                 campaign_id=args.campaign_id, install=args.install,
                                 valid_for=_dt.timedelta(days=args.valid_days), deltas=deltas,
                                 preconditions=preconditions or None)
        if args.out:
            atomic_write_bytes(args.out, envelope)
        else:
            sys.stdout.write(envelope.decode())
        return 0
    if args.cloud_command == "publish":
        publish(args.broker, args.vin, "campaign", read_input(args.campaign, "campaign"), args.mqtt_version)
        return 0
    if args.cloud_command == "keys":
        import base64

        body = json.dumps({"command": "keys_update", "vin": args.vin,
                           "keys": base64.b64encode(read_input(args.keys, "key list")).decode()}).encode()
        publish(args.broker, args.vin, "command", body, args.mqtt_version)
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
