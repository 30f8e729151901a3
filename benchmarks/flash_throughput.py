#!/usr/bin/env python3
"""UDS flash throughput between separate processes, and the header-only trace size.

Starts one ``vota ecu-sim`` process and runs ``vota flash`` (the gateway) against it over
python-can's udp_multicast, for classic CAN framing and CAN FD framing, without and with
bus-timing emulation. Prints, per run: TransferData goodput in KiB/s, CAN frames/s
(counted from the ISO-TP framing of what was sent), the trace size per MiB flashed and,
with emulation, the goodput as a fraction of the physical ISO-TP limit; and the CPU time
the gateway process spent per MiB flashed.

    .venv/bin/python benchmarks/flash_throughput.py [--size 1M] [--emulated-size 1M] [--runs 1] [--mode NAME]
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

MODES = [
    # name, tx_data_length, bitrate, the ECU's maxNumberOfBlockLength (16 KiB on CAN FD, as
    # FD bootloaders commonly use; "fd 4K blocks" shows what the per-block round trip costs)
    ("classic", 8, None, 4095),
    ("fd", 64, None, 0x4002),
    ("fd 4K blocks", 64, None, 4095),
    ("classic @500k", 8, "500000", 4095),
    ("fd @500k/2M", 64, "500000/2000000", 0x4002),
]
# compressed transfer (RequestDownload's dataFormatIdentifier) of a firmware-like image: a real
# compiled binary, PyYAML's C extension as pip installed it, repeated to the image size
COMPRESSED = [
    ("classic @500k zlib", 8, "500000", 4095, "zlib"),
    ("classic @500k lzma", 8, "500000", 4095, "lzma"),
    ("fd @500k/2M zlib", 64, "500000/2000000", 0x4002, "zlib"),
    # delta images: the ECU runs one release of a real compiled binary, the new one goes as a
    # detools patch (agent/protocol/delta.py); the two releases are fetched from PyPI once
    ("classic @500k delta", 8, "500000", 4095, "delta"),
    ("fd @500k/2M delta", 64, "500000/2000000", 0x4002, "delta"),
]
# two consecutive releases of a compiled package: the C extension of ``regex`` as its wheels
# for CPython 3.11 on x86-64 Linux carry it
RELEASES = ("regex", "2024.5.10", "2024.5.15")
CACHE = ROOT / "out" / "bench-cache"


def releases() -> tuple[bytes, bytes]:
    """The old and the new release's binary (downloaded with pip once, then from the cache)."""
    import zipfile

    package, *versions = RELEASES
    found = []
    for version in versions:
        directory = CACHE / f"{package}-{version}"
        wheels = sorted(directory.glob("*.whl")) if directory.exists() else []
        if not wheels:
            run = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                                  "--python-version", "3.11", "--platform", "manylinux_2_17_x86_64",
                                  f"{package}=={version}", "-d", str(directory)], capture_output=True, text=True)
            wheels = sorted(directory.glob("*.whl"))
            if run.returncode != 0 or not wheels:
                raise SystemExit(f"the delta modes need {package} {version} from PyPI: {run.stderr.strip()[-300:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            name = next(n for n in wheel.namelist() if n.endswith(".so"))
            found.append(wheel.read(name))
    return found[0], found[1]


def _runs(state: Path, image: bytes) -> None:
    """The simulated ECU runs ``image``, as a finished flash leaves it (written, checked, active)."""
    import hashlib

    from ecu_sim.flash_banks import FlashBanks

    banks = FlashBanks(state / "ecu", "1.0.0")
    banks.erase()
    banks.begin_write(len(image))
    banks.write(0, image)
    banks.finish_write(len(image))
    banks.pending_version = RELEASES[1]
    assert banks.check("sha256", hashlib.sha256(image).digest()) and banks.check_dependencies()
    assert banks.activate_if_ready()


def firmware_like(size: int) -> bytes:
    import yaml._yaml as compiled  # noqa: PLC0415 - the binary is the point, not the module

    data = Path(compiled.__file__).read_bytes()
    return (data * (size // len(data) + 1))[:size]


def _size(text: str) -> int:
    text = text.lower()
    mult = {"k": 1024, "m": 1024 * 1024}.get(text[-1], 1)
    return int(float(text.rstrip("km")) * mult)


def frames_for(request_len: int, dl: int) -> int:
    """CAN frames ISO-TP needs for one request (blocksize 0: one flow control frame)."""
    sf_room = 7 if dl == 8 else dl - 2
    if request_len <= sf_room:
        return 1
    ff_room = dl - 2 if request_len <= 4095 else dl - 6
    rest = request_len - ff_room
    return 1 + 1 + -(-rest // (dl - 1))  # first frame + flow control + consecutive frames


def run_mode(name: str, dl: int, bitrate: str | None, block: int, size: int, work: Path, method: str | None = None,
             firmware: bool = False, image: bytes | None = None) -> dict:
    """One flash of ``size`` bytes (``image``: these bytes instead of a made-up image)."""
    rng = random.Random()
    bus = {"interface": "udp_multicast", "channel": f"239.{rng.randint(64, 250)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
           "port": rng.randint(20000, 60000), "fd": dl > 8}
    segment = {"bus": bus, "tx_data_length": dl}
    if bitrate:
        segment["bitrate"] = bitrate
    config = {"segments": {"bench": segment},
              "ecus": {"ecu": {"segment": "bench", "request_id": 0x7E0, "response_id": 0x7E8, "security_secret": "s",
                               "memory": {"address": 0, "size": 16 * 1024 * 1024},
                               "sim": {"max_block_length": block, "erase_ms": 100, "check_ms": 10, "reset_ms": 100}}}}
    flash_args = []
    kind = "firmware" if method or firmware else "random"
    given, image = image, work / "image.bin"
    if method == "delta":
        old, new = releases()
        config["ecus"]["ecu"]["delta"] = 13
        size, kind = len(new), f"{RELEASES[0]} {RELEASES[1]} -> {RELEASES[2]}"
        image.write_bytes(new)
        (work / "old.bin").write_bytes(old)
        _runs(work / "state", old)
        flash_args = [f"--delta-from=ecu={work / 'old.bin'}"]
    else:
        if method:
            config["ecus"]["ecu"]["compression"] = {method: 1}
        if given is not None:
            kind = "given"
        image.write_bytes(given if given is not None else firmware_like(size) if method or firmware else os.urandom(size))
    cfg = work / f"{name.replace(' ', '_').replace('/', '_')}.yaml"
    cfg.write_text(yaml.safe_dump(config))
    sim = subprocess.Popen([sys.executable, "-m", "vota", "ecu-sim", "-c", str(cfg), "--state-dir", str(work / "state")],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        assert sim.stdout is not None
        sim.stdout.readline()  # "ecu-sim ready"
        out = work / f"out-{time.monotonic_ns()}"
        t0 = time.monotonic()
        cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        run = subprocess.run([sys.executable, "-m", "vota", "flash", "-c", str(cfg), "--out", str(out), "--json",
                              "--no-progress", f"ecu={image}@{time.monotonic_ns()}", *flash_args], capture_output=True,
                             text=True, cwd=ROOT)
        wall = time.monotonic() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    finally:
        sim.terminate()
        sim.wait()
    if run.returncode != 0:
        raise SystemExit(f"{name}: flash failed: {run.stdout} {run.stderr}")
    result = json.loads(run.stdout)[0]
    if method and result["compression"] != method:
        raise SystemExit(f"{name}: the image went as {result['compression']}, not {method}: {result}")
    trace = read_trace(out / "ecu.trace.jsonl")
    transfers = [e for e in trace.exchanges if e.service == 0x36]
    seconds = (transfers[-1].t + transfers[-1].dt - transfers[0].t) / 1000.0
    frames = sum(frames_for(e.length, dl) + 1 for e in transfers)  # + the response frame
    on_bus = result["bytes_transferred"]
    goodput = size / seconds  # image bytes (decompressed) per second of transfer
    row = {
        "mode": name,
        "image": kind,
        "image_kib": size // 1024,
        "on_bus_kib": on_bus // 1024,
        "transfer_s": round(seconds, 2),
        "goodput_kib_s": round(goodput / 1024, 1),
        "frames_per_s": round(frames / seconds),
        "flash_s": result["duration_s"],
        "wall_s": round(wall, 1),
        # the gateway process's CPU (user + system) for the whole flash, per MiB of image
        "gateway_cpu_s_per_mib": round((cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime)
                                       * 1024 * 1024 / size, 1),
        "trace_bytes_per_mib": round(result["trace_bytes"] * 1024 * 1024 / size),
        "trace_percent": round(100 * result["trace_fraction"], 3),
    }
    if bitrate:
        nominal, _, data = bitrate.partition("/")
        limit = physical_goodput(dl, int(nominal), int(data) if data else None)
        row["physical_kib_s"] = round(limit / 1024, 1)
        row["of_physical"] = f"{100 * goodput / limit:.1f} %"  # above 100 %: fewer bytes on the bus than the image
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1M", help="image size without emulation (default 1M)")
    parser.add_argument("--emulated-size", default="1M", help="image size with bus-timing emulation (default 1M)")
    parser.add_argument("--runs", type=int, default=1, help="runs per mode (default 1)")
    parser.add_argument("--mode", action="append", help="only these modes (classic, fd, 'fd 4K blocks', 'classic @500k', "
                        "'fd @500k/2M', 'classic @500k zlib', 'classic @500k lzma', 'fd @500k/2M zlib', 'classic @500k delta', "
                        "'fd @500k/2M delta')")
    parser.add_argument("--json", action="store_true", help="print JSON rows")
    parser.add_argument("--image", choices=("random", "firmware"), default="random",
                        help="image of the uncompressed modes (compressed ones always use the firmware-like image)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="vota-bench-") as tmp:
        for name, dl, bitrate, block, method in [(*m, None) for m in MODES] + COMPRESSED:
            if args.mode and name not in args.mode:
                continue
            size = _size(args.emulated_size if bitrate else args.size)
            for _ in range(args.runs):
                rows.append(run_mode(name, dl, bitrate, block, size, Path(tmp), method, args.image == "firmware"))
                if not args.json:
                    print(json.dumps(rows[-1]), flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    head = ["mode", "image", "image_kib", "on_bus_kib", "transfer_s", "goodput_kib_s", "frames_per_s", "trace_bytes_per_mib",
            "trace_percent", "physical_kib_s", "of_physical", "gateway_cpu_s_per_mib"]
    widths = [max(len(h), *(len(str(r.get(h, ""))) for r in rows)) for h in head]
    print()
    print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    for r in rows:
        print("  ".join(str(r.get(h, "")).ljust(w) for h, w in zip(head, widths, strict=True)))


if __name__ == "__main__":
    main()
