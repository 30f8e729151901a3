#!/usr/bin/env python3
"""The deploy link over DoIP against the CAN backbone: N packages (default 4 x 1 MiB, random,
so incompressible) deployed by the TBOX's PackageDeployer to a real gateway process (`vota
gateway`), once over a CAN backbone emulated at 500 kbit/s (udp_multicast with the bus clock),
once over DoIP on loopback TCP, in one run.

Baselines measured or computed in the same run:
- CAN: the physical ISO-TP limit of classic CAN at 500 kbit/s (consecutive frames back to back);
- DoIP: a bare stop-and-wait exchange on loopback TCP with the same block size (a block out, two
  bytes back), without UDS, DoIP or the gateway: what the machine's loopback allows such a protocol.
DoIP runs plain, over mutual TLS (port 3496's setting), and plain with a larger block.

    .venv/bin/python benchmarks/doip_deploy.py [--packages 4] [--size 1M] [--block 4095] [--doip-block 16383]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from agent.adapters.canbus import physical_goodput  # noqa: E402
from agent.adapters.config_files import load_vehicle_config  # noqa: E402
from agent.adapters.doip_client import open_deploy_link  # noqa: E402
from agent.adapters.file_client import PackageDeployer  # noqa: E402
from cloud_sim.pki import bench_pki  # noqa: E402

BITRATE = 500000


def _size(text: str) -> int:
    text = text.lower()
    mult = {"k": 1024, "m": 1024 * 1024}.get(text[-1], 1)
    return int(float(text.rstrip("km")) * mult)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(work: Path, link: str, block: int) -> Path:
    rng = random.Random()

    def bus() -> dict:
        return {"interface": "udp_multicast", "channel": f"239.{rng.randint(64, 250)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
                "port": rng.randint(20000, 60000)}

    data: dict = {
        "segments": {"bb": {"bus": bus(), "bitrate": BITRATE}, "pt": {"bus": bus()}},
        "gateway": {"results_dir": str(work / f"{link}-{block}" / "results"), "vin": "LVOTABENCHDOIP001"},
        "deploy": {"segment": "bb", "package_dir": str(work / f"{link}-{block}" / "packages"), "max_block_length": block,
                   "security_secret": "bench-deploy"},
        "ecus": {"vcu": {"segment": "pt", "request_id": 0x7E0, "response_id": 0x7E8}},
    }
    if link in ("doip", "doip-tls"):
        data["doip"] = {"address": "127.0.0.1", "port": _free_port(), "announce_to": False}
        del data["deploy"]["segment"]
        data["deploy"]["transport"] = "doip"
    if link == "doip-tls":  # mutual TLS, the bench PKI's certificates (ECDSA P-256)
        pki = bench_pki(work / "pki", ["tbox"], server_names=["127.0.0.1"])
        data["doip"]["tls"] = {"port": _free_port(), "cert": str(pki / "server.pem"), "key": str(pki / "server.key"),
                               "ca": str(pki / "ca.pem"), "plain": False}
        data["deploy"]["tls"] = {"ca": str(pki / "ca.pem"), "cert": str(pki / "tbox.pem"), "key": str(pki / "tbox.key")}
    path = work / f"{link}-{block}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_link(work: Path, link: str, block: int, packages: list[Path]) -> dict:
    cfg = _config(work, link, block)
    gateway = subprocess.Popen([sys.executable, "-m", "vota", "gateway", "-c", str(cfg)], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert gateway.stdout is not None
        for line in gateway.stdout:
            if "gateway ready" in line:
                break
        config = load_vehicle_config(cfg)
        results = []
        t0 = time.monotonic()
        with open_deploy_link(config) as transport:
            for path in packages:
                sha = hashlib.sha256(path.read_bytes()).hexdigest()
                results.append(PackageDeployer(transport, config.deploy_link(), path.name, path, sha).run())
        wall = time.monotonic() - t0
    finally:
        gateway.terminate()
        gateway.wait(timeout=30)
    failed = [r for r in results if r.result != "success"]
    if failed:
        raise SystemExit(f"{link}: {failed[0].package} failed at {failed[0].failed_step}: {failed[0].reason}")
    return {"wall": wall, "per_package": [r.duration_s for r in results]}


def stop_and_wait_baseline(total: int, block: int) -> float:
    """Seconds to move ``total`` bytes as ``block``-byte messages over loopback TCP, each answered
    with two bytes before the next goes (the request/response shape of TransferData)."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            left = 0
            while True:
                data = conn.recv(1 << 16)
                if not data:
                    return
                left += len(data)
                while left >= block:
                    left -= block
                    conn.sendall(b"\x76\x01")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    payload = os.urandom(block)
    with socket.create_connection(server.getsockname()) as client:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = time.monotonic()
        for _ in range(-(-total // block)):
            client.sendall(payload)
            got = b""
            while len(got) < 2:
                got += client.recv(2 - len(got))
        took = time.monotonic() - t0
    server.close()
    thread.join(timeout=5)
    return took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--packages", type=int, default=4)
    ap.add_argument("--size", type=_size, default=1024 * 1024, help="bytes per package (default 1M)")
    ap.add_argument("--block", type=int, default=4095, help="maxNumberOfBlockLength on both links (default 4095)")
    ap.add_argument("--doip-block", type=int, default=16383, help="a second DoIP run with this block length (0: none)")
    args = ap.parse_args()
    total = args.packages * args.size
    with tempfile.TemporaryDirectory(prefix="vota-doip-bench-") as tmp:
        work = Path(tmp)
        packages = []
        for i in range(args.packages):
            path = work / f"pkg{i}.bin"
            path.write_bytes(os.urandom(args.size))
            packages.append(path)
        limit = total / physical_goodput(8, BITRATE)
        rows = [("CAN 500 kbit/s: the physical ISO-TP limit (computed)", limit, None)]
        can = run_link(work, "can", args.block, packages)
        rows.append((f"CAN 500 kbit/s backbone, block {args.block}", can["wall"], can["per_package"]))
        bare = stop_and_wait_baseline(total, args.block)
        rows.append((f"loopback TCP stop-and-wait, block {args.block} (baseline)", bare, None))
        doip = run_link(work, "doip", args.block, packages)
        rows.append((f"DoIP on loopback, block {args.block}", doip["wall"], doip["per_package"]))
        tls = run_link(work, "doip-tls", args.block, packages)
        rows.append((f"DoIP over TLS on loopback, block {args.block}", tls["wall"], tls["per_package"]))
        if args.doip_block:
            big = run_link(work, "doip", args.doip_block, packages)
            rows.append((f"DoIP on loopback, block {args.doip_block}", big["wall"], big["per_package"]))
    print(f"deploy of {args.packages} x {args.size // 1024} KiB ({total / 1024 / 1024:.1f} MiB), random data")
    print(f"{'run':<58} {'wall s':>8} {'KiB/s':>9} {'vs CAN':>8}  per package s")
    for name, seconds, per in rows:
        per_text = " ".join(f"{p:.2f}" for p in per) if per else ""
        print(f"{name:<58} {seconds:8.2f} {total / 1024 / seconds:9.0f} {can['wall'] / seconds:7.1f}x  {per_text}")
    print(f"DoIP block {args.block} against the bare loopback exchange: {doip['wall'] / bare:.1f}x its time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
