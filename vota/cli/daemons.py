"""The long-running commands: ``vota gateway``, ``vota tbox``, ``vota ecu-sim``, and how a daemon
is served (systemd readiness, watchdog, clean stop)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import threading
import time
from typing import Any, Iterator

from agent.errors import UsageError

__all__ = ["serve", "cmd_gateway", "cmd_tbox", "cmd_ecu_sim"]


def serve(name: str, start: Any, stop: Any, alive: Any = None, status: Any = None) -> int:
    """Run a daemon: READY=1 to systemd once started, WATCHDOG=1 while ``alive()``, STATUS= with
    ``status()`` whenever it changes (checked every second), clean stop."""
    from agent.adapters import systemd

    done = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    start()
    print(f"{name} ready", flush=True)
    systemd.notify("READY=1")
    interval = systemd.watchdog_interval()
    tick = min(interval or 1.0, 1.0)
    pinged, said = 0.0, ""
    try:
        while not done.wait(tick):
            now = time.monotonic()
            if interval and now - pinged >= interval and (alive is None or alive()):
                systemd.notify("WATCHDOG=1")
                pinged = now
            line = _status_line(status)
            if line and line != said:
                systemd.notify(f"STATUS={line}")
                said = line
    finally:
        systemd.notify("STOPPING=1")
        stop()
    return 0


def _status_line(status: Any) -> str:
    """``status()`` as one sd_notify line: control characters (a newline would start another
    assignment, e.g. MAINPID=) become spaces; a status that cannot be read is skipped."""
    if status is None:
        return ""
    try:
        line = str(status())
    except Exception:  # noqa: BLE001 - the status line must not stop the daemon
        logging.getLogger(__name__).debug("status line failed", exc_info=True)
        return ""
    return "".join(c if c.isprintable() else " " for c in line)[:200]


@contextlib.contextmanager
def _only_one(directory: str, what: str) -> Iterator[None]:
    """Hold the state directory's instance lock while the daemon runs (one line, exit 1, if taken)."""
    from agent.adapters.storage import InstanceLock

    lock = InstanceLock(directory, what).acquire()
    try:
        yield
    finally:
        lock.release()


def cmd_gateway(args: argparse.Namespace) -> int:
    from agent.adapters.config_files import load_vehicle_config
    from agent.core.faults import parse_faults
    from gateway.daemon import GatewayDaemon

    config = load_vehicle_config(args.config)
    faults = parse_faults(args.fault, "gateway", list(config.ecus))
    with _only_one(config.gateway.results_dir, "vota gateway"):
        daemon = GatewayDaemon(config, faults)
        return serve("gateway", daemon.start, daemon.stop, alive=daemon.alive, status=daemon.status)


def cmd_tbox(args: argparse.Namespace) -> int:
    from agent.adapters.config_files import load_vehicle_config
    from agent.core.clock import parse_time, simulated_clock
    from agent.core.faults import parse_faults
    from tbox.daemon import TboxDaemon

    config = load_vehicle_config(args.config)
    content_now = simulated_clock(parse_time(args.clock), args.clock_rate) if args.clock else None
    faults = parse_faults(args.fault, "tbox", list(config.ecus))
    with _only_one(config.tbox_config().state_dir, "vota tbox"):  # two would fight over the broker and the gateway
        daemon = TboxDaemon(config, faults=faults, content_now=content_now)
        return serve("tbox", daemon.start, daemon.stop, alive=daemon.alive, status=daemon.status)


def cmd_ecu_sim(args: argparse.Namespace) -> int:
    from agent.adapters.config_files import load_vehicle_config
    from agent.core.faults import parse_faults
    from ecu_sim.simulator import EcuSimulator

    config = load_vehicle_config(args.config)
    names = args.ecu or list(config.ecus)
    if not names:
        raise UsageError(f"{args.config}: no ECUs configured")
    faults = parse_faults(args.fault, "ecu-sim", names)
    if args.state_dir is not None:
        from agent.adapters.storage import writable_dir

        writable_dir(args.state_dir, "--state-dir")
    sim = EcuSimulator(config, names, args.state_dir, faults)
    done = threading.Event()

    def stop(signum: int, frame: Any) -> None:
        done.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    sim.start()
    print(f"ecu-sim ready: {', '.join(names)}", flush=True)
    try:
        # in steps: a signal the kernel hands to another thread does not wake a main thread
        # blocked on a lock for good, only one that comes round to check
        while not done.wait(0.2):
            pass
    finally:
        sim.stop()
    return 0
