"""An ECU's store of owner content (C6): projection material, tail-light patterns, boot
animations. Content arrives by RequestFileTransfer (the same protocol as a deploy) and is
shown or stopped by RoutineControl, without touching the ECU's software; DID 0xF1C0 reads
back what is shown. The choice survives a restart (``active.json``, written atomically)."""

from __future__ import annotations

import json
from pathlib import Path

from agent.adapters.file_store import FileStore
from agent.adapters.storage import atomic_write_json

__all__ = ["ContentStore"]


class ContentStore:
    def __init__(self, directory: Path, max_block_length: int) -> None:
        self.files = FileStore(directory, max(7, max_block_length))
        self.state_path = directory / "active.json"
        self.active: str | None = None
        try:
            self.active = json.loads(self.state_path.read_text()).get("active")
        except (OSError, ValueError, AttributeError):
            self.active = None
        if self.active and not self.files.path(self.active).is_file():
            self.active = None

    def show(self, name: str | None) -> None:
        self.active = name
        atomic_write_json(self.state_path, {"active": name})
