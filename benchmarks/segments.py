#!/usr/bin/env python3
"""Parallel segments: one gateway (`vota flash`) flashing N segments at once, each emulated
at 500 kbit/s, against one ECU simulator process per segment.

Prints, per layout (segments x ECUs per segment): the wall time of the whole flash as a ratio
to the 1-segment time measured in the same run, each segment's TransferData goodput as a
fraction of its physical ISO-TP limit, the CPU the gateway used (its worker processes
included: seconds, and as a share of one core over the wall time) and the CPU the ECU
simulators used (everything on one machine shares its cores).

    .venv/bin/python benchmarks/segments.py [--size 256K] [--layout 1x1 --layout 4x1 ...] [--workers MODE]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from agent.adapters.canbus import physical_goodput  # noqa: E402
from agent.adapters.trace_files import read_trace  # noqa: E402

LAYOUTS = ["1x1", "2x1", "4x1", "8x1", "4x2"]
BITRATE = 500000


def _size(text: str) -> int:
    text = text.lower()
    mult = {"k": 1024, "m": 1024 * 1024}.get(text[-1], 1)
    return int(float(text.rstrip("km")) * mult)


def run_layout(segments: int, per_segment: int, size: int, work: Path, workers: str | None) -> dict:
    rng = random.Random()
    config: dict = {"segments": {}, "ecus": {}, "gateway": {"results_dir": str(work / "results")}}
    if workers:
        config["gateway"]["segment_workers"] = workers
    for s in range(segments):
        bus = {"interface": "udp_multicast", "channel": f"239.{rng.randint(64, 250)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
               "port": rng.randint(20000, 60000)}
        config["segments"][f"s{s}"] = {"bus": bus, "bitrate": BITRATE}
        for e in range(per_segment):
            i = s * per_segment + e
            config["ecus"][f"e{i}"] = {"segment": f"s{s}", "request_id": 0x700 + i, "response_id": 0x780 + i,
                                       "security_secret": "s", "memory": {"address": 0, "size": 16 * 1024 * 1024},
                                       "sim": {"erase_ms": 100, "check_ms": 10, "reset_ms": 100}}
    cfg = work / f"{segments}x{per_segment}.yaml"
    cfg.write_text(yaml.safe_dump(config))
    image = work / "image.bin"
    image.write_bytes(os.urandom(size))
    sims = []
    try:
        for s in range(segments):  # one simulator process per segment, as separate ECUs would be
            names = [f"--ecu=e{s * per_segment + e}" for e in range(per_segment)]
            sims.append(subprocess.Popen([sys.executable, "-m", "vota", "ecu-sim", "-c", str(cfg), *names,
                                          "--state-dir", str(work / f"state-{segments}x{per_segment}")],
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT))
        for sim in sims:
            assert sim.stdout is not None
            sim.stdout.readline()  # "ecu-sim ready"
        out = work / f"out-{time.monotonic_ns()}"
        cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        run = subprocess.run([sys.executable, "-m", "vota", "flash", "-c", str(cfg), "--out", str(out), "--json",
                              "--no-progress", *[f"e{i}={image}@{time.monotonic_ns()}" for i in range(segments * per_segment)]],
                             capture_output=True, text=True, cwd=ROOT)
        wall = time.monotonic() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    finally:
        for sim in sims:
            sim.terminate()
            sim.wait()
    cpu2 = resource.getrusage(resource.RUSAGE_CHILDREN)  # + the simulators (started before the flash: a little more)
    if run.returncode != 0:
        raise SystemExit(f"{segments}x{per_segment}: flash failed: {run.stdout[-2000:]} {run.stderr[-2000:]}")
    limit = physical_goodput(8, BITRATE)
    fractions = []
    for s in range(segments):  # a segment's goodput: its ECUs' image bytes over the span of their transfers
        spans = []
        for e in range(per_segment):
            trace = read_trace(out / f"e{s * per_segment + e}.trace.jsonl")
            blocks = [x for x in trace.exchanges if x.service == 0x36]
            start = trace.header.started + blocks[0].t / 1000.0
            spans.append((start, trace.header.started + (blocks[-1].t + (blocks[-1].dt or 0)) / 1000.0))
        seconds = sum(end - start for start, end in spans)
        fractions.append(per_segment * size / seconds / limit)
    cpu = cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime
    return {"layout": f"{segments}x{per_segment}", "segments": segments, "ecus_per_segment": per_segment,
            "image_kib": size // 1024, "wall_s": round(wall, 1),
            "goodput_of_physical": f"{100 * min(fractions):.0f}-{100 * max(fractions):.0f} %",
            "gateway_cpu_s": round(cpu, 1), "gateway_cpu_of_one_core": f"{100 * cpu / wall:.0f} %",
            "simulators_cpu_s": round(cpu2.ru_utime - cpu1.ru_utime + cpu2.ru_stime - cpu1.ru_stime, 1),
            "cores": os.cpu_count()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="256K", help="image size per ECU (default 256K)")
    parser.add_argument("--layout", action="append", help=f"SEGMENTSxECUS (default: {' '.join(LAYOUTS)})")
    parser.add_argument("--workers", choices=("thread", "process"), help="gateway.segment_workers (default: the config's default)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    size = _size(args.size)
    layouts = args.layout or LAYOUTS
    if "1x1" not in layouts:
        layouts = ["1x1", *layouts]
    with tempfile.TemporaryDirectory(prefix="vota-segments-") as tmp:
        for layout in layouts:
            segments, _, per = layout.partition("x")
            rows.append(run_layout(int(segments), int(per or 1), size, Path(tmp), args.workers))
            rows[-1]["ratio_to_1x1"] = round(rows[-1]["wall_s"] / rows[0]["wall_s"], 2)
            if not args.json:
                print(json.dumps(rows[-1]), flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
