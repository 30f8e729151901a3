"""The fleet tables on disk (cloud_sim/fleet.py): JSON Lines, appended run by run, and the same
rows as Parquet with a fixed schema (pyarrow, the ``fleet`` extra), rewritten atomically.

JSON Lines is the record: a run appends its new rows and fsyncs them before ``done.json``
says they are done, so a run killed in between only appends a row twice, and every reader
keeps the last row of a (vehicle, campaign). Parquet is derived from it on every run, with
typed columns (times as UTC timestamps, NRC and packet as integers) for DuckDB, pandas,
Spark and the like.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any

from agent.adapters.storage import atomic_write_bytes

__all__ = ["COLUMNS", "append_rows", "read_rows", "write_parquet", "parquet_available"]

_S, _T, _I16, _I32, _F = "string", "timestamp", "int16", "int32", "float64"
COLUMNS: dict[str, list[tuple[str, str]]] = {
    "findings": [
        ("vin", _S), ("campaign_id", _S), ("started_at", _T), ("finished_at", _T), ("failure_stage", _S), ("failure_reason", _S),
        ("stage", _S), ("cause", _S), ("side", _S), ("unit", _S), ("package", _S), ("step", _S), ("request", _S),
        ("nrc", _I16), ("nrc_name", _S), ("packet", _I32), ("software_before", _S), ("software_after", _S),
        ("part_number", _S), ("supplier_software", _S), ("findings", _I32),
    ],
    "campaigns": [
        ("vin", _S), ("campaign_id", _S), ("outcome", _S), ("started_at", _T), ("finished_at", _T), ("failure_stage", _S),
        ("failure_reason", _S), ("deferrals", _I32), ("deferred_by", _S), ("first_deferred_at", _T), ("waited_s", _F),
    ],
}
COLUMNS["waiting"] = COLUMNS["campaigns"]


def parquet_available() -> bool:
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        return False
    return True


def append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append rows to a JSON Lines table, on disk before this returns."""
    with open(path, "a", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_rows(path: Path) -> list[dict[str, Any]]:
    """A JSON Lines table, the last row of each (vehicle, campaign) kept; a line cut by a kill
    (the last one) is left out."""
    rows: dict[tuple[Any, Any], dict[str, Any]] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows[(row.get("vin"), row.get("campaign_id"))] = row
    return list(rows.values())


def _time(value: Any) -> _dt.datetime | None:
    try:
        return _dt.datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def write_parquet(path: Path, kind: str, rows: list[dict[str, Any]]) -> None:
    """``rows`` as a Parquet file with the ``kind`` table's schema, written atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = {_S: pa.string(), _T: pa.timestamp("s", tz="UTC"), _I16: pa.int16(), _I32: pa.int32(), _F: pa.float64()}
    convert = {_S: lambda v: None if v is None else str(v), _T: _time, _I16: _int, _I32: _int,
               _F: lambda v: float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None}
    columns = COLUMNS[kind]
    arrays = [pa.array([convert[t](row.get(name)) for row in rows], type=types[t]) for name, t in columns]
    table = pa.Table.from_arrays(arrays, schema=pa.schema([(name, types[t]) for name, t in columns]))
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    atomic_write_bytes(path, sink.getvalue().to_pybytes())
