"""Configuration files read from disk: the YAML text handed to the pure parsers of
``agent/core/config``, with every problem reported as one ConfigError naming the file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from agent.adapters.plugins import check_plugins
from agent.core.config import VehicleConfig, parse_vehicle_config, parse_yaml
from agent.errors import ConfigError

__all__ = ["load_yaml", "load_vehicle_config"]


def load_yaml(path: str | os.PathLike[str]) -> Any:
    """Read a YAML file; any problem becomes one ConfigError naming the file."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(source, None, "file not found") from None
    except OSError as exc:
        raise ConfigError(source, None, f"cannot read file ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(source, None, f"not UTF-8 text (byte {exc.start}): a binary file?") from None
    return parse_yaml(text, source)


def load_vehicle_config(path: str | os.PathLike[str]) -> VehicleConfig:
    """The vehicle configuration in ``path`` (agent/core/config), checked key by key."""
    config = parse_vehicle_config(load_yaml(path), str(path))
    check_plugins(config)  # a profile naming a plug-in that is not installed: refused now, not mid-flash
    return config
