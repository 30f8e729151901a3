"""``vota tbox``: the TBOX daemon. Takes campaigns from the cloud, downloads and verifies
the packages, deploys them to the gateway, triggers the install, collects the flash
results and traces, and reports everything through the store-and-forward cloud link.

Each campaign runs through an explicit state machine (``tbox/campaign_state.py``); every
handler returns the next state, and the state is persisted before its handler runs.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.adapters.canbus import Segment
from agent.adapters.cloud_link import CloudLink
from agent.adapters.file_client import PackageDeployer
from agent.adapters.heartbeat import Heartbeats
from agent.adapters.storage import atomic_write_bytes, atomic_write_json
from agent.core.campaign import Campaign, CampaignRejected, Package, compare_versions, key_id, load_public_key, verify_campaign
from agent.core.config import TboxConfig, VehicleConfig
from agent.core.faults import FaultSpec
from agent.errors import VotaError
from agent.protocol.link import InstallJob, InstallManifest, InstallStatus, encode_manifest
from tbox.apps import AppRegistry
from tbox.campaign_state import TERMINAL, CampaignRecord
from tbox.content_exec import AppExecutor, ResourceExecutor, SoftwareExecutor
from tbox.content_manager import COMMANDS as CONTENT_COMMANDS
from tbox.content_manager import ContentManager
from tbox.download import DownloadError, download
from tbox.gateway_client import ContentOp, GatewayClient, GatewayError

__all__ = ["TboxDaemon", "COMMANDS"]

log = logging.getLogger(__name__)

COMMANDS = ("confirm_install",)
LOCAL_CAMPAIGN = "campaign.local.json"  # a campaign the TBOX made itself from a verified content item


def _load_keys(paths: tuple[str, ...], what: str) -> dict[str, Ed25519PublicKey]:
    keys = {}
    for path in paths:
        try:
            key = load_public_key(Path(path).read_bytes(), path)
        except OSError as exc:
            raise VotaError(f"{path}: cannot read {what} ({exc.strerror})") from None
        keys[key_id(key)] = key
    return keys


class _Fail(Exception):
    """A handler's way to end the campaign: the failure is reported with its stage."""

    def __init__(self, stage: str, reason: str, detail: str, **extra: Any) -> None:
        self.failure = {"stage": stage, "reason": reason, "detail": detail, **extra}
        super().__init__(detail)


class _Retry(Exception):
    """A transient problem: enter the same state again after a pause (loop guard applies)."""


class TboxDaemon:
    def __init__(self, config: VehicleConfig, now: Callable[[], _dt.datetime] | None = None,
                 faults: list[FaultSpec] | None = None, content_now: Callable[[], _dt.datetime] | None = None) -> None:
        self.config = config
        self.faults = [f for f in faults or [] if f.stage == "deploy" and f.side == "client"]
        self.tbox: TboxConfig = config.tbox_config()
        self.link_cfg = config.deploy_link()
        self.now = now or (lambda: _dt.datetime.now(_dt.timezone.utc))
        self.content_now = content_now
        self.state_dir = Path(self.tbox.state_dir)
        self.campaigns_dir = self.state_dir / "campaigns"
        self.trusted = _load_keys(self.tbox.trusted_keys, "trusted key")
        self.cloud = CloudLink(self.tbox.cloud, self.tbox.vin, on_message=self._on_message)
        self.segment: Segment | None = None
        self.gateway: GatewayClient | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._content_wake = threading.Event()
        self._commands: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self._worker = threading.Thread(target=self._run, name="tbox-worker", daemon=True)
        self._content_worker = threading.Thread(target=self._run_content, name="tbox-content", daemon=True)
        self.heartbeats = Heartbeats(self.tbox.worker_stale_s)
        self.content = self._content_manager()

    def _content_manager(self) -> ContentManager:
        cfg = self.tbox.content
        trusted = _load_keys(cfg.trusted_keys, "trusted content key") if cfg.trusted_keys else dict(self.trusted)
        vehicle_key = None
        if cfg.vehicle_key:
            try:
                loaded = serialization.load_pem_private_key(Path(cfg.vehicle_key).read_bytes(), None)
            except OSError as exc:
                raise VotaError(f"{cfg.vehicle_key}: cannot read the vehicle content key ({exc.strerror})") from None
            except ValueError:
                raise VotaError(f"{cfg.vehicle_key}: not a PEM private key") from None
            if not isinstance(loaded, X25519PrivateKey):
                raise VotaError(f"{cfg.vehicle_key}: not an X25519 key (vota content keygen makes one)")
            vehicle_key = loaded
        self.apps = AppRegistry(cfg.app_dir or self.state_dir / "apps")
        light = None
        if cfg.light_ecu:
            ecu, did = cfg.light_ecu, cfg.light_did.to_bytes(2, "big")
            light = lambda: self._gateway().content(ContentOp.READ_DID, ecu, did)  # noqa: E731
        executors: dict[str, Any] = {"application": AppExecutor(self.apps),
                                     "software": SoftwareExecutor(self, set(self.config.ecus))}
        return ContentManager(cfg, self.state_dir, self.tbox.vin, trusted, self._content_report, executors,
                              self.content_now or self.now,
                              vehicle_key=vehicle_key, registry=self.apps, light=light, stop=self._stop)

    def _gateway(self) -> GatewayClient:
        if self.gateway is None:
            raise GatewayError("the TBOX is not started")
        return self.gateway

    def _content_report(self, body: dict[str, Any], msg_id: str) -> None:
        self.cloud.report("events", body, msg_id=msg_id)

    def _content_transfer(self, ecu: str, name: str, result: dict[str, Any], trace: bytes) -> None:
        """A gateway -> ECU content transfer, reported like a flash: result, then its trace."""
        tid = f"content.{ecu}.{name}.{str(result.get('started', '')).replace(':', '')}"
        meta = {"stage": "content", "ecu": ecu, "package": name}
        self.cloud.report("results", {**meta, "result": result}, msg_id=f"{tid}.result")
        self.cloud.report_trace(tid, trace, meta)

    # ---- life cycle ------------------------------------------------------------------------
    def start(self) -> None:
        self.campaigns_dir.mkdir(parents=True, exist_ok=True)
        for d in sorted(self.campaigns_dir.iterdir()):
            CampaignRecord.load(d)  # refuse to start on unreadable state, with the file named
        self.segment = Segment(self.config.segments[self.link_cfg.segment])
        self.gateway = GatewayClient(self.segment, self.link_cfg)
        self.content.executors["resource"] = ResourceExecutor(
            self.gateway, self.segment, self.link_cfg, set(self.config.ecus), dict(self.tbox.content.targets),
            self.state_dir / "content" / "outgoing", self._stop, self._content_transfer)
        self.content.start()
        self.cloud.start()
        self._worker.start()
        self._content_worker.start()

    def stop(self) -> None:
        """Finish or checkpoint the current step, then stop (SIGTERM)."""
        self._stop.set()
        self._wake.set()
        self._content_wake.set()
        for worker in (self._worker, self._content_worker):
            if worker.is_alive():
                worker.join(timeout=60)
        self.cloud.stop()
        if self.segment is not None:
            self.segment.shutdown()

    def alive(self) -> bool:
        """Both workers run and have made progress within ``worker_stale_s`` (the systemd watchdog's question)."""
        stale = self.heartbeats.stale()
        if stale:
            log.error("worker(s) without progress for over %d s: %s", self.tbox.worker_stale_s, ", ".join(stale))
        return self._worker.is_alive() and self._content_worker.is_alive() and not stale

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _polling(self) -> bool:
        """Called at every install status poll: the campaign worker is alive; True when stopping."""
        self.heartbeats.beat("campaign")
        return self.stopping

    # ---- inbound --------------------------------------------------------------------------
    def _reject(self, topic: str, reason: str, detail: str, key: str, campaign_id: str | None = None) -> None:
        log.warning("rejected %s: %s (%s)", topic, reason, detail)
        body = {"event": "rejected", "topic": topic, "reason": reason, "detail": detail, "campaign_id": campaign_id}
        self.cloud.report("events", body, msg_id=f"rejected.{key}")

    def _on_message(self, kind: str, payload: bytes) -> None:
        digest = hashlib.sha256(payload).hexdigest()[:24]
        if kind == "campaign":
            directory = self.campaigns_dir / digest
            if directory.exists():
                log.info("campaign %s received again; already known", digest)
                return
            record = CampaignRecord(digest, directory)
            atomic_write_bytes(record.envelope_path, payload)
            record.save()  # state "received", persisted before anything else happens
            self._wake.set()
            return
        try:
            doc = json.loads(payload)
            if not isinstance(doc, dict):
                raise ValueError("not an object")
        except (ValueError, UnicodeDecodeError):
            self._reject(kind, "malformed", "not a JSON object", digest)
            return
        command, vin = doc.get("command"), doc.get("vin", self.tbox.vin)
        if vin != self.tbox.vin:
            self._reject(kind, "wrong_vehicle", f"command for {vin}", digest)
        elif command in CONTENT_COMMANDS:
            self.content.submit(doc)
            self._content_wake.set()
        elif command not in COMMANDS or not isinstance(doc.get("campaign_id"), str):
            self._reject(kind, "malformed", f"unknown command {command!r} or no campaign_id", digest)
        else:
            self._commands.put(doc)
            self._wake.set()

    def _apply_commands(self) -> None:
        while True:
            try:
                doc = self._commands.get_nowait()
            except queue.Empty:
                return
            for record in self._records():
                if record.campaign_id == doc["campaign_id"] and record.state not in TERMINAL:
                    record.confirmed = True
                    record.save()
                    log.info("install of %s confirmed", record.campaign_id)
                    break
            else:
                self._reject("command", "unknown_campaign", f"no open campaign {doc['campaign_id']!r}",
                             hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:24], doc["campaign_id"])

    # ---- content (C1-C8) -----------------------------------------------------------------------
    def _run_content(self) -> None:
        interval = self.tbox.content.tick_ms / 1000.0
        while not self._stop.is_set():
            self.heartbeats.beat("content")
            try:
                self.content.step()
            except Exception:  # noqa: BLE001 - one bad bundle must not stop the daemon
                log.exception("content step failed")
            self._content_wake.wait(interval)
            self._content_wake.clear()

    def start_local_campaign(self, campaign_id: str, ecu: str, version: str, data: bytes) -> None:
        """A ``software`` content item as a campaign through deploy -> flash (C1)."""
        key = "local-" + hashlib.sha256(campaign_id.encode()).hexdigest()[:18]
        directory = self.campaigns_dir / key
        if (directory / "state.json").exists():
            return
        name = f"{campaign_id}.bin"
        atomic_write_bytes(directory / "packages" / name, data)
        package = {"name": name, "ecu": ecu, "version": version, "url": "", "size": len(data),
                   "sha256": hashlib.sha256(data).hexdigest()}
        atomic_write_json(directory / LOCAL_CAMPAIGN, {"campaign_id": campaign_id, "install": "immediate",
                                                         "packages": [package]})
        record = CampaignRecord(key, directory)
        record.packages = {name: {"ecu": ecu, "version": version, "downloaded": True}}
        record.save()
        self._wake.set()

    def campaign_outcome(self, campaign_id: str) -> dict[str, Any] | None:
        for record in self._records():
            if record.campaign_id == campaign_id and record.state in TERMINAL:
                return {"outcome": record.outcome, "failure": record.failure, "cause": (record.failure or {}).get("cause")}
        return None

    # ---- the worker -----------------------------------------------------------------------
    def _records(self) -> list[CampaignRecord]:
        if not self.campaigns_dir.exists():
            return []
        records = [CampaignRecord.load(d) for d in sorted(self.campaigns_dir.iterdir()) if (d / "state.json").exists()]
        return sorted(records, key=lambda r: r.path.stat().st_mtime)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.heartbeats.beat("campaign")
            self._apply_commands()
            active = [r for r in self._records() if r.state not in TERMINAL]
            progressed = False
            for record in active:
                if self._stop.is_set():
                    break
                progressed |= self._advance(record)
            if not progressed:
                self._wake.wait(1.0)
                self._wake.clear()

    def _advance(self, record: CampaignRecord) -> bool:
        """Run the campaign until it ends or waits; False when it is waiting."""
        handlers: dict[str, Callable[[CampaignRecord], str | None]] = {
            "received": self._received, "verified": lambda r: "downloading", "downloading": self._downloading,
            "downloaded": lambda r: "deploying", "deploying": self._deploying, "deployed": self._deployed,
            "awaiting_install": self._awaiting_install, "installing": self._installing,
            "done": self._finished, "failed": self._finished,
        }
        moved = False
        while record.state not in TERMINAL and not self._stop.is_set():
            self.heartbeats.beat("campaign")
            state = record.state
            if record.entries.get(state, 0) >= self.tbox.max_attempts and state not in ("done", "failed", "awaiting_install"):
                self._fail(record, _Fail(state, "loop_guard", f"state {state} entered {record.entries[state]} times"))
                continue
            if record.entries.get(state, 0) == 0 or moved or state != "awaiting_install":
                record.enter(state)
                self._event(record, state)
            try:
                nxt = handlers[state](record)
            except _Fail as failure:
                self._fail(record, failure)
                moved = True
                continue
            except (_Retry, VotaError, OSError, ValueError, KeyError) as exc:
                log.warning("%s: %s; will retry", state, exc)
                self._stop.wait(self.tbox.retry_delay_s)
                moved = True
                continue
            if nxt is None:  # waiting (a confirm command, or stopping)
                return moved
            record.state = nxt
            if nxt in TERMINAL:
                record.enter(nxt)
            moved = True
        return moved

    def _event(self, record: CampaignRecord, state: str, **extra: Any) -> None:
        cid = record.campaign_id or record.key
        count = record.entries.get(state, 1)
        self.cloud.report("events", {"event": "state", "campaign_id": record.campaign_id, "state": state,
                                     "attempt": count, **extra}, msg_id=f"{cid}.state.{state}.{count}")

    def _fail(self, record: CampaignRecord, failure: _Fail) -> None:
        record.failure = failure.failure
        record.outcome = "failed"
        record.state = "failed"
        record.save()

    def _campaign(self, record: CampaignRecord) -> Campaign:
        """The campaign, verified again from its stored envelope (pure and cheap). Expiry was
        checked when it arrived: a campaign that expires while it runs is finished."""
        local = record.dir / LOCAL_CAMPAIGN
        if local.exists():  # made by this TBOX from a content item whose bundle it verified
            doc = json.loads(local.read_text())
            packages = tuple(Package(**p) for p in doc["packages"])
            now = self.now()
            return Campaign(doc["campaign_id"], self.tbox.vin, now, now + _dt.timedelta(days=1), doc["install"], packages, doc)
        try:
            return verify_campaign(record.envelope_path.read_bytes(), self.trusted, vin=self.tbox.vin,
                                   now=self.now(), check_time=False)
        except CampaignRejected as exc:
            raise _Fail("verify", exc.reason, str(exc)) from None

    # ---- states -----------------------------------------------------------------------------
    def _received(self, record: CampaignRecord) -> str:
        assert self.gateway is not None
        try:
            inventory = self.gateway.inventory()  # D11: versions before the campaign
        except GatewayError as exc:
            raise _Retry(f"inventory: {exc}") from None
        installed = {e["ecu"]: e["software_version"] for e in inventory if e.get("software_version")}
        try:
            if (record.dir / LOCAL_CAMPAIGN).exists():
                campaign = self._campaign(record)
                for p in campaign.packages:  # the same downgrade rule as for the cloud's campaigns
                    current = installed.get(p.ecu)
                    if current and compare_versions(p.version, current) < 0:
                        raise CampaignRejected("downgrade", f"{p.ecu}: {p.version} is older than the installed {current}",
                                               campaign.campaign_id)
            else:
                campaign = verify_campaign(record.envelope_path.read_bytes(), self.trusted, vin=self.tbox.vin,
                                           now=self.now(), installed=installed, known_ecus=set(self.config.ecus))
        except CampaignRejected as exc:
            record.campaign_id = exc.campaign_id
            self._reject("campaign", exc.reason, str(exc), record.key, exc.campaign_id)
            raise _Fail("verify", exc.reason, str(exc)) from None
        duplicate = [r for r in self._records() if r.campaign_id == campaign.campaign_id and r.key != record.key]
        if duplicate:
            self._reject("campaign", "duplicate", f"campaign {campaign.campaign_id} is already known", record.key,
                         campaign.campaign_id)
            record.outcome = "duplicate"
            return "reported"
        record.campaign_id = campaign.campaign_id
        record.packages = {p.name: {"ecu": p.ecu, "version": p.version, **record.packages.get(p.name, {})}
                           for p in campaign.packages}
        record.save()
        self.cloud.report("inventory", {"campaign_id": campaign.campaign_id, "ecus": inventory},
                          msg_id=f"{campaign.campaign_id}.inventory")
        return "verified"

    def _package_path(self, record: CampaignRecord, name: str) -> Path:
        return record.dir / "packages" / name

    def _downloading(self, record: CampaignRecord) -> str | None:
        campaign = self._campaign(record)
        for p in campaign.packages:
            entry = record.packages.setdefault(p.name, {})
            if entry.get("downloaded"):
                continue
            def progress(done: int, total: int, name: str = p.name, last: list[float] = [0.0]) -> None:  # noqa: B006
                self.heartbeats.beat("campaign")
                if time.monotonic() - last[0] > 1.0:
                    last[0] = time.monotonic()
                    self.cloud.report("events", {"event": "progress", "campaign_id": campaign.campaign_id,
                                                 "stage": "download", "package": name, "done": done, "total": total})

            try:
                info = download(p.url, self._package_path(record, p.name), p.size, p.sha256, progress=progress,
                                should_stop=lambda: self.stopping)
            except DownloadError as exc:
                if self.stopping:
                    return None
                if exc.transient:
                    raise _Retry(str(exc)) from None
                raise _Fail("download", "package_refused", str(exc), package=p.name) from None
            entry.update(downloaded=True, resumed_from=info.resumed_from)
            record.save()
            log.info("downloaded %s (%d bytes, resumed from %d)", p.name, p.size, info.resumed_from)
        return "downloaded"

    def _deploying(self, record: CampaignRecord) -> str | None:
        assert self.segment is not None
        campaign = self._campaign(record)
        out = record.dir / "deploy"
        for p in campaign.packages:
            entry = record.packages[p.name]
            if entry.get("deploy") == "success":
                continue
            resume = bool(entry.get("deploy_started"))
            entry["deploy_started"] = True
            record.save()
            deployer = PackageDeployer(self.segment, self.link_cfg, p.name, self._package_path(record, p.name), p.sha256,
                                       resume=resume, stop=self._stop, faults=self.faults,
                                       progress=lambda *_: self.heartbeats.beat("campaign"))
            with self.gateway.lock if self.gateway is not None else threading.RLock():
                result = deployer.run()
            if result.reason == "cancelled":
                return None  # SIGTERM: checkpointed; the deploy resumes after restart
            deployer.write(out, result)
            entry["deploy"] = result.result
            record.save()
            self._report_stage(record, "deploy", p.name, result.to_json(), out / f"{p.name}.deploy.trace.jsonl",
                               {"package": p.name})
            if result.result != "success":  # D4: a failed deploy ends the campaign here
                raise _Fail("deploy", "deploy_failed", f"{p.name}: {result.failed_step}: {result.reason}",
                            package=p.name, packet=result.failed_packet)
        return "deployed"

    def _diagnose(self, record: CampaignRecord) -> dict[str, Any] | None:
        """D10 in the vehicle: analyse the campaign's own results and traces."""
        from agent.adapters.diagnosis_files import load_inputs, load_rules
        from agent.core.diagnosis import diagnose

        try:
            inputs, _, problems = load_inputs(record.dir)
        except VotaError:
            return None  # nothing deployed or flashed: the failure itself says why
        verdict = diagnose(inputs, load_rules(), "first", record.campaign_id)
        verdict.unanalysed.extend(problems)
        return verdict.to_json()

    def _report_stage(self, record: CampaignRecord, stage: str, unit: str, result: dict[str, Any], trace: Path,
                      meta: dict[str, Any]) -> None:
        cid = record.campaign_id
        self.cloud.report("results", {"campaign_id": cid, "stage": stage, **meta, "result": result},
                          msg_id=f"{cid}.{stage}.{unit}.result")
        if trace.exists():
            self.cloud.report_trace(f"{cid}.{stage}.{unit}", trace.read_bytes(),
                                    {"campaign_id": cid, "stage": stage, **meta})

    def _deployed(self, record: CampaignRecord) -> str:
        assert self.segment is not None
        campaign = self._campaign(record)
        manifest = InstallManifest(campaign.campaign_id, tuple(InstallJob(p.ecu, p.name, p.version) for p in campaign.packages))
        name = f"install-{campaign.campaign_id}.json"
        path = record.dir / name
        atomic_write_bytes(path, encode_manifest(manifest))
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        with self._gateway().lock:
            result = PackageDeployer(self.segment, self.link_cfg, name, path, digest).run()
        if result.result != "success":
            raise _Retry(f"install manifest: {result.failed_step}: {result.reason}")
        return "awaiting_install"

    def _awaiting_install(self, record: CampaignRecord) -> str | None:
        campaign = self._campaign(record)
        if campaign.install == "immediate" or record.confirmed:
            return "installing"
        return None  # wait for the confirm command

    def _installing(self, record: CampaignRecord) -> str | None:
        assert self.gateway is not None
        cid = record.campaign_id
        assert cid is not None
        try:
            status, _, _ = self.gateway.install_status(cid)
            if status == InstallStatus.NONE or (status == InstallStatus.FAILED and not record.install_started):
                self.gateway.start_install(f"install-{cid}.json")
                record.install_started = True
                record.save()
            status = self.gateway.wait_install(cid, self.tbox.install_timeout_s, should_stop=self._polling)
        except GatewayError as exc:
            if self.stopping:
                return None  # checkpointed: after restart the TBOX asks the gateway again
            raise _Retry(str(exc)) from None
        summary = json.loads(self.gateway.read_file(f"{cid}/summary.json"))
        out = record.dir / "flash"
        failed = []
        for r in summary["results"]:
            ecu = r["ecu"]
            trace = out / f"{ecu}.trace.jsonl"
            try:
                atomic_write_bytes(trace, self.gateway.read_file(f"{cid}/{ecu}.trace.jsonl"))
            except GatewayError as exc:
                log.warning("flash trace of %s not available: %s", ecu, exc)
            atomic_write_json(out / f"{ecu}.result.json", r)
            self._report_stage(record, "flash", ecu, r, trace, {"ecu": ecu})
            if r["result"] != "success":
                failed.append(f"{ecu}: {r['failed_step']}: {r['reason']}")
        if failed or status != InstallStatus.SUCCEEDED:
            raise _Fail("flash", "flash_failed", "; ".join(failed) or "install failed on the gateway")
        record.outcome = "success"
        record.save()
        return "done"

    def _finished(self, record: CampaignRecord) -> str:
        cid = record.campaign_id or record.key
        body: dict[str, Any] = {"event": "finished", "campaign_id": record.campaign_id, "outcome": record.outcome or "failed",
                                "failure": record.failure}
        if self.tbox.diagnose and record.outcome != "success" and record.campaign_id:
            verdict = self._diagnose(record)
            if verdict is not None:
                self.cloud.report("results", {"campaign_id": cid, "stage": "diagnosis", "verdict": verdict},
                                  msg_id=f"{cid}.diagnosis")
                body["cause"] = verdict.get("cause")
                if record.failure is not None:
                    record.failure["cause"] = verdict.get("cause")
        self.cloud.report("events", body, msg_id=f"{cid}.finished")
        return "reported"
