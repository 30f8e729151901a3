"""``vota bench``: a simulated vehicle on one machine.

One ECU simulator process per ECU, a gateway process that flashes them, a result table
and a report directory (``report.json``, per-ECU results and traces, ECU logs).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from agent.config import load_vehicle_config
from agent.errors import VotaError
from agent.faults import parse_fault
from agent.storage import atomic_write_json

__all__ = ["run_bench", "make_image", "EcuProcesses"]


def make_image(ecu: str, version: str, size: int) -> bytes:
    """A deterministic pseudo-random image per ECU and version (incompressible, like code)."""
    seed = int.from_bytes(hashlib.sha256(f"{ecu}/{version}".encode()).digest()[:8], "big")
    return random.Random(seed).randbytes(size)


class EcuProcesses:
    """Starts ``vota ecu-sim`` processes, one per ECU, and stops them for sure."""

    def __init__(self, config_path: str, names: list[str], state_dir: Path, log_dir: Path, faults: list[str]) -> None:
        self.config_path, self.names = config_path, names
        self.state_dir, self.log_dir, self.faults = state_dir, log_dir, faults
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def __enter__(self) -> "EcuProcesses":
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for name in self.names:
            cmd = [sys.executable, "-m", "agent.cli", "ecu-sim", "-c", self.config_path, "--ecu", name,
                   "--state-dir", str(self.state_dir), "-v"]
            for f in self.faults:
                cmd += ["--fault", f]
            log = open(self.log_dir / f"ecu-{name}.log", "wb")
            self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=os.getcwd())
            log.close()
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def dead(self) -> list[str]:
        return [n for n, p in self.procs.items() if p.poll() is not None]


def run_bench(args: argparse.Namespace) -> int:
    from agent.cli import format_flash_table
    from gateway.inventory import collect_versions, wait_reachable

    config = load_vehicle_config(args.config)
    names = args.ecu or list(config.ecus)
    for n in names:
        config.ecu(n)
    for f in args.fault:
        parse_fault(f)
    out = Path(args.out)
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    flash_dir = out / "flash"
    started = time.time()
    print(f"bench: {len(names)} ECU simulator processes on {len({config.ecu(n).segment for n in names})} segment(s), "
          f"{args.image_size // 1024} KiB images", flush=True)
    with EcuProcesses(args.config, names, out / "ecu_state", out / "logs", args.fault) as sims:
        missing = wait_reachable(config, names, timeout=20.0)
        if missing or sims.dead():
            raise VotaError(f"ECU simulators did not come up: {', '.join(missing or sims.dead())} (see {out / 'logs'})")
        before = collect_versions(config, names)
        jobs = []
        for name in names:
            path = images_dir / f"{name}-{args.image_version}.bin"
            path.write_bytes(make_image(name, args.image_version, args.image_size))
            jobs.append(f"{name}={path}@{args.image_version}")
        cmd = [sys.executable, "-m", "agent.cli", "flash", "-c", args.config, "--out", str(flash_dir), "--json", *jobs]
        if args.verbose:
            cmd.append("-" + "v" * args.verbose)
        gateway = subprocess.run(cmd, stdout=subprocess.PIPE)
        if gateway.returncode not in (0, 3):
            raise VotaError(f"the gateway flash process failed with exit code {gateway.returncode}")
        results: list[dict[str, Any]] = json.loads(gateway.stdout)
        after = collect_versions(config, names)
    report = {
        "schema": "vota-bench-report/1",
        "started": started,
        "duration_s": round(time.time() - started, 3),
        "config": args.config,
        "image_size": args.image_size,
        "faults": args.fault,
        "inventory_before": before,
        "inventory_after": after,
        "flash": results,
        "result": "success" if all(r["result"] == "success" for r in results) else "failed",
    }
    atomic_write_json(out / "report.json", report)
    print(format_flash_table(results))
    print(f"bench {report['result']} in {report['duration_s']:.1f} s; report: {out / 'report.json'}")
    return 0 if report["result"] == "success" else 3
