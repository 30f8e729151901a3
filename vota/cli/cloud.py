"""``vota cloud``: the stand-in cloud (package server, collector), campaigns and commands to a vehicle."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from agent.errors import UsageError
from vota.cli.daemons import serve
from vota.cli.inputs import image_keys, read_input

__all__ = ["cmd_cloud"]


def cmd_cloud(args: argparse.Namespace) -> int:
    action = {"broker": _broker, "serve": _serve, "campaign": _campaign, "publish": _publish, "keys": _keys, "certs": _certs,
              "offer-content": _offer_content, "request-content": _request_content}.get(args.cloud_command, _command)
    return action(args)


def _broker(args: argparse.Namespace) -> int:
    from cloud_sim.broker import run_broker

    run_broker("127.0.0.1", args.port, ready=lambda: print(f"broker ready on 127.0.0.1:{args.port}", flush=True))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from cloud_sim.cloud import CloudSim

    if (args.tls_cert is None) != (args.tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together")
    sim = CloudSim(args.broker, args.store, args.packages, args.http_port, args.mqtt_version,
                   require_signed=args.report_keys is not None, collector_broker=args.collector_broker,
                   tls=(args.tls_cert, args.tls_key) if args.tls_cert else None, share=args.share,
                   collector_id=args.collector_id)
    if args.report_keys is not None:
        from agent.core.campaign import load_public_key

        directory = Path(args.report_keys)
        if not directory.is_dir():
            raise UsageError(f"{directory}: not a directory of <VIN>.pub report keys")
        for path in sorted(directory.glob("*.pub")):
            sim.register_vehicle(path.stem, load_public_key(read_input(str(path), "report key"), str(path)))
    return serve(f"cloud (packages at {sim.base_url})", sim.start, sim.stop)


def _campaign(args: argparse.Namespace) -> int:
    import datetime as _dt

    from agent.adapters.storage import atomic_write_bytes
    from agent.core.campaign import load_private_key
    from cloud_sim.cloud import make_campaign

    key = load_private_key(read_input(args.key, "key"), args.key)
    packages = [_package(item, "", "ECU=FILE@VERSION") for item in args.packages]
    deltas = {}
    for item in args.delta_from:
        ecu, path, version = _package(item, "--delta-from: ", "ECU=OLD_IMAGE@VERSION")
        if ecu not in {e for e, _, _ in packages}:
            raise UsageError(f"--delta-from {item}: the campaign has no package for {ecu}")
        deltas[ecu] = (path, version)
    envelope = make_campaign(vin=args.vin, packages=packages, base_url=args.base_url, key=key,
                             campaign_id=args.campaign_id, install=args.install,
                             valid_for=_dt.timedelta(days=args.valid_days), deltas=deltas,
                             preconditions=_preconditions(args.precondition) or None,
                             image_keys=image_keys(args.image_key, {e for e, _, _ in packages}),
                             rxswin={r: (b, a) for r, b, a in args.rxswin} or None,
                             information=_information(args.information) if args.information else None)
    if args.out:
        atomic_write_bytes(args.out, envelope)
    else:
        sys.stdout.write(envelope.decode())
    return 0


def _information(path: str) -> dict[str, Any]:
    """``--information FILE``: per language, what the driver is told; checked as the vehicle will."""
    from agent.core.config import parse_yaml
    from agent.core.hmi import parse_information

    try:
        return parse_information(parse_yaml(read_input(path, "information").decode("utf-8", "replace"), path))
    except ValueError as exc:
        raise UsageError(f"{path}: {exc}") from None


def _package(item: str, what: str, form: str) -> tuple[str, Path, str]:
    ecu, _, rest = item.partition("=")
    path_text, _, version = rest.partition("@")
    if not ecu or not path_text or not version:
        raise UsageError(f"{what}expected {form}, got {item!r}")
    return ecu, Path(path_text), version


def _preconditions(items: list[str]) -> dict[str, Any]:
    """``--precondition KEY=VALUE``: numbers, true and false as JSON, anything else as text."""
    preconditions: dict[str, Any] = {}
    for item in items:
        name, eq, text = item.partition("=")
        if not name or not eq or not text:
            raise UsageError(f"--precondition: expected KEY=VALUE, got {item!r}")
        try:
            preconditions[name] = json.loads(text)  # numbers, true, false
        except ValueError:
            preconditions[name] = text  # allowed, forbidden
    return preconditions


def _publish(args: argparse.Namespace) -> int:
    from cloud_sim.cloud import publish

    publish(args.broker, args.vin, "campaign", read_input(args.campaign, "campaign"), args.mqtt_version)
    return 0


def _keys(args: argparse.Namespace) -> int:
    """The key list on the vehicle's ``keys`` topic, retained: one offline now takes it when it is back."""
    from cloud_sim.cloud import publish

    publish(args.broker, args.vin, "keys", read_input(args.keys, "key list"), args.mqtt_version, retain=True)
    return 0


def _certs(args: argparse.Namespace) -> int:
    from cloud_sim.pki import bench_pki

    directory = bench_pki(args.out, args.names, args.server_name or ("localhost", "127.0.0.1"))
    print(f"{directory}: ca.pem, server.pem" + "".join(f", {n}.pem" for n in args.names) + " (each with its .key)")
    return 0


def _offer_content(args: argparse.Namespace) -> int:
    from cloud_sim.cloud import content_offer

    Path(args.packages).mkdir(parents=True, exist_ok=True)
    return _send(args, content_offer(read_input(args.bundle, "bundle"), Path(args.packages), args.base_url, args.vin,
                                     args.request))


def _request_content(args: argparse.Namespace) -> int:
    return _send(args, json.dumps({"command": "content_request", "bundle_id": args.bundle_id, "vin": args.vin}).encode())


def _command(args: argparse.Namespace) -> int:
    """``confirm_install`` and the other commands about one campaign."""
    return _send(args, json.dumps({"command": args.command, "campaign_id": args.campaign_id, "vin": args.vin}).encode())


def _send(args: argparse.Namespace, body: bytes) -> int:
    from cloud_sim.cloud import publish

    publish(args.broker, args.vin, "command", body, args.mqtt_version)
    return 0
