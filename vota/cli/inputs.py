"""Reading the files a command is given: one UsageError naming the file when it cannot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agent.errors import UsageError

__all__ = ["read_input", "trusted_keys", "threshold_role", "image_keys", "IMAGE_KEY_HELP"]


def read_input(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{path}: {what} not found") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read {what} ({exc.strerror})") from None


def trusted_keys(paths: list[str]) -> dict[str, Any]:
    """``--trusted`` public key files, by key id."""
    from agent.core.campaign import key_id, load_public_key

    keys = {}
    for path in paths:
        key = load_public_key(read_input(path, "public key"), path)
        keys[key_id(key)] = key
    return keys


def threshold_role(keys: dict[str, Any], threshold: int) -> Any:
    """``--trusted`` keys with ``--threshold``: a role (a threshold above the key count is a usage error)."""
    from agent.core.roles import Role

    if not 1 <= threshold <= len(keys):
        raise UsageError(f"--threshold must be from 1 to the number of distinct --trusted keys ({len(keys)})")
    return Role(keys, threshold)


IMAGE_KEY_HELP = ("the OEM's key for an ECU model (Ed25519 or ECDSA P-256, PEM): sign ECU's image for a bootloader that "
                  "verifies what it boots, with security version N (default 0; the ECU refuses one below its counter); "
                  "repeatable")


def image_keys(items: list[str], ecus: set[str]) -> dict[str, tuple[Any, int]]:
    """``--image-key ECU=PEM[@N]``: by ECU, (the signing key, the security version)."""
    from agent.core.image_auth import MAX_SECURITY_VERSION, load_image_signer

    out: dict[str, tuple[Any, int]] = {}
    for item in items:
        ecu, _, rest = item.partition("=")
        path, _, number = rest.partition("@")
        if not ecu or not path or (number and not number.isdigit()):
            raise UsageError(f"--image-key: expected ECU=KEY.pem[@SECURITY_VERSION], got {item!r}")
        if ecu not in ecus:
            raise UsageError(f"--image-key {item}: there is no image for {ecu}")
        version = int(number or 0)
        if version > MAX_SECURITY_VERSION:
            raise UsageError(f"--image-key {item}: the security version is at most {MAX_SECURITY_VERSION}")
        out[ecu] = (load_image_signer(read_input(path, "image signing key"), path), version)
    return out
