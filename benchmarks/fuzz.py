#!/usr/bin/env python3
"""Fuzz every external input for as long as asked: the targets of ``tests/fuzz_targets.py``
(the ones ``make test`` runs with bounded example counts), here in batches of fresh random
seeds until each target's time is up. Prints, per target, the inputs tried, the rate and
the failures; a failure is printed with hypothesis's shrunk example and makes the exit
code 1.

    .venv/bin/python benchmarks/fuzz.py [--seconds 60] [--target NAME ...] [--batch 200]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hypothesis import HealthCheck, given, seed, settings  # noqa: E402

from tests.fuzz_targets import TARGETS  # noqa: E402


def fuzz(name: str, seconds: float, batch: int, first_seed: int) -> tuple[int, int, float]:
    """(inputs tried, failures, seconds spent) for one target."""
    target = TARGETS[name]()
    fed = [0]
    failures = 0
    with tempfile.TemporaryDirectory(prefix=f"vota-fuzz-{name}-") as tmp:
        started = time.monotonic()
        target.open(Path(tmp))
        try:
            n = first_seed
            while time.monotonic() - started < seconds:
                @seed(n)
                @settings(max_examples=batch, deadline=None, database=None, suppress_health_check=list(HealthCheck))
                @given(target.strategy)
                def check(example):  # type: ignore[no-untyped-def]
                    fed[0] += 1
                    target.feed(example)

                try:
                    check()
                except Exception:  # noqa: BLE001 - a finding: print it and go on with the next seed
                    failures += 1
                    print(f"--- {name}: failure with seed {n}", flush=True)
                    traceback.print_exc(limit=3)
                n += 1
        finally:
            try:
                target.close()
            except AssertionError as exc:  # an end-of-run property (what was stored is unchanged)
                failures += 1
                print(f"--- {name}: at the end: {exc}", flush=True)
        return fed[0], failures, time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="time per target (default 60)")
    parser.add_argument("--target", action="append", choices=sorted(TARGETS), help="only these targets (repeatable)")
    parser.add_argument("--batch", type=int, default=200, help="inputs per hypothesis run, one seed each (default 200)")
    parser.add_argument("--seed", type=int, default=int(time.time()), help="first seed (default: the time)")
    args = parser.parse_args()
    root = logging.getLogger()  # the targets read ERROR records themselves; nothing else is printed
    root.addHandler(logging.NullHandler())
    root.setLevel(logging.ERROR)
    total_failures = 0
    print(f"{'target':<16} {'inputs':>9} {'per s':>8} {'failures':>8}   (first seed {args.seed})")
    for name in args.target or sorted(TARGETS):
        inputs, failures, spent = fuzz(name, args.seconds, args.batch, args.seed)
        total_failures += failures
        print(f"{name:<16} {inputs:>9} {inputs / spent:>8.0f} {failures:>8}", flush=True)
    return 1 if total_failures else 0


if __name__ == "__main__":
    sys.exit(main())
