"""``vota fleet diagnose``: fleet failure analytics (cloud_sim/fleet.py)."""

from __future__ import annotations

import argparse

from agent.errors import UsageError


def cmd_fleet(args: argparse.Namespace) -> int:
    from agent.adapters.storage import writable_dir
    from cloud_sim.fleet import fleet_diagnose

    if args.workers < 0:
        raise UsageError("--workers must be 0 (every core) or more")
    writable_dir(args.out, "--out")
    figures = fleet_diagnose(args.store, args.out, args.workers or None, args.dask)
    tables = "findings, campaigns, waiting (.jsonl" + (", .parquet)" if figures["parquet"] else
                                                      "; no Parquet: pip install 'vota[fleet]' for pyarrow)")
    print(f"fleet: {figures['vehicles']} vehicles, {figures['new_failures']} new failed campaigns diagnosed "
          f"({figures['failures']} failed of {figures['campaigns']} finished, {figures['waiting']} waiting) on "
          f"{figures['workers']} {'Dask ' if args.dask else ''}workers; {args.out}/summary.md, summary.html; {tables}")
    return 0
