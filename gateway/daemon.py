"""``vota gateway``: the gateway as a long-lived process, the composition root. It opens the
segments (``gateway/buses.py``), builds the installer (``gateway/installer.py``: installs per
manifest, their status, resume after a restart) and the content relay, and serves the deploy link
to the TBOX (``gateway/deploy_server.py``); the flash results, flash traces and the inventory stay
on disk for the TBOX to read back (D2). The install manifest's layout is in
``agent/protocol/link.py``.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from agent.adapters.uds_server import UdsServer
from agent.core.config import VehicleConfig
from agent.core.faults import FaultSpec
from gateway.buses import Buses
from gateway.content_relay import ContentRelay
from gateway.deploy_server import DEPLOY_SERVICES, DeployState
from gateway.doip_entity import DoipEntity
from gateway.installer import GatewayInstaller

__all__ = ["GatewayDaemon"]

log = logging.getLogger(__name__)


class GatewayDaemon:
    def __init__(self, config: VehicleConfig, faults: list[FaultSpec] | None = None) -> None:
        self.config = config
        self.link = config.deploy_link()
        faults = faults or []
        # deploy stage, server side: the deploy server; flash stage, client side: the flash client
        self.faults = [f for f in faults if f.stage == "deploy" and f.side == "server"]
        self.flash_faults = [f for f in faults if f.stage in ("flash", "activate") and f.side == "client"]
        self.buses = Buses(config)  # every segment opened once; one conversation per ECU at a time
        if self.link.transport == "can":  # the deploy server listens there, also while an ECU on it is flashed
            self.buses.pin(self.link.segment)  # (over DoIP it has the entity's logical address alone)
        self.server: UdsServer[DeployState] | None = None
        self.doip: DoipEntity | None = None  # the gateway on the vehicle's Ethernet (doip section)
        self._stopped = threading.Event()
        self._owed = threading.Thread(target=self._settle_owed, name="owed-discards", daemon=True)
        self.installer = GatewayInstaller(config, Path(self.link.package_dir), Path(config.gateway.results_dir), self._stopped,
                                          self.flash_faults, self.buses)
        if self.link.security_secret is None:
            log.warning("the deploy link has no SecurityAccess (deploy.security_secret): any node on the backbone may "
                        "deploy files and start installs (installs are still checked against signed campaigns)")

    def start(self) -> None:
        try:
            self.installer.resume()
            self.server = UdsServer(
                name="gateway-deploy",
                segment=self.buses.segment(self.link.segment) if self.link.transport == "can" else None,
                request_id=self.link.request_id,
                response_id=self.link.response_id,
                functional_id=None,
                services=DEPLOY_SERVICES,
                state=DeployState(self.link, self.config.gateway.results_dir, self.installer,
                                  relay=ContentRelay(self.config, Path(self.link.package_dir),
                                                     Path(self.config.gateway.results_dir), self.buses),
                                  dids={self.config.gateway.rxswin_did: self.installer.rxswin.did_value}
                                  if self.config.approvals else {}),
                faults=self.faults,
                fault_targets=("*", "GW", "gw", "gateway"),
                fault_scope=lambda state: state.transfer.name if state.transfer is not None else None,
            )
            self.server.start()
            if self.config.doip is not None:
                self.doip = DoipEntity(self.config, self.buses, local=self.server)
                self.doip.start()
            self._owed.start()
        except BaseException:
            self.stop()
            raise
        log.info("deploy server on %s, packages in %s", self._where(), self.link.package_dir)

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()  # an install in progress is cancelled at its next request
        self.installer.join()
        if self.doip is not None:
            self.doip.stop()
        if self.server is not None:
            self.server.stop()
            self.server.state.abort()
        self.buses.shutdown()

    def wait(self) -> None:
        self._stopped.wait()

    def _settle_owed(self) -> None:
        """Discards a failed install could not make, tried again while no install runs (gateway/owed.py)."""
        while not self._stopped.wait(self.config.gateway.owed_retry_s):
            try:
                self.installer.settle_owed()
            except Exception:  # noqa: BLE001 - tried again at the next round
                log.exception("owed discards failed")

    def alive(self) -> bool:
        """The deploy server's threads and the running install have made progress within
        ``gateway.worker_stale_s`` (the systemd watchdog's question)."""
        stale_s = self.config.gateway.worker_stale_s
        wrong = (self.server.alive(stale_s) if self.server is not None else []) + self.installer.heartbeats.stale()
        if wrong:
            log.error("without progress for over %d s: %s", stale_s, ", ".join(wrong))
        return not wrong

    def status(self) -> str:
        """One line for systemd's STATUS=."""
        testers = f"; DoIP: {len(self.doip.testers())} tester(s)" if self.doip is not None else ""
        return f"deploy server on {self._where()}{testers}; {self.installer.describe()}"

    def _where(self) -> str:
        link = self.link
        if link.transport == "doip":
            return f"DoIP, logical address 0x{link.doip_target:04X}"
        return link.segment
