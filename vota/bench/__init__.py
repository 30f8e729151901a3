"""``vota bench``: a whole simulated vehicle and a stand-in cloud on one machine.

Processes: an MQTT broker (``--broker``, else Mosquitto running the shipped configuration with
per-vehicle ACLs where it is installed, else the embedded amqtt), one ECU simulator
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
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.adapters.config_files import load_vehicle_config, load_yaml
from agent.adapters.storage import atomic_write_bytes, atomic_write_json, atomic_write_text
from agent.core.config import parse_vehicle_config
from agent.core.faults import parse_faults
from agent.errors import UsageError, VotaError

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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Processes:
    """Starts vota processes, waits for their "ready" line, and always stops them."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.ready: set[str] = set()  # known to be ready (a process that prints no "ready" line is marked by its starter)

    def start(self, name: str, *args: str, argv: list[str] | None = None) -> None:
        """``vota ARGS`` (or another program's ``argv``), its output in ``<log_dir>/<name>.log``."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{name}.log", "wb") as log:
            self.procs[name] = subprocess.Popen(argv or [sys.executable, "-m", "vota.cli", *args], stdout=log,
                                                stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        pending = set(self.procs) - self.ready
        while pending:
            for name in list(pending):
                if self.procs[name].poll() is not None:
                    text = (self.log_dir / f"{name}.log").read_text(errors="replace").strip().splitlines()
                    raise VotaError(f"{name} exited at start-up: {text[-1] if text else 'no output'}")
                if " ready" in (self.log_dir / f"{name}.log").read_text(errors="replace"):
                    pending.discard(name)
                    self.ready.add(name)
            if time.monotonic() > deadline:
                raise VotaError(f"not ready after {timeout:.0f} s: {', '.join(sorted(pending))} (see {self.log_dir})")
            time.sleep(0.05)

    def stop(self, grace_s: float = 8.0) -> None:
        """SIGTERM to every process at once, SIGKILL to those still there after ``grace_s`` in
        all (each daemon checkpoints its journal first: a campaign cut off resumes)."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + grace_s
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


SHIPPED_MOSQUITTO = Path(__file__).resolve().parents[2] / "configs" / "mosquitto"


def _mosquitto(out: Path, procs: Processes, vin: str) -> tuple[str, str, tuple[str, str]] | None:
    """Mosquitto with the shipped vota.conf and vota.acl on a free loopback port, a password for
    the cloud and one for this vehicle (made with mosquitto_passwd, as an operator would): the
    broker URL, the cloud's (with its login) and the vehicle's login. None when Mosquitto is not
    installed."""
    binary = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    passwd_tool = shutil.which("mosquitto_passwd")
    if binary is None or passwd_tool is None or not (SHIPPED_MOSQUITTO / "vota.conf").exists():
        return None
    import os
    import secrets

    directory = out / "broker"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    logins = {"vota-cloud": secrets.token_urlsafe(16), vin: secrets.token_urlsafe(16)}
    passwd = directory / "vota.passwd"
    passwd.write_text("")
    for user, password in logins.items():
        subprocess.run([passwd_tool, "-b", str(passwd), user, password], check=True, capture_output=True, timeout=30)
    port = _free_port()
    conf = (SHIPPED_MOSQUITTO / "vota.conf").read_text().replace("listener 1883", f"listener {port} 127.0.0.1")
    conf = conf.replace("/etc/mosquitto/vota.passwd", str(passwd)).replace("/etc/mosquitto/vota.acl",
                                                                            str(SHIPPED_MOSQUITTO / "vota.acl"))
    conf += f"persistence_location {directory}/\n"
    if os.geteuid() == 0:
        conf += "user root\n"  # else it drops to user mosquitto, who cannot read the bench's files
    atomic_write_text(directory / "mosquitto.conf", conf)
    procs.start("broker", argv=[binary, "-c", str(directory / "mosquitto.conf")])
    deadline = time.monotonic() + 15
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if procs.procs["broker"].poll() is not None or time.monotonic() > deadline:
                raise VotaError(f"mosquitto did not start (see {procs.log_dir / 'broker.log'})") from None
            time.sleep(0.05)
    procs.ready.add("broker")
    return f"mqtt://127.0.0.1:{port}", f"mqtt://vota-cloud:{logins['vota-cloud']}@127.0.0.1:{port}", (vin, logins[vin])


def _runtime_config(source: str, out: Path, broker: str, mqtt_version: str, vin: str,
                    login: tuple[str, str] | None = None) -> Path:
    """The user's configuration with every path moved under ``out`` and the bench's broker/key."""
    data = load_yaml(source)
    parse_vehicle_config(data, source)  # errors name the user's file, not the copy
    if not data.get("deploy") or not data.get("tbox"):
        raise UsageError(f"{source}: the bench needs the deploy and tbox sections (see configs/bench.yaml)")
    data.setdefault("gateway", {})["results_dir"] = str(out / "gateway" / "results")
    data["deploy"]["package_dir"] = str(out / "gateway" / "packages")
    for ecu in data.get("ecus", {}).values():
        ecu.setdefault("sim", {})["state_dir"] = str(out / "ecu_state")
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
    cloud.update(broker=broker, outbox=str(out / "tbox" / "outbox.db"), mqtt_version=mqtt_version,
                 reconnect_min_s=1, reconnect_max_s=5, report_key=str(out / "keys" / "report.key"))
    for stale in ("username", "password"):
        cloud.pop(stale, None)
    if login is not None:
        cloud.update(username=login[0], password=login[1])
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
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("tbox", "gateway", "cloud", "logs", "keys"):  # the ECUs keep their flash banks
        shutil.rmtree(out / stale, ignore_errors=True)
    procs = Processes(out / "logs")
    cloud: CloudSim | None = None
    started = time.time()
    try:
        broker = _broker(args, out, procs, vin)
        key, cloud, runtime = _cloud(args, out, vin, broker)
        clock: list[str] = []
        if content_spec is not None:
            begin, rate = content_clock(content_spec[0], args.content_seconds)
            clock = ["--clock", begin.isoformat(timespec="seconds"), "--clock-rate", f"{rate:g}"]
        _start_vehicle(procs, runtime, names, faults, clock)
        print(f"bench: broker {broker.tbox} ({broker.kind}), {len(names)} ECU simulators, gateway, TBOX {vin}; "
              f"cloud packages at {cloud.base_url}", flush=True)
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
        report = _campaign(args, out, vin, names, key, cloud, broker, started)
    except KeyboardInterrupt:
        print("bench: interrupted; stopping every process", file=sys.stderr)
        return 130
    finally:
        procs.stop()
        if cloud is not None:
            cloud.stop()
    atomic_write_json(out / "report.json", report)
    return report


class _Broker(NamedTuple):
    tbox: str  # the vehicle's URL
    cloud: str  # the cloud's URL (with its login where there are ACLs)
    login: tuple[str, str] | None  # the vehicle's login
    mqtt_version: str
    kind: str


def _broker(args: argparse.Namespace, out: Path, procs: Processes, vin: str) -> _Broker:
    """The broker asked for, Mosquitto with the shipped ACLs where it is installed, else the embedded one."""
    mosquitto = None if args.broker else _mosquitto(out, procs, vin)
    if args.broker and args.broker != "embedded":
        return _Broker(args.broker, args.broker, None, args.mqtt_version, "given")
    if mosquitto is not None:
        tbox_broker, cloud_broker, login = mosquitto
        return _Broker(tbox_broker, cloud_broker, login, "5", "mosquitto, configs/mosquitto: per-vehicle ACLs")
    port = _free_port()
    procs.start("broker", "cloud", "broker", "--port", str(port))
    procs.wait_ready()
    return _Broker(f"mqtt://127.0.0.1:{port}", f"mqtt://127.0.0.1:{port}", None, "3.1.1", "embedded amqtt, no ACLs")


def _cloud(args: argparse.Namespace, out: Path, vin: str, broker: _Broker) -> tuple[Ed25519PrivateKey, Any, Path]:
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
    runtime = _runtime_config(args.config, out, broker.tbox, broker.mqtt_version, vin, broker.login)
    cloud = CloudSim(broker.cloud, out / "cloud" / "store", out / "cloud" / "packages", mqtt_version=broker.mqtt_version,
                     platform_key=platform, require_signed=True)
    cloud.vehicle_keys[vin] = vehicle_key.public_key()
    cloud.register_vehicle(vin, report_key.public_key())
    cloud.start()
    if not cloud.collector.connected.wait(15):
        raise VotaError(f"the cloud cannot reach the broker {broker.tbox}")
    return key, cloud, runtime


def _start_vehicle(procs: Processes, runtime: Path, names: list[str], faults: list[Any], clock: list[str]) -> None:
    """One ECU simulator per ECU, the gateway and the TBOX, each with the faults injected where they belong."""

    def routed(stage: str, side: str, ecu: str | None = None) -> list[str]:
        return [a for f in faults if f.stage == stage and f.side == side and (ecu is None or f.target in ("*", ecu))
                for a in ("--fault", f.text)]

    for name in names:  # each simulator gets the faults for its own ECU
        procs.start(f"ecu-{name}", "ecu-sim", "-c", str(runtime), "--ecu", name, *routed("flash", "server", name))
    procs.start("gateway", "gateway", "-c", str(runtime), *routed("deploy", "server"), *routed("flash", "client"))
    procs.start("tbox", "tbox", "-c", str(runtime), "-v", *routed("deploy", "client"), *clock)
    procs.wait_ready()


def _campaign(args: argparse.Namespace, out: Path, vin: str, names: list[str], key: Ed25519PrivateKey, cloud: Any,
              broker: _Broker, started: float) -> dict[str, Any]:
    """A campaign of one generated package per ECU, signed, published and followed to its end."""
    from cloud_sim.cloud import make_campaign, publish

    campaign_id = f"bench-{time.strftime('%Y%m%d-%H%M%S')}"
    packages = []
    for name in names:
        path = out / "cloud" / "packages" / f"{name}-{args.image_version}.bin"
        path.write_bytes(make_image(name, args.image_version, args.image_size, getattr(args, "image_kind", "random")))
        packages.append((name, path, args.image_version))
    envelope = make_campaign(vin=vin, packages=packages, base_url=cloud.base_url, key=key, campaign_id=campaign_id)
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
                counted = "ECUs" if body.get("stage") == "install" else "bytes"
                share = f" ({100 * done // total} %)" if total else ""
                what = " ".join(str(x) for x in (body.get("stage"), body.get("package")) if x)
                print(f"  {what}: {done} of {total} {counted}{share}", flush=True)
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
                unit = body.get("package") or body.get("ecu")
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
        "duration_s": round(time.time() - started, 1),
        "image_size": args.image_size,
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
