"""The cloud link over MQTT 5 (paho-mqtt): one topic tree per vehicle, QoS 1, a retained
"online" status with an "offline" last will, and store-and-forward through the outbox.

Topic tree (``<prefix>`` is ``vota/v1/<vin>``)::

    <prefix>/status      out, retained   {"state": "online" | "offline"}
    <prefix>/campaign    in              a signed campaign envelope
    <prefix>/command     in              {"command": ..., ...}
    <prefix>/keys        in, retained    the fleet's current signed key list (roles.py)
    <prefix>/ack         in              {"ids": [...]}: reports the cloud has stored
    <prefix>/events      out             campaign state changes, progress, rejections
    <prefix>/inventory   out             version collection (D11)
    <prefix>/results     out             deploy and flash results
    <prefix>/traces      out             header-only traces, gzip + base64, split in parts

Every outgoing message is a JSON object ``{"id", "vin", "type", "ts", "body"}``; ``id``
is stable, so a message delivered twice is recognisably the same message. A report leaves the
outbox when the cloud acknowledges storing it on ``ack`` (``cloud.app_acks``), not when the
broker took it: a session wiped at the broker, or a broker that lost its queue, costs a
resend after ``cloud.ack_timeout_s``, never a report. With
``cloud.report_key`` each carries the vehicle's signature (``agent/core/signed_report.py``).

Nothing a callback raises reaches paho's network thread (a full disk under the outbox, a bug
in a handler): it is logged, and the link keeps reconnecting and sending; ``alive`` tells a
watchdog whether the network and sender threads still run.
"""

from __future__ import annotations

import base64
import binascii
import collections
import gzip
import hashlib
import json
import logging
import queue
import ssl
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Callable

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.adapters.outbox import Outbox
from agent.adapters.storage import storage_fault
from agent.core.campaign import load_private_key
from agent.core.config import CloudConfig
from agent.core.signed_report import sign_report
from agent.errors import ConfigError, VotaError

__all__ = ["CloudConfig", "CloudLink", "make_client", "topic_prefix", "trace_parts", "join_trace_parts", "OUT_KINDS", "IN_KINDS"]

log = logging.getLogger(__name__)

OUT_KINDS = ("events", "inventory", "results", "traces")
IN_KINDS = ("campaign", "command", "keys")
MAX_INBOUND = 256 * 1024
MAX_ACK_IDS = 1000
COMPACT_EVERY_S = 3600.0


def make_client(client_id: str, version: str, clean: bool) -> mqtt.Client:
    """A paho client for MQTT 5 or 3.1.1 (``clean``: no session kept by the broker)."""
    if version == "5":
        return mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    if version == "3.1.1":
        return mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311, clean_session=clean)
    raise ConfigError("cloud", "mqtt_version", f"expected 5 or 3.1.1, got {version!r}")


def topic_prefix(root: str, vin: str) -> str:
    return f"{root}/{vin}"


def trace_parts(trace: bytes, max_bytes: int) -> tuple[str, list[str]]:
    """gzip a trace and cut its base64 text into parts that fit a message."""
    packed = base64.b64encode(gzip.compress(trace, compresslevel=9, mtime=0)).decode()
    room = max(1024, max_bytes - 1024)  # leave room for the JSON around a part
    return "gzip+base64", [packed[i : i + room] for i in range(0, len(packed), room)] or [""]


MAX_TRACE_BYTES = 256 * 1024 * 1024  # a reassembled trace larger than this is refused (no gzip bomb)


def join_trace_parts(parts: list[str], max_bytes: int = MAX_TRACE_BYTES) -> bytes:
    """The trace ``trace_parts`` cut; ValueError when the parts do not decode or exceed ``max_bytes``."""
    try:
        packed = base64.b64decode("".join(parts), validate=True)
        inflate = zlib.decompressobj(wbits=31)  # gzip framing
        data = inflate.decompress(packed, max_bytes)
        if inflate.unconsumed_tail:
            raise ValueError(f"the trace is larger than {max_bytes} bytes")
        if not inflate.eof:
            raise ValueError("the trace is cut off")
    except (zlib.error, binascii.Error) as exc:
        raise ValueError(f"the trace does not decode: {exc}") from None
    return data


def _report_key(path: str | None) -> Ed25519PrivateKey | None:
    """The vehicle's report signing key; one line naming the file when it cannot be read."""
    if path is None:
        return None
    try:
        pem = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError("tbox.cloud", "report_key", f"{path}: cannot read ({exc.strerror})") from None
    try:
        return load_private_key(pem, path)
    except VotaError as exc:
        raise ConfigError("tbox.cloud", "report_key", str(exc)) from None


class CloudLink:
    """Publishes the outbox to the broker and hands inbound messages to ``on_message``."""

    def __init__(
        self,
        config: CloudConfig,
        vin: str,
        on_message: Callable[[str, bytes], None] | None = None,
        client_id: str | None = None,
    ) -> None:
        self.config, self.vin = config, vin
        self.prefix = topic_prefix(config.topic_root, vin)
        self.outbox = Outbox(config.outbox)
        self.on_message = on_message or (lambda kind, payload: None)
        self.host, self.port, tls = config.host_port()
        # a persistent session: what the cloud publishes while the vehicle is offline waits at the broker
        self.client = make_client(client_id or f"vota-tbox-{vin}", config.mqtt_version, clean=config.session_expiry_s == 0)
        if tls:
            self.client.tls_set(ca_certs=config.tls_ca, certfile=config.tls_cert, keyfile=config.tls_key,
                                tls_version=ssl.PROTOCOL_TLS_CLIENT)
        if config.username:
            self.client.username_pw_set(config.username, config.password)
        self.client.will_set(f"{self.prefix}/status", json.dumps({"state": "offline", "vin": vin}), qos=1, retain=True)
        self.client.reconnect_delay_set(config.reconnect_min_s, config.reconnect_max_s)
        self.client.max_inflight_messages_set(20)
        self.client.suppress_exceptions = True  # a callback that raises anyway is logged, the loop goes on
        self.report_key = _report_key(config.report_key)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message
        self.connected = threading.Event()
        # mid -> (message id, when published); touched by the sender thread only. paho calls
        # on_publish holding its own lock, so acknowledgements come through a queue.
        self._inflight: dict[int, tuple[str, float]] = {}
        self._acks: queue.SimpleQueue[tuple[int, bool]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._compact_due = 0.0  # the outbox is compacted once everything is sent, at most every COMPACT_EVERY_S
        self._unstored: collections.deque[mqtt.MQTTMessage] = collections.deque(maxlen=32)  # inbound, storage full
        self._sender = threading.Thread(target=self._send_loop, name="cloud-sender", daemon=True)

    # ---- life cycle ---------------------------------------------------------------------
    def start(self) -> None:
        if self.config.mqtt_version == "5":
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.config.session_expiry_s
            self.client.connect_async(self.host, self.port, keepalive=self.config.keepalive,
                                      clean_start=self.config.session_expiry_s == 0, properties=props)
        else:
            self.client.connect_async(self.host, self.port, keepalive=self.config.keepalive)
        self.client.loop_start()
        self._sender.start()

    def stop(self, graceful: bool = True) -> None:
        """Stop; ``graceful`` publishes "offline" first (a kill leaves it to the last will)."""
        self._stop.set()
        self._wake.set()
        if self._sender.is_alive():
            self._sender.join(timeout=5)
        if graceful and self.connected.is_set():
            info = self.client.publish(f"{self.prefix}/status", json.dumps({"state": "offline", "vin": self.vin}), qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=2)
            except (RuntimeError, ValueError):
                pass
        self.client.disconnect()
        self.client.loop_stop()
        self.outbox.close()

    # ---- reporting ------------------------------------------------------------------------
    def report(self, kind: str, body: dict[str, Any], msg_id: str | None = None) -> str:
        """Store a report in the outbox; it is published when the broker is reachable."""
        if kind not in OUT_KINDS:
            raise ValueError(f"unknown report kind {kind!r}")
        msg_id = msg_id or Outbox.new_id()
        doc: dict[str, Any] = {"id": msg_id, "vin": self.vin, "type": kind, "ts": round(time.time(), 3), "body": body}
        if self.report_key is not None:
            doc = sign_report(doc, self.report_key)
        payload = json.dumps(doc, separators=(",", ":")).encode()
        stored = self.outbox.put(f"{self.prefix}/{kind}", payload, msg_id)
        self._wake.set()
        return stored

    def report_trace(self, trace_id: str, trace: bytes, meta: dict[str, Any]) -> list[str]:
        """Compress and (if needed) split a trace; each part is its own outbox message."""
        encoding, parts = trace_parts(trace, self.config.max_message_bytes)
        ids = []
        for i, part in enumerate(parts):
            body = {**meta, "trace_id": trace_id, "encoding": encoding, "part": i, "parts": len(parts),
                    "size": len(trace), "data": part}
            ids.append(self.report("traces", body, msg_id=f"{trace_id}.{i}"))
        return ids

    # ---- MQTT callbacks --------------------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Properties | None) -> None:
        if reason.is_failure:
            log.warning("broker %s:%d refused the connection: %s", self.host, self.port, reason)
            return
        log.info("connected to %s:%d", self.host, self.port)
        client.publish(f"{self.prefix}/status", json.dumps({"state": "online", "vin": self.vin}), qos=1, retain=True)
        acks = ("ack",) if self.config.app_acks else ()
        client.subscribe([(f"{self.prefix}/{kind}", 1) for kind in IN_KINDS + acks])
        self.connected.set()
        self._wake.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Properties | None) -> None:
        self.connected.clear()
        if not self._stop.is_set():
            log.warning("disconnected from the broker (%s); retrying with backoff", reason)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode, props: Properties | None) -> None:
        self._acks.put((mid, not reason.is_failure))
        self._wake.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            self._take(msg)
        except Exception as exc:  # noqa: BLE001 - nothing reaches paho's network thread
            fault = storage_fault(exc)
            if fault is None:
                log.exception("a message on %s could not be taken", msg.topic)
                return
            # the vehicle's storage cannot take it now: kept here and handed over again once it can
            log.error("a message on %s cannot be stored now (%s); it is taken again when the storage recovers", msg.topic, fault)
            self._unstored.append(msg)

    def _take(self, msg: mqtt.MQTTMessage) -> None:
        kind = msg.topic.rsplit("/", 1)[-1]
        if kind == "ack":
            self._cloud_ack(bytes(msg.payload))
            return
        digest = hashlib.sha256(msg.payload).hexdigest()[:24]
        if len(msg.payload) > MAX_INBOUND:
            self.report("events", {"event": "rejected", "topic": kind, "reason": "too_large",
                                   "detail": f"{len(msg.payload)} bytes, at most {MAX_INBOUND}"},
                        msg_id=f"rejected.{kind}.{digest}")
            return
        try:
            self.on_message(kind, bytes(msg.payload))
        except Exception as exc:  # noqa: BLE001 - a bad message must not stop the link; the cloud hears why
            if storage_fault(exc) is not None:
                raise  # not the message's fault: it is taken again once the storage recovers
            log.exception("handling a %s message failed", kind)
            self.report("events", {"event": "rejected", "topic": kind, "reason": "internal_error",
                                   "detail": f"{type(exc).__name__}: {exc}"[:500]}, msg_id=f"rejected.{kind}.{digest}")

    def _cloud_ack(self, payload: bytes) -> None:
        """The cloud stored these reports: they leave the outbox. Anything else is ignored (an
        acknowledgement is no command: the worst a wrong one can do is end a resend)."""
        try:
            doc = json.loads(payload) if len(payload) <= MAX_INBOUND else None
        except (ValueError, UnicodeDecodeError, RecursionError):
            doc = None
        ids = doc.get("ids") if isinstance(doc, dict) else None
        if not isinstance(ids, list) or len(ids) > MAX_ACK_IDS or not all(isinstance(i, str) for i in ids):
            log.warning("an acknowledgement from the cloud is not {\"ids\": [...]}; ignored")
            return
        for msg_id in ids:
            self.outbox.ack(msg_id)

    # ---- sending ----------------------------------------------------------------------------
    def _drain_acks(self) -> None:
        while True:
            try:
                mid, ok = self._acks.get_nowait()
            except queue.Empty:
                return
            entry = self._inflight.pop(mid, None)
            if entry is None:
                continue
            if ok and self.config.app_acks:
                self.outbox.published(entry[0])  # the broker has it; the cloud's acknowledgement removes it
            elif ok:
                self.outbox.ack(entry[0])
            else:
                log.warning("the broker refused message %s; it stays in the outbox", entry[0])

    def _send_loop(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                self._send_some()
                failures = 0
            except Exception as exc:  # noqa: BLE001 - the outbox unreadable (disk full, I/O): wait, then go on
                failures += 1
                if failures == 1:
                    log.error("the outbox cannot be read or updated (%s); sending waits", exc)
                self._stop.wait(min(10.0, 0.5 * failures))

    def _retake(self) -> None:
        """Inbound messages the storage could not take: handed over again, oldest first."""
        while self._unstored:
            msg = self._unstored[0]
            self._take(msg)  # raises while the storage still fails: the sender waits and tries again
            self._unstored.popleft()
            log.info("a message on %s kept while the storage was failing is taken now", msg.topic)

    def _send_some(self) -> None:
        self._retake()
        self._drain_acks()
        if not self.connected.is_set():
            self._wake.wait(0.2)
            self._wake.clear()
            return
        now = time.monotonic()
        for mid in [mid for mid, (_, t) in self._inflight.items() if now - t > 30]:
            del self._inflight[mid]  # never acknowledged: it goes out again, same id
        room = 20 - len(self._inflight)
        busy = {msg_id for msg_id, _ in self._inflight.values()}
        resend = self.config.ack_timeout_s if self.config.app_acks else None
        batch = self.outbox.pending(limit=room, exclude=busy, resend_after=resend) if room > 0 else []
        if not batch and not self._inflight and time.monotonic() >= self._compact_due:
            self._compact_due = time.monotonic() + COMPACT_EVERY_S  # everything sent: a good moment
            self.outbox.compact()
        if not batch:
            self._wake.wait(0.2)
            self._wake.clear()
            return
        for m in batch:
            if not self.connected.is_set():
                break
            info = self.client.publish(m.topic, m.payload, qos=1, retain=m.retain)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                break
            self._inflight[info.mid] = (m.id, time.monotonic())

    def alive(self) -> list[str]:
        """What is wrong with the link's threads, for a watchdog (empty: nothing)."""
        network = getattr(self.client, "_thread", None)
        return ([] if self._sender.is_alive() else ["cloud sender ended"]) + (
            ["MQTT network thread ended"] if network is not None and not network.is_alive() else [])

    def pending(self) -> int:
        """Messages not yet acknowledged (by the cloud; by the broker without ``app_acks``)."""
        return len(self.outbox)

    def unpublished(self) -> int:
        """Messages the broker has not taken yet."""
        return self.outbox.unpublished()
