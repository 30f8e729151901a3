"""The ``vota`` command line.

Exit codes: 0 done, 1 an operation failed at run time, 2 bad usage, input or
configuration, 3 a flash finished with at least one failed ECU, 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

from agent.errors import VotaError
from vota.cli.parser import build_parser

__all__ = ["main"]

log = logging.getLogger("vota")

DAEMONS = ("tbox", "gateway", "ecu-sim")


def _setup_logging(verbose: int, command: str) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    # Daemons log to stdout for the journal; the other commands keep stdout for their output.
    stream = sys.stdout if command in DAEMONS else sys.stderr
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=stream)
    if verbose < 3:
        # udsoncan and can-isotp log every request at INFO; keep them for -vvv.
        # udsoncan logs an expected timeout (a rebooting ECU) at ERROR: the flash result says it.
        for noisy in ("UdsClient", "Connection", "isotp", "can"):
            logging.getLogger(noisy).setLevel(logging.CRITICAL)


def _commands() -> dict[str, Callable[[argparse.Namespace], int]]:
    from vota.cli import bench, campaign, cloud, content, daemons, vehicle
    from vota.cli.evidence import cmd_evidence
    from vota.cli.fleet import cmd_fleet
    from vota.cli.init import cmd_init
    from vota.cli.log import cmd_log

    return {
        "ecu-sim": daemons.cmd_ecu_sim,
        "flash": vehicle.cmd_flash,
        "versions": vehicle.cmd_versions,
        "gateway": daemons.cmd_gateway,
        "tbox": daemons.cmd_tbox,
        "deploy": vehicle.cmd_deploy,
        "campaign": campaign.cmd_campaign,
        "cloud": cloud.cmd_cloud,
        "diagnose": vehicle.cmd_diagnose,
        "fleet": cmd_fleet,
        "content": content.cmd_content,
        "bench": bench.cmd_bench,
        "init": cmd_init,
        "log": cmd_log,
        "evidence": cmd_evidence,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose, args.command)
    try:
        if hasattr(args, "config"):  # a vehicle configuration: the one given, configs/bench.yaml here, or the installed one
            from agent.adapters.examples import resolve_config

            args.config = resolve_config(args.config)
        if isinstance(getattr(args, "capture", None), str):  # the commands that open segments themselves
            from agent.adapters.capture import configure

            configure(args.capture, {"gateway": "gw"}.get(args.command, args.command), args.capture_format,
                      args.capture_max_mib)
        return _commands()[args.command](args)
    except VotaError as exc:
        print(f"vota {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # a path that cannot be written or read (a read-only place, /proc, a full disk)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"vota {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"vota {args.command}: interrupted", file=sys.stderr)
        return 130
