"""The infotainment app area (C1 ``application`` items, C5 selection and binding), simulated
as a directory with an app registry: apps are installed, updated automatically or only on
the owner's confirmation, and reverted to the version before when their content expires.

    <dir>/registry.json          {"schema": 1, "apps": {app_id: {"version", "auto_update",
                                  "previous", "history"}}}
    <dir>/<app_id>/<version>.app  the installed packages (the current and the previous one)

Every change is written atomically; a kill at any line leaves the registry as it was
before the change or after it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.adapters.storage import atomic_write_bytes, atomic_write_json
from agent.errors import VotaError
from agent.protocol.files import is_name

__all__ = ["AppRegistry", "AppDecision"]



@dataclass(frozen=True)
class AppDecision:
    app_id: str
    action: str  # install | update | wait_for_owner | up_to_date
    version: str


class AppRegistry:
    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.path = self.dir / "registry.json"
        self.apps: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            try:
                doc = json.loads(self.path.read_text())
                if doc.get("schema") != 1:
                    raise ValueError(f"schema {doc.get('schema')!r}")
                self.apps = dict(doc["apps"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise VotaError(f"{self.path}: unreadable app registry ({exc})") from None

    def _save(self) -> None:
        atomic_write_json(self.path, {"schema": 1, "apps": self.apps})

    @staticmethod
    def _check(app_id: str) -> None:
        if not is_name(app_id):
            raise VotaError(f"app id {app_id!r} is not a plain name")

    def version(self, app_id: str) -> str | None:
        entry = self.apps.get(app_id)
        return str(entry["version"]) if entry and entry.get("version") else None

    def set_auto_update(self, app_id: str, auto: bool) -> None:
        """C5: the owner binds an app for automatic or manual updates."""
        self._check(app_id)
        entry = self.apps.setdefault(app_id, {"version": None, "auto_update": auto, "previous": None, "history": []})
        entry["auto_update"] = auto
        self._save()

    def decide(self, app_id: str, version: str, accepted: bool = False) -> AppDecision:
        """What to do with an offered version: install a new app, update one set to auto
        update (or accepted by the owner), else wait for the owner."""
        self._check(app_id)
        entry = self.apps.get(app_id)
        if entry is None or entry.get("version") is None:
            return AppDecision(app_id, "install", version)
        if entry["version"] == version:
            return AppDecision(app_id, "up_to_date", version)
        if entry.get("auto_update", True) or accepted:
            return AppDecision(app_id, "update", version)
        return AppDecision(app_id, "wait_for_owner", version)

    def install(self, app_id: str, version: str, package: bytes) -> None:
        self._check(app_id)
        if not is_name(version):
            raise VotaError(f"app version {version!r} is not a plain name")
        atomic_write_bytes(self.dir / app_id / f"{version}.app", package)  # the package first ...
        entry = self.apps.setdefault(app_id, {"version": None, "auto_update": True, "previous": None, "history": []})
        if entry.get("version") and entry["version"] != version:
            entry["previous"] = entry["version"]
        entry["version"] = version
        entry["history"] = (entry.get("history") or [])[-9:] + [version]
        self._save()  # ... then the registry names it
        self._prune(app_id)

    def revert(self, app_id: str) -> str | None:
        """Back to the version before (or uninstalled when there was none); returns it."""
        entry = self.apps.get(app_id)
        if entry is None:
            return None
        entry["version"], entry["previous"] = entry.get("previous"), None
        self._save()
        self._prune(app_id)
        return entry["version"]

    def _prune(self, app_id: str) -> None:
        entry = self.apps.get(app_id) or {}
        keep = {f"{v}.app" for v in (entry.get("version"), entry.get("previous")) if v}
        folder = self.dir / app_id
        for path in folder.glob("*.app") if folder.exists() else []:
            if path.name not in keep:
                path.unlink()

    def package(self, app_id: str) -> bytes | None:
        version = self.version(app_id)
        if version is None:
            return None
        return (self.dir / app_id / f"{version}.app").read_bytes()
