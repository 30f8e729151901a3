"""Reading YAML values with errors that name the file, the key and what was expected."""

from __future__ import annotations

from typing import Any, Callable, Mapping, TypeVar

import yaml

from agent.errors import ConfigError

T = TypeVar("T")


def parse_yaml(text: str, source: str) -> Any:
    """YAML text (read from ``source``) as data; any problem becomes one ConfigError naming ``source``."""
    try:
        return yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(source, None, "broken YAML: nested too deeply") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(source, None, f"broken YAML{where}: {problem}") from None


class _Section:
    """Reads one mapping of a config file, remembering which keys were used."""

    def __init__(self, source: str, path: str, data: Any) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(source, path or None, f"expected a mapping, got {_kind(data)}")
        self.source = source
        self.path = path
        self.data = data
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def get(self, name: str, conv: Callable[[Any], T], default: Any = ..., what: str = "") -> T:
        self.used.add(name)
        if name not in self.data or self.data[name] is None:
            if default is ...:
                raise ConfigError(self.source, self.key(name), f"missing; expected {what or conv.__name__}")
            return default  # type: ignore[no-any-return]
        value = self.data[name]
        try:
            return conv(value)
        except (TypeError, ValueError) as exc:
            detail = f" ({exc})" if str(exc) else ""
            raise ConfigError(
                self.source, self.key(name), f"expected {what or conv.__name__}, got {value!r}{detail}"
            ) from None

    def section(self, name: str, default: Any = ...) -> "_Section":
        self.used.add(name)
        if name not in self.data or self.data[name] is None:
            if default is ...:
                raise ConfigError(self.source, self.key(name), "missing; expected a mapping")
            return _Section(self.source, self.key(name), default)
        return _Section(self.source, self.key(name), self.data[name])

    def done(self) -> None:
        unknown = sorted(str(k) for k in self.data if k not in self.used)
        if unknown:
            raise ConfigError(self.source, self.key(unknown[0]), "unknown key")


def _kind(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__


def _int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    if isinstance(value, str):
        return int(value, 0)
    if isinstance(value, int):
        return value
    raise ValueError(f"{_kind(value)} is not an integer")


def _can_id(value: Any) -> int:
    number = _int(value)
    if not 0 <= number <= 0x1FFFFFFF:
        raise ValueError("outside 0..0x1FFFFFFF")
    return number


def _positive(value: Any) -> int:
    number = _int(value)
    if number <= 0:
        raise ValueError("must be greater than 0")
    return number


def _ranged(low: int, high: int, why: str) -> Callable[[Any], int]:
    """An integer within ``low..high``; ``why`` says where the bounds come from."""

    def conv(value: Any) -> int:
        number = _int(value)
        if not low <= number <= high:
            raise ValueError(f"outside {low}..{high} ({why})")
        return number

    conv.__name__ = f"a number {low}..{high}"
    return conv


def _nibble(value: Any) -> int:
    number = _int(value)
    if not 1 <= number <= 15:
        raise ValueError("outside 1..15")
    return number


def _nonneg(value: Any) -> int:
    number = _int(value)
    if number < 0:
        raise ValueError("must not be negative")
    return number


def _str(value: Any) -> str:
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ValueError(f"{_kind(value)} is not a string")
    return str(value)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{_kind(value)} is not true/false")
    return value


def _choice(*options: str) -> Callable[[Any], str]:
    def conv(value: Any) -> str:
        text = _str(value)
        if text not in options:
            raise ValueError(f"not one of {', '.join(options)}")
        return text

    conv.__name__ = " or ".join(options)
    return conv


def _bitrate(value: Any) -> tuple[int, int | None]:
    """``500000`` or ``"500000/2000000"`` (arbitration/data phase for CAN FD)."""
    if isinstance(value, int) and not isinstance(value, bool):
        parts = [value]
    else:
        parts = [int(p) for p in _str(value).split("/")]
    if len(parts) not in (1, 2) or any(p <= 0 for p in parts):
        raise ValueError("expected N or N/M bit/s")
    return parts[0], (parts[1] if len(parts) == 2 else None)
