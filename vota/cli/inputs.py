"""Reading the files a command is given: one UsageError naming the file when it cannot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agent.errors import UsageError

__all__ = ["read_input", "trusted_keys", "threshold_role"]


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
