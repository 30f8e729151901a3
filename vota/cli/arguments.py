"""Argument types and option groups the ``vota`` commands share (vota/cli/parser.py)."""

from __future__ import annotations

import argparse

from agent.adapters.examples import DEFAULT_CONFIG

__all__ = ["DEFAULT_CONFIG", "_size", "_add_common", "_seconds", "_capture"]


def _size(text: str) -> int:
    units = {"k": 1024, "m": 1024 * 1024}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        if t and t[-1] in units:
            value = int(float(t[:-1]) * units[t[-1]])
        else:
            value = int(t, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("size must be positive")
    return value


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", default=None,
                   help=f"vehicle configuration YAML (default: {DEFAULT_CONFIG}, else the example installed with vota)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-v info, -vv debug, -vvv library debug)")


def _seconds(text: str) -> float:
    """A duration in seconds, above 0 (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < 1e9:
        raise argparse.ArgumentTypeError(f"{text!r}: must be above 0 seconds")
    return value


def _capture(p: argparse.ArgumentParser, bench: bool = False) -> None:
    """The standard CAN capture options (agent/adapters/capture.py)."""
    if bench:
        p.add_argument("--capture", action="store_true",
                       help="write every frame of every segment, as the gateway and the TBOX see them, to DIR/capture/ "
                       "(python-can's writers; see --capture-format)")
    else:
        p.add_argument("--capture", metavar="DIR",
                       help="write every frame this process sends and receives on each segment to DIR/<process>-<segment>."
                       "<format> (off by default; timestamps on the traces' clock)")
    p.add_argument("--capture-format", choices=("blf", "asc", "log"), default="blf",
                   help="capture format: blf (CANalyzer, SavvyCAN), asc, log (candump -L) (default: blf)")
    if not bench:
        p.add_argument("--capture-max-mib", type=float, default=64.0, metavar="MIB",
                       help="at most this much per segment: the file is rotated once at half of it (default: 64)")
