"""The gateway's installs as the deploy server starts and reports them: one at a time, in a
thread of its own, with its status on disk (``<results>/<campaign>/install.json``) so that the
TBOX can ask for it at any time and an install that was running when the gateway stopped goes on
when it starts again (``resume``). What an install does is ``gateway/install.py``; what it is
checked against, ``gateway/plan.py``.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as _dt
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

from agent.adapters.bus_signals import BusSignals
from agent.adapters.heartbeat import Heartbeats
from agent.adapters.keys import KeyStore, initial_key_list
from agent.adapters.storage import Deferred, atomic_write_bytes, atomic_write_json, storage_fault
from agent.core.config import VehicleConfig
from agent.core.faults import FaultSpec
from agent.core.roles import KeysRejected
from agent.errors import InstallRefused
from agent.protocol.link import INVENTORY_FILE, InstallManifest, InstallStatus, parse_manifest
from gateway.arrivals import Arrivals
from gateway.buses import Buses
from gateway.install import InstallInterrupted, InstallPorts, install
from gateway.inventory import collect_versions
from gateway.owed import OwedDiscards
from gateway.plan import InstallPlan, build_plan, files_named
from gateway.retention import MANIFEST_COPY, release_packages, tidy
from gateway.rxswin import RxswinSet
from gateway.vehicle_state import read_signals
from gateway.verify import Trust

__all__ = ["GatewayInstaller", "load_keys", "MANIFEST_COPY", "WAITING_FILE", "CANCEL_FILE"]

log = logging.getLogger(__name__)

INSTALLED_FILE = "installed-campaigns.json"  # campaign ids installed here: a replayed manifest is refused
MAX_INSTALLED = 4096
CANCEL_FILE = "cancel.json"  # the TBOX cancelled the campaign: never resumed, never started again
PROGRESS_FILE = "progress.json"  # served from memory while an install runs: each ECU's step and bytes
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


class GatewayInstaller:
    """Runs installs per install manifest in a background thread; status kept on disk too. An
    install that was running when the gateway stopped goes on when it starts again (``resume``)."""

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
        self._bytes: dict[str, tuple[str, int, int]] = {}  # ECU -> (step, bytes done, bytes in all) of the running install
        self._total = 0
        self._waiting: dict[str, str] | None = None  # the install waits for these preconditions
        self._cancel = threading.Event()  # the running install's: set when the TBOX cancels its campaign
        self.deferred = Deferred()  # statuses and summaries the storage could not take yet
        self._status_lock = threading.Lock()
        self._statuses: dict[str, dict[str, Any]] = {}  # the statuses written since the start, newest per campaign
        self.heartbeats = Heartbeats(config.gateway.worker_stale_s)  # the install thread, while one runs
        self.buses.on_wait = self._ecu_held  # an install waiting for an ECU (a DoIP tester has it) is alive
        self.owed = OwedDiscards(config, self.buses, results_dir, stop)  # staged images a failed install left
        self.rxswin = RxswinSet(config, results_dir)  # the vehicle's RXSWIN set (gateway/rxswin.py)
        self.bus_signals = None  # the vehicle's state from its broadcast frames (vehicle_signals)
        if config.signals is not None:
            self.buses.pin(config.signals.segment)
            self.bus_signals = BusSignals(config.signals, self.buses.segment(config.signals.segment))

    # ---- what a manifest asks for --------------------------------------------------------
    def plan(self, data: bytes, starting: bool = False) -> InstallPlan:
        """The plan of an install manifest, or InstallRefused: parsed, the key lists it carries
        taken, checked against the deployed files and the signed documents (gateway/plan.py);
        ``starting`` (not resuming): also against the gateway's clock and the campaigns it installed."""
        manifest = parse_manifest(data)
        if starting and manifest.campaign_id in self._installed():
            raise InstallRefused(f"campaign {manifest.campaign_id} was installed on this vehicle before: not run again",
                                 manifest.campaign_id)
        self._follow_keys(manifest)
        images = {}
        for name in files_named(manifest):  # the full image, a delta to it, or both, where deployed
            if (self.package_dir / name).is_file():
                images[name] = (self.package_dir / name).read_bytes()
        trust = self._trust()
        if starting:
            trust = dataclasses.replace(trust, now=_dt.datetime.now(_dt.timezone.utc))
        plan = build_plan(manifest, images, trust, self.config)
        if starting:  # a resumed install may have changed it already
            self.rxswin.check(plan.campaign_id, plan.rxswin, [job.ecu for _, job in plan.jobs])
        return plan

    def _trust(self) -> Trust:
        if self.keys is None:
            return self.trust
        current = self.keys.current
        return Trust(self.trust.vin, current.role("campaign"), current.role("content"))

    def _installed(self) -> list[str]:
        """The campaigns installed on this vehicle (replays of them are refused), newest last."""
        try:
            doc = json.loads((self.results_dir / INSTALLED_FILE).read_text())
            return [str(c) for c in doc["campaigns"]]
        except (OSError, ValueError, KeyError, TypeError):
            return []

    def _note_installed(self, campaign: str) -> None:
        installed = [c for c in self._installed() if c != campaign][-(MAX_INSTALLED - 1):] + [campaign]
        self.deferred.write_json(self.results_dir / INSTALLED_FILE, {"campaigns": installed}, "the campaigns installed")

    def _follow_keys(self, manifest: InstallManifest) -> None:
        """The key lists the TBOX has taken, taken here too (kept: leaving them out of a later
        manifest brings no revoked key back)."""
        chain = (manifest.proof or {}).get("keys")
        if chain is None or self.keys is None:
            return
        try:
            if not isinstance(chain, list) or not all(isinstance(k, str) for k in chain):
                raise ValueError("proof.keys is not a list of base64 key lists")
            self.keys.follow([base64.b64decode(k, validate=True) for k in chain])
        except (binascii.Error, ValueError, KeysRejected) as exc:
            raise InstallRefused(f"not signed: {exc}", manifest.campaign_id) from None

    # ---- running one ---------------------------------------------------------------------
    def start(self, manifest: bytes) -> None:
        """Start the install a manifest asks for; InstallRefused says why not. A campaign refused
        for good gets its status (refused, and why) for the TBOX to read instead of trying again."""
        try:
            plan = self.plan(manifest, starting=True)
            if self._cancelled(plan.campaign_id) is not None:
                raise InstallRefused("the TBOX cancelled this campaign", plan.campaign_id)
        except InstallRefused as exc:
            cid = exc.campaign_id
            if cid is not None and not (self.results_dir / cid / "install.json").exists():
                self._write_status(cid, InstallStatus.REFUSED, exc.detail)
            raise
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                raise InstallRefused("an install is running", plan.campaign_id)
            try:
                atomic_write_bytes(self.results_dir / plan.campaign_id / MANIFEST_COPY, manifest)
                kept = None
            except OSError as exc:  # nothing is started that could not be resumed
                kept = f"storage: the gateway cannot keep the manifest ({storage_fault(exc) or exc})"
            if kept is None:
                self._tidy(plan, frozenset(files_named(parse_manifest(manifest))))
                self._begin(plan, resume=False)
        if kept is not None:
            self._write_status(plan.campaign_id, InstallStatus.REFUSED, kept)
            raise InstallRefused(kept, plan.campaign_id)
        log.info("install %s started: %s", plan.campaign_id, ", ".join(f"{j.ecu} <- {j.source}" for _, j in plan.jobs))

    def _begin(self, plan: InstallPlan, resume: bool) -> None:
        self._campaign, self._done, self._total, self._step = plan.campaign_id, 0, len(plan.jobs), "starting"
        self._bytes = {}
        self._waiting = None
        self._cancel = threading.Event()
        if self._cancelled(plan.campaign_id) is not None:  # cancelled while the gateway was down: it goes back
            self._cancel.set()
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
                if resumed is not None:
                    raise InstallRefused("another install went on")
                plan = self.plan((out / MANIFEST_COPY).read_bytes())
                if plan.campaign_id != campaign:
                    raise InstallRefused("its manifest names another campaign")
            except (InstallRefused, OSError) as exc:
                why = exc.detail if isinstance(exc, InstallRefused) else f"its manifest is gone ({exc.strerror})"
                log.warning("install %s was interrupted and cannot go on: %s", campaign, why)
                self._write_status(campaign, InstallStatus.FAILED, f"interrupted by a gateway restart; {why}")
                continue
            with self._lock:
                self._begin(plan, resume=True)
            log.info("install %s was interrupted by a restart: going on from its journal", campaign)
            resumed = campaign
        return resumed

    def _progress(self, ecu: str, step: str, done: int, total: int) -> None:
        self.heartbeats.beat("install")  # called at every request of a flash
        self._step = f"{ecu} {step}"
        self._bytes[ecu] = (step, done, total)
        if step in ("done", "failed"):
            with self._lock:
                self._done += 1

    def _run(self, plan: InstallPlan, resume: bool) -> None:
        campaign = plan.campaign_id
        out = self.results_dir / campaign
        storage: list[str] = []  # why the install went back, when the storage failed under it
        ports = InstallPorts(
            self.buses, self.stop, progress=self._progress, faults=tuple(self.faults),
            ready=Arrivals(self.package_dir, self.config.gateway.arrival_idle_s, self.stop,
                           [j.awaited.file for _, j in plan.jobs if j.awaited is not None], self._cancel).ready
            if plan.arriving else None,
            signals=lambda ecu, wait: read_signals(self.config, self.buses, ecu, wait, self.bus_signals),
            waiting=lambda check: self._wait(out, check), cancel=self._cancel,
            cancelled=lambda: self._cancelled(campaign) or "cancelled by the TBOX", storage_failed=storage.append,
            keep=self.deferred.write_json, rxswin=lambda ok: self.rxswin.settle(campaign, plan.rxswin, ok))
        try:
            self.owed.settle()  # what an earlier install could not discard, before this one touches the ECUs
            ok, results = install(self.config, plan, out, ports, resume=resume)
            self.owed.note(campaign, ok, results)
            end = (InstallStatus.SUCCEEDED if ok else InstallStatus.FAILED if storage
                   else InstallStatus.CANCELLED if ports.cancel.is_set() else InstallStatus.FAILED)
            self._write_status(campaign, end, storage[0] if storage and not ok else None)
            if end == InstallStatus.SUCCEEDED:
                self._note_installed(campaign)
            if end in (InstallStatus.SUCCEEDED, InstallStatus.CANCELLED):  # no second round can need them
                release_packages(self.package_dir, out)
            log.info("install %s finished: %s", campaign, "success" if ok else "failed")
        except InstallInterrupted as exc:  # status stays running: the next start goes on from the journal
            log.warning("%s; it goes on when the gateway starts again", exc)
        except Exception as exc:  # noqa: BLE001 - reported to the TBOX as a failed install
            log.exception("install %s failed", campaign)
            self._write_status(campaign, InstallStatus.FAILED, str(exc))
        finally:
            self.heartbeats.forget("install")

    def _ecu_held(self, ecu: str, holder: str) -> None:
        """Work waits for ``ecu`` that ``holder`` has (a workshop tester programming it): while an
        install runs it is alive, and its status says what it waits for."""
        with self._lock:
            running = self._thread is not None and self._thread.is_alive()
        if running:
            self.heartbeats.beat("install")
            self._step = f"waiting for {ecu} ({holder})"

    def _wait(self, out: Path, check: dict[str, Any] | None) -> None:
        """The install waits for its preconditions (the check, kept for the TBOX), or goes on (None)."""
        self.heartbeats.beat("install")
        unmet = check["unmet"] if check is not None else None
        if check is not None and unmet != self._waiting:  # written when what is unmet changes, not at every check
            atomic_write_json(out / WAITING_FILE, check)
            self._step = "waiting for " + ", ".join(check["unmet"])
        self._waiting = unmet

    def unwritten(self, path: Path) -> bytes | None:
        """A result file the storage could not take yet; and ``<campaign>/progress.json``, never on
        disk: each ECU's step and bytes while the install runs (what the TBOX tells the cloud)."""
        if path.name == PROGRESS_FILE:
            with self._lock:
                if path.parent.name == self._campaign and self._thread is not None and self._thread.is_alive():
                    ecus = {e: {"step": st, "done": d, "total": t} for e, (st, d, t) in sorted(self._bytes.items())}
                    return json.dumps({"campaign_id": self._campaign, "ecus": ecus}, separators=(",", ":")).encode()
        self.deferred.flush()
        return self.deferred.pending(path)

    def _tidy(self, plan: InstallPlan, names: frozenset[str]) -> None:
        """Before an install: what ended installs keep, trimmed (gateway/retention.py); ``names``:
        the files this install's manifest names, never removed."""
        gw = self.config.gateway
        try:
            tidy(self.package_dir, self.results_dir, plan.campaign_id, names | {f"install-{plan.campaign_id}.json"},
                 gw.keep_results, gw.keep_days)
        except OSError as exc:
            log.warning("ended installs not tidied: %s", exc)

    # ---- cancelling -----------------------------------------------------------------------
    def _cancelled(self, campaign: str) -> str | None:
        """Why the TBOX cancelled ``campaign``, when it did."""
        path = self.results_dir / campaign / CANCEL_FILE
        try:
            doc = json.loads(self.deferred.pending(path) or path.read_bytes())  # kept here while the disk is full
            return f"cancelled by the TBOX: {doc.get('reason') or 'the campaign ended'}"
        except (OSError, ValueError, AttributeError):
            return None

    def cancel(self, campaign: str, reason: str = "") -> tuple[int, int, int]:
        """The TBOX ended ``campaign``: journaled first (a restart does not resume it, a manifest
        for it is refused), then the install running it goes back (gateway/install_phases.py);
        the status as ``status`` gives it (RUNNING while it winds down). Idempotent."""
        with self._lock:
            if self._cancelled(campaign) is None:
                self.deferred.write_json(self.results_dir / campaign / CANCEL_FILE,  # a full disk does not stop a cancel
                                         {"campaign_id": campaign, "reason": reason[:200] or None, "at": round(time.time(), 3)},
                                         f"the cancel of {campaign}")
                log.warning("campaign %s cancelled by the TBOX%s", campaign, f": {reason}" if reason else "")
            if campaign == self._campaign and self._thread is not None and self._thread.is_alive():
                self._cancel.set()
        return self.status(campaign)

    # ---- what the TBOX asks --------------------------------------------------------------
    def _write_status(self, campaign: str, status: int, error: str | None = None) -> None:
        doc: dict[str, Any] = {"campaign_id": campaign, "status": InstallStatus(status).name.lower(), "code": status,
                               "done": self._done, "total": self._total}
        if error:
            doc["error"] = error
        with self._status_lock:
            self._statuses.pop(campaign, None)
            self._statuses[campaign] = doc  # what the TBOX is told, also while the storage cannot take it
            while len(self._statuses) > 64:  # months of campaigns: the newest are enough, the rest is on disk
                del self._statuses[next(iter(self._statuses))]
        self.deferred.write_json(self.results_dir / campaign / "install.json", doc, f"install {campaign}: its status")

    def status(self, campaign: str | None) -> tuple[int, int, int]:
        self.deferred.flush()  # what the storage could not take before goes now, before the TBOX reads it
        with self._lock:
            running = self._thread is not None and self._thread.is_alive()
            if campaign is None or campaign == self._campaign:
                if running:
                    return InstallStatus.WAITING if self._waiting is not None else InstallStatus.RUNNING, self._done, self._total
                campaign = campaign or self._campaign
        if campaign is None:
            return InstallStatus.NONE, 0, 0
        try:
            with self._status_lock:
                known = self._statuses.get(campaign)
            doc = known or json.loads((self.results_dir / campaign / "install.json").read_text())
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
        with self._lock:
            idle = self._thread is None or not self._thread.is_alive()
        if idle:
            self.owed.settle()  # a campaign is about to be verified against what the ECUs hold
        ecus = collect_versions(self.config, buses=self.buses, trace_dir=self.results_dir / "inventory")
        doc: dict[str, Any] = {"schema": "vota-inventory/1", "ecus": ecus}
        if self.config.approvals:
            try:
                doc["rxswin"] = self.rxswin.current()
            except ValueError as exc:
                doc["rxswin_error"] = str(exc)
        atomic_write_json(self.results_dir / INVENTORY_FILE, doc)

    def settle_owed(self) -> None:
        """Every ``gateway.owed_retry_s`` (the daemon's timer): owed discards, while no install runs."""
        with self._lock:
            if not self.owed or (self._thread is not None and self._thread.is_alive()):
                return
        self.owed.settle()

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()
