"""Public keys named in the configuration, read from their PEM files."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.core.campaign import key_id, load_public_key
from agent.errors import UsageError

__all__ = ["load_public_keys"]


def load_public_keys(paths: tuple[str, ...], what: str) -> dict[str, Ed25519PublicKey]:
    """Key id -> key for each file; one line naming the file when one cannot be read (exit 2)."""
    keys = {}
    for path in paths:
        try:
            key = load_public_key(Path(path).read_bytes(), path)
        except OSError as exc:
            raise UsageError(f"{path}: cannot read {what} ({exc.strerror})") from None
        keys[key_id(key)] = key
    return keys
