"""The daemons as systemd runs them: sd_notify READY / WATCHDOG / STOPPING, SIGTERM, and
start-up errors that name the file and key."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from tests.conftest import ROOT, ecu_entry, multicast_bus, vota

pytestmark = pytest.mark.slow  # separate processes


def test_gateway_speaks_sd_notify_and_stops_on_sigterm(tmp_path, write_config):
    config = write_config({"segments": {"bb": {"bus": multicast_bus()}},
                           "deploy": {"segment": "bb", "package_dir": str(tmp_path / "pk")}})
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(15)
    env = {**os.environ, "NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "400000"}
    proc = subprocess.Popen([sys.executable, "-m", "vota", "gateway", "-c", str(config)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert sock.recv(1024) == b"READY=1"
        said = [sock.recv(1024) for _ in range(4)]
        assert said.count(b"WATCHDOG=1") == 3, said
        assert b"STATUS=deploy server on bb; no install running" in said  # once: STATUS= only when it changes
        proc.send_signal(signal.SIGTERM)
        while (msg := sock.recv(1024)) == b"WATCHDOG=1":
            pass
        assert msg == b"STOPPING=1"
        assert proc.wait(timeout=15) == 0
        assert b"gateway ready" in proc.stdout.read()  # type: ignore[union-attr]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close()


def test_tbox_start_up_errors_name_the_problem(tmp_path, write_config):
    base = {"segments": {"bb": {"bus": multicast_bus()}}, "deploy": {"segment": "bb"},
            "ecus": {"vcu": ecu_entry("vcu", 0x7E0, 0x7E8, "bb")}}
    run = vota("tbox", "-c", str(write_config(base)))
    assert run.returncode == 2 and "tbox: missing" in run.stderr and "Traceback" not in run.stderr
    run = vota("tbox", "-c", str(write_config({**base, "tbox": {"vin": "X", "trusted_keys": []}})))
    assert run.returncode == 2 and "tbox.trusted_keys" in run.stderr
    run = vota("tbox", "-c", str(write_config({**base, "tbox": {"vin": "X", "trusted_keys": ["k.pub"],
                                                                "cloud": {"broker": "http://x"}}})))
    assert run.returncode == 2 and "tbox.cloud.broker" in run.stderr
    run = vota("tbox", "-c", str(write_config({**base, "tbox": {"vin": "X", "trusted_keys": [str(tmp_path / "nope.pub")],
                                                                "state_dir": str(tmp_path / "t")}})))
    assert run.returncode == 2 and "nope.pub: cannot read trusted campaign key" in run.stderr
    assert "Traceback" not in run.stderr


def test_one_daemon_per_state_directory(vehicle):
    """A second TBOX, gateway or ECU simulator on the same state directory stops at once with one
    line naming the directory and the running one's pid; the running ones go on."""
    for args, what, proc in ((("tbox",), "vota tbox", vehicle.tbox), (("gateway",), "vota gateway", vehicle.gateway)):
        run = vota(*args, "-c", str(vehicle.config))
        assert run.returncode == 1, run.stderr
        assert f"another {what} runs on this directory (pid {proc.p.pid})" in run.stderr
        assert "Traceback" not in run.stderr and proc.p.poll() is None
    run = vota("ecu-sim", "-c", str(vehicle.config), "--state-dir", str(vehicle.tmp / "ecu"), "--ecu", "bcm")
    assert run.returncode == 1 and "another ECU simulator for bcm runs on this directory" in run.stderr, run.stderr
    vehicle.send(vehicle.campaign("c-after", "2.0.0"))  # the vehicle still works
    assert vehicle.finished("c-after")["outcome"] == "success"
