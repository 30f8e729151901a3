"""Plug-ins an integrator installs for ECUs the project did not write (docs/flash-profiles.md):

- ``vota.seed_key``: ``key(level, seed, params) -> bytes``, the SecurityAccess key for a seed
  (``params``: the profile's ``seed_key.params`` with the ECU's ``seed_key_params`` over them, and
  ``secret``: the ECU's ``security_secret``). Built in: ``vota-hmac`` (the simulator's: the first
  4 bytes of HMAC-SHA256(secret, seed)).
- ``vota.check``: ``check(data) -> bytes``, the check-memory value of a written block. Built
  in: ``none``, ``crc16`` (CCITT-FALSE), ``crc32``, ``sha256``.

A plug-in is found by name among the Python entry points of its group (what a package declares
in ``[options.entry_points]``), or given as ``module:function``.
"""

from __future__ import annotations

import functools
import importlib
from importlib.metadata import entry_points
from typing import Any, Callable, Mapping

from agent.core.config import EcuConfig, VehicleConfig
from agent.core.flash_profile import CHECKS
from agent.errors import ConfigError
from agent.protocol.ecu import security_key

__all__ = ["SEED_KEY_GROUP", "CHECK_GROUP", "seed_key_for", "check_for", "check_plugins", "PluginMissing"]

SEED_KEY_GROUP = "vota.seed_key"
CHECK_GROUP = "vota.check"

SeedKey = Callable[[int, bytes, Mapping[str, Any]], bytes]


class PluginMissing(LookupError):
    pass


def hmac_seed_key(level: int, seed: bytes, params: Mapping[str, Any]) -> bytes:
    """The simulator's algorithm: the first 4 bytes of HMAC-SHA256(secret, seed)."""
    return security_key(str(params.get("secret", "")), seed)


BUILTIN: dict[str, dict[str, Callable[..., bytes]]] = {SEED_KEY_GROUP: {"vota-hmac": hmac_seed_key}, CHECK_GROUP: dict(CHECKS)}


@functools.lru_cache(maxsize=None)
def load(group: str, name: str) -> Callable[..., bytes]:
    """The plug-in ``name`` of ``group``, or PluginMissing saying what is installed."""
    if name in BUILTIN[group]:
        return BUILTIN[group][name]
    found = [ep for ep in entry_points(group=group) if ep.name == name]
    try:
        if found:
            return found[0].load()  # type: ignore[no-any-return]
        if ":" in name:
            module, _, attr = name.partition(":")
            return getattr(importlib.import_module(module), attr)  # type: ignore[no-any-return]
    except Exception as exc:  # noqa: BLE001 - a broken plug-in is named, not a traceback
        raise PluginMissing(f"plug-in {name!r} of {group} cannot be loaded: {type(exc).__name__}: {exc}") from None
    installed = sorted({*BUILTIN[group], *(ep.name for ep in entry_points(group=group))})
    raise PluginMissing(f"no {group} plug-in named {name!r} (installed: {', '.join(installed)}); install the package "
                        f"that provides it (entry point group {group}) or give module:function")


def seed_key_for(ecu: EcuConfig) -> Callable[[int, bytes], bytes]:
    """The ECU's SecurityAccess key function: its profile's plug-in with the ECU's parameters."""
    profile = ecu.flash_profile
    params = {**profile.seed_key_params, **ecu.seed_key_params, "secret": ecu.security_secret, "ecu": ecu.name}
    plugin = load(SEED_KEY_GROUP, profile.seed_key)

    def key(level: int, seed: bytes) -> bytes:
        out = plugin(level, bytes(seed), params)
        if not isinstance(out, (bytes, bytearray)):
            raise TypeError(f"seed/key plug-in {profile.seed_key!r} returned {type(out).__name__}, not bytes")
        return bytes(out)

    return key


def check_for(ecu: EcuConfig) -> Callable[[bytes], bytes]:
    return load(CHECK_GROUP, ecu.flash_profile.check)


def check_plugins(config: VehicleConfig) -> None:
    """At start-up: every ECU's plug-ins load, or a ConfigError naming the profile's key."""
    for ecu in config.ecus.values():
        profile = ecu.flash_profile
        where = f"flash_profiles.{profile.name}" if ecu.profile is not None else f"ecus.{ecu.name}"
        for group, name, key in ((SEED_KEY_GROUP, profile.seed_key, "seed_key"), (CHECK_GROUP, profile.check, "check")):
            try:
                load(group, name)
            except PluginMissing as exc:
                raise ConfigError(config.source, f"{where}.{key}", str(exc)) from None
