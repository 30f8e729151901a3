"""``vota gateway``: the gateway as a long-lived process.

It serves the deploy link to the TBOX (the deploy server); flashing on the TBOX's install
command joins it with the rest of the campaign flow.
"""

from __future__ import annotations

import logging
import threading

from agent.canbus import Segment
from agent.config import VehicleConfig
from agent.faults import FaultSpec
from agent.uds_server import UdsServer
from gateway.deploy_server import DEPLOY_SERVICES, DeployState

__all__ = ["GatewayDaemon"]

log = logging.getLogger(__name__)


class GatewayDaemon:
    def __init__(self, config: VehicleConfig, faults: list[FaultSpec] | None = None) -> None:
        self.config = config
        self.link = config.deploy_link()
        self.faults = [f for f in faults or [] if f.stage == "deploy" and f.target in ("*", "GW", "gw", "gateway")]
        self.segment: Segment | None = None
        self.server: UdsServer[DeployState] | None = None
        self._stopped = threading.Event()

    def start(self) -> None:
        self.segment = Segment(self.config.segments[self.link.segment])
        try:
            self.server = UdsServer(
                name="gateway-deploy",
                segment=self.segment,
                request_id=self.link.request_id,
                response_id=self.link.response_id,
                functional_id=None,
                services=DEPLOY_SERVICES,
                state=DeployState(self.link),
                faults=self.faults,
            )
            self.server.start()
        except BaseException:
            self.stop()
            raise
        log.info("deploy server on %s: requests 0x%X, responses 0x%X, packages in %s",
                 self.link.segment, self.link.request_id, self.link.response_id, self.link.package_dir)

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self.server is not None:
            self.server.stop()
            self.server.state.abort()
        if self.segment is not None:
            self.segment.shutdown()

    def wait(self) -> None:
        self._stopped.wait()
