"""``vota bench``: a whole simulated vehicle and a stand-in cloud on one machine.

Processes: an MQTT broker (``--broker``, else Mosquitto running the shipped configuration, TLS
and per-vehicle identities, where it is installed, else the embedded amqtt; vota/bench/broker.py),
one ECU simulator
per ECU, the gateway, the TBOX; this process plays the cloud (package server, campaign
signing and publishing, collector). It publishes one campaign for the chosen ECUs, shows
its progress, and writes ``report.json`` with the outcome, the inventory, deploy and flash
results and the paths of all traces. Every process it started is gone when it returns.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.adapters.config_files import load_vehicle_config, load_yaml
from agent.adapters.storage import atomic_write_bytes, atomic_write_json, atomic_write_text, writable_dir
from agent.core.config import parse_vehicle_config
from agent.core.faults import parse_faults
from agent.errors import UsageError, VotaError
from vota.bench.broker import BenchBroker, start_broker
from vota.bench.processes import Processes

__all__ = ["run_bench", "make_image", "Processes"]


def make_image(ecu: str, version: str, size: int, kind: str = "random") -> bytes:
    """A deterministic image per ECU and version: pseudo-random (incompressible), or
    firmware-like: a real compiled binary (PyYAML's C extension as pip installed it), taken
    from an offset that depends on ECU and version, repeated to ``size``."""
    seed = int.from_bytes(hashlib.sha256(f"{ecu}/{version}".encode()).digest()[:8], "big")
    if kind == "firmware":
        import yaml._yaml as compiled  # noqa: PLC0415 - its bytes are the point

        data = Path(compiled.__file__).read_bytes()
        start = seed % len(data)
        data = data[start:] + data[:start]
        return (data * (size // len(data) + 1))[:size]
    return random.Random(seed).randbytes(size)


def _free_port() -> int:
    """A loopback port free for TCP and UDP both (a DoIP entity listens on both)."""
    for _ in range(50):
        with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise VotaError("no free loopback port for the DoIP entity")


def _over_doip(data: dict[str, Any]) -> None:
    """The DoIP variant: the gateway a DoIP entity on loopback (a free port), the deploy link over
    it; the ECUs stay on their CAN segments."""
    data["doip"] = {**(data.get("doip") or {}), "address": "127.0.0.1", "port": _free_port(), "announce_to": False}
    deploy = data["deploy"]
    for key in ("segment", "host"):
        deploy.pop(key, None)
    deploy["transport"] = "doip"


def _runtime_config(source: str, out: Path, broker: BenchBroker, vin: str, doip: bool = False) -> Path:
    """The user's configuration with every path moved under ``out`` and the bench's broker/key
    (``doip``: the deploy link over DoIP on loopback)."""
    data = load_yaml(source)
    parse_vehicle_config(data, source)  # errors name the user's file, not the copy
    if not data.get("deploy") or not data.get("tbox"):
        raise UsageError(f"{source}: the bench needs the deploy and tbox sections (see configs/bench.yaml)")
    if doip:
        _over_doip(data)
    data.setdefault("gateway", {})["results_dir"] = str(out / "gateway" / "results")
    data["deploy"]["package_dir"] = str(out / "gateway" / "packages")
    for name, ecu in data.get("ecus", {}).items():
        ecu.setdefault("sim", {})["state_dir"] = str(out / "ecu_state")
        if ecu["sim"].get("image_key"):  # a bootloader that verifies images: the bench plays the OEM
            ecu["sim"]["image_key"] = str(out / "keys" / f"image-{name}.pub")
    tbox = data["tbox"]
    tbox["vin"] = vin
    tbox["state_dir"] = str(out / "tbox")
    tbox["trusted_keys"] = [str(out / "keys" / "signing.pub")]
    content = tbox.setdefault("content", {}) or {}
    tbox["content"] = content
    content.update(vehicle_key=str(out / "keys" / "vehicle.key"), trusted_keys=[str(out / "keys" / "platform.pub")])
    if content.get("app_dir"):
        content["app_dir"] = str(out / "tbox" / "apps")
    cloud = tbox.setdefault("cloud", {})
    cloud.update(broker=broker.tbox, outbox=str(out / "tbox" / "outbox.db"), mqtt_version=broker.mqtt_version,
                 reconnect_min_s=1, reconnect_max_s=5, report_key=str(out / "keys" / "report.key"))
    for stale in ("username", "password", "tls"):
        cloud.pop(stale, None)
    tbox.pop("package_ca", None)
    if broker.login is not None:
        cloud.update(username=broker.login[0], password=broker.login[1])
    if broker.certs is not None:  # the broker's and the package server's certificate: the bench's CA
        cloud["tls"] = {"ca": str(broker.certs / "ca.pem")}
        tbox["package_ca"] = str(broker.certs / "ca.pem")
    path = out / "vehicle.yaml"
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))
    return path


def run_bench(args: argparse.Namespace) -> dict[str, Any] | int:
    """The bench report (also written to ``report.json``), or 130 when interrupted."""
    from cloud_sim.cloud import CloudSim
    from vota.bench.content import content_clock, load_content_spec, run_content

    config = load_vehicle_config(args.config)
    content_spec = load_content_spec(args.content) if args.content else None
    names = args.ecu or list(config.ecus)
    for n in names:
        config.ecu(n)
    faults = parse_faults(args.fault, "bench", names)
    vin = config.tbox_config().vin if config.tbox else "LVOTABENCH0000001"
    out = writable_dir(Path(args.out).resolve(), "--out")
    learned = _learned_rates(out)  # what earlier runs' installs took: the next estimate learns from them
    for stale in ("tbox", "gateway", "cloud", "logs", "keys", "capture"):  # the ECUs keep their flash banks
        shutil.rmtree(out / stale, ignore_errors=True)
    if learned is not None:
        atomic_write_bytes(out / "tbox" / "rates.json", learned)
    procs = Processes(out / "logs")
    cloud: CloudSim | None = None
    started = time.time()
    try:
        broker = start_broker(args, out, procs, vin)
        key, cloud, runtime = _cloud(args, out, vin, broker)
        image_keys = _image_keys(out, config, names)
        clock: list[str] = []
        if content_spec is not None:
            begin, rate = content_clock(content_spec[0], args.content_seconds)
            clock = ["--clock", begin.isoformat(timespec="seconds"), "--clock-rate", f"{rate:g}"]
        capture = ["--capture", str(out / "capture"), "--capture-format", args.capture_format] if args.capture else []
        _start_vehicle(procs, runtime, names, faults, clock, capture)
        print(f"bench: broker {broker.tbox} ({broker.kind}), {len(names)} ECU simulators, gateway, TBOX {vin}; "
              f"deploy link {_deploy_link(runtime)}; cloud packages at {cloud.base_url}", flush=True)
        if content_spec is not None:
            print(f"bench: simulated clock from {clock[1]}, {clock[3]} s per second", flush=True)
            result = run_content(cloud, vin, *content_spec, begin, args.timeout)
            report = {"schema": "vota-bench-report/2", "vin": vin, "content": result, "outcome": result["outcome"],
                      "duration_s": round(time.time() - started, 1), "clock": {"start": clock[1], "rate": float(clock[3])},
                      "store": str(out / "cloud" / "store" / vin)}
            atomic_write_json(out / "report.json", report)
            print(f"content {content_spec[0]['bundle_id']}: {result['outcome']} in {report['duration_s']:.1f} s; "
                  f"report: {out / 'report.json'}", flush=True)
            return report
        report = _campaign(args, out, vin, names, (key, image_keys), cloud, broker, started)
    except KeyboardInterrupt:
        print("bench: interrupted; stopping every process", file=sys.stderr)
        return 130
    finally:
        procs.stop()
        if cloud is not None:
            cloud.stop()
    atomic_write_json(out / "report.json", report)
    return report


def _cloud(args: argparse.Namespace, out: Path, vin: str, broker: BenchBroker) -> tuple[Ed25519PrivateKey, Any, Path]:
    """The keys (campaign signing, content platform, vehicle, report), the stand-in cloud started,
    the vehicle's configuration: (the campaign key, the cloud, the configuration's path)."""
    from cloud_sim.cloud import CloudSim
    from vota.bench.content import content_keys

    key = Ed25519PrivateKey.generate()
    (out / "keys").mkdir(exist_ok=True)
    (out / "keys" / "signing.pub").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    platform, vehicle_key = content_keys(out)
    report_key = Ed25519PrivateKey.generate()  # the vehicle signs every report with it; the cloud checks
    atomic_write_bytes(out / "keys" / "report.key", report_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    runtime = _runtime_config(args.config, out, broker, vin, getattr(args, "doip", False))
    tls = (str(broker.certs / "server.pem"), str(broker.certs / "server.key")) if broker.certs is not None else None
    cloud = CloudSim(broker.cloud, out / "cloud" / "store", out / "cloud" / "packages", mqtt_version=broker.mqtt_version,
                     platform_key=platform, require_signed=True, collector_broker=broker.collector, tls=tls)
    cloud.vehicle_keys[vin] = vehicle_key.public_key()
    cloud.register_vehicle(vin, report_key.public_key())
    cloud.start()
    if not cloud.collector.connected.wait(15):
        raise VotaError(f"the cloud cannot reach the broker {broker.tbox}")
    return key, cloud, runtime


def _image_keys(out: Path, config: Any, names: list[str]) -> dict[str, tuple[Ed25519PrivateKey, int]]:
    """One OEM key per ECU whose bootloader verifies images (``sim.image_key``): its public half is
    the simulator's trust anchor, the private one signs the bench's images (security version 1)."""
    keys = {}
    for name in names:
        if config.ecu(name).sim.image_key:
            key = Ed25519PrivateKey.generate()
            atomic_write_bytes(out / "keys" / f"image-{name}.pub", key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
            keys[name] = (key, 1)
    return keys


def _learned_rates(out: Path) -> bytes | None:
    """The TBOX's ``rates.json`` of the run before in ``out`` (kept across runs, like the ECUs' banks)."""
    try:
        text = (out / "tbox" / "rates.json").read_bytes()
        json.loads(text)
    except (OSError, ValueError):
        return None
    return text


def _start_vehicle(procs: Processes, runtime: Path, names: list[str], faults: list[Any], clock: list[str],
                   capture: list[str]) -> None:
    """One ECU simulator per ECU, the gateway and the TBOX, each with the faults injected where they belong."""

    def routed(stage: str, side: str, ecu: str | None = None) -> list[str]:
        return [a for f in faults if f.stage == stage and f.side == side and (ecu is None or f.target in ("*", ecu))
                for a in ("--fault", f.text)]

    for name in names:  # each simulator gets the faults for its own ECU
        procs.start(f"ecu-{name}", "ecu-sim", "-c", str(runtime), "--ecu", name, *routed("flash", "server", name))
    procs.start("gateway", "gateway", "-c", str(runtime), *routed("deploy", "server"), *routed("flash", "client"),
                *routed("activate", "client"), *capture)
    procs.start("tbox", "tbox", "-c", str(runtime), "-v", *routed("deploy", "client"), *routed("link", "client"), *clock)
    procs.wait_ready()


def _campaign(args: argparse.Namespace, out: Path, vin: str, names: list[str],
              keys: tuple[Ed25519PrivateKey, dict[str, tuple[Ed25519PrivateKey, int]]], cloud: Any,
              broker: BenchBroker, started: float) -> dict[str, Any]:
    """A campaign of one generated package per ECU, signed (and each image signed for an ECU that
    verifies what it boots), published and followed to its end."""
    from cloud_sim.cloud import make_campaign, publish

    key, image_keys = keys

    campaign_id = f"bench-{time.strftime('%Y%m%d-%H%M%S')}"
    packages = []
    for name in names:
        path = out / "cloud" / "packages" / f"{name}-{args.image_version}.bin"
        path.write_bytes(make_image(name, args.image_version, args.image_size, getattr(args, "image_kind", "random")))
        packages.append((name, path, args.image_version))
    envelope = make_campaign(vin=vin, packages=packages, base_url=cloud.base_url, key=key, campaign_id=campaign_id,
                             image_keys=image_keys)
    (out / "campaign.signed.json").write_bytes(envelope)
    publish(broker.cloud, vin, "campaign", envelope, broker.mqtt_version)
    print(f"cloud: campaign {campaign_id} published ({len(packages)} packages of {args.image_size // 1024} KiB)", flush=True)
    finished = _follow(cloud, vin, campaign_id, args.timeout)
    return _report(cloud, out, vin, campaign_id, finished, started, args)


def _follow(cloud: Any, vin: str, campaign_id: str, timeout: float) -> dict[str, Any] | None:
    seen = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        messages = list(cloud.collector.messages)
        for m in messages[seen:]:
            body = m.get("body") or {}
            if body.get("campaign_id") not in (campaign_id, None):
                continue
            if body.get("event") == "state":
                print(f"  tbox: {body['state']}", flush=True)
            elif body.get("event") == "progress":
                done, total = int(body.get("done") or 0), int(body.get("total") or 0)
                counted = "ECUs" if body.get("stage") == "install" and not body.get("ecu") else "bytes"
                share = f" ({100 * done // total} %)" if total else ""
                what = " ".join(str(x) for x in (body.get("stage"), body.get("package"), body.get("ecu")) if x)
                step = f", {body['step']}" if body.get("ecu") and body.get("step") else ""
                print(f"  {what}: {done} of {total} {counted}{share}{step}", flush=True)
            elif body.get("event") == "estimate":
                print(f"  tbox: estimated install time {body.get('install_s')} s", flush=True)
            elif body.get("event") == "preconditions":
                print(f"  tbox: preconditions {'met' if body.get('met') else 'unmet: ' + '; '.join((body.get('unmet') or {}).values())}",
                      flush=True)
            elif body.get("event") == "rejected":
                print(f"  tbox: rejected ({body.get('reason')}): {body.get('detail')}", flush=True)
                return {"outcome": "rejected", "failure": body}
            elif m.get("type") == "results":
                r = body.get("result", {})
                unit = body.get("package") or body.get("ecu") or body.get("name")
                why = f" at {r.get('failed_step')}: {r.get('reason')}" if r.get("result") != "success" else ""
                size = r.get("image_size", r.get("size"))
                moved = r.get("bytes_transferred")
                if isinstance(size, int) and isinstance(moved, int) and size and body.get("stage") in ("flash", "deploy"):
                    # per ECU / package: what went over the bus against the image (compressed transfer)
                    why += f" ({moved // 1024} KiB on the bus for {size // 1024} KiB, {r.get('compression') or 'uncompressed'})"
                print(f"  {body.get('stage')} {unit}: {r.get('result')}{why}", flush=True)
        seen = len(messages)
        done = cloud.finished(vin, campaign_id)
        if done is not None:
            return done
        time.sleep(0.2)
    return None


def _deploy_link(runtime: Path) -> str:
    link = load_vehicle_config(runtime).deploy_link()
    if link.transport == "doip":
        return f"DoIP {link.doip_host}:{link.doip_port} (0x{link.doip_source:04X} -> 0x{link.doip_target:04X})"
    return f"CAN {link.segment}"


def _report(cloud: Any, out: Path, vin: str, campaign_id: str, finished: dict[str, Any] | None, started: float,
            args: argparse.Namespace) -> dict[str, Any]:
    mine = [m for m in cloud.collector.messages if (m.get("body") or {}).get("campaign_id") == campaign_id]
    results = [m["body"] for m in mine if m["type"] == "results"]
    inventory: list[Any] = next((m["body"]["ecus"] for m in mine if m["type"] == "inventory"), [])
    traces_dir = out / "cloud" / "store" / vin / "traces"
    traces = sorted(str(p) for p in traces_dir.glob(f"{campaign_id}.*.jsonl")) if traces_dir.exists() else []
    outcome = (finished or {}).get("outcome") or ("timeout" if finished is None else "failed")
    return {
        "diagnosis": _diagnose(out, campaign_id, (finished or {}).get("failure")),
        "schema": "vota-bench-report/2",
        "campaign_id": campaign_id,
        "vin": vin,
        "outcome": outcome,
        "failure": (finished or {}).get("failure"),
        "final_versions": (finished or {}).get("versions"),  # read back from the ECUs at the end
        "estimated_install_s": (finished or {}).get("estimated_install_s"),  # told before the install ...
        "install_s": (finished or {}).get("install_s"),  # ... against what it took
        "estimate": next((m["body"] for m in mine if m["type"] == "events" and m["body"].get("event") == "estimate"),
                         None),
        "duration_s": round(time.time() - started, 1),
        "image_size": args.image_size,
        "deploy_link": _deploy_link(out / "vehicle.yaml"),
        "faults": args.fault,
        "inventory_before": inventory,
        "deploy": [{"package": r["package"], **r["result"]} for r in results if r.get("stage") == "deploy"],
        "flash": [{"ecu": r["ecu"], **r["result"]} for r in results if r.get("stage") == "flash"],
        "traces": traces,
        "store": str(out / "cloud" / "store" / vin),
    }


def _diagnose(out: Path, campaign_id: str, failure: dict[str, Any] | None) -> dict[str, Any] | None:
    """The verdict for the campaign, from the TBOX's own copy of results and traces."""
    from agent.adapters.diagnosis_files import load_inputs, load_rules
    from agent.core.diagnosis import diagnose

    for state in (out / "tbox" / "campaigns").glob("*/state.json"):
        try:
            if json.loads(state.read_text()).get("campaign_id") != campaign_id:
                continue
        except (ValueError, OSError):
            continue
        try:
            inputs, _, problems = load_inputs(state.parent)
        except VotaError:  # nothing deployed or flashed
            inputs, problems = [], []
        verdict = diagnose(inputs, load_rules(), "first", campaign_id, failure)
        verdict.unanalysed.extend(problems)
        return verdict.to_json()
    return None
