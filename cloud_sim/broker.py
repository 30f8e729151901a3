"""The demo's embedded MQTT broker: amqtt (pure Python, MQTT 3.1.1) on a loopback port.

Only for ``vota bench`` / ``make demo`` where no broker is given; tests and vehicles use a
real broker (Mosquitto)."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

__all__ = ["run_broker"]

log = logging.getLogger(__name__)


def run_broker(host: str, port: int, ready: Any = None) -> None:
    try:
        from amqtt.broker import Broker
    except ImportError:
        from agent.errors import UsageError

        raise UsageError("the embedded broker needs amqtt: pip install 'vota[bench]' (make demo installs it), "
                         "or give --broker mqtt://host:port") from None
    for noisy in ("amqtt", "transitions"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }

    async def main() -> None:
        broker = Broker(config)
        await broker.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if ready is not None:
            ready()
        await stop.wait()
        await broker.shutdown()

    asyncio.run(main())
