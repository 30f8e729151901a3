"""Executors for owner content (C1, C6): one small interface, one executor per item class.

- ``resource`` items go to the ECU that shows them, through the gateway: the material is
  deployed to the gateway like a package, stored on the ECU by RequestFileTransfer, then
  shown or stopped by RoutineControl (gateway routine 0x0303). No software is flashed.
- ``application`` items are installed into the infotainment app area (``tbox/apps.py``).
- ``software`` items become an upgrade campaign through the deploy -> flash path, with its
  traces and diagnosis; the item is ``installing`` until the campaign ends.

Executors are idempotent: the manager runs an action first and persists the new state
after it, so a kill in between runs the action again after a restart.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

from agent.adapters.file_client import PackageDeployer
from agent.adapters.storage import atomic_write_bytes
from agent.adapters.uds_client import Transport
from agent.core.config import DeployConfig
from agent.core.content import Item
from agent.errors import Refused, TryLater, VotaError
from tbox.apps import AppRegistry
from tbox.content_state import ItemRecord
from tbox.gateway_client import ContentOp, GatewayClient, GatewayError

__all__ = ["Job", "Executor", "ResourceExecutor", "AppExecutor", "SoftwareExecutor"]

log = logging.getLogger(__name__)


@dataclass
class Job:
    bundle_id: str
    version: int
    item: Item
    entry: ItemRecord  # the item's persisted state; executors keep what they need in it (delivered, campaign_id)
    data: Callable[[], bytes]  # the item's plaintext (decrypted on demand)
    signed: Callable[[], tuple[bytes, bytes]] = lambda: (b"", b"")  # the bundle's manifest.json and manifest.sig.json

    @property
    def name(self) -> str:
        return f"c-{self.bundle_id}-v{self.version}-{self.item.id}.bin"


class Executor(Protocol):
    def start(self, job: Job) -> str:
        """Run the item; returns its status after it (``active`` or ``installing``)."""

    def stop(self, job: Job) -> None:
        """Outside its window or mode: stop showing it (it may start again)."""

    def revert(self, job: Job) -> None:
        """Expired or declined: undo it."""

    def poll(self, job: Job) -> tuple[str, dict[str, Any]] | None:
        """For ``installing`` items: the final status and details, or None while running."""


class ResourceExecutor:
    def __init__(self, gateway: GatewayClient, segment: Transport, link: DeployConfig, ecus: set[str],
                 targets: Mapping[str, str], workdir: Path, stop: threading.Event,
                 report: Callable[[str, str, dict[str, Any], bytes], None] | None = None) -> None:
        self.gateway, self.segment, self.link, self.ecus = gateway, segment, link, ecus
        self.targets, self.workdir, self.stop_event = dict(targets), workdir, stop
        self.report = report  # (ecu, name, transfer result, header-only trace) of each gateway -> ECU transfer

    def ecu(self, job: Job) -> str:
        ecu = self.targets.get(job.item.target, job.item.target)
        if ecu not in self.ecus:
            raise Refused("unknown_target", f"no ECU shows {job.item.target!r} on this vehicle")
        return ecu

    def _ask(self, op: int, ecu: str, arg: bytes = b"") -> bytes:
        """The gateway's answer; Refused (ecu_refused) when the ECU said no, TryLater when it is silent."""
        return self.gateway.content(op, ecu, arg)

    def start(self, job: Job) -> str:
        ecu = self.ecu(job)
        if job.entry.delivered:
            try:
                self._ask(ContentOp.SHOW, ecu, job.name.encode())
                return "active"
            except Refused:
                job.entry.delivered = False  # the ECU lost it (replaced, reflashed): deliver it again
        self._deliver(job, ecu)
        self._ask(ContentOp.SHOW, ecu, job.name.encode())
        return "active"

    def _deliver(self, job: Job, ecu: str) -> None:
        """Deploy the plaintext to the gateway, then have the gateway store it on the ECU."""
        path = self.workdir / job.name
        data = job.data()
        atomic_write_bytes(path, data)
        try:
            with self.gateway.lock:
                result = PackageDeployer(self.segment, self.link, job.name, path, hashlib.sha256(data).hexdigest(),
                                         stop=self.stop_event).run()
            if result.result != "success":
                raise TryLater(f"deploy to the gateway: {result.failed_step}: {result.reason}")
            try:
                self._ask(ContentOp.STORE, ecu, job.name.encode())
            finally:
                self._report_transfer(ecu, job.name)
        finally:
            path.unlink(missing_ok=True)  # the plaintext does not stay on the TBOX
        job.entry.delivered = True

    def _report_transfer(self, ecu: str, name: str) -> None:
        """The gateway's result and header-only trace of its transfer to the ECU, to the cloud."""
        if self.report is None:
            return
        base = f"content/{name}.deploy"
        try:
            result = json.loads(self.gateway.read_file(f"{base}.result.json"))
            trace = self.gateway.read_file(f"{base}.trace.jsonl")
        except (GatewayError, ValueError) as exc:
            log.info("content transfer of %s to %s not read back: %s", name, ecu, exc)
            return
        self.report(ecu, name, result, trace)

    def stop(self, job: Job) -> None:
        self._ask(ContentOp.STOP, self.ecu(job))

    def revert(self, job: Job) -> None:
        """Stop showing it and delete it from the ECU: nothing of it stays."""
        ecu = self.ecu(job)
        self._ask(ContentOp.STOP, ecu)
        if job.entry.delivered:
            try:
                self._ask(ContentOp.DELETE, ecu, job.name.encode())
            except Refused:
                pass  # already gone (the ECU was replaced or reset its store)
            job.entry.delivered = False

    def poll(self, job: Job) -> tuple[str, dict[str, Any]] | None:
        return "active", {}


class AppExecutor:
    def __init__(self, registry: AppRegistry) -> None:
        self.registry = registry

    @staticmethod
    def version(job: Job) -> str:
        return str(job.item.raw.get("version") or job.version)

    def start(self, job: Job) -> str:
        try:
            if self.registry.version(job.item.target) != self.version(job):
                self.registry.install(job.item.target, self.version(job), job.data())
        except VotaError as exc:
            raise Refused("install_failed", str(exc)) from None
        return "active"

    def stop(self, job: Job) -> None:
        return None  # an installed app stays installed until its content expires

    def revert(self, job: Job) -> None:
        if self.registry.version(job.item.target) == self.version(job):
            self.registry.revert(job.item.target)

    def poll(self, job: Job) -> tuple[str, dict[str, Any]] | None:
        return "active", {}


class CampaignPort(Protocol):
    def start_local_campaign(self, campaign_id: str, ecu: str, version: str, data: bytes,
                             proof: dict[str, Any] | None = None) -> None:
        """Queue a campaign (deploy -> flash) for ``data``; idempotent per campaign id. ``proof``
        goes with the install manifest: the gateway flashes only what it shows was signed."""

    def campaign_outcome(self, campaign_id: str) -> dict[str, Any] | None:
        """None while it runs; else {"outcome", "failure", "cause"}."""


class SoftwareExecutor:
    def __init__(self, campaigns: CampaignPort, ecus: set[str]) -> None:
        self.campaigns, self.ecus = campaigns, ecus

    @staticmethod
    def campaign_id(job: Job) -> str:
        return f"content-{job.bundle_id}-v{job.version}-{job.item.id}"

    def start(self, job: Job) -> str:
        if job.item.target not in self.ecus:
            raise Refused("unknown_target", f"no ECU {job.item.target!r} on this vehicle")
        version = job.item.raw.get("version")
        if not isinstance(version, str) or not version:
            raise Refused("malformed", "a software item needs the software version it installs")
        manifest, signature = job.signed()
        proof = {"content": {"manifest": base64.b64encode(manifest).decode(), "signature": base64.b64encode(signature).decode(),
                             "item": job.item.id}}
        self.campaigns.start_local_campaign(self.campaign_id(job), job.item.target, version, job.data(), proof)
        job.entry.campaign_id = self.campaign_id(job)
        return "installing"

    def stop(self, job: Job) -> None:
        return None  # software stays installed; a window means nothing to a flash

    def revert(self, job: Job) -> None:
        return None  # expiry ends the item; going back needs a campaign of its own

    def poll(self, job: Job) -> tuple[str, dict[str, Any]] | None:
        outcome = self.campaigns.campaign_outcome(self.campaign_id(job))
        if outcome is None:
            return None
        if outcome.get("outcome") == "success":
            return "active", {"campaign_id": self.campaign_id(job)}
        failure = outcome.get("failure") or {}
        return "failed", {"reason": str(failure.get("reason") or "flash_failed"), "detail": str(failure.get("detail") or ""),
                          "campaign_id": self.campaign_id(job), "cause": outcome.get("cause")}
