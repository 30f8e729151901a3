"""Certificates for a bench's broker and package server (``vota cloud certs``): a CA, a server
certificate for the names the vehicle connects to, and a client certificate per vehicle whose
common name is its VIN (the identity Mosquitto takes with ``use_identity_as_username``).

ECDSA P-256 throughout. A fleet uses the OEM's PKI; this makes the same files for a bench, so
the shipped broker configuration runs there unchanged. The CA's key is written beside its
certificate: keep it off the broker and off every vehicle.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
from pathlib import Path
from typing import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.adapters.storage import atomic_write_bytes
from agent.errors import UsageError

__all__ = ["make_ca", "issue", "bench_pki"]

_KEY = serialization.PrivateFormat.PKCS8


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "vota bench"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    atomic_write_bytes(directory / f"{stem}.pem", cert.public_bytes(serialization.Encoding.PEM))
    atomic_write_bytes(directory / f"{stem}.key", key.private_bytes(serialization.Encoding.PEM, _KEY,
                                                                   serialization.NoEncryption()))
    (directory / f"{stem}.key").chmod(0o600)


def make_ca(days: int = 3650) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _dt.datetime.now(_dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name("vota bench CA")).issuer_name(_name("vota bench CA"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(minutes=5)).not_valid_after(now + _dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return cert, key


def issue(ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], common_name: str, *, server_names: Iterable[str] = (),
          days: int = 825) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate signed by ``ca``: a server's (``server_names``: DNS names and IP addresses)
    or, without them, a client's."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = _dt.datetime.now(_dt.timezone.utc)
    names = list(server_names)
    builder = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(ca[0].subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - _dt.timedelta(minutes=5)).not_valid_after(now + _dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if names
                                                     else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if names:
        alt: list[x509.GeneralName] = []
        for n in names:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                alt.append(x509.DNSName(n))
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    return builder.sign(ca[1], hashes.SHA256()), key


def bench_pki(directory: str | Path, clients: Iterable[str], server_names: Iterable[str] = ("localhost", "127.0.0.1")) -> Path:
    """``ca.pem``/``ca.key``, ``server.pem``/``server.key`` (the broker's and the package
    server's) and ``<NAME>.pem``/``<NAME>.key`` per client (a vehicle's VIN, a cloud service's
    identity) in ``directory``; a CA already there is used again, so clients added later share it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        ca_pem, ca_key = (directory / "ca.pem").read_bytes(), (directory / "ca.key").read_bytes()
    except FileNotFoundError:
        ca = make_ca()
        _write(directory, "ca", *ca)
    except OSError as exc:
        raise UsageError(f"{directory}: cannot read the CA ({exc.strerror})") from None
    else:
        try:
            key = serialization.load_pem_private_key(ca_key, None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError("not an EC key")
            ca = (x509.load_pem_x509_certificate(ca_pem), key)
        except ValueError as exc:
            raise UsageError(f"{directory}: ca.pem/ca.key are not a usable CA ({exc})") from None
    _write(directory, "server", *issue(ca, "vota broker", server_names=server_names))
    for name in clients:
        if not name or not all(ch.isalnum() or ch in "-_" for ch in name):
            raise UsageError(f"{name!r}: a client's name (a VIN, vota-collector) is letters, digits, - and _")
        _write(directory, name, *issue(ca, name))
    return directory
