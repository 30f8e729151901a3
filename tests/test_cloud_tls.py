"""The cloud link over TLS with a client certificate, against Mosquitto requiring one."""

from __future__ import annotations

import datetime as dt
import ipaddress
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.adapters.cloud_link import CloudConfig, CloudLink
from tests.conftest import Mosquitto

pytestmark = pytest.mark.slow  # a Mosquitto process


def _cert(name: str, issuer_key, issuer_name, key, ca: bool = False, ip: str | None = None):  # type: ignore[no-untyped-def]
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(issuer_name or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ip:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _write(path: Path, cert, key) -> None:  # type: ignore[no-untyped-def]
    path.with_suffix(".pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))


def test_tls_with_client_certificate(tmp_path):
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("vota test CA", None, None, ca_key, ca=True)
    server_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    _write(tmp_path / "ca", ca, ca_key)
    _write(tmp_path / "server", _cert("broker", ca_key, ca.subject, server_key, ip="127.0.0.1"), server_key)
    _write(tmp_path / "client", _cert("LVOTA000000000001", ca_key, ca.subject, client_key), client_key)
    broker = Mosquitto(tmp_path / "broker")
    broker.conf.write_text(f"listener {broker.port} 127.0.0.1\nallow_anonymous true\nrequire_certificate true\n"
                           f"cafile {tmp_path / 'ca.pem'}\ncertfile {tmp_path / 'server.pem'}\nkeyfile {tmp_path / 'server.key'}\n"
                           + broker.user_line())
    broker.start()
    url = f"mqtts://127.0.0.1:{broker.port}"
    good = CloudLink(CloudConfig(broker=url, outbox=str(tmp_path / "o1.db"), tls_ca=str(tmp_path / "ca.pem"),
                                 tls_cert=str(tmp_path / "client.pem"), tls_key=str(tmp_path / "client.key")), "LVOTA000000000001")
    anonymous = CloudLink(CloudConfig(broker=url, outbox=str(tmp_path / "o2.db"), tls_ca=str(tmp_path / "ca.pem"),
                                      reconnect_min_s=1, reconnect_max_s=1), "LVOTA000000000002")
    try:
        good.start()
        anonymous.start()
        good.report("events", {"event": "hello"})
        anonymous.report("events", {"event": "hello"})
        assert good.connected.wait(10)
        deadline = time.monotonic() + 10
        while good.pending() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert good.pending() == 0  # acknowledged over TLS
        assert not anonymous.connected.wait(2) and anonymous.pending() == 1  # no client certificate, no entry
    finally:
        good.stop()
        anonymous.stop()
        broker.stop()
