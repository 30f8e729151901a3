"""The TBOX feeds the systemd watchdog only while every worker makes progress, not merely while
its threads exist."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.adapters.config_files import load_vehicle_config
from tbox.daemon import TboxDaemon
from tests.conftest import free_port, multicast_bus


def _wait(condition, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def _tbox(tmp_path: Path, write_config, **tbox: object) -> TboxDaemon:  # type: ignore[no-untyped-def]
    """A TBOX daemon (not started) whose broker does not listen: the link keeps trying in the background."""
    pub = tmp_path / "signing.pub"
    pub.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    config = write_config({
        "segments": {"bb": {"bus": multicast_bus()}}, "deploy": {"segment": "bb"},
        "tbox": {"vin": "LVOTAWATCHDOG0001", "trusted_keys": [str(pub)], "state_dir": str(tmp_path / "tbox"),
                 "cloud": {"broker": f"mqtt://127.0.0.1:{free_port()}", "outbox": str(tmp_path / "outbox.db")}, **tbox},
    })
    return TboxDaemon(load_vehicle_config(config))


def test_a_hung_content_worker_stops_the_watchdog_pings(tmp_path: Path, write_config) -> None:  # type: ignore[no-untyped-def]
    daemon = _tbox(tmp_path, write_config, worker_stale_s=1)
    hung, release = threading.Event(), threading.Event()

    def hanging_step() -> None:  # a content step stuck in a call that does not return
        hung.set()
        release.wait(30)

    daemon.content.step = hanging_step  # type: ignore[method-assign]
    daemon.start()
    try:
        assert hung.wait(10) and daemon.alive()
        assert daemon.status().startswith("no campaign open; broker not connected, ")  # systemd's STATUS=
        assert _wait(lambda: not daemon.alive()), "the watchdog is still fed while the content worker hangs"
        assert daemon.heartbeats.stale() == ["content"]
        assert daemon._content_worker.is_alive() and daemon._worker.is_alive()  # the threads exist all along
        release.set()
        assert _wait(daemon.alive), "the watchdog is not fed again once the worker goes on"
    finally:
        release.set()
        daemon.stop()


def test_a_hung_deploy_server_stops_the_gateways_watchdog_pings(tmp_path: Path, write_config) -> None:  # type: ignore[no-untyped-def]
    """A request whose handler never returns keeps the serving thread alive but stuck: the
    gateway stops feeding the watchdog; once the handler returns, it feeds it again."""
    from agent.adapters.canbus import Segment
    from gateway.daemon import GatewayDaemon

    config = load_vehicle_config(write_config({
        "segments": {"bb": {"bus": multicast_bus()}},
        "deploy": {"segment": "bb", "package_dir": str(tmp_path / "pk")},
        "gateway": {"results_dir": str(tmp_path / "gw"), "worker_stale_s": 1},
    }))
    daemon = GatewayDaemon(config)
    daemon.start()
    hung, release = threading.Event(), threading.Event()
    tester = Segment(config.segments["bb"])
    try:
        assert daemon.server is not None and daemon.alive()
        assert daemon.status() == "deploy server on bb; no install running"
        served = dict(daemon.server.services)
        original = served[0x22]

        def hanging(state, request):  # type: ignore[no-untyped-def]  # a read stuck in storage that never answers
            hung.set()
            release.wait(30)
            return original.handler(state, request)

        served[0x22] = type(original)(hanging, min_length=3)
        daemon.server.services = served
        stack = tester.stack(config.deploy_link().request_id, config.deploy_link().response_id)
        stack.send(b"\x22\xf1\xb0")
        assert hung.wait(5)
        assert _wait(lambda: not daemon.alive()), "the watchdog is still fed while the deploy server hangs"
        assert daemon.server.alive(1) == ["uds-gateway-deploy-physical"]
        release.set()
        assert stack.recv(block=True, timeout=5)[:3] == b"\x62\xf1\xb0"
        assert _wait(daemon.alive), "the watchdog is not fed again once the server goes on"
    finally:
        release.set()
        tester.shutdown()
        daemon.stop()


def test_a_campaign_step_that_raises_does_not_end_the_campaign_worker(tmp_path: Path, write_config) -> None:  # type: ignore[no-untyped-def]
    """A campaign state file broken under the running daemon: the step fails, is logged and
    tried again with back-off; the worker lives on and goes on once the file is readable."""
    daemon = _tbox(tmp_path, write_config)
    daemon.start()
    broken = tmp_path / "tbox" / "campaigns" / "0123456789abcdef01234567"
    try:
        broken.mkdir(parents=True)
        (broken / "state.json").write_text("{not json")
        daemon._wake.set()
        time.sleep(2.5)
        assert daemon._worker.is_alive() and daemon.alive()
        (broken / "state.json").unlink()
        broken.rmdir()
        assert _wait(lambda: daemon.runner.activity == "no campaign open", 15)
    finally:
        daemon.stop()
