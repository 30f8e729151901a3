"""The long-running commands: ``vota gateway``, ``vota tbox``, ``vota ecu-sim``, and how a daemon
is served (systemd readiness, watchdog, clean stop)."""

from __future__ import annotations

import argparse
import signal
from typing import Any

from agent.errors import UsageError

__all__ = ["serve", "cmd_gateway", "cmd_tbox", "cmd_ecu_sim"]


def serve(name: str, start: Any, stop: Any, alive: Any = None) -> int:
    """Run a daemon: READY=1 to systemd once started, WATCHDOG=1 while alive, clean stop."""
    import threading

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
    try:
        while not done.wait(interval or 1.0):
            if interval and (alive is None or alive()):
                systemd.notify("WATCHDOG=1")
    finally:
        systemd.notify("STOPPING=1")
        stop()
    return 0


def cmd_gateway(args: argparse.Namespace) -> int:
    from agent.core.config import load_vehicle_config
    from agent.core.faults import parse_fault
    from gateway.daemon import GatewayDaemon

    config = load_vehicle_config(args.config)
    daemon = GatewayDaemon(config, [parse_fault(f) for f in args.fault])
    return serve("gateway", daemon.start, daemon.stop)


def cmd_tbox(args: argparse.Namespace) -> int:
    from agent.core.clock import parse_time, simulated_clock
    from agent.core.config import load_vehicle_config
    from agent.core.faults import parse_fault
    from tbox.daemon import TboxDaemon

    config = load_vehicle_config(args.config)
    content_now = simulated_clock(parse_time(args.clock), args.clock_rate) if args.clock else None
    daemon = TboxDaemon(config, faults=[parse_fault(f) for f in args.fault], content_now=content_now)
    return serve("tbox", daemon.start, daemon.stop, alive=daemon.alive)


def cmd_ecu_sim(args: argparse.Namespace) -> int:
    from agent.core.config import load_vehicle_config
    from agent.core.faults import parse_fault
    from ecu_sim.simulator import EcuSimulator

    config = load_vehicle_config(args.config)
    names = args.ecu or list(config.ecus)
    if not names:
        raise UsageError(f"{args.config}: no ECUs configured")
    faults = [parse_fault(f) for f in args.fault]
    sim = EcuSimulator(config, names, args.state_dir, faults)

    def stop(signum: int, frame: Any) -> None:
        sim.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    sim.start()
    print(f"ecu-sim ready: {', '.join(names)}", flush=True)
    sim.wait()
    return 0
