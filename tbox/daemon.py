"""``vota tbox``: the TBOX daemon, the composition root. It builds the real cloud link and gateway
access (or takes injected ones), the campaign runner (``tbox/runner.py``: one handler per
campaign state), the inbound dispatch (``tbox/inbound.py``) and the content manager, and runs
two workers: campaigns and owner content. The systemd watchdog is fed only while both beat.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import threading
from pathlib import Path
from typing import Any, Callable

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.adapters.bus_signals import BusSignals
from agent.adapters.canbus import Segment
from agent.adapters.cloud_link import CloudLink
from agent.adapters.doip_client import DoipLink, open_deploy_link
from agent.adapters.heartbeat import Heartbeats
from agent.adapters.keys import KeyStore, initial_key_list
from agent.adapters.storage import storage_fault
from agent.adapters.update_log import LOG_FILE, UpdateLog
from agent.core.campaign import MAX_ENVELOPE, CampaignRejected, verify_campaign
from agent.core.config import TboxConfig, VehicleConfig
from agent.core.faults import FaultSpec
from agent.core.preconditions import Estimate, estimate_install
from agent.core.roles import KeysRejected
from agent.errors import Refused, UsageError, VotaError
from agent.protocol.ecu import SIGNALS, decode_signal
from tbox.apps import AppRegistry
from tbox.campaign_state import CampaignRecord
from tbox.content_exec import AppExecutor, ResourceExecutor, SoftwareExecutor
from tbox.content_manager import ContentManager
from tbox.gateway_client import ContentOp, GatewayClient, GatewayError
from tbox.hmi import HmiFeed, HmiSocket
from tbox.inbound import COMMANDS, Inbound
from tbox.media import MediaWatcher, read_bounded
from tbox.offline import CAMPAIGN_FILE, PACKAGES, import_campaign
from tbox.ports import CloudPort, GatewayPort
from tbox.runner import CampaignRunner
from tbox.update_log import LoggedCloud

__all__ = ["TboxDaemon", "COMMANDS"]

log = logging.getLogger(__name__)


class TboxDaemon:
    def __init__(self, config: VehicleConfig, now: Callable[[], _dt.datetime] | None = None,
                 faults: list[FaultSpec] | None = None, content_now: Callable[[], _dt.datetime] | None = None,
                 *, cloud: CloudPort | None = None, gateway: GatewayPort | None = None) -> None:
        """``cloud`` and ``gateway``: the two ports, the real cloud link and gateway client by default."""
        self.config = config
        self.faults = [f for f in faults or [] if f.stage in ("deploy", "link") and f.side == "client"]
        self.tbox: TboxConfig = config.tbox_config()
        self.link_cfg = config.deploy_link()
        self.now = now or (lambda: _dt.datetime.now(_dt.timezone.utc))
        self.content_now = content_now
        self.state_dir = Path(self.tbox.state_dir)
        self.campaigns_dir = self.state_dir / "campaigns"
        t = self.tbox
        self.keys = KeyStore(self.state_dir / "keys", initial_key_list(
            (t.trusted_keys, t.signature_threshold), (t.content.trusted_keys, t.content.signature_threshold),
            (t.root_keys, t.root_threshold)))
        self.trusted = self.keys.current.role("campaign")
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._content_wake = threading.Event()
        self._media_problem = ""
        self.media: MediaWatcher | None = None
        if self.tbox.media_dir is not None:  # its own thread: a slow or hostile stick never holds up a campaign
            self.media = MediaWatcher(Path(self.tbox.media_dir), CAMPAIGN_FILE, PACKAGES, self._look_at_media, self._stop,
                                      beat=lambda: self.heartbeats.beat("media"))
        self.heartbeats = Heartbeats(self.tbox.worker_stale_s)
        self.segment: Segment | DoipLink | None = None
        self._signal_segment: Segment | None = None
        self.bus_signals: BusSignals | None = None  # the vehicle's state from its broadcast frames
        self.gateway: GatewayClient | None = None  # the real gateway client, once started
        self.cloud: CloudPort = cloud if cloud is not None else CloudLink(
            self.tbox.cloud, self.tbox.vin, on_message=lambda kind, payload: self.inbound.on_message(kind, payload))
        # every campaign report also goes into the vehicle's signed update log (R156 records)
        self.update_log = UpdateLog(Path(self.tbox.state_dir) / LOG_FILE, getattr(self.cloud, "report_key", None))
        # ... and what the driver is told of them goes to the HMI (tbox/hmi.py), reported and logged too
        self.hmi = HmiFeed(LoggedCloud(self.cloud, self.update_log), lambda cid: self.runner.offer(cid))
        self.runner = CampaignRunner(self.tbox, set(config.ecus), self.hmi,
                                     gateway or _NotStarted(), self.trusted,
                                     now=self.now, stop=self._stop, beat=lambda: self.heartbeats.beat("campaign"),
                                     key_chain=self.keys.chain, estimate=self._estimate,
                                     signals=self._signals if self.tbox.preconditions.ecu else None,
                                     safety_relevant=frozenset(n for n, e in config.ecus.items() if e.safety_relevant))
        self._gateway_injected = gateway is not None
        self.content = self._content_manager()
        self.inbound = Inbound(self.tbox.vin, self.runner, self.content.submit, self._wake.set, self._content_wake.set,
                               keys=self.update_keys)
        self._worker = threading.Thread(target=self._run, name="tbox-worker", daemon=True)
        self._content_worker = threading.Thread(target=self._run_content, name="tbox-content", daemon=True)

    def _content_manager(self) -> ContentManager:
        cfg = self.tbox.content
        trusted = self.keys.current.role("content")
        vehicle_key = None
        if cfg.vehicle_key:
            try:
                loaded = serialization.load_pem_private_key(Path(cfg.vehicle_key).read_bytes(), None)
            except OSError as exc:
                raise UsageError(f"{cfg.vehicle_key}: cannot read the vehicle content key ({exc.strerror})") from None
            except ValueError:
                raise UsageError(f"{cfg.vehicle_key}: not a PEM private key") from None
            if not isinstance(loaded, X25519PrivateKey):
                raise UsageError(f"{cfg.vehicle_key}: not an X25519 key (vota content keygen makes one)")
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
                              vehicle_key=vehicle_key, registry=self.apps, light=light, stop=self._stop,
                              package_ca=self.tbox.package_ca)

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

    # ---- key rotation and revocation ---------------------------------------------------------
    def update_keys(self, envelope: bytes, digest: str, retained: bool = False) -> None:
        """A signed key list from the cloud: taken (stored first, then in force for campaigns and
        content, and passed to the gateway with the next install) or refused; reported either way.
        ``retained``: the broker's copy, delivered at every connection: the list the vehicle has
        already, or an older one, is no news."""
        before = self.keys.current.version
        try:
            keys = self.keys.accept(envelope)
        except KeysRejected as exc:
            if retained and exc.reason == "rollback":
                log.debug("the retained key list is not newer than the current one: %s", exc)
                return
            log.warning("%s", exc)
            self.cloud.report("events", {"event": "keys", "status": "rejected", "reason": exc.reason,
                                         "version": exc.version, "detail": str(exc)}, msg_id=f"keys.{digest}.rejected")
            return
        if retained and keys.version == before:
            return
        self.runner.trusted = keys.role("campaign")
        self.content.trusted = keys.role("content")
        self.cloud.report("events", {"event": "keys", "status": "accepted", **keys.describe()},
                          msg_id=f"keys.v{keys.version}.accepted")

    # ---- the campaign port of software content items -------------------------------------------
    def start_local_campaign(self, campaign_id: str, ecu: str, version: str, data: bytes,
                             proof: dict[str, Any] | None = None) -> None:
        self.runner.start_local_campaign(campaign_id, ecu, version, data, proof)
        self._wake.set()

    def campaign_outcome(self, campaign_id: str) -> dict[str, Any] | None:
        return self.runner.campaign_outcome(campaign_id)

    # ---- life cycle ------------------------------------------------------------------------
    def start(self) -> None:
        self.campaigns_dir.mkdir(parents=True, exist_ok=True)
        for d in sorted(self.campaigns_dir.iterdir()):
            if (d / "state.json").exists():  # a directory without one was never a campaign: its store failed part-way
                CampaignRecord.load(d)  # refuse to start on unreadable state, with the file named
        self.segment = open_deploy_link(self.config)  # a CAN segment, or the link over DoIP
        signals = self.config.signals
        if signals is not None and self.tbox.preconditions.ecu is not None:  # heard where the frames are
            heard = self.segment if isinstance(self.segment, Segment) and signals.segment == self.link_cfg.segment \
                else None
            if heard is None:
                heard = self._signal_segment = Segment(self.config.segments[signals.segment])
            self.bus_signals = BusSignals(signals, heard)
        self.gateway = GatewayClient(self.segment, self.link_cfg, self._stop, self.faults,
                                     self.config.gateway.rxswin_did)
        if not self._gateway_injected:
            self.runner.gateway = self.gateway
        self.content.executors["resource"] = ResourceExecutor(
            self.gateway, self.segment, self.link_cfg, set(self.config.ecus), dict(self.tbox.content.targets),
            self.state_dir / "content" / "outgoing", self._stop, self._content_transfer)
        self.content.start()
        HmiSocket(Path(self.tbox.hmi_socket or self.state_dir / "hmi.sock"), self.hmi, self.inbound.consent,
                  self._stop).start()
        if isinstance(self.cloud, CloudLink):
            self.cloud.start()
        self.heartbeats.beat("campaign")
        self.heartbeats.beat("content")
        self._worker.start()
        self._content_worker.start()
        if self.media is not None:
            self.heartbeats.beat("media")
            self.media.thread.start()

    def stop(self) -> None:
        """Finish or checkpoint the current step, then stop (SIGTERM)."""
        self._stop.set()
        self._wake.set()
        self._content_wake.set()
        for worker in (self._worker, self._content_worker):
            if worker.is_alive():
                worker.join(timeout=60)
        if isinstance(self.cloud, CloudLink):
            self.cloud.stop()
        for segment in (self.segment, self._signal_segment):
            if segment is not None:
                segment.shutdown()

    def alive(self) -> bool:
        """Both workers run and have made progress within ``worker_stale_s``, and the cloud link's
        threads run (the systemd watchdog's question)."""
        stale = self.heartbeats.stale()
        if isinstance(self.cloud, CloudLink):
            stale += self.cloud.alive()  # the cloud link's threads: without them nothing is reported again
        if stale:
            log.error("worker(s) without progress for over %d s: %s", self.tbox.worker_stale_s, ", ".join(stale))
        return self._worker.is_alive() and self._content_worker.is_alive() and not stale

    def status(self) -> str:
        """One line for systemd's STATUS=: the campaign worker's activity and the cloud link."""
        if isinstance(self.cloud, CloudLink):
            link = "connected" if self.cloud.connected.is_set() else "not connected"
            return f"{self.runner.activity}; broker {link}, {self.cloud.pending()} reports queued"
        return self.runner.activity

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # ---- the workers ------------------------------------------------------------------------
    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            self.heartbeats.beat("campaign")
            try:
                self.inbound.apply_commands()
                moved = self.runner.step()
                failures = 0
            except Exception as exc:  # noqa: BLE001 - e.g. a state file that cannot be read: logged, tried again
                failures += 1
                fault = storage_fault(exc)
                if fault is not None:  # the state directory full, read-only or failing: one line, not a traceback
                    log.error("campaign step failed (%d in a row): the TBOX's storage: %s", failures, fault)
                    failures = min(failures, 3)  # back within seconds once there is room again
                else:
                    log.exception("campaign step failed (%d in a row)", failures)
                moved = False
                self._stop.wait(min(60.0, 2.0 ** failures))  # no tight loop of tracebacks
            if not moved:
                self._wake.wait(1.0)
                self._wake.clear()

    def _estimate(self, jobs: list[tuple[str, int, int]], activation: str, pipelined: bool,
                  measured: dict[str, Any]) -> Estimate:
        return estimate_install(self.config, jobs, activation, self.link_cfg.segment if pipelined else None, measured)

    def _signals(self) -> dict[str, Any]:
        """The vehicle's state: from its broadcast frames where the vehicle_signals DBC carries it,
        else from the preconditions ECU's DIDs through the gateway; a signal it does not report is
        None (and fails what depends on it), ``stale`` says why one from the bus is."""
        ecu = self.tbox.preconditions.ecu
        assert ecu is not None
        values: dict[str, Any] = {}
        if self.bus_signals is not None:
            values, stale = self.bus_signals.read()
            if stale:
                values["stale"] = stale
        for name, (did, _) in SIGNALS.items():
            if name in values:
                continue
            try:
                values[name] = decode_signal(name, self._gateway().content(ContentOp.READ_DID, ecu, did.to_bytes(2, "big")))
            except (Refused, ValueError):  # not supported, or not a value the signal can have
                values[name] = None
        return values

    def _look_at_media(self, media: Path) -> None:
        """``tbox.media_dir`` changed: a campaign on media mounted there is imported as ``vota
        campaign import`` does (tbox/offline.py); one refused is reported once, a problem logged
        once, and neither is read again until the media changes (tbox/media.py)."""
        try:
            envelope = read_bounded(media / CAMPAIGN_FILE, MAX_ENVELOPE, self.tbox.media_follow_links)
        except VotaError as exc:
            self._media_said(media, str(exc))
            return
        key = hashlib.sha256(envelope).hexdigest()[:24]
        if (self.campaigns_dir / key).exists():
            return

        def check(data: bytes) -> None:
            verify_campaign(data, self.runner.trusted, vin=self.tbox.vin, now=self.now(), known_ecus=set(self.config.ecus))

        try:
            import_campaign(media, self.campaigns_dir, check, follow_links=self.tbox.media_follow_links,
                            reserve=self.tbox.min_free_mib << 20, beat=lambda: self.heartbeats.beat("media"))
            log.info("campaign imported from %s", media)
            self._wake.set()
        except CampaignRejected as exc:
            self.runner.reject("campaign", exc.reason, f"on the media at {media}: {exc}", key, exc.campaign_id)
        except VotaError as exc:  # e.g. a package not (yet) on it: looked at again when the media changes
            self._media_said(media, str(exc))

    def _media_said(self, media: Path, problem: str) -> None:
        if problem != self._media_problem:
            log.warning("the campaign on %s cannot be imported: %s", media, problem)
        self._media_problem = problem

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


class _NotStarted:
    """The gateway port before ``start`` opened the bus: every call is a transient error."""

    def __getattr__(self, name: str) -> Any:
        raise GatewayError("the TBOX is not started")
