"""``vota init DIR``: a starter vehicle configuration and everything it refers to.

DIR gets ``vehicle.yaml`` (the bench vehicle on udp_multicast, or ``--kind vcan``: the same
vehicle on SocketCAN), the keys it names (Ed25519 pairs for ``keys/<name>.pub``, the vehicle's
X25519 content key for ``keys/vehicle.key``), and ``examples/`` (Mosquitto's configuration and
ACL, the systemd units with their sysusers and tmpfiles files, owner-content examples). Paths in
``vehicle.yaml`` are relative: run the commands from DIR. Nothing is overwritten without
``--force``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.adapters.examples import examples_dir
from agent.adapters.storage import atomic_write_bytes, writable_dir
from agent.errors import UsageError

__all__ = ["cmd_init"]

TEMPLATES = {"bench": "bench.yaml", "vcan": "vcan.yaml"}
KEY = re.compile(r"\bkeys/([A-Za-z0-9][A-Za-z0-9._-]*)\.(pub|key)\b")


def _pair(directory: Path, name: str, x25519: bool) -> None:
    key = X25519PrivateKey.generate() if x25519 else Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    atomic_write_bytes(directory / f"{name}.key", private)
    os.chmod(directory / f"{name}.key", 0o600)
    atomic_write_bytes(directory / f"{name}.pub", key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


def cmd_init(args: argparse.Namespace) -> int:
    target = Path(args.dir)
    source = examples_dir()
    template = source / TEMPLATES[args.kind]
    if not template.is_file():
        raise UsageError(f"{template}: the example configuration is missing (a broken installation?)")
    if (target / "vehicle.yaml").exists() and not args.force:
        raise UsageError(f"{target / 'vehicle.yaml'} exists: --force to write over it")
    writable_dir(target, "DIR")
    text = template.read_text()
    atomic_write_bytes(target / "vehicle.yaml", text.encode())
    keys = writable_dir(target / "keys", "DIR")
    names = sorted({m.group(1) for m in KEY.finditer(text)})
    for name in names:
        _pair(keys, name, x25519=name == "vehicle")
    for part in ("mosquitto", "systemd", "content"):
        if (source / part).is_dir():
            shutil.copytree(source / part, target / "examples" / part, dirs_exist_ok=True)
    print(f"{target / 'vehicle.yaml'}: the {args.kind} vehicle; keys: {', '.join(names)} in {keys}; "
          f"examples in {target / 'examples'}")
    print(f"next: cd {target} && vota bench -c vehicle.yaml (needs the bench extra: pip install 'vota[bench]'), "
          "or vota ecu-sim -c vehicle.yaml, vota gateway -c vehicle.yaml, vota tbox -c vehicle.yaml")
    return 0
