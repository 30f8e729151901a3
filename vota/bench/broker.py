"""The bench's broker: the one given (``--broker``), else Mosquitto running the shipped
configuration (configs/mosquitto: TLS, one identity per vehicle and per cloud service, client
id bound to the identity, per-vehicle ACLs) where it is installed, else the demo's embedded
amqtt (plain MQTT 3.1.1 on loopback, no identities).

For Mosquitto the bench makes what an operator would: a CA and the broker's certificate
(``cloud_sim/pki.py``, the same as ``vota cloud certs``), a password per identity with
``mosquitto_passwd``; the vehicle gets the CA (``tbox.cloud.tls.ca``, also ``tbox.package_ca``:
the package server speaks HTTPS with the same certificate) and its login.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import NamedTuple
from urllib.parse import quote

from agent.adapters.examples import examples_dir
from agent.adapters.storage import atomic_write_text
from agent.errors import VotaError
from cloud_sim.pki import bench_pki
from vota.bench.processes import Processes, free_port

__all__ = ["BenchBroker", "start_broker", "SHIPPED_MOSQUITTO"]

SHIPPED_MOSQUITTO = examples_dir() / "mosquitto"  # this checkout's, or the one installed with vota
CLOUD_IDENTITIES = ("vota-cloud", "vota-collector")  # the operator's tools, the collector


class BenchBroker(NamedTuple):
    tbox: str  # the vehicle's URL
    cloud: str  # the operator's URL (with its login and CA where there are identities)
    collector: str  # the collector's URL (its own identity)
    login: tuple[str, str] | None  # the vehicle's login
    mqtt_version: str
    kind: str
    certs: Path | None = None  # ca.pem, server.pem/.key (broker and package server), <VIN>.pem/.key


def start_broker(args: argparse.Namespace, out: Path, procs: Processes, vin: str) -> BenchBroker:
    """The broker asked for, Mosquitto with the shipped configuration where it is installed, else the embedded one."""
    if args.broker and args.broker != "embedded":
        return BenchBroker(args.broker, args.broker, args.broker, None, args.mqtt_version, "given")
    mosquitto = None if args.broker else _mosquitto(out, procs, vin)
    if mosquitto is not None:
        return mosquitto
    port = free_port()
    procs.start("broker", "cloud", "broker", "--port", str(port))
    procs.wait_ready()
    url = f"mqtt://127.0.0.1:{port}"
    return BenchBroker(url, url, url, None, "3.1.1", "embedded amqtt, plain, no identities")


def _mosquitto(out: Path, procs: Processes, vin: str) -> BenchBroker | None:
    """Mosquitto with the shipped vota.conf and vota.acl on a free loopback port, its TLS files
    and a password per identity. None when Mosquitto is not installed."""
    binary = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    passwd_tool = shutil.which("mosquitto_passwd")
    if binary is None or passwd_tool is None or not (SHIPPED_MOSQUITTO / "vota.conf").exists():
        return None
    directory = out / "broker"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    certs = bench_pki(directory / "certs", [vin])
    logins = {user: secrets.token_urlsafe(16) for user in (*CLOUD_IDENTITIES, vin)}
    passwd = directory / "vota.passwd"
    passwd.write_text("")
    for user, password in logins.items():
        subprocess.run([passwd_tool, "-b", str(passwd), user, password], check=True, capture_output=True, timeout=30)
    port = free_port()
    atomic_write_text(directory / "mosquitto.conf", shipped_conf(port, directory, passwd, certs))
    procs.start("broker", argv=[binary, "-c", str(directory / "mosquitto.conf")])
    _wait_listening(procs, port)
    procs.ready.add("broker")
    ca = quote(str(certs / "ca.pem"))

    def url(user: str) -> str:
        return f"mqtts://{user}:{logins[user]}@127.0.0.1:{port}?ca={ca}"

    return BenchBroker(f"mqtts://127.0.0.1:{port}", url("vota-cloud"), url("vota-collector"), (vin, logins[vin]), "5",
                       "mosquitto, configs/mosquitto: TLS, an identity per vehicle and service, per-vehicle ACLs", certs)


def shipped_conf(port: int, directory: Path, passwd: Path, certs: Path) -> str:
    """The shipped vota.conf for a loopback port, with this bench's files in place of /etc's."""
    conf = (SHIPPED_MOSQUITTO / "vota.conf").read_text().replace("listener 8883", f"listener {port} 127.0.0.1")
    for shipped, here in (("/etc/mosquitto/vota.passwd", passwd), ("/etc/mosquitto/vota.acl", SHIPPED_MOSQUITTO / "vota.acl"),
                          ("/etc/mosquitto/certs/vota-ca.pem", certs / "ca.pem"),
                          ("/etc/mosquitto/certs/broker.pem", certs / "server.pem"),
                          ("/etc/mosquitto/certs/broker.key", certs / "server.key")):
        conf = conf.replace(shipped, str(here))
    conf += f"persistence_location {directory}/\n"
    if os.geteuid() == 0:
        conf += "user root\n"  # else it drops to user mosquitto, who cannot read the bench's files
    return conf


def _wait_listening(procs: Processes, port: int) -> None:
    deadline = time.monotonic() + 15
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if procs.procs["broker"].poll() is not None or time.monotonic() > deadline:
                raise VotaError(f"mosquitto did not start (see {procs.log_dir / 'broker.log'})") from None
            time.sleep(0.05)
