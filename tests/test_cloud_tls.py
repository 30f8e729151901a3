"""The cloud link over TLS with a client certificate, against Mosquitto requiring one."""

from __future__ import annotations

import time

import pytest

from agent.adapters.cloud_link import CloudConfig, CloudLink
from cloud_sim.pki import bench_pki
from tests.conftest import Mosquitto

pytestmark = pytest.mark.slow  # a Mosquitto process


def test_tls_with_client_certificate(tmp_path):
    bench_pki(tmp_path, ["LVOTA000000000001"])  # what `vota cloud certs` makes
    broker = Mosquitto(tmp_path / "broker")
    broker.conf.write_text(f"listener {broker.port} 127.0.0.1\nallow_anonymous true\nrequire_certificate true\n"
                           f"cafile {tmp_path / 'ca.pem'}\ncertfile {tmp_path / 'server.pem'}\nkeyfile {tmp_path / 'server.key'}\n"
                           + broker.user_line())
    broker.start()
    url = f"mqtts://127.0.0.1:{broker.port}"
    good = CloudLink(CloudConfig(broker=url, outbox=str(tmp_path / "o1.db"), tls_ca=str(tmp_path / "ca.pem"),
                                 tls_cert=str(tmp_path / "LVOTA000000000001.pem"),
                                 tls_key=str(tmp_path / "LVOTA000000000001.key")), "LVOTA000000000001")
    anonymous = CloudLink(CloudConfig(broker=url, outbox=str(tmp_path / "o2.db"), tls_ca=str(tmp_path / "ca.pem"),
                                      reconnect_min_s=1, reconnect_max_s=1), "LVOTA000000000002")
    try:
        good.start()
        anonymous.start()
        good.report("events", {"event": "hello"})
        anonymous.report("events", {"event": "hello"})
        assert good.connected.wait(10)
        deadline = time.monotonic() + 10
        while good.unpublished() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert good.unpublished() == 0  # taken by the broker over TLS
        assert not anonymous.connected.wait(2) and anonymous.pending() == 1  # no client certificate, no entry
    finally:
        good.stop()
        anonymous.stop()
        broker.stop()
