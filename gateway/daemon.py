"""``vota gateway``: the gateway as a long-lived process.

It serves the deploy link to the TBOX (deploy server), flashes the ECUs when the TBOX
starts an install, and keeps the flash results, flash traces and the inventory for the
TBOX to read back (D2).

Install manifest (deployed like a package, then named in routine 0x0301)::

    {"format": "vota-install", "version": 1, "campaign_id": "c-0001",
     "jobs": [{"ecu": "vcu", "package": "vcu-2.0.0.bin", "version": "2.0.0"}]}
"""

from __future__ import annotations

import json
import logging
import re
import threading
from pathlib import Path
from typing import Any

from agent.canbus import Segment
from agent.config import VehicleConfig
from agent.faults import FaultSpec
from agent.storage import atomic_write_json
from agent.uds_server import UdsServer
from gateway.content_relay import ContentRelay
from gateway.deploy_server import DEPLOY_SERVICES, DeployState, InstallStatus
from gateway.flash import FlashJob, flash_all
from gateway.inventory import collect_versions

__all__ = ["GatewayDaemon", "GatewayInstaller"]

log = logging.getLogger(__name__)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")


class GatewayInstaller:
    """Flashes per install manifest in a background thread; status kept on disk too."""

    def __init__(self, config: VehicleConfig, package_dir: Path, results_dir: Path, stop: threading.Event,
                 faults: list[FaultSpec] | None = None) -> None:
        self.config, self.package_dir, self.results_dir, self.stop = config, package_dir, results_dir, stop
        self.faults = faults or []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._campaign: str | None = None
        self._done = 0
        self._total = 0

    def _parse(self, manifest: bytes) -> tuple[str, list[FlashJob]] | str:
        try:
            doc = json.loads(manifest)
            if doc.get("format") != "vota-install" or doc.get("version") != 1:
                return "not a vota-install version 1 manifest"
            campaign = doc["campaign_id"]
            if not isinstance(campaign, str) or not _NAME.match(campaign):
                return "bad campaign_id"
            jobs = []
            for job in doc["jobs"]:
                ecu, package, version = job["ecu"], job["package"], job["version"]
                if ecu not in self.config.ecus:
                    return f"unknown ECU {ecu!r}"
                if not isinstance(package, str) or not _NAME.match(package) or not (self.package_dir / package).is_file():
                    return f"package {package!r} was not deployed"
                jobs.append(FlashJob(ecu, (self.package_dir / package).read_bytes(), str(version), package))
            if not jobs:
                return "no jobs"
            return campaign, jobs
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            return f"malformed manifest ({exc})"

    def start(self, manifest: bytes) -> str | None:
        parsed = self._parse(manifest)
        if isinstance(parsed, str):
            return parsed
        campaign, jobs = parsed
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return "an install is running"
            self._campaign, self._done, self._total = campaign, 0, len(jobs)
            self._write_status(campaign, InstallStatus.RUNNING)
            self._thread = threading.Thread(target=self._run, args=(campaign, jobs), name="install", daemon=True)
            self._thread.start()
        log.info("install %s started: %s", campaign, ", ".join(f"{j.ecu} <- {j.source}" for j in jobs))
        return None

    def _progress(self, ecu: str, step: str, done: int, total: int) -> None:
        if step in ("done", "failed"):
            with self._lock:
                self._done += 1

    def _run(self, campaign: str, jobs: list[FlashJob]) -> None:
        out = self.results_dir / campaign
        try:
            results = flash_all(self.config, jobs, out, progress=self._progress, stop=self.stop, faults=self.faults)
            ok = all(r.result == "success" for r in results) and len(results) == len(jobs)
            self._write_status(campaign, InstallStatus.SUCCEEDED if ok else InstallStatus.FAILED)
            log.info("install %s finished: %s", campaign, "success" if ok else "failed")
        except Exception as exc:  # noqa: BLE001 - reported to the TBOX as a failed install
            log.exception("install %s failed", campaign)
            self._write_status(campaign, InstallStatus.FAILED, str(exc))

    def _write_status(self, campaign: str, status: int, error: str | None = None) -> None:
        names = {v: k for k, v in vars(InstallStatus).items() if not k.startswith("_")}
        doc: dict[str, Any] = {"campaign_id": campaign, "status": names[status].lower(), "code": status,
                               "done": self._done, "total": self._total}
        if error:
            doc["error"] = error
        atomic_write_json(self.results_dir / campaign / "install.json", doc)

    def status(self, campaign: str | None) -> tuple[int, int, int]:
        with self._lock:
            running = self._thread is not None and self._thread.is_alive()
            if campaign is None or campaign == self._campaign:
                if running:
                    return InstallStatus.RUNNING, self._done, self._total
                campaign = campaign or self._campaign
        if campaign is None:
            return InstallStatus.NONE, 0, 0
        try:
            doc = json.loads((self.results_dir / campaign / "install.json").read_text())
        except (OSError, ValueError):
            return InstallStatus.NONE, 0, 0
        code = int(doc.get("code", InstallStatus.NONE))
        if code == InstallStatus.RUNNING:  # the gateway restarted in the middle of it
            code = InstallStatus.FAILED
        return code, int(doc.get("done", 0)), int(doc.get("total", 0))

    def inventory(self) -> None:
        atomic_write_json(self.results_dir / "inventory.json",
                          {"schema": "vota-inventory/1", "ecus": collect_versions(self.config)})

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()


class GatewayDaemon:
    def __init__(self, config: VehicleConfig, faults: list[FaultSpec] | None = None) -> None:
        self.config = config
        self.link = config.deploy_link()
        faults = faults or []
        # deploy stage, server side: the deploy server; flash stage, client side: the flash client
        self.faults = [f for f in faults if f.stage == "deploy" and f.side == "server"]
        self.flash_faults = [f for f in faults if f.stage == "flash" and f.side == "client"]
        self.segment: Segment | None = None
        self.server: UdsServer[DeployState] | None = None
        self._stopped = threading.Event()
        self.installer = GatewayInstaller(config, Path(self.link.package_dir), Path(config.gateway.results_dir), self._stopped,
                                          self.flash_faults)

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
                state=DeployState(self.link, self.config.gateway.results_dir, self.installer,
                                  relay=ContentRelay(self.config, Path(self.link.package_dir),
                                                     Path(self.config.gateway.results_dir))),
                faults=self.faults,
                fault_targets=("*", "GW", "gw", "gateway"),
                fault_scope=lambda state: state.transfer.name if state.transfer is not None else None,
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
        self._stopped.set()  # an install in progress is cancelled at its next request
        self.installer.join()
        if self.server is not None:
            self.server.stop()
            self.server.state.abort()
        if self.segment is not None:
            self.segment.shutdown()

    def wait(self) -> None:
        self._stopped.wait()
