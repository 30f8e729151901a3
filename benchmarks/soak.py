#!/usr/bin/env python3
"""Months of campaigns in minutes: one simulated vehicle (the bench's processes: broker, ECU
simulators, gateway, TBOX, the stand-in cloud) runs N campaigns one after another, each a new
version for every ECU; after each, the disk its boxes use and the resident memory of the
gateway and the TBOX are printed. With retention (tbox.keep_campaigns, gateway.keep_results)
the disk goes flat once the kept number of campaigns is reached; without it, it grows linearly.

    .venv/bin/python benchmarks/soak.py [--campaigns 50] [--image-size 96K] [--out out/soak]
                                        [--keep 20]

The baseline in the same run is the first campaigns' figures: disk and memory are compared with
them, not with absolute numbers (these shared machines vary from run to run).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from vota.bench import Processes, _cloud, _start_vehicle, make_image  # noqa: E402
from vota.bench.broker import start_broker  # noqa: E402


def du(path: Path) -> int:
    total = 0
    for base, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(base, name)).st_blocks * 512
            except OSError:
                continue
    return total


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--campaigns", type=int, default=50)
    p.add_argument("--image-size", default="96K")
    p.add_argument("--keep", type=int, default=20, help="tbox.keep_campaigns and gateway.keep_results")
    p.add_argument("--out", default="out/soak")
    args = p.parse_args()
    size = int(args.image_size.rstrip("Kk")) * 1024 if args.image_size[-1] in "Kk" else int(args.image_size)
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    config = yaml.safe_load((ROOT / "configs" / "bench.yaml").read_text())
    config["tbox"]["keep_campaigns"] = args.keep
    config.setdefault("gateway", {})["keep_results"] = args.keep
    (out / "source.yaml").write_text(yaml.safe_dump(config))
    from cloud_sim.cloud import make_campaign, publish

    procs = Processes(out / "logs")
    bench = argparse.Namespace(config=str(out / "source.yaml"), broker=None, mqtt_version="5")
    vin = config["tbox"]["vin"]
    cloud = None
    try:
        broker = start_broker(bench, out, procs, vin)
        key, cloud, runtime = _cloud(bench, out, vin, broker)
        names = list(config["ecus"])
        _start_vehicle(procs, runtime, names, [], [])
        print(f"{args.campaigns} campaigns of {len(names)} x {size // 1024} KiB, keeping {args.keep}")
        print(f"{'#':>3} {'outcome':8} {'s':>5} {'TBOX MiB':>9} {'GW MiB':>7} {'TBOX RSS':>9} {'GW RSS':>7}")
        rows = []
        for n in range(1, args.campaigns + 1):
            version = f"2.{n}.0"
            packages = []
            for name in names:
                path = out / "cloud" / "packages" / f"{name}-{version}.bin"
                path.write_bytes(make_image(name, version, size))
                packages.append((name, path, version))
            cid = f"soak-{n:03d}"
            began = time.monotonic()
            publish(broker.cloud, vin, "campaign", make_campaign(vin=vin, packages=packages, base_url=cloud.base_url,
                                                                 key=key, campaign_id=cid), broker.mqtt_version)
            while cloud.finished(vin, cid) is None:
                if time.monotonic() - began > 600:
                    raise SystemExit(f"{cid} did not finish within 600 s")
                time.sleep(0.2)
            for name in names:  # the cloud's own copy is not the vehicle's disk
                (out / "cloud" / "packages" / f"{name}-{version}.bin").unlink()
            time.sleep(1.5)  # the TBOX tidies at its next step
            row = (n, cloud.finished(vin, cid)["outcome"], time.monotonic() - began, du(out / "tbox") / 2**20,
                   du(out / "gateway") / 2**20, rss_kib(procs.procs["tbox"].pid) / 1024,
                   rss_kib(procs.procs["gateway"].pid) / 1024)
            rows.append(row)
            print(f"{row[0]:>3} {row[1]:8} {row[2]:5.1f} {row[3]:9.2f} {row[4]:7.2f} {row[5]:8.1f}M {row[6]:6.1f}M", flush=True)
        head, tail = rows[: min(5, len(rows))], rows[-min(5, len(rows)):]

        def mean(rs: list[tuple], i: int) -> float:  # type: ignore[type-arg]
            return sum(r[i] for r in rs) / len(rs)

        print(f"disk per box, first {len(head)} vs last {len(tail)} campaigns: TBOX {mean(head, 3):.2f} -> "
              f"{mean(tail, 3):.2f} MiB, gateway {mean(head, 4):.2f} -> {mean(tail, 4):.2f} MiB")
        print(f"resident memory: TBOX {mean(head, 5):.0f} -> {mean(tail, 5):.0f} MiB, gateway {mean(head, 6):.0f} -> "
              f"{mean(tail, 6):.0f} MiB; failed campaigns: {sum(1 for r in rows if r[1] != 'success')}")
    finally:
        procs.stop()
        if cloud is not None:
            cloud.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
