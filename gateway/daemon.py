"""``vota gateway``: the gateway as a long-lived process.

It serves the deploy link to the TBOX (deploy server), flashes the ECUs when the TBOX
starts an install, and keeps the flash results, flash traces and the inventory for the
TBOX to read back (D2).

The install manifest's layout is in ``agent/protocol/link.py``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import threading
from pathlib import Path
from typing import Any

from agent.adapters.heartbeat import Heartbeats
from agent.adapters.keys import KeyStore, initial_key_list
from agent.adapters.storage import atomic_write_bytes, atomic_write_json
from agent.adapters.uds_server import UdsServer
from agent.core.config import VehicleConfig
from agent.core.faults import FaultSpec
from agent.core.preconditions import Gate, parse_gate
from agent.core.roles import KeysRejected
from agent.protocol.link import INVENTORY_FILE, InstallJob, InstallStatus, parse_manifest
from gateway.arrivals import Arrivals
from gateway.buses import Buses
from gateway.content_relay import ContentRelay
from gateway.deploy_server import DEPLOY_SERVICES, DeployState
from gateway.install import InstallInterrupted, InstallPlan, install
from gateway.inventory import collect_versions
from gateway.jobs import Awaited, DeltaImage, FlashJob
from gateway.vehicle_state import read_signals
from gateway.verify import Approved, Trust, check_install

__all__ = ["GatewayDaemon", "GatewayInstaller"]

log = logging.getLogger(__name__)

MANIFEST_COPY = "install-manifest.json"  # the manifest an install runs, kept beside its journal
WAITING_FILE = "preconditions.json"  # why an install waits before activating (status 0x05), for the TBOX to read


def load_keys(config: VehicleConfig, results_dir: Path) -> tuple[str | None, KeyStore]:
    """The VIN and the key store installs are verified against: the gateway section's keys,
    thresholds and VIN, else the tbox section's (one vehicle.yaml for both daemons), then the key
    lists taken since (``<results_dir>/keys/``). Without a VIN or keys, every install is refused."""
    gw, tbox = config.gateway, config.tbox
    campaign = gw.trusted_keys or (tbox.trusted_keys if tbox is not None else ())
    content = gw.content_trusted_keys or (tbox.content.trusted_keys if tbox is not None else ())
    root = gw.root_keys or (tbox.root_keys if tbox is not None else ())

    def threshold(own: int | None, tbox_value: int) -> int:
        return own if own is not None else (tbox_value if tbox is not None else 1)

    initial = initial_key_list(
        (campaign, threshold(gw.signature_threshold, tbox.signature_threshold if tbox else 1)),
        (content, threshold(gw.content_signature_threshold, tbox.content.signature_threshold if tbox else 1)),
        (root, threshold(gw.root_threshold, tbox.root_threshold if tbox else 1)))
    vin = gw.vin or (tbox.vin if tbox is not None else None)
    if not vin or not campaign:
        log.warning("no VIN or no trusted campaign keys configured: every install will be refused")
    return vin, KeyStore(results_dir / "keys", initial)


def _matches(data: bytes | None, size: int, sha256: str) -> bool:
    return data is not None and len(data) == size and hashlib.sha256(data).hexdigest() == sha256


class GatewayInstaller:
    """Flashes per install manifest in a background thread; status kept on disk too. An install
    that was running when the gateway stopped goes on when it starts again (``resume``)."""

    def __init__(self, config: VehicleConfig, package_dir: Path, results_dir: Path, stop: threading.Event,
                 faults: list[FaultSpec] | None = None, buses: Buses | None = None, trust: Trust | None = None) -> None:
        self.config, self.package_dir, self.results_dir, self.stop = config, package_dir, results_dir, stop
        self.keys: KeyStore | None = None
        if trust is None:
            vin, self.keys = load_keys(config, results_dir)
            trust = Trust(vin)
        self.trust = trust
        self.buses = buses if buses is not None else Buses(config)
        self.faults = faults or []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._campaign: str | None = None
        self._step = "starting"
        self._done = 0
        self._total = 0
        self._waiting: dict[str, str] | None = None  # the install waits for these preconditions
        self.heartbeats = Heartbeats(config.gateway.worker_stale_s)  # the install thread, while one runs

    def _parse(self, data: bytes) -> InstallPlan | str:
        manifest = parse_manifest(data)
        if isinstance(manifest, str):
            return manifest
        images: dict[str, bytes] = {}
        for job in manifest.jobs:
            if job.ecu not in self.config.ecus:
                return f"unknown ECU {job.ecu!r}"
            for name in (job.package, job.delta):  # the full image, a delta to it, or both
                if name is not None and (self.package_dir / name).is_file():
                    images[name] = (self.package_dir / name).read_bytes()
            if manifest.arriving:
                continue  # a pipelined install: each job waits for its file (gateway/arrivals.py)
            if job.delta is not None and job.delta not in images:
                return f"delta {job.delta!r} was not deployed"
            if job.package not in images and job.delta is None:
                return f"package {job.package!r} was not deployed"
        gate: Gate | None = None
        if manifest.preconditions is not None:
            parsed_gate = parse_gate(manifest.preconditions)
            if isinstance(parsed_gate, str):
                return parsed_gate
            if parsed_gate.conditions.ecu not in self.config.ecus:
                return f"preconditions: unknown ECU {parsed_gate.conditions.ecu!r}"
            gate = parsed_gate
        refused = self._follow_keys(manifest.proof or {})
        if refused is not None:
            return refused
        trust = self.trust
        if self.keys is not None:
            current = self.keys.current
            trust = Trust(trust.vin, current.role("campaign"), current.role("content"))
        approved = check_install(manifest, images, trust, set(self.config.ecus))
        if isinstance(approved, str):
            return approved
        jobs = [(job.order, self._job(job, images, approved)) for job in manifest.jobs]
        ready = Arrivals(self.package_dir, self.config.gateway.arrival_idle_s, self.stop).ready if manifest.arriving else None
        return InstallPlan(manifest.campaign_id, tuple(jobs), manifest.activation, ready, gate)

    @staticmethod
    def _job(job: InstallJob, images: dict[str, bytes], approved: Approved) -> FlashJob:
        """A verified job: its full image when it was deployed, and the delta to it when one was."""
        delta = None
        signed = approved.packages.get(job.ecu)
        if signed is not None and job.delta is not None and signed.delta is not None:
            d = signed.delta
            if not _matches(images.get(job.delta), d.size, d.sha256):  # a pipelined install: still on its way
                awaited = Awaited(d.name, d.size, d.sha256, signed.size, signed.sha256, d.base_sha256, d.image_crc32)
                return FlashJob(job.ecu, b"", job.version, job.package, guard_rollback=True, awaited=awaited)
            delta = DeltaImage(images[job.delta], d.base_sha256, signed.size, signed.sha256, d.image_crc32, job.delta)
        elif signed is not None and not _matches(images.get(job.package), signed.size, signed.sha256):
            awaited = Awaited(signed.name, signed.size, signed.sha256, signed.size, signed.sha256)
            return FlashJob(job.ecu, b"", job.version, job.package, guard_rollback=True, awaited=awaited)
        return FlashJob(job.ecu, images.get(job.package, b""), job.version, job.package, guard_rollback=True, delta=delta)

    def _follow_keys(self, proof: dict[str, Any]) -> str | None:
        """The key lists the TBOX has taken, taken here too (kept: leaving them out of a later
        manifest brings no revoked key back). None, or why the install is refused."""
        chain = proof.get("keys")
        if chain is None or self.keys is None:
            return None
        try:
            if not isinstance(chain, list) or not all(isinstance(k, str) for k in chain):
                raise ValueError("proof.keys is not a list of base64 key lists")
            self.keys.follow([base64.b64decode(k, validate=True) for k in chain])
        except (binascii.Error, ValueError) as exc:
            return f"not signed: {exc}"
        except KeysRejected as exc:
            return f"not signed: {exc}"
        return None

    def start(self, manifest: bytes) -> str | None:
        parsed = self._parse(manifest)
        if isinstance(parsed, str):
            named = parse_manifest(manifest)
            if not isinstance(named, str) and not (self.results_dir / named.campaign_id / "install.json").exists():
                # refused for good: the TBOX reads the reason instead of trying again
                self._write_status(named.campaign_id, InstallStatus.REFUSED, parsed)
            return parsed
        plan = parsed
        campaign, jobs = plan.campaign_id, [job for _, job in plan.jobs]
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return "an install is running"
            atomic_write_bytes(self.results_dir / campaign / MANIFEST_COPY, manifest)
            self._begin(plan, resume=False)
        log.info("install %s started: %s", campaign, ", ".join(f"{j.ecu} <- {j.source}" for j in jobs))
        return None

    def _begin(self, plan: InstallPlan, resume: bool) -> None:
        self._campaign, self._done, self._total, self._step = plan.campaign_id, 0, len(plan.jobs), "starting"
        self._waiting = None
        self.heartbeats.beat("install")
        self._write_status(plan.campaign_id, InstallStatus.RUNNING)
        self._thread = threading.Thread(target=self._run, args=(plan, resume), name="install", daemon=True)
        self._thread.start()

    def resume(self) -> str | None:
        """At start-up: the install that was running when the gateway stopped goes on from its
        journal (the campaign id), or is ended as failed when it cannot (the reason is logged)."""
        running = []
        for path in self.results_dir.glob("*/install.json"):
            try:
                doc = json.loads(path.read_text())
                if int(doc.get("code", 0)) == InstallStatus.RUNNING:
                    running.append((path.stat().st_mtime, path.parent, str(doc.get("campaign_id") or path.parent.name)))
            except (OSError, ValueError, TypeError, AttributeError):
                continue
        resumed = None
        for _, out, campaign in sorted(running, reverse=True):  # the newest goes on; any other is stale
            try:
                parsed = self._parse((out / MANIFEST_COPY).read_bytes()) if resumed is None else "another install went on"
            except OSError as exc:
                parsed = f"its manifest is gone ({exc.strerror})"
            if isinstance(parsed, str) or parsed.campaign_id != campaign:
                why = parsed if isinstance(parsed, str) else "its manifest names another campaign"
                log.warning("install %s was interrupted and cannot go on: %s", campaign, why)
                self._write_status(campaign, InstallStatus.FAILED, f"interrupted by a gateway restart; {why}")
                continue
            with self._lock:
                self._begin(parsed, resume=True)
            log.info("install %s was interrupted by a restart: going on from its journal", campaign)
            resumed = campaign
        return resumed

    def _progress(self, ecu: str, step: str, done: int, total: int) -> None:
        self.heartbeats.beat("install")  # called at every request of a flash
        self._step = f"{ecu} {step}"
        if step in ("done", "failed"):
            with self._lock:
                self._done += 1

    def _run(self, plan: InstallPlan, resume: bool) -> None:
        campaign = plan.campaign_id
        out = self.results_dir / campaign
        try:
            ok, _ = install(self.config, plan, out, buses=self.buses, progress=self._progress, stop=self.stop,
                            faults=self.faults, resume=resume, waiting=lambda check: self._wait(out, check),
                            signals=lambda ecu, wait: read_signals(self.config, self.buses, ecu, wait))
            self._write_status(campaign, InstallStatus.SUCCEEDED if ok else InstallStatus.FAILED)
            log.info("install %s finished: %s", campaign, "success" if ok else "failed")
        except InstallInterrupted as exc:  # status stays running: the next start goes on from the journal
            log.warning("%s; it goes on when the gateway starts again", exc)
        except Exception as exc:  # noqa: BLE001 - reported to the TBOX as a failed install
            log.exception("install %s failed", campaign)
            self._write_status(campaign, InstallStatus.FAILED, str(exc))
        finally:
            self.heartbeats.forget("install")

    def _wait(self, out: Path, check: dict[str, Any] | None) -> None:
        """The install waits for its preconditions (the check, kept for the TBOX), or goes on (None)."""
        self.heartbeats.beat("install")
        unmet = check["unmet"] if check is not None else None
        if check is not None and unmet != self._waiting:  # written when what is unmet changes, not at every check
            atomic_write_json(out / WAITING_FILE, check)
            self._step = "waiting for " + ", ".join(check["unmet"])
        self._waiting = unmet

    def _write_status(self, campaign: str, status: int, error: str | None = None) -> None:
        doc: dict[str, Any] = {"campaign_id": campaign, "status": InstallStatus(status).name.lower(), "code": status,
                               "done": self._done, "total": self._total}
        if error:
            doc["error"] = error
        atomic_write_json(self.results_dir / campaign / "install.json", doc)

    def status(self, campaign: str | None) -> tuple[int, int, int]:
        with self._lock:
            running = self._thread is not None and self._thread.is_alive()
            if campaign is None or campaign == self._campaign:
                if running:
                    return InstallStatus.WAITING if self._waiting is not None else InstallStatus.RUNNING, self._done, self._total
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

    def describe(self) -> str:
        """One line on the install, for systemd's STATUS=."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                return "no install running"
            return f"install {self._campaign}: {self._done} of {self._total} ECUs done, now {self._step}"

    def inventory(self) -> None:
        atomic_write_json(self.results_dir / INVENTORY_FILE,
                          {"schema": "vota-inventory/1", "ecus": collect_versions(self.config, buses=self.buses,
                                                                                  trace_dir=self.results_dir / "inventory")})

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
        self.buses = Buses(config)  # every segment opened once; one conversation per ECU at a time
        self.buses.pin(self.link.segment)  # the deploy server listens there, also while an ECU on it is flashed
        self.server: UdsServer[DeployState] | None = None
        self._stopped = threading.Event()
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
                segment=self.buses.segment(self.link.segment),
                request_id=self.link.request_id,
                response_id=self.link.response_id,
                functional_id=None,
                services=DEPLOY_SERVICES,
                state=DeployState(self.link, self.config.gateway.results_dir, self.installer,
                                  relay=ContentRelay(self.config, Path(self.link.package_dir),
                                                     Path(self.config.gateway.results_dir), self.buses)),
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
        self.buses.shutdown()

    def wait(self) -> None:
        self._stopped.wait()

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
        return f"deploy server on {self.link.segment}; {self.installer.describe()}"
