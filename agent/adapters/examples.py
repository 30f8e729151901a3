"""Where the example configurations live: this checkout's ``configs/``, or, installed from the
wheel, ``<prefix>/share/vota/configs`` (the vehicle templates, Mosquitto's configuration and
ACL, the systemd units with their sysusers and tmpfiles files, owner-content examples)."""

from __future__ import annotations

import sysconfig
from pathlib import Path

from agent.errors import UsageError

__all__ = ["examples_dir", "resolve_config", "DEFAULT_CONFIG"]

DEFAULT_CONFIG = "configs/bench.yaml"


def examples_dir() -> Path:
    checkout = Path(__file__).resolve().parents[2] / "configs"
    if (checkout / "bench.yaml").is_file():
        return checkout
    return Path(sysconfig.get_path("data")) / "share" / "vota" / "configs"


def resolve_config(given: str | None) -> str:
    """The vehicle configuration a command reads: the one given, else ``configs/bench.yaml`` here,
    else the installed example; one error naming the examples when there is none."""
    path = given or (DEFAULT_CONFIG if Path(DEFAULT_CONFIG).is_file() else str(examples_dir() / "bench.yaml"))
    if not Path(path).is_file():
        raise UsageError(f"{path}: file not found (examples: {examples_dir()}; `vota init DIR` writes a starter "
                         "vehicle configuration with its keys)")
    return path
