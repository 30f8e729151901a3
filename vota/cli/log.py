"""``vota log verify``: the vehicle's update log checked offline (agent/adapters/update_log.py)."""

from __future__ import annotations

import argparse
import json

from agent.errors import UsageError


def cmd_log(args: argparse.Namespace) -> int:
    from agent.adapters.update_log import verify_log
    from agent.core.campaign import load_public_key
    from vota.cli.inputs import read_input

    key = load_public_key(read_input(args.key, "public key"), args.key) if args.key else None
    try:
        found = verify_log(args.file, key)
    except FileNotFoundError:
        raise UsageError(f"{args.file}: no such log") from None
    except IsADirectoryError:
        raise UsageError(f"{args.file}: a directory, not a log") from None
    if args.json:
        print(json.dumps(found, indent=2))
    elif found["ok"] and not found["entries"]:
        print(f"{args.file}: intact: no entries yet")
    elif found["ok"]:
        print(f"{args.file}: intact: {found['entries']} entries (seq {found['first_seq']} to {found['last_seq']}), "
              f"{len(found['campaigns'])} campaigns, " + ("every signature verified" if key else "chain only (no --key)"))
    else:
        b = found["broken"]
        seq = f" (seq {b['seq']})" if b["seq"] is not None else ""
        print(f"{args.file}: broken at line {b['line']}{seq}: {b['why']}; {found['entries']} entries before it hold")
    return 0 if found["ok"] else 1
