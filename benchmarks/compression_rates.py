#!/usr/bin/env python3
"""The compression bootloaders decode, on real binaries, against the physical bus limit.

For each real compiled binary (the C extension of two consecutive ``regex`` releases from
PyPI, and this Python's own ``_ssl`` and ``_decimal``) and each method the gateway offers
(zlib, LZMA with a 64 KiB and with Python's default 8 MiB dictionary, heatshrink LZSS with a
2 KiB and a 256-byte window): the ratio, the gateway's time to compress, the time a streaming
decoder takes fed in TransferData-sized pieces, what that decoder holds in RAM, and the
effective image rate the ratio gives on a 500 kbit/s classic CAN bus and a 500k/2M CAN FD bus
(the physical ISO-TP limit times the ratio). Then the new release flashed for real into the
simulator over an emulated classic 500 kbit/s bus, once per method and once uncompressed
(the baseline measured in the same run), and the delta-or-full choice for the release pair.

    .venv/bin/python benchmarks/compression_rates.py [--no-flash] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from flash_throughput import RELEASES, releases, run_mode  # noqa: E402

from agent.adapters.canbus import physical_goodput  # noqa: E402
from agent.protocol.compression import Params, compress, decoder_ram, decompressor  # noqa: E402
from agent.protocol.delta import make_delta  # noqa: E402

VARIANTS = [  # name, method, parameters
    ("zlib", "zlib", Params()),
    ("lzma 64K", "lzma", Params()),
    ("lzma 8M", "lzma", Params(lzma_dict_size=8 * 1024 * 1024)),
    ("lzss w11", "lzss", Params()),
    ("lzss w8", "lzss", Params(lzss_window_bits=8, lzss_lookahead_bits=4)),
]
CLASSIC = physical_goodput(8, 500_000, None)
FD = physical_goodput(64, 500_000, 2_000_000)


def binaries() -> dict[str, bytes]:
    import _decimal
    import _ssl

    old, new = releases()
    return {f"{RELEASES[0]} {RELEASES[1]}": old, f"{RELEASES[0]} {RELEASES[2]}": new,
            "_ssl": Path(_ssl.__file__).read_bytes(), "_decimal": Path(_decimal.__file__).read_bytes()}


def measure(name: str, data: bytes) -> list[dict]:
    rows = []
    for label, method, params in VARIANTS:
        t0 = time.process_time()
        packed = compress(method, data, params)
        t1 = time.process_time()
        unpack, out = decompressor(method, len(data), params), 0
        for at in range(0, len(packed), 4093):
            out += len(unpack.feed(packed[at : at + 4093], len(data) - out))
        t2 = time.process_time()
        assert out == len(data) and unpack.finished, (name, label)
        ratio = len(data) / len(packed)
        rows.append({"binary": name, "method": label, "image_kib": len(data) // 1024, "packed_kib": len(packed) // 1024,
                     "ratio": round(ratio, 2), "compress_s_per_mib": round((t1 - t0) * 2**20 / len(data), 2),
                     "decode_s_per_mib": round((t2 - t1) * 2**20 / len(data), 3),
                     "decoder_ram_bytes": decoder_ram(method, params),
                     "classic_500k_kib_s": round(CLASSIC * ratio / 1024, 1), "fd_500k_2m_kib_s": round(FD * ratio / 1024, 1)})
    return rows


def flashes(work: Path) -> list[dict]:
    """The new release flashed for real (classic, emulated 500 kbit/s): uncompressed, then per method."""
    old, new = releases()
    rows = []
    for method in (None, "zlib", "lzma", "lzss"):
        row = run_mode(f"classic @500k {method or 'none'}", 8, "500000", 4095, len(new), work, method, image=new)
        rows.append({k: row[k] for k in ("mode", "image_kib", "on_bus_kib", "transfer_s", "goodput_kib_s", "of_physical",
                                          "gateway_cpu_s_per_mib")})
    patch = make_delta(old, new)
    rows.append({"mode": "delta or full", "patch_kib": len(patch) // 1024,
                 "lzma_64k_full_kib": len(compress("lzma", new)) // 1024,
                 "goes": "delta" if len(patch) < len(compress("lzma", new)) else "full"})
    return rows


def table(rows: list[dict]) -> str:
    head = list(rows[0])
    widths = [max(len(h), *(len(str(r.get(h, ""))) for r in rows)) for h in head]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines += ["  ".join(str(r.get(h, "")).ljust(w) for h, w in zip(head, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-flash", action="store_true", help="the ratios only, no flash over the emulated bus")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args()
    ratios = [row for name, data in binaries().items() for row in measure(name, data)]
    flashed = []
    if not args.no_flash:
        with tempfile.TemporaryDirectory(prefix="vota-bench-") as tmp:
            flashed = flashes(Path(tmp))
    if args.json:
        print(json.dumps({"physical_kib_s": {"classic_500k": round(CLASSIC / 1024, 1), "fd_500k_2m": round(FD / 1024, 1)},
                          "ratios": ratios, "flashes": flashed}, indent=2))
        return
    print(f"physical ISO-TP limit: classic 500k {CLASSIC / 1024:.1f} KiB/s, FD 500k/2M {FD / 1024:.1f} KiB/s\n")
    print(table(ratios))
    if flashed:
        print()
        print(table([r for r in flashed if "transfer_s" in r]))
        print()
        print(table([r for r in flashed if "transfer_s" not in r]))


if __name__ == "__main__":
    main()
