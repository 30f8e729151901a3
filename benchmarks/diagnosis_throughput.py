#!/usr/bin/env python3
"""Diagnosis throughput: trace records analysed per second on one core, parsing included.

Builds a synthetic fleet of failed flash traces (by default 1,000 vehicles x 20 ECUs, each
a 1 MiB image in 4093-byte blocks, about 280 records a trace, one ECU per vehicle failing
with a negative response near the end) as the JSON Lines text the cloud receives, then
times ``parse_trace`` + ``diagnose`` over all of it in this one process. Also times one
vehicle's verdict (its 20 traces) from text to verdict.

    .venv/bin/python benchmarks/diagnosis_throughput.py [--vehicles 1000] [--ecus 20] [--image 1M]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.adapters.diagnosis_files import load_rules  # noqa: E402
from agent.core.diagnosis import StageInput, diagnose  # noqa: E402
from agent.core.trace import parse_trace  # noqa: E402


def flash_trace(ecu: str, image: int, fail: bool) -> str:
    block = 4093
    head = {"format": "vota-trace", "version": 1, "stage": "flash", "client": "GW", "server": ecu, "packet": ecu,
            "request_id": 0x7E0, "response_id": 0x7E8, "functional_id": 0x7DF, "started": 1795300000.0}
    rows = [[0, "1003", 2, 1.1, "5003003201f4"], [2, "8502", 2, 1, "c502"], [4, "280301", 3, 1, "6803"],
            [6, "1002", 2, 1, "5002003201f4"], [8, "2701", 2, 1, "670112345678"], [10, "2702", 6, 1, "6702"],
            [12, "2ef15a", 12, 1.2, "6ef15a"], [14, "3101ff00", 13, 500.3, "7101ff0000", {"pend": [3.4]}],
            [520, f"34004408000000{image:08x}", 11, 2.1, "74200fff"]]
    t = 530.0
    blocks = -(-image // block)
    for n in range(blocks):
        counter = (n + 1) & 0xFF
        length = 2 + min(block, image - n * block)  # SID, counter and the data (the last block is short)
        if fail and n == blocks - 3:
            rows.append([round(t, 1), f"36{counter:02x}", length, 1.3, "7f3672"])
            break
        rows.append([round(t, 1), f"36{counter:02x}", length, 38.7, f"76{counter:02x}"])
        t += 40.2
    else:
        rows += [[t, "37", 1, 3, "77"], [t + 5, "31010202", 8, 104, "7101020200", {"pend": [3.1]}],
                 [t + 110, "3101ff01", 4, 1.4, "7101ff0100"], [t + 112, "1101", 2, 2, "5101", {"back": 300}],
                 [t + 420, "1003", 2, 0.9, "5003003201f4"], [t + 422, "280003", 3, 1, "6800"],
                 [t + 424, "8501", 2, 0.8, "c501"], [t + 426, "1001", 2, 0.8, "5001003201f4"]]
    lines = [json.dumps(head, separators=(",", ":"))] + [json.dumps(r, separators=(",", ":")) for r in rows]
    lines.append(json.dumps({"end": True, "exchanges": len(rows), "result": "failed" if fail else "success"}))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vehicles", type=int, default=1000)
    parser.add_argument("--ecus", type=int, default=20)
    parser.add_argument("--image", default="1M", help="image size per ECU (default 1M)")
    args = parser.parse_args()
    image = int(float(args.image.rstrip("KMkm")) * (1 << 20 if args.image[-1] in "Mm" else 1 << 10 if args.image[-1] in "Kk" else 1))
    rules = load_rules()
    ok, bad = flash_trace("ecu", image, False), flash_trace("ecu", image, True)
    # Every vehicle: 19 ECUs flashed fine, one failed. D5 analyses only the failed ECU's trace,
    # but the fleet figure below parses and checks *every* trace, the worst case.
    records_ok = ok.count("\n") - 2
    records_bad = bad.count("\n") - 2
    total_records = 0
    start = time.process_time()
    for v in range(args.vehicles):
        for e in range(args.ecus):
            text = bad if e == 0 else ok
            trace = parse_trace(text, f"v{v}.e{e}")
            diagnose([StageInput("flash", f"e{e}", {"result": "failed"}, trace)], rules, "all")
            total_records += records_bad if e == 0 else records_ok
    cpu = time.process_time() - start
    rate = total_records / cpu
    one = []
    for _ in range(20):
        t0 = time.perf_counter()
        inputs = [StageInput("flash", f"e{e}", {"result": "failed" if e == 0 else "success"},
                             parse_trace(bad if e == 0 else ok)) for e in range(args.ecus)]
        verdict = diagnose(inputs, rules, "first", "c-1")
        one.append((time.perf_counter() - t0) * 1000)
    assert verdict.cause == "negative_response"
    print(json.dumps({
        "vehicles": args.vehicles, "ecus_per_vehicle": args.ecus, "image_bytes": image,
        "records": total_records, "cpu_s": round(cpu, 2), "records_per_s_per_core": round(rate),
        "one_vehicle_verdict_ms_p50": round(statistics.median(one), 2), "one_vehicle_verdict_ms_max": round(max(one), 2),
    }, indent=2))


if __name__ == "__main__":
    main()
