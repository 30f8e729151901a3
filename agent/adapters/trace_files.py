"""Traces on disk: read one (any defect named with the file) and write one atomically."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

from agent.adapters.storage import atomic_write_json, atomic_write_text
from agent.core.trace import Trace, TraceRecorder, parse_trace
from agent.errors import TraceFormatError
from agent.protocol.link import LINK_RESULT_SCHEMA

__all__ = ["read_trace", "write_trace", "write_link_trace"]


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


def write_link_trace(directory: Path, file: str, recorder: TraceRecorder, failure: tuple[str, str, int | None] | None,
                     name: str | None = None, **extra: Any) -> Path:
    """A trace of stage ``link`` as ``<file>.link.trace.jsonl`` and its result beside it
    (``vota-link-result/1``, named ``name``, default ``file``): ``failed`` with ``failure``
    (step, reason, NRC), else ``success``. The trace's path."""
    result = "failed" if failure is not None else "success"
    path = directory / f"{file}.link.trace.jsonl"
    size = write_trace(path, recorder, result)
    header = recorder.header
    step, reason, nrc = failure if failure is not None else (None, None, None)
    atomic_write_json(directory / f"{file}.link.result.json", {
        "schema": LINK_RESULT_SCHEMA, "name": name or file, "client": header.client, "server": header.server,
        "result": result, "failed_step": step, "reason": reason, "nrc": nrc, **extra,
        "exchanges": len(recorder.exchanges),
        "started": _dt.datetime.fromtimestamp(header.started, _dt.timezone.utc).isoformat(timespec="seconds"),
        "trace_file": path.name, "trace_bytes": size})
    return path
