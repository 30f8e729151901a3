"""Two flash banks persisted on disk, as an A/B bootloader keeps them.

The active bank is never written. A new image goes into the other bank; once fully written,
verified (check memory) and consistent (check dependencies) it is **staged**, and it becomes
active at a reset: at once when the tester resets in the same programming session (one ECU
at a time), or, in a vehicle-level campaign, when the activate routine selected it. An image
activated that way is on trial (``confirmed`` false) and the old one is kept: the rollback
routine goes back to it at the next reset, the commit routine confirms the new one and drops
the old (MCUboot's test/confirm swap). ``meta.json`` is replaced atomically at each state
change, so a kill at any point leaves a consistent pair of banks: a half-written image is
discarded at start-up, a staged one stays staged.

An ECU with a single bank (``single``) is flashed in place: the erase removes the running
application (the bootloader answers, with no software version), the new image is written over
it and runs at the reset once checked. Nothing can be staged, activated, rolled back or
committed; a kill mid-flash leaves the ECU without an application until it is flashed again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from agent.adapters.storage import atomic_write_json
from agent.errors import VotaError

__all__ = ["FlashBanks", "BankInfo"]

SCHEMA = 1


@dataclass
class BankInfo:
    state: str  # empty | erased | writing | written | verified | staged | valid
    version: str = ""
    size: int = 0
    sha256: str = ""
    confirmed: bool = True  # the active bank: false while it is on trial and may be rolled back
    verified: bool = False  # its signature checked against the ECU's trust anchor (the authenticate routine)
    security_version: int = 0  # the signed security version it carries

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state, "version": self.version, "size": self.size, "sha256": self.sha256,
                "confirmed": self.confirmed, "verified": self.verified, "security_version": self.security_version}

    def moved(self, state: str, **changes: Any) -> "BankInfo":
        """The same image in another state (its version, digest and signature go with it)."""
        return dataclasses.replace(self, state=state, **changes)


class FlashBanks:
    def __init__(self, directory: str | os.PathLike[str], factory_version: str, single: bool = False) -> None:
        self.single = single
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.meta_path = self.dir / "meta.json"
        self.active = "a"
        self.banks = {"a": BankInfo("valid", factory_version), "b": BankInfo("empty")}
        self.dependencies_ok = False
        self.pending_version = ""
        self.next_boot = ""  # what the next reset does: "activate" the staged bank, "rollback" to the old one
        self.counter = 0  # anti-rollback: the highest security version of a verified image that was confirmed
        self.blocks_written: list[tuple[int, int]] = []  # (offset, size) of the blocks of the image being written
        self._handle: Any = None
        self._load()

    # ---- persistence ------------------------------------------------------------------
    def _load(self) -> None:
        if not self.meta_path.exists():
            self._save()
            return
        try:
            meta = json.loads(self.meta_path.read_text())
            self.active = meta["active"]
            self.banks = {k: BankInfo(**v) for k, v in meta["banks"].items()}
            self.next_boot = str(meta.get("next_boot", ""))
            self.counter = int(meta.get("security_counter", 0))
            if self.active not in ("a", "b") or set(self.banks) != {"a", "b"}:
                raise ValueError("banks must be a and b")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise VotaError(f"{self.meta_path}: unreadable flash bank metadata ({exc})") from None
        if self.single:
            if self.active_info.state == "staged":  # complete and checked: the bootloader starts it
                self._run(self.active, self.active_info.moved("valid", confirmed=True))
                self._save()
            return  # anything less stays: no application until it is flashed again
        inactive = self.banks[self.inactive]
        if inactive.state in ("erased", "writing", "written", "verified"):
            # An interrupted programming session: the bootloader discards the half image.
            self.banks[self.inactive] = BankInfo("empty")
            self._save()

    def _save(self) -> None:
        atomic_write_json(
            self.meta_path,
            {"schema": SCHEMA, "active": self.active, "banks": {k: v.to_json() for k, v in self.banks.items()},
             "next_boot": self.next_boot, "security_counter": self.counter},
        )

    def path(self, bank: str) -> Path:
        return self.dir / f"bank_{bank}.bin"

    @property
    def inactive(self) -> str:
        return "b" if self.active == "a" else "a"

    @property
    def target(self) -> str:
        """The bank a new image is written to: the other one, or the only one."""
        return self.active if self.single else self.inactive

    @property
    def active_info(self) -> BankInfo:
        return self.banks[self.active]

    def active_image(self) -> bytes:
        path = self.path(self.active)
        return path.read_bytes() if path.exists() else b""

    # ---- programming ------------------------------------------------------------------
    def erase(self, offset: int = 0, size: int = 0) -> None:
        """Erase for a new image. A block of the same image that lies apart from the blocks already
        written (an image of several memory blocks, each erased before its download) keeps them."""
        self.close()
        info = self.banks[self.target]
        apart = all(offset + size <= o or o + n <= offset for o, n in self.blocks_written)
        if self.blocks_written and size and apart and info.state in ("written", "verified"):
            self.banks[self.target] = BankInfo("erased", size=info.size)
            self._save()
            return
        self.blocks_written = []
        self.dependencies_ok = False
        self.next_boot = ""
        self.banks[self.target] = BankInfo("erased")
        self._save()
        with open(self.path(self.target), "wb"):
            pass

    @property
    def erased(self) -> bool:
        return self.banks[self.target].state == "erased"

    def begin_write(self, size: int, offset: int = 0) -> None:
        extent = self.banks[self.target].size if self.blocks_written else 0
        self.banks[self.target] = BankInfo("writing", size=max(extent, offset + size))
        self._save()
        self._handle = open(self.path(self.target), "r+b")
        if not self.blocks_written:
            self._handle.truncate(0)

    def write(self, offset: int, data: bytes) -> None:
        self._handle.seek(offset)
        self._handle.write(data)

    def finish_write(self, written: int, offset: int = 0) -> None:
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self.close()
        self.blocks_written.append((offset, written))
        extent = max(o + n for o, n in self.blocks_written)
        self.banks[self.target] = BankInfo("written", size=extent)
        self._save()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def check(self, algorithm: "str | Callable[[bytes], bytes]", expected: bytes) -> bool:
        """Check memory: the digest of the block just written against the value the tester sent."""
        info = self.banks[self.target]
        if info.state != "written" or not self.blocks_written:
            return False
        image = self.path(self.target).read_bytes()[: info.size]
        offset, size = self.blocks_written[-1]  # the block just written
        data = image[offset : offset + size]
        if callable(algorithm):
            actual = algorithm(data)
        else:
            actual = zlib.crc32(data).to_bytes(4, "big") if algorithm == "crc32" else hashlib.sha256(data).digest()
        if actual != expected:
            return False
        self.banks[self.target] = BankInfo("verified", self.pending_version, info.size, hashlib.sha256(image).hexdigest())
        self._save()
        return True

    def authenticate(self, security_version: int) -> None:
        """The image just written carries a valid signature (checked by the caller) and this security version."""
        self.banks[self.target] = self.banks[self.target].moved("verified", verified=True, security_version=security_version)
        self._save()

    def check_dependencies(self) -> bool:
        """The new image is consistent: it is staged (kept across restarts, not yet running)."""
        info = self.banks[self.target]
        if info.state == "verified":
            self.banks[self.target] = info.moved("staged")
            self._save()
        self.dependencies_ok = self.banks[self.target].state == "staged"
        return self.dependencies_ok

    @property
    def staged(self) -> BankInfo | None:
        if self.single:
            return None  # written in place: nothing waits beside the running image
        info = self.banks[self.inactive]
        return info if info.state == "staged" else None

    @property
    def previous(self) -> BankInfo | None:
        """The image the active one replaced, while it is kept for a rollback."""
        info = self.banks[self.inactive]
        return info if info.state == "valid" and not self.active_info.confirmed else None

    def select_staged(self) -> bool:
        """The activate routine: the next reset runs the staged image (on trial)."""
        if self.staged is None:
            return False
        self.next_boot = "activate"
        self._save()
        return True

    def discard(self) -> None:
        """The discard routine: forget a staged (or half-written) image; the active one stays."""
        self.close()
        self.dependencies_ok = False
        if self.banks[self.inactive].state != "valid":
            self.banks[self.inactive] = BankInfo("empty")
        if self.next_boot == "activate":
            self.next_boot = ""
        self._save()

    def select_previous(self) -> bool:
        """The rollback routine: the next reset runs the image the active one replaced."""
        if self.previous is None:
            return False
        self.next_boot = "rollback"
        self._save()
        return True

    def commit(self) -> None:
        """The commit routine: the running image is confirmed; the one it replaced is dropped."""
        if self.next_boot == "rollback":
            self.next_boot = ""
        self.active_info.confirmed = True
        if self.active_info.verified:
            self.counter = max(self.counter, self.active_info.security_version)
        if self.banks[self.inactive].state == "valid":
            self.banks[self.inactive] = BankInfo("empty")
        self._save()

    def _run(self, bank: str, info: BankInfo) -> None:
        """``info`` becomes what ``bank`` runs; confirmed at once, a verified image raises the counter."""
        self.banks[bank] = info
        if info.confirmed and info.verified:
            self.counter = max(self.counter, info.security_version)

    def activate_if_ready(self) -> bool:
        """At reset: run the staged image when it was selected (on trial) or was staged in this
        programming session (one ECU at a time: confirmed at once), or go back to the previous
        image when a rollback was selected."""
        if self.single:
            info = self.active_info
            if info.state != "staged":  # checked and consistent: the bootloader starts it at any reset
                return False
            self._run(self.active, info.moved("valid", confirmed=True))
            self.dependencies_ok = False
            self._save()
            return True
        new = self.inactive
        info = self.banks[new]
        trial = self.next_boot == "activate"
        if self.next_boot == "rollback" and self.previous is not None:
            left = self.active
            self.banks[new] = info.moved("valid", confirmed=True)
            self.banks[left] = BankInfo("empty")
        elif info.state == "staged" and (trial or self.dependencies_ok):
            self._run(new, info.moved("valid", confirmed=not trial))
        else:
            if self.next_boot:
                self.next_boot = ""
                self._save()
            return False
        self.active = new
        self.dependencies_ok = False
        self.next_boot = ""
        self._save()
        return True
