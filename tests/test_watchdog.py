"""The TBOX feeds the systemd watchdog only while every worker makes progress, not merely while
its threads exist."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.core.config import load_vehicle_config
from tbox.daemon import TboxDaemon
from tests.conftest import free_port, multicast_bus


def _wait(condition, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_a_hung_content_worker_stops_the_watchdog_pings(tmp_path: Path, write_config) -> None:  # type: ignore[no-untyped-def]
    pub = tmp_path / "signing.pub"
    pub.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    config = write_config({
        "segments": {"bb": {"bus": multicast_bus()}}, "deploy": {"segment": "bb"},
        "tbox": {"vin": "LVOTAWATCHDOG0001", "trusted_keys": [str(pub)], "state_dir": str(tmp_path / "tbox"),
                 "worker_stale_s": 1,  # no broker listens on this port: the link keeps trying in the background
                 "cloud": {"broker": f"mqtt://127.0.0.1:{free_port()}", "outbox": str(tmp_path / "outbox.db")}},
    })
    daemon = TboxDaemon(load_vehicle_config(config))
    hung, release = threading.Event(), threading.Event()

    def hanging_step() -> None:  # a content step stuck in a call that does not return
        hung.set()
        release.wait(30)

    daemon.content.step = hanging_step  # type: ignore[method-assign]
    daemon.start()
    try:
        assert hung.wait(10) and daemon.alive()
        assert _wait(lambda: not daemon.alive()), "the watchdog is still fed while the content worker hangs"
        assert daemon.heartbeats.stale() == ["content"]
        assert daemon._content_worker.is_alive() and daemon._worker.is_alive()  # the threads exist all along
        release.set()
        assert _wait(daemon.alive), "the watchdog is not fed again once the worker goes on"
    finally:
        release.set()
        daemon.stop()
