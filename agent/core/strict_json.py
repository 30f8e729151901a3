"""JSON as signed documents need it: one meaning per byte string.

Python's ``json`` keeps the last of two equal keys and reads ``NaN`` and ``Infinity``; another
parser may keep the first key or refuse. A signed document that two parsers read differently
is an attack (the verifier checks one meaning, the installer acts on another), so signed
envelopes, campaigns and manifests are read here: a repeated key or a non-finite number is
an error (``ValueError``, like any other malformed JSON).
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["Ambiguous", "loads", "why"]


class Ambiguous(ValueError):
    """Well-formed JSON that parsers read differently: a repeated key, NaN or Infinity."""


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for key, value in pairs:
        if key in doc:
            raise Ambiguous(f"the key {key!r} appears twice in one object")
        doc[key] = value
    return doc


def _constant(name: str) -> Any:
    raise Ambiguous(f"{name} is not a JSON number")


def loads(data: str | bytes) -> Any:
    """``json.loads`` that refuses repeated keys and NaN/Infinity (``Ambiguous``, a ValueError;
    RecursionError when nested too deeply, as ``json.loads``)."""
    return json.loads(data, object_pairs_hook=_pairs, parse_constant=_constant)


def why(exc: BaseException) -> str:
    """`` (the reason)`` for an ambiguous document, to append to "not JSON"; empty otherwise."""
    return f" ({exc})" if isinstance(exc, Ambiguous) else ""
