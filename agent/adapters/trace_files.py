"""Traces on disk: read one (any defect named with the file) and write one atomically."""

from __future__ import annotations

from pathlib import Path

from agent.adapters.storage import atomic_write_text
from agent.core.trace import Trace, TraceRecorder, parse_trace
from agent.errors import TraceFormatError

__all__ = ["read_trace", "write_trace"]


def read_trace(path: str | Path) -> Trace:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceFormatError(f"{path}: cannot read trace ({exc})") from None
    return parse_trace(text, str(path))


def write_trace(path: str | Path, recorder: TraceRecorder, result: str | None = None) -> int:
    """Write what ``recorder`` holds (with the end line when ``result`` is given); its size in bytes."""
    text = recorder.trace(result).to_text()
    atomic_write_text(path, text)
    return len(text.encode())
