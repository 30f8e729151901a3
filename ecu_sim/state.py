"""What one simulated ECU holds between requests: session, security, the download under way,
its flash banks and content store. The services (``ecu_sim/services.py``,
``ecu_sim/identification.py``) are functions of (this state, a request)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from agent.adapters.storage import atomic_write_json
from agent.core.config import EcuConfig, EcuSimConfig
from agent.core.image_auth import ImageKey
from agent.protocol.compression import Decompressor
from agent.protocol.uds import BlockCounter, Session
from ecu_sim.content import ContentStore
from ecu_sim.dialect import Dialect, dialect_of
from ecu_sim.flash_banks import FlashBanks

__all__ = ["EcuState"]


@dataclass
class EcuState:
    config: EcuConfig
    banks: FlashBanks
    random: Callable[[int], bytes] = os.urandom
    session: int = Session.defaultSession
    unlocked: bool = False
    seed: bytes | None = None
    failed_attempts: int = 0
    locked_until: float = 0.0
    dtc_setting_on: bool = True
    communication: int = 0x00
    fingerprint: bytes = b""
    # download state
    download_active: bool = False
    download_size: int = 0
    received: int = 0
    decompressor: Decompressor | None = None  # a compressed download: decompressed while written
    delta: tuple[str, str] | None = None  # (base, new image) SHA-256 the delta base routine accepted
    written: "hashlib._Hash" = field(default_factory=hashlib.sha256)  # of the image as written
    counter: BlockCounter = field(default_factory=BlockCounter)
    resets: int = 0
    erased_region: tuple[int, int] | None = field(default=None)
    download_offset: int = 0  # where the open download writes, from the memory's start
    content: ContentStore | None = None
    sensors: Path | None = None  # sensors.json: {"ambient_lux": N}, the simulated light sensor
    signals: Path | None = None  # signals.json: the vehicle's state (ecu_sim/identification.py)
    security_file: Path | None = None  # security.json: wrong keys and the lock-out, across a power cycle
    dialect: Dialect | None = None  # the bootloader dialect it plays (ecu_sim/dialect.py); None: from its profile
    image_key: ImageKey | None = None  # the trust anchor (sim.image_key): only images signed with it are staged or run

    def __post_init__(self) -> None:
        if self.dialect is None:
            self.dialect = dialect_of(self.config)

    @property
    def speaks(self) -> Dialect:
        assert self.dialect is not None
        return self.dialect

    def load_security(self, now: float) -> None:
        """At power-up: the failed attempts and what is left of a lock-out (a restart is no way around it)."""
        if self.security_file is None:
            return
        try:
            doc = json.loads(self.security_file.read_text())
            self.failed_attempts = int(doc.get("failed_attempts", 0))
            left = float(doc.get("locked_for_s", 0)) - (time.time() - float(doc.get("at", 0)))
            self.locked_until = now + max(0.0, min(left, 3600.0))
        except (OSError, ValueError, TypeError, AttributeError):
            pass  # none yet

    def save_security(self, now: float) -> None:
        if self.security_file is not None:
            atomic_write_json(self.security_file, {"failed_attempts": self.failed_attempts,
                                                   "locked_for_s": max(0.0, self.locked_until - now), "at": time.time()})

    def session_timeout(self) -> None:
        self._leave_session()
        self.banks.dependencies_ok = False
        self.session = Session.defaultSession

    def _leave_session(self) -> None:
        self.unlocked = False
        self.seed = None
        if self.content is not None:
            self.content.files.abort()
        self.delta = None
        if self.download_active:
            self._end_download()
            self.banks.close()

    def _end_download(self) -> None:
        if self.decompressor is not None:
            self.decompressor.close()
        self.download_active, self.decompressor = False, None

    def reset(self) -> None:
        """What a power cycle does: default session, locked, new image active if ready."""
        self._leave_session()
        self.session = Session.defaultSession
        self.dtc_setting_on = True
        self.communication = 0x00
        self.banks.activate_if_ready()
        self.banks.pending_version = ""
        self.resets += 1

    @property
    def sim(self) -> EcuSimConfig:
        return self.config.sim
