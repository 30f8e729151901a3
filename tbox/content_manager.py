"""Owner-customised content on the TBOX (C2-C5, C7, C8): offers, the owner's request,
download, verification, decryption, the persisted schedule and every state change
reported through the store-and-forward outbox.

The cloud offers a bundle as its signed manifest plus one URL per item file; the TBOX
verifies the manifest at once (trusted trust-platform key, this vehicle, not expired, not
older than what it has, nothing but ``items/<name>`` paths, no item over the size limit)
and refuses, with the reason reported, what fails. On the owner's request it downloads
the items (resumable, each checked against the signed size and SHA-256), except those with
policy ``never``, checks that encrypted ones decrypt with the vehicle's key, and hands the
items to the schedule. ``manual`` items wait for ``content_accept``.

State, written atomically (a kill at any line leaves the state before or after a change)::

    <state_dir>/content/installed.json                 {bundle_id: newest version downloaded}: anti-rollback
    <state_dir>/content/inbox/*.json, *.tar            commands from ``vota content accept|decline``,
                                                        archives from ``vota content import``
    <state_dir>/content/bundles/<id>-v<version>/       manifest.json, manifest.sig.json (as offered),
                                                        state.json, items/<item>.bin (as downloaded)

Bundle statuses: offered -> requested -> downloaded (its items then run) | failed; an older
version is ``superseded`` when a newer one is downloaded. Item statuses: offered ->
scheduled <-> active -> expired; installing (software items while their campaign runs);
declined; failed; superseded.

Commands (MQTT ``command`` topic, or the inbox)::

    {"command": "content_offer", "manifest": "<b64 manifest.json>", "signature": "<b64 manifest.sig.json>",
     "urls": {"<item>": "http://..."}, "request": false}
    {"command": "content_request", "bundle_id": "dlp-520"}          the owner's "upgrade" request
    {"command": "content_accept", "bundle_id": "dlp-520", "item": "music"}   item optional: all
    {"command": "content_decline", "bundle_id": "dlp-520", "item": "music"}
    {"command": "content_bind", "app": "com.example.music", "auto_update": false}   C5 binding
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import json
import logging
import queue
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.adapters.storage import atomic_write_bytes, atomic_write_json
from agent.core.config import ContentConfig
from agent.core.content import Bundle, BundleRejected, Item, check_item, decrypt_item, verify_bundle, verify_manifest
from agent.core.roles import Role
from agent.errors import TryLater, VotaError
from tbox.apps import AppRegistry
from tbox.content_exec import Executor
from tbox.content_schedule import ItemScheduling
from tbox.content_state import RUNNING, BundleRecord, ItemRecord, load_records, write_inbox
from tbox.download import DownloadError, download

__all__ = ["ContentManager", "COMMANDS", "load_records", "write_inbox"]  # the last two from content_state

log = logging.getLogger(__name__)

COMMANDS = ("content_offer", "content_request", "content_accept", "content_decline", "content_bind")
_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)


class ContentManager(ItemScheduling):
    def __init__(
        self,
        config: ContentConfig,
        state_dir: str | Path,
        vin: str,
        trusted: Role | Mapping[str, Ed25519PublicKey],
        report: Callable[[dict[str, Any], str], None],
        executors: Mapping[str, Executor],
        now: Callable[[], _dt.datetime],
        *,
        vehicle_key: X25519PrivateKey | None = None,
        registry: AppRegistry | None = None,
        light: Callable[[], bytes] | None = None,
        stop: threading.Event | None = None,
        package_ca: str | None = None,
    ) -> None:
        self.config, self.vin, self.trusted = config, vin, Role.of(trusted)
        self.package_ca = package_ca  # what signs the package server's certificate (https)
        self.report_fn, self.executors, self.now = report, dict(executors), now
        self.vehicle_key, self.registry, self.light = vehicle_key, registry, light
        self.stop = stop or threading.Event()
        self.dir = Path(state_dir) / "content"
        self.bundles_dir, self.inbox = self.dir / "bundles", self.dir / "inbox"
        self.installed_path = self.dir / "installed.json"
        self._queue: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self._bundles: dict[Path, Bundle] = {}
        self._lux: tuple[float, float | None] = (-1e9, None)
        self._next_download = 0.0
        self._backoff: dict[tuple[Path, str], float] = {}

    # ---- life cycle ------------------------------------------------------------------------
    def start(self) -> None:
        self.bundles_dir.mkdir(parents=True, exist_ok=True)
        self.inbox.mkdir(parents=True, exist_ok=True)
        for record in load_records(self.dir.parent):  # refuse to start on unreadable state, file named
            self._bundle(record.dir)

    def submit(self, doc: dict[str, Any]) -> None:
        """A command from the cloud link's thread; run by the next ``step``."""
        self._queue.put(doc)

    def step(self) -> None:
        self._commands()
        for doc in load_records(self.dir.parent):
            directory = doc.dir
            if self.stop.is_set():
                return
            try:
                if doc.status == "requested" and time.monotonic() >= self._next_download:
                    self._download(directory, doc)
                elif doc.status == "downloaded" or any(e.revert_pending for e in doc.items.values()):
                    self._tick(directory, doc)
            except VotaError as exc:
                log.warning("content %s: %s", directory.name, exc)

    # ---- reports ---------------------------------------------------------------------------
    def _report_bundle(self, doc: BundleRecord, status: str, **extra: Any) -> None:
        body = {"event": "content", "bundle_id": doc.bundle_id, "bundle_version": doc.version, "status": status, **extra}
        self.report_fn(body, f"content.{doc.bundle_id}.v{doc.version}.{status}.{doc.changes}")

    def _report_item(self, doc: BundleRecord, item: Item, entry: ItemRecord, at: _dt.datetime | None = None,
                     **extra: Any) -> None:
        entry.changes += 1
        body = {"event": "content", "bundle_id": doc.bundle_id, "bundle_version": doc.version, "item": item.id,
                "class": item.cls, "target": item.target, "status": entry.status,
                "at": (at or self.now()).isoformat(timespec="seconds"), **extra}
        self.report_fn(body, f"content.{doc.bundle_id}.v{doc.version}.{item.id}.{entry.changes}")

    def _reject(self, reason: str, detail: str, bundle_id: str | None, key: str) -> None:
        log.warning("content refused (%s): %s", reason, detail)
        self.report_fn({"event": "rejected", "topic": "content", "reason": reason, "detail": detail, "bundle_id": bundle_id},
                       f"rejected.content.{key}")

    # ---- records ---------------------------------------------------------------------------
    def installed(self) -> dict[str, int]:
        try:
            return {str(k): int(v) for k, v in json.loads(self.installed_path.read_text()).items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, AttributeError) as exc:
            raise VotaError(f"{self.installed_path}: unreadable ({exc})") from None

    def _bundle(self, directory: Path) -> Bundle:
        """The stored manifest, its signature checked again (what is on disk is what was offered)."""
        bundle = self._bundles.get(directory)
        if bundle is None:
            try:
                body = (directory / "manifest.json").read_bytes()
                sig = (directory / "manifest.sig.json").read_bytes()
                bundle = verify_manifest(body, sig, self.trusted, vin=self.vin, now=_EPOCH)
            except (OSError, BundleRejected) as exc:
                raise VotaError(f"{directory}: stored manifest unusable ({exc})") from None
            self._bundles[directory] = bundle
        return bundle

    def _find(self, bundle_id: Any, statuses: tuple[str, ...] | None = None) -> BundleRecord | None:
        found = [r for r in load_records(self.dir.parent)
                 if r.bundle_id == bundle_id and (statuses is None or r.status in statuses)]
        return found[-1] if found else None

    # ---- commands --------------------------------------------------------------------------
    def _commands(self) -> None:
        docs: list[tuple[dict[str, Any], str]] = []
        while True:
            try:
                docs.append((self._queue.get_nowait(), "cloud"))
            except queue.Empty:
                break
        for path in sorted(self.inbox.glob("*.json")) if self.inbox.exists() else []:
            try:
                doc = json.loads(path.read_text())
                docs.append((doc if isinstance(doc, dict) else {}, "inbox"))
            except (OSError, ValueError):
                docs.append(({}, "inbox"))
            path.unlink(missing_ok=True)
        for path in sorted(self.inbox.glob("*.tar")) if self.inbox.exists() else []:
            key = f"import.{time.time_ns()}"
            try:
                self._import(path, key)
            except Exception as exc:  # noqa: BLE001 - one archive never stops the others
                log.exception("content import %s failed", path.name)
                self._reject("internal_error", f"{path.name}: {type(exc).__name__}: {exc}", None, key)
        for doc, origin in docs:
            key = f"{origin}.{time.time_ns()}"
            command = doc.get("command")
            try:
                if command == "content_offer":
                    self._offer(doc, key)
                elif command == "content_request":
                    self._request(doc, key)
                elif command in ("content_accept", "content_decline"):
                    self._choose(doc, command == "content_accept", key)
                elif command == "content_bind":
                    self._bind(doc, key)
                else:
                    self._reject("malformed", f"unknown content command {command!r}", None, key)
            except VotaError as exc:
                self._reject("failed", str(exc), doc.get("bundle_id"), key)
            except Exception as exc:  # noqa: BLE001 - a command that breaks is reported; the batch goes on
                log.exception("content command %r failed", command)
                self._reject("internal_error", f"{type(exc).__name__}: {exc}", doc.get("bundle_id"), key)

    def _offer(self, doc: dict[str, Any], key: str) -> None:
        try:
            body = base64.b64decode(str(doc.get("manifest")), validate=True)
            sig_field = doc.get("signature")
            sig = json.dumps(sig_field).encode() if isinstance(sig_field, dict) else \
                base64.b64decode(str(sig_field), validate=True) if sig_field is not None else None
        except (binascii.Error, ValueError):
            self._reject("malformed", "manifest and signature must be base64", None, key)
            return
        try:
            bundle = verify_manifest(body, sig, self.trusted, vin=self.vin, now=self.now(), installed=self.installed())
            urls = doc.get("urls")
            if not isinstance(urls, dict) or any(not isinstance(urls.get(i.id), str) for i in bundle.items):
                raise BundleRejected("malformed", "the offer needs a URL for every item", bundle.bundle_id)
            assert sig is not None
            self._keep(bundle, sig, {i.id: urls[i.id] for i in bundle.items}, bool(doc.get("request")), {})
        except BundleRejected as exc:
            self._reject(exc.reason, str(exc), exc.bundle_id, key)

    def _import(self, path: Path, key: str) -> None:
        """A whole signed bundle archive from the vehicle side (``vota content import``: a
        workshop or a bench without a cloud); importing it is the owner's request."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            self._reject("malformed", f"{path.name}: {exc.strerror}", None, key)
            return
        finally:
            path.unlink(missing_ok=True)
        try:
            bundle = verify_bundle(data, self.trusted, vin=self.vin, now=self.now(), installed=self.installed())
            sig = bundle.files.get("manifest.sig.json", b"")
            self._keep(bundle, sig, {}, True, {i.id: bundle.files[i.file] for i in bundle.items if i.file in bundle.files})
        except BundleRejected as exc:
            self._reject(exc.reason, str(exc), exc.bundle_id, key)

    def _keep(self, bundle: Bundle, sig: bytes, urls: dict[str, str], request: bool, files: dict[str, bytes]) -> None:
        """Store a verified offer (and, from an archive, its item files); report it."""
        for item in bundle.items:
            if item.size > self.config.max_item_size:
                raise BundleRejected("too_large", f"item {item.id}: {item.size} bytes, the limit is "
                                                  f"{self.config.max_item_size}", bundle.bundle_id)
        directory = self.bundles_dir / f"{bundle.bundle_id}-v{bundle.bundle_version}"
        if (directory / "state.json").exists():
            log.info("content %s offered again; already known", directory.name)
            return
        atomic_write_bytes(directory / "manifest.json", bundle.manifest)
        atomic_write_bytes(directory / "manifest.sig.json", sig)
        for item_id, data in files.items():
            atomic_write_bytes(directory / "items" / f"{item_id}.bin", data)
        state = BundleRecord(directory, bundle.bundle_id, bundle.bundle_version, bundle.title, bundle.owner,
                             "requested" if request else "offered", urls=urls,
                             items={i.id: ItemRecord(policy=i.policy) for i in bundle.items})
        state.save()  # the state file last: its existence makes the offer known
        self._report_bundle(state, "offered", title=bundle.title, owner=bundle.owner, items=[
            {"item": i.id, "class": i.cls, "target": i.target, "policy": i.policy, "size": i.size} for i in bundle.items])
        if request:
            self._report_bundle(state, "requested")
        log.info("content %s v%d offered: %s", bundle.bundle_id, bundle.bundle_version, bundle.title)

    def _bind(self, doc: dict[str, Any], key: str) -> None:
        """C5: the owner binds an app for automatic or manual updates."""
        app, auto = doc.get("app"), doc.get("auto_update")
        if self.registry is None or not isinstance(app, str) or not isinstance(auto, bool):
            self._reject("malformed", "content_bind needs an app id and auto_update true or false", None, key)
            return
        self.registry.set_auto_update(app, auto)
        self.report_fn({"event": "app", "app": app, "auto_update": auto}, f"app.{app}.{key}")
        log.info("app %s bound for %s updates", app, "automatic" if auto else "manual")

    def _request(self, doc: dict[str, Any], key: str) -> None:
        found = self._find(doc.get("bundle_id"), ("offered", "failed"))
        if found is None:
            self._reject("unknown_bundle", f"no offered bundle {doc.get('bundle_id')!r}", doc.get("bundle_id"), key)
            return
        state = found
        state.status, state.changes = "requested", state.changes + 1
        state.reason = None
        state.save()
        self._report_bundle(state, "requested")
        self._next_download = 0.0

    def _choose(self, doc: dict[str, Any], accept: bool, key: str) -> None:
        item_id = doc.get("item")
        if item_id is not None and not isinstance(item_id, str):
            self._reject("malformed", f"item must be an item id, not {type(item_id).__name__}", doc.get("bundle_id"), key)
            return
        found = self._find(doc.get("bundle_id"), ("offered", "requested", "downloaded"))
        if found is None or (item_id is not None and item_id not in found.items):
            self._reject("unknown_bundle", f"no bundle {doc.get('bundle_id')!r} with item {item_id!r}", doc.get("bundle_id"), key)
            return
        state = found
        directory = state.dir
        bundle = self._bundle(directory)
        for item in bundle.items:
            entry = state.items[item.id]
            if item_id is None and (accept and entry.policy != "manual" or not accept and entry.policy == "auto"):
                continue  # without an item: accept the manual ones, decline the optional ones
            if item_id is not None and item.id != item_id:
                continue
            if accept and entry.status in ("offered", "declined"):
                entry.accepted, entry.status, entry.policy = True, "offered", "manual" if entry.policy == "never" else entry.policy
                if state.status == "downloaded" and not (directory / "items" / f"{item.id}.bin").exists():
                    state.status, state.reopened = "requested", True  # an item that was set never to download is wanted now
                self._report_item(state, item, entry, accepted=True)
            elif not accept and entry.status in ("offered", "scheduled", "active", "installing"):
                if entry.status == "active":
                    self._revert(directory, state, item)
                entry.accepted, entry.status = False, "declined"
                self._report_item(state, item, entry)
        state.save()

    # ---- download ----------------------------------------------------------------------------
    def _download(self, directory: Path, state: BundleRecord) -> None:
        bundle = self._bundle(directory)
        for item in bundle.items:
            entry = state.items[item.id]
            if not entry.wanted:
                continue
            url = state.urls.get(item.id)
            if url is None and not (directory / "items" / f"{item.id}.bin").exists():
                entry.status, entry.reason = "failed", "not_in_bundle"  # imported without it, and no cloud to ask
                self._report_item(state, item, entry, reason="not_in_bundle", detail="the imported archive does not hold it")
                continue
            try:
                download(url or "", directory / "items" / f"{item.id}.bin", item.size, item.sha256,
                         should_stop=self.stop.is_set, ca=self.package_ca)
                if item.encryption is not None:
                    self._plain(directory, bundle, item)
            except (DownloadError, BundleRejected) as exc:
                if isinstance(exc, TryLater):
                    log.warning("content %s: %s; will retry", directory.name, exc)
                    self._next_download = time.monotonic() + 2.0
                    return
                reason = (exc.reason if isinstance(exc, BundleRejected) else exc.reason or "download_failed")
                if state.reopened:  # the rest of the bundle runs already: only this item fails
                    (directory / "items" / f"{item.id}.bin").unlink(missing_ok=True)
                    entry.status, entry.reason = "failed", reason
                    self._report_item(state, item, entry, reason=reason, detail=str(exc))
                    continue
                self._fail_bundle(directory, state, reason, str(exc))
                return
        previous = self.installed()
        if previous.get(bundle.bundle_id, -1) < bundle.bundle_version:
            atomic_write_json(self.installed_path, {**previous, bundle.bundle_id: bundle.bundle_version})
        for item in bundle.items:  # C5: an app bound to manual updates waits for the owner
            entry = state.items[item.id]
            if item.cls == "application" and self.registry is not None and entry.policy == "auto" and \
                    self.registry.decide(item.target, str(item.raw.get("version") or bundle.bundle_version)).action == "wait_for_owner":
                entry.policy = "manual"
        state.status, state.changes = "downloaded", state.changes + 1
        state.reopened = False
        state.save()
        self._report_bundle(state, "downloaded", items=[i.id for i in bundle.items if (directory / "items" / f"{i.id}.bin").exists()])
        log.info("content %s downloaded and verified", directory.name)
        self._supersede(bundle, directory)

    def _fail_bundle(self, directory: Path, state: BundleRecord, reason: str, detail: str) -> None:
        shutil.rmtree(directory / "items", ignore_errors=True)  # nothing of it runs
        state.status, state.reason, state.detail, state.changes = "failed", reason, detail, state.changes + 1
        state.save()
        self._report_bundle(state, "failed", reason=reason, detail=detail)
        log.warning("content %s refused (%s): %s", directory.name, reason, detail)

    def _supersede(self, bundle: Bundle, newest: Path) -> None:
        for state in load_records(self.dir.parent):
            directory = state.dir
            if directory == newest or state.bundle_id != bundle.bundle_id or state.version >= bundle.bundle_version:
                continue
            if state.status in ("superseded", "failed"):
                continue
            old = self._bundle(directory)
            for item in old.items:
                entry = state.items[item.id]
                if entry.status == "active":
                    self._revert(directory, state, item)
                if entry.status in RUNNING + ("installing",):
                    entry.status = "superseded"
                    self._report_item(state, item, entry)
            state.status = "superseded"
            state.save()
            shutil.rmtree(directory / "items", ignore_errors=True)

    def _plain(self, directory: Path, bundle: Bundle, item: Item) -> bytes:
        data = (directory / "items" / f"{item.id}.bin").read_bytes()
        check_item(bundle.bundle_id, item, data)  # again: the disk is not trusted
        if item.encryption is None:
            return data
        if self.vehicle_key is None:
            raise BundleRejected("cannot_decrypt", f"item {item.id} is encrypted and this vehicle has no content key",
                                 bundle.bundle_id)
        return decrypt_item(data, item.encryption, self.vehicle_key)
