#!/usr/bin/env python3
"""Fleet diagnosis throughput: vehicles diagnosed per second, per core, with 1, 2 and every core
and on a Dask LocalCluster, against the same library in this one process (the baseline).

1. Template campaigns: ``vota bench`` runs on the simulated vehicle, one clean and one per
   fault drawn at random from every stage (flash server and client, deploy server and client,
   the link, the commit), each with its collector store.
2. A synthetic fleet (cloud_sim/fleet_synth.py): ``--vehicles`` vehicles drawn from those
   campaigns (``--failed`` of them failed), spread over two campaigns and 14 days.
3. The baseline: ``vehicle_rows`` over every vehicle here, in one process (files read from the
   page cache, as in every run after it).
4. ``vota fleet diagnose`` as a command (start-up and writing the tables included) with
   ``--workers 1``, ``2``, every core, and ``--dask local``; wall time, vehicles/s, vehicles/s
   per worker against the baseline, the largest resident set of any of its processes.

    .venv/bin/python benchmarks/fleet.py [--vehicles 10000] [--failed 0.3] [--faults 6] [--seed 1]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cloud_sim.fleet import find_vehicles  # noqa: E402
from cloud_sim.fleet_rows import vehicle_rows  # noqa: E402
from cloud_sim.fleet_synth import finished_campaigns, make_fleet  # noqa: E402

VOTA = str(Path(sys.executable).parent / "vota")
# where a fault can hit, by stage ({e}: an ECU, {n}: a TransferData block)
FAULTS = ["{e}:36#{n}:nrc=0x72", "{e}:34:drop", "{e}:37:malformed", "{e}:36#{n}:delay=1500", "{e}:31#5:nrc=0x22",
          "{e}:36#{n}:skip_counter", "{e}:34:bad_length", "deploy:GW:36#{n}+:nrc=0x72", "deploy:GW:37+:drop",
          "deploy:TBOX:36#{n}+:not_sent", "deploy:GW:31#3+:nrc=0x22"]
ECUS = ["vcu", "bms", "bcm", "dlp_headlamp"]


def templates(work: Path, faults: int, rnd: random.Random) -> dict[str, tuple[Path, str]]:
    """A clean bench run and ``faults`` failed ones; name -> (vehicle store, campaign)."""
    specs = [""] + [rnd.choice(FAULTS).format(e=rnd.choice(ECUS), n=rnd.randint(2, 4)) for _ in range(faults)]
    out = {}
    for i, spec in enumerate(specs):
        run = work / f"bench-{i}"
        args = [VOTA, "bench", "--out", str(run), "--image-size", "16K", "--timeout", "300"]
        done = subprocess.run(args + (["--fault", spec] if spec else []), capture_output=True, text=True)
        if not (run / "report.json").exists():
            print(f"template {i}: {spec}: no campaign ({done.stderr.strip()[-300:]})", file=sys.stderr)
            continue
        (vehicle,) = list(find_vehicles(run / "cloud" / "store"))
        outcome = json.loads((run / "report.json").read_text())["outcome"]
        print(f"template {i}: {spec or 'clean'}: {outcome} (exit {done.returncode})", file=sys.stderr)
        out[f"{'ok' if outcome == 'success' else 'failed'}-{i}"] = (vehicle, finished_campaigns(vehicle)[-1])
    return out


def command(store: Path, out: Path, *extra: str) -> dict[str, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    run = subprocess.run([VOTA, "fleet", "diagnose", str(store), "--out", str(out), *extra], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if run.returncode:
        raise SystemExit(f"vota fleet diagnose {' '.join(extra)}: {run.stderr.strip()}")
    rss = max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return {"wall_s": round(wall, 2), "max_rss_mib": round(rss / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vehicles", type=int, default=10_000)
    parser.add_argument("--failed", type=float, default=0.3, help="share of vehicles whose campaign failed")
    parser.add_argument("--faults", type=int, default=6, help="failed template campaigns (random faults)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--work", default=None, help="working directory (default: a temporary one, removed)")
    args = parser.parse_args()
    rnd = random.Random(args.seed)
    work = Path(args.work or tempfile.mkdtemp(prefix="vota-fleet-"))
    try:
        found = templates(work, args.faults, rnd)
        failed = [n for n in found if n.startswith("failed")]
        weights = {n: (args.failed / len(failed) if n in failed else (1 - args.failed) / (len(found) - len(failed)))
                   for n in found}
        t0 = time.perf_counter()
        store = work / "store"
        make_fleet(found, weights, store, args.vehicles, ["2027-01", "2027-02"], seed=args.seed)
        made = time.perf_counter() - t0
        vehicles = list(find_vehicles(store))
        t0, cpu0 = time.perf_counter(), time.process_time()
        failures = sum(len(vehicle_rows(v)["findings"]) for v in vehicles)
        base_wall, base_cpu = time.perf_counter() - t0, time.process_time() - cpu0
        base_rate = len(vehicles) / base_wall
        figures: dict[str, object] = {
            "vehicles": len(vehicles), "failed_campaigns": failures, "templates": sorted(found), "cores": os.cpu_count(),
            "fleet_made_s": round(made, 1),
            "baseline_library_one_process": {"wall_s": round(base_wall, 2), "cpu_s": round(base_cpu, 2),
                                             "vehicles_per_s": round(base_rate)},
        }
        cores = os.cpu_count() or 1
        for label, workers, extra in (("workers_1", 1, ()), ("workers_2", 2, ()), (f"workers_all_{cores}", cores, ()),
                                      ("dask_local_all", cores, ("--dask", "local"))):
            out = work / f"out-{label}"
            got = command(store, out, "--workers", str(workers), *extra)
            rate = len(vehicles) / got["wall_s"]
            figures[label] = {**got, "vehicles_per_s": round(rate), "per_worker_vs_baseline": round(rate / workers / base_rate, 2)}
            shutil.rmtree(out)
        print(json.dumps(figures, indent=2))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
