"""Fleet failure analytics (``vota fleet diagnose``): every failed campaign of every vehicle in a
cloud store diagnosed, on every core or on a Dask cluster, into tables and a fleet summary.

A store is the collector's (``<store>/<vin>/messages/...``, ``<store>/<vin>/traces/``); any
tree that holds such directories (bench outputs, several stores) is walked for them. Vehicles
go in batches to a process pool (the rules are loaded once per worker) or, given a scheduler
address (or ``local``), to ``dask.distributed`` workers. The rows (cloud_sim/fleet_rows.py)
land in ``findings``, ``campaigns`` and ``waiting`` tables (JSON Lines and Parquet,
cloud_sim/fleet_table.py), the summary in ``summary.md`` and ``summary.html``
(cloud_sim/fleet_report.py); ``done.json`` remembers the finished campaigns tabled, so a
second run diagnoses only what is new and the summary covers them all.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

from agent.adapters.storage import atomic_write_bytes, atomic_write_json
from agent.errors import UsageError, VotaError
from cloud_sim.fleet_report import summary_html, summary_markdown
from cloud_sim.fleet_rows import vehicle_rows
from cloud_sim.fleet_table import append_rows, parquet_available, read_rows, write_parquet

__all__ = ["fleet_diagnose", "find_vehicles", "diagnose_batch", "vehicle_rows"]

Task = tuple[str, list[str]]  # a vehicle's directory, the campaigns an earlier run tabled
Rows = dict[str, list[dict[str, Any]]]
KINDS = ("findings", "campaigns", "waiting")


def find_vehicles(root: Path) -> Iterator[Path]:
    """Every directory under ``root`` with a ``messages`` directory (a vehicle of a store), in
    name order; a vehicle's own directory is not searched further."""
    try:
        children = sorted((e for e in os.scandir(root) if e.is_dir(follow_symlinks=False)), key=lambda e: e.name)
    except OSError:
        return
    for entry in children:
        path = Path(entry.path)
        if (path / "messages").is_dir():
            yield path
        elif entry.name not in ("messages", "traces", "diagnosis"):
            yield from find_vehicles(path)


def diagnose_batch(tasks: list[Task]) -> Rows:
    """The rows of a batch of vehicles (one unit of work for a pool or a Dask worker)."""
    out: Rows = {kind: [] for kind in KINDS}
    for vehicle, skip in tasks:
        for kind, rows in vehicle_rows(Path(vehicle), frozenset(skip)).items():
            out[kind].extend(rows)
    return out


def _batches(tasks: list[Task], workers: int) -> list[list[Task]]:
    size = max(1, min(64, len(tasks) // (workers * 8) or 1))
    return [tasks[i : i + size] for i in range(0, len(tasks), size)]


def _pool(batches: list[list[Task]], workers: int) -> list[Rows]:
    if workers == 1:
        return [diagnose_batch(b) for b in batches]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(diagnose_batch, batches))


def _dask(batches: list[list[Task]], scheduler: str, workers: int) -> tuple[list[Rows], int]:
    """The batches on a Dask cluster: ``local`` starts a LocalCluster of ``workers`` processes
    here, anything else is a scheduler's address (its workers need vota installed)."""
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise UsageError("--dask needs dask.distributed: pip install 'vota[fleet]'") from None
    logging.getLogger("distributed").setLevel(logging.WARNING)
    cluster = None
    try:
        if scheduler == "local":
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0",
                                   silence_logs=logging.WARNING)
            client = Client(cluster)
        else:
            client = Client(scheduler, timeout=15)
    except (OSError, TimeoutError) as exc:
        raise VotaError(f"--dask {scheduler}: cannot reach the scheduler ({exc})") from None
    try:
        cores = sum(client.nthreads().values())
        return client.gather(client.map(diagnose_batch, batches, pure=False)), cores
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def fleet_diagnose(store: str | Path, out: str | Path, workers: int | None = None, dask: str | None = None,
                   progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Diagnose what is new under ``store`` into ``out``; the figures of this run."""
    root, target = Path(store), Path(out)
    if not root.is_dir():
        raise UsageError(f"{root}: not a cloud store (a directory of <VIN>/messages/)")
    vehicles = list(find_vehicles(root))
    target.mkdir(parents=True, exist_ok=True)
    done_path = target / "done.json"
    try:
        done: dict[str, list[str]] = json.loads(done_path.read_text())
        if not isinstance(done, dict):
            done = {}
    except (OSError, ValueError):
        done = {}
    tasks = [(str(v), list(done.get(v.name, []))) for v in vehicles]  # by VIN: one VIN in several trees is one vehicle
    workers = max(1, workers or os.cpu_count() or 1)
    batches = _batches(tasks, workers)
    if dask is not None:
        found, workers = _dask(batches, dask, workers)
    else:
        found = _pool(batches, workers)
    new: Rows = {kind: [row for rows in found for row in rows[kind]] for kind in KINDS}
    for kind in ("findings", "campaigns"):  # the record first, then what it covers
        append_rows(target / f"{kind}.jsonl", new[kind])
    atomic_write_bytes(target / "waiting.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in new["waiting"]).encode())
    for row in new["campaigns"]:
        done.setdefault(row["vin"], []).append(row["campaign_id"])
    atomic_write_json(done_path, done)
    tables = {kind: read_rows(target / f"{kind}.jsonl") for kind in KINDS}
    parquet = parquet_available()
    if parquet:
        for kind, rows in tables.items():
            write_parquet(target / f"{kind}.parquet", kind, rows)
    atomic_write_bytes(target / "summary.md", summary_markdown(tables, len(vehicles)).encode())
    atomic_write_bytes(target / "summary.html", summary_html(tables, len(vehicles)).encode())
    return {"vehicles": len(vehicles), "new_failures": len(new["findings"]), "failures": len(tables["findings"]),
            "campaigns": len(tables["campaigns"]), "waiting": len(tables["waiting"]), "workers": workers,
            "parquet": parquet}
