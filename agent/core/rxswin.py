"""RXSWIN: the Regulation X Software Identification Number of UN R156 (7.2): one per type
approval, naming the software the approval covers. The vehicle keeps its set (``gateway/rxswin.py``),
a signed campaign changes it together with the software, and any tester reads it on a DID.

Pure: the rules for names and values, the DID's layout and the check of a campaign's stated
"before" against the vehicle's set.

The DID's value (``gateway.rxswin_did``, 0xF1EF unless configured), in the order of the
vehicle's approvals::

    NN                          number of approvals
    NN x { RL regulation VL rxswin }   RL, VL: one byte of length each; both printable ASCII
"""

from __future__ import annotations

import re
from typing import Any, Mapping

__all__ = ["REGULATION", "value_problem", "encode_did", "decode_did", "mismatch", "Change", "parse_changes"]

REGULATION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,15}")  # R156, R10, UN-R155, GB44496
MAX_VALUE = 64


def value_problem(value: Any) -> str | None:
    """Why ``value`` is not an RXSWIN (None when it is one): printable ASCII, 1 to 64 characters."""
    if not isinstance(value, str) or not value:
        return "must be a non-empty string"
    if len(value) > MAX_VALUE:
        return f"is longer than {MAX_VALUE} characters"
    if not all(" " <= ch <= "~" for ch in value):
        return "must be printable ASCII"
    return None


Change = tuple[str, str, str]  # (regulation, before, after)


def parse_changes(doc: Any) -> tuple[Change, ...]:
    """A campaign's ``rxswin``: ``{regulation: {"before": value, "after": value}}``; ValueError says what is wrong."""
    if not isinstance(doc, dict) or not doc:
        raise ValueError("rxswin must map regulations to {before, after}")
    changes = []
    for regulation, entry in doc.items():
        if not isinstance(regulation, str) or not REGULATION.fullmatch(regulation):
            raise ValueError(f"rxswin: {regulation!r} is not a regulation name (letters, digits, ._-; 16 at most)")
        if not isinstance(entry, dict) or set(entry) != {"before", "after"}:
            raise ValueError(f"rxswin.{regulation} needs before and after, nothing else")
        for key in ("before", "after"):
            problem = value_problem(entry[key])
            if problem is not None:
                raise ValueError(f"rxswin.{regulation}.{key} {problem}")
        changes.append((regulation, entry["before"], entry["after"]))
    return tuple(changes)


def mismatch(changes: tuple[Change, ...], current: Mapping[str, str]) -> str | None:
    """Why a campaign stating ``changes`` does not fit a vehicle whose set is ``current`` (None: it fits)."""
    for regulation, before, _ in changes:
        if regulation not in current:
            return f"RXSWIN: the vehicle has no approval under {regulation} (it has {', '.join(current) or 'none'})"
        if current[regulation] != before:
            return (f"RXSWIN: {regulation} is {current[regulation]!r} on this vehicle; the campaign was made for "
                    f"{before!r}")
    return None


def encode_did(values: Mapping[str, str]) -> bytes:
    out = bytearray((len(values),))
    for regulation, value in values.items():
        for text in (regulation, value):
            raw = text.encode("ascii")
            out += bytes((len(raw),)) + raw
    return bytes(out)


def decode_did(data: bytes) -> dict[str, str]:
    """The DID's value as {regulation: rxswin}; ValueError when it is not laid out as documented."""
    if not data:
        raise ValueError("empty")
    count, at, out = data[0], 1, {}
    for _ in range(count):
        texts = []
        for _ in range(2):
            if at >= len(data) or at + 1 + data[at] > len(data):
                raise ValueError("shorter than its lengths say")
            texts.append(data[at + 1:at + 1 + data[at]].decode("ascii"))
            at += 1 + data[at]
        out[texts[0]] = texts[1]
    if at != len(data):
        raise ValueError(f"{len(data) - at} bytes after the last approval")
    return out
