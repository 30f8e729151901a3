"""Public keys named in the configuration, and the key lists a vehicle has taken since.

``KeyStore`` keeps every accepted key list as the signed envelope that came
(``<dir>/keys-<version>.json``, written atomically) and, at every start, verifies them again
one after the other from the configured roles: a file changed on disk is not taken, and the
lists before it still are. A key list is never forgotten, so a revoked key stays revoked
after a restart, and an install manifest that leaves the chain out cannot bring it back.
"""

from __future__ import annotations

import logging
import re
import threading
from pathlib import Path
from typing import Iterable, Mapping

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.adapters.storage import atomic_write_bytes
from agent.core.campaign import load_public_key
from agent.core.roles import KeyList, KeysRejected, Role, key_id, verify_key_list
from agent.errors import UsageError

__all__ = ["load_public_keys", "initial_key_list", "KeyStore"]

log = logging.getLogger(__name__)

_FILE = re.compile(r"keys-(\d{6,})\.json")


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


def initial_key_list(campaign: tuple[tuple[str, ...], int], content: tuple[tuple[str, ...], int],
                     root: tuple[tuple[str, ...], int]) -> KeyList:
    """Key list version 0: the configuration's key files and thresholds per role (content
    falls back to the campaign keys when it names none)."""
    roles: dict[str, Role] = {}
    for name, (paths, threshold) in (("campaign", campaign), ("content", content), ("root", root)):
        keys: Mapping[str, Ed25519PublicKey] = load_public_keys(paths, f"trusted {name} key")
        if name == "content" and not keys:
            keys = roles["campaign"].keys
        if keys and threshold > len(keys):
            raise UsageError(f"the {name} signature threshold is {threshold} but only {len(keys)} key(s) are trusted")
        roles[name] = Role(keys, threshold)
    return KeyList(0, roles)


class KeyStore:
    def __init__(self, directory: str | Path, initial: KeyList) -> None:
        self.dir = Path(directory)
        self.initial = initial
        self._lock = threading.Lock()
        self._current = initial
        self._chain: list[bytes] = []
        self._load()

    @property
    def current(self) -> KeyList:
        return self._current

    def chain(self) -> list[bytes]:
        """The accepted key lists' envelopes, oldest first (what another node needs to follow)."""
        with self._lock:
            return list(self._chain)

    def _load(self) -> None:
        if not self.dir.is_dir():
            return
        files = sorted((int(m.group(1)), p) for p in self.dir.iterdir() if (m := _FILE.fullmatch(p.name)))
        for version, path in files:
            try:
                data = path.read_bytes()
                new = verify_key_list(data, self._current)
            except (OSError, KeysRejected) as exc:
                log.error("stored key list %s not taken: %s", path, exc)
                continue
            if new.version != version:
                log.error("stored key list %s holds version %d; not taken", path, new.version)
                continue
            self._current = new
            self._chain.append(data)

    def accept(self, envelope: bytes) -> KeyList:
        """Take a key list that may replace the current one (stored before it is used);
        ``KeysRejected`` otherwise. The current one sent again is no change."""
        with self._lock:
            if self._chain and envelope == self._chain[-1]:
                return self._current
            new = verify_key_list(envelope, self._current)
            atomic_write_bytes(self.dir / f"keys-{new.version:06d}.json", envelope)
            self._current = new
            self._chain.append(envelope)
            log.info("key list version %d taken: %s", new.version, new.describe())
            return new

    def follow(self, chain: Iterable[bytes]) -> KeyList:
        """Take, in order, the lists of ``chain`` this store does not have yet (an older or the
        same list is skipped, not an error: the sender may be behind)."""
        for envelope in chain:
            try:
                self.accept(envelope)
            except KeysRejected as exc:
                if exc.reason != "rollback":
                    raise
        return self._current
