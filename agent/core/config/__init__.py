"""Typed configuration of the simulated or real vehicle, loaded from YAML in one place.

One file describes the CAN segments and the ECUs on them; the gateway reads the client side
of each ECU, the ECU simulator reads the ``sim`` part. Every error names the file, the key
and what was expected. This package parses what was read; the file itself is read by
``agent/adapters/config_files.py``.
"""

from __future__ import annotations

from agent.core.config._parse import parse_vehicle_config
from agent.core.config._values import parse_yaml
from agent.core.config.model import (
    Approval,
    CloudConfig,
    ContentConfig,
    DeployConfig,
    DoipConfig,
    EcuConfig,
    EcuSimConfig,
    GatewayConfig,
    PreconditionsConfig,
    SegmentConfig,
    TboxConfig,
    VehicleConfig,
    VehicleSignalsConfig,
)

__all__ = [
    "Approval",
    "CloudConfig",
    "SegmentConfig",
    "EcuSimConfig",
    "EcuConfig",
    "GatewayConfig",
    "PreconditionsConfig",
    "DeployConfig",
    "DoipConfig",
    "ContentConfig",
    "TboxConfig",
    "VehicleConfig",
    "VehicleSignalsConfig",
    "parse_vehicle_config",
    "parse_yaml",
]
