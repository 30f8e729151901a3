"""Reading the files a command is given: one UsageError naming the file when it cannot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agent.errors import UsageError

__all__ = ["read_input", "trusted_keys"]


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
