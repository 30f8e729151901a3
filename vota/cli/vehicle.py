"""The commands that talk to a vehicle's buses directly: ``vota flash``, ``vota versions``,
``vota deploy``, and ``vota diagnose`` on what they leave behind."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import Any

from agent.adapters.storage import writable_dir
from agent.errors import UsageError
from vota.cli.inputs import image_keys
from vota.cli.tables import format_flash_table, table

__all__ = ["cmd_flash", "cmd_versions", "cmd_deploy", "cmd_diagnose", "parse_image_arg"]


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def parse_image_arg(text: str) -> tuple[str, Path, str]:
    ecu, sep, rest = text.partition("=")
    if not sep or not ecu or not rest:
        raise UsageError(f"expected ECU=IMAGE[@VERSION], got {text!r}")
    path_text, _, version = rest.partition("@")
    path = Path(path_text)
    return ecu, path, version or path.stem


def cmd_flash(args: argparse.Namespace) -> int:
    import time

    from agent.adapters.config_files import load_vehicle_config
    from agent.core.faults import parse_faults
    from agent.protocol.images import ImageError
    from gateway.jobs import FlashJob
    from gateway.orchestrator import FlashRun, flash_all
    from vota.cli.progress import ProgressBoard

    config = load_vehicle_config(args.config)
    jobs = []
    for item in args.images:
        ecu, path, version = parse_image_arg(item)
        config.ecu(ecu)
        try:
            image = path.read_bytes()
        except FileNotFoundError:
            raise UsageError(f"{path}: image file not found") from None
        except OSError as exc:
            raise UsageError(f"{path}: cannot read image ({exc.strerror})") from None
        if not image:
            raise UsageError(f"{path}: image file is empty")
        try:  # Intel HEX, S-record or VBF: its segments, every checksum checked before anything is erased
            jobs.append(FlashJob(ecu, image, version, str(path)).unpacked(config.ecu(ecu)))
        except ImageError as exc:
            raise UsageError(str(exc)) from None
    jobs = _with_deltas(jobs, args.delta_from)
    jobs = _signed(jobs, args.image_key)
    out = writable_dir(args.out or Path(config.gateway.results_dir) / time.strftime("%Y%m%d-%H%M%S"), "--out")
    signal.signal(signal.SIGTERM, _interrupt)
    board = ProgressBoard([j.ecu for j in jobs], enabled=not args.no_progress)
    faults = parse_faults(args.fault, "flash", [j.ecu for j in jobs])
    results = flash_all(config, jobs, out, FlashRun(progress=board, faults=tuple(faults)))
    board.finish()
    rows = [r.to_json() for r in results]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_flash_table(rows))
        print(f"results and traces: {out}")
    return 0 if all(r.result == "success" for r in results) else 3


def _signed(jobs: list[Any], items: list[str]) -> list[Any]:
    """``--image-key ECU=KEY[@N]``: the job carries the image's signature, made here with the OEM's key."""
    import dataclasses

    from agent.core.image_auth import sign_image

    keys = image_keys(items, {j.ecu for j in jobs})
    return [dataclasses.replace(j, image_auth=sign_image(keys[j.ecu][0], j.ecu, j.version, keys[j.ecu][1],
                                                          j.on_ecu_sha256)) if j.ecu in keys else j for j in jobs]


def _with_deltas(jobs: list[Any], delta_from: list[str]) -> list[Any]:
    """``--delta-from ECU=OLD``: each such job also carries the delta from OLD to its image."""
    import dataclasses
    import hashlib
    import zlib

    from agent.protocol.delta import make_delta
    from gateway.jobs import DeltaImage

    by_ecu = {j.ecu: j for j in jobs}
    for item in delta_from:
        ecu, sep, path_text = item.partition("=")
        if not sep or not ecu or not path_text:
            raise UsageError(f"--delta-from: expected ECU=OLD_IMAGE, got {item!r}")
        if ecu not in by_ecu:
            raise UsageError(f"--delta-from {item}: {ecu} is not flashed here")
        try:
            base = Path(path_text).read_bytes()
        except OSError as exc:
            raise UsageError(f"{path_text}: cannot read the old image ({exc.strerror})") from None
        job = by_ecu[ecu]
        if job.segments:
            raise UsageError(f"--delta-from {item}: a delta is made from raw binary images, not from {job.source}")
        delta = DeltaImage(make_delta(base, job.image), hashlib.sha256(base).hexdigest(), len(job.image),
                           hashlib.sha256(job.image).hexdigest(), zlib.crc32(job.image), path_text)
        by_ecu[ecu] = dataclasses.replace(job, delta=delta)
    return [by_ecu[j.ecu] for j in jobs]


def cmd_versions(args: argparse.Namespace) -> int:
    from agent.adapters.config_files import load_vehicle_config
    from gateway.inventory import collect_versions

    config = load_vehicle_config(args.config)
    names = args.ecu or list(config.ecus)
    for n in names:
        config.ecu(n)
    inventory = collect_versions(config, names)
    if args.json:
        print(json.dumps(inventory, indent=2))
    else:
        head = ["ECU", "segment", "part number", "software", "serial", "supplier sw", "bootloader"]
        rows = [[e["ecu"], e["segment"]] + [_cell(e, k) for k in ("part_number", "software_version", "serial",
                                                                  "supplier_software", "bootloader")] for e in inventory]
        print(table(head, rows))
    return 0 if all(e["reachable"] for e in inventory) else 1


def _cell(entry: dict[str, Any], key: str) -> str:
    if entry.get(key):
        return str(entry[key])
    if not entry["reachable"]:
        return "(no response)"
    return "(boot mode)" if key == "software_version" and entry.get("mode") == "boot" else "?"


def cmd_deploy(args: argparse.Namespace) -> int:
    from agent.adapters.config_files import load_vehicle_config
    from agent.adapters.doip_client import open_deploy_link
    from agent.adapters.file_client import PackageDeployer, file_sha256
    from agent.core.faults import parse_faults
    from vota.cli.progress import ProgressBoard

    config = load_vehicle_config(args.config)
    link = config.deploy_link()
    faults = parse_faults(args.fault, "deploy", list(config.ecus))
    if args.sha256 and len(args.sha256) != len(args.packages):
        raise UsageError("give --sha256 once per package, or not at all")
    items = []
    for i, item in enumerate(args.packages):
        path_text, _, name = item.partition("=")
        path = Path(path_text)
        if not path.is_file():
            raise UsageError(f"{path}: package file not found")
        digest = args.sha256[i].lower() if args.sha256 else file_sha256(path)
        if len(digest) != 64 or any(ch not in "0123456789abcdef" for ch in digest):
            raise UsageError(f"--sha256 {args.sha256[i]!r} is not a SHA-256 in hex")
        items.append((name or path.name, path, digest))
    writable_dir(args.out, "--out")
    signal.signal(signal.SIGTERM, _interrupt)
    board = ProgressBoard([n for n, _, _ in items], enabled=not args.no_progress)
    rows = []
    with open_deploy_link(config) as segment:
        for name, path, digest in items:
            deployer = PackageDeployer(segment, link, name, path, digest, resume=args.resume, progress=board,
                                       faults=faults)
            result = deployer.run()
            deployer.write(args.out, result)
            rows.append(result.to_json())
            if result.result != "success" and not args.keep_going:
                break  # D4: a failed deploy ends the deploy stage
    board.finish()
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        head = ["package", "result", "KiB", "packets", "resumed at", "s", "trace B", "failed step / reason"]
        lines = [[r["package"], r["result"], f"{r['size'] / 1024:.0f}", str(r["packets"]), str(r["resumed_from"]),
                  f"{r['duration_s']:.1f}", str(r["trace_bytes"]),
                  f"{r['failed_step']}: {r['reason']}" + (f" (packet {r['failed_packet']})" if r["failed_packet"] is not None else "")
                  if r["result"] != "success" else ""] for r in rows]
        print(table(head, lines))
        print(f"deploy results and traces: {args.out}")
    return 0 if len(rows) == len(items) and all(r["result"] == "success" for r in rows) else 3


def cmd_diagnose(args: argparse.Namespace) -> int:
    from agent.adapters.diagnosis_files import campaign_failure, load_inputs, load_rules
    from agent.adapters.storage import atomic_write_json
    from agent.core.diagnosis import diagnose, render_markdown

    rules = load_rules(args.rules)
    inputs, campaign_id, problems = load_inputs(args.path)
    verdict = diagnose(inputs, rules, args.mode, campaign_id, campaign_failure(args.path))
    verdict.unanalysed.extend(problems)
    if args.json == "-":
        print(json.dumps(verdict.to_json(), indent=2))
        return 0
    if args.json:
        atomic_write_json(args.json, verdict.to_json())
    sys.stdout.write(render_markdown(verdict))
    return 0
