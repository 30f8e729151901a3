"""The stand-in cloud's collector: stores everything vehicles report, per vehicle, once.

Subscribes to ``<root>/+/#`` (or, with ``share``, as one of a shared subscription's group);
every message is stored by its stable id (a message that arrives twice is stored once, also
across a restart and by several collectors sharing a store: ``cloud_sim/claims.py``), traces
are reassembled from their parts. Each report stored is acknowledged to its vehicle on ``<root>/<vin>/ack``: the
vehicle keeps a report in its outbox until then, so nothing lost at the broker is lost.
Layout::

    <store>/<vin>/status.json                      last status (online/offline)
    <store>/<vin>/messages/<type>/<seq>-<id>.json  every report, in arrival order (per collector)
    <store>/<vin>/ids/<id>                         the claim: a hard link to the report
    <store>/<vin>/traces/<trace_id>.jsonl          reassembled traces

With ``report_keys`` (VIN -> that vehicle's report public keys) a report is stored only when
the vehicle signed it (``agent/core/signed_report.py``): for the topic's VIN and type, by
one of that VIN's keys; anything else is dropped with the reason, so nobody else on the
broker (another vehicle, a client with the cloud's identity) can take a report's id first.
``require_signed`` drops unsigned reports from vehicles without a registered key too. A
report id is one vehicle's: ids are kept per VIN.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from pathlib import Path
from typing import Any, Mapping

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.adapters.cloud_link import IN_KINDS, OUT_KINDS, join_trace_parts
from agent.adapters.storage import atomic_write_bytes, atomic_write_json
from agent.core.signed_report import check_report
from cloud_sim.claims import ReportClaims, safe_id
from cloud_sim.mqtt import cloud_client

__all__ = ["Collector"]

log = logging.getLogger(__name__)

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # a VIN or a message type: one safe path component
_BASE64 = re.compile(r"[A-Za-z0-9+/=]*")
MAX_TRACE_PARTS = 100_000
MAX_MESSAGE = 16 * 1024 * 1024
TO_VEHICLE = (*IN_KINDS, "ack")


class Collector:
    def __init__(self, broker: str, store: str | Path, root: str = "vota/v1", client_id: str = "vota-cloud-collector",
                 mqtt_version: str = "5", diagnose: bool = True,
                 report_keys: Mapping[str, Mapping[str, Ed25519PublicKey]] | None = None,
                 require_signed: bool = False, share: str | None = None) -> None:
        """``broker``: ``mqtt[s]://[user:password@]host:port[?ca=...]`` (cloud_sim/mqtt.py), the
        collector's own identity on a broker with ACLs. ``share``: a shared subscription's group
        (``$share/<group>/...``): the collectors of one group split the reports between them and
        store each once in the same store (``cloud_sim/claims.py``)."""
        self.diagnose = diagnose
        self.report_keys = report_keys if report_keys is not None else {}
        self.require_signed = require_signed
        self.store = Path(store)
        self.root = root
        self.mqtt_version = mqtt_version
        self.client, self.host, self.port = cloud_client(broker, client_id, mqtt_version, clean=False)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.reconnect_delay_set(1, 5)
        self.share = share
        self.claims = ReportClaims(self.store)
        self.claims.recover()  # what a collector killed between claim and rename left behind
        self.seen: set[tuple[str, str]] = set(self.claims.stored_ids())  # (VIN, id), also stored before a restart
        self.duplicates = 0
        self.rejected = 0  # messages dropped as malformed (each logged with its reason)
        self.acks = 0  # reports acknowledged to their vehicle as stored
        self.messages: list[dict[str, Any]] = []
        self.status: dict[str, str] = {}
        self.verdicts: dict[str, dict[str, Any]] = {}
        self._parts: dict[str, dict[int, str]] = {}
        self._lock = threading.Condition()
        self.connected = threading.Event()

    def start(self) -> None:
        # A durable session: what vehicles report while the collector is away waits at the broker.
        if self.mqtt_version == "5":
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 24 * 3600
            self.client.connect_async(self.host, self.port, keepalive=30, clean_start=False, properties=props)
        else:
            self.client.connect_async(self.host, self.port, keepalive=30)
        self.client.loop_start()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        topic = f"{self.root}/+/#"
        client.subscribe(f"$share/{self.share}/{topic}" if self.share else topic, qos=1)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        self.connected.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        """Every message is stored or dropped with a reason; nothing a vehicle (or anyone on the
        broker) sends stops the collector or writes outside ``<store>/<vin>/``."""
        try:
            why = self._take(msg.topic, msg.payload)
        except Exception:  # noqa: BLE001 - one message must not stop the collector
            log.exception("message on %r could not be stored", msg.topic)
            why = "internal error"
        if why is not None:
            with self._lock:
                self.rejected += 1
                self._lock.notify_all()  # a waiter may count rejections
            log.warning("dropped a message on %r: %s", msg.topic, why)

    def _ack(self, vin: str, msg_id: str) -> None:
        """A report stored (or stored before): its vehicle may now remove it from its outbox
        (``<root>/<vin>/ack``, QoS 1). Until this arrives the vehicle keeps it and sends it again."""
        self.client.publish(f"{self.root}/{vin}/ack", json.dumps({"ids": [msg_id]}), qos=1)
        self.acks += 1

    def _take(self, topic: str, payload: bytes | bytearray) -> str | None:
        """Store one message; None, or why it was dropped."""
        parts = topic.split("/")
        if len(parts) < 4:
            return "not a vehicle topic"
        vin, kind = parts[-2], parts[-1]
        if kind in TO_VEHICLE:
            return None  # the cloud's own messages to a vehicle (seen on a broker without ACLs): not reports
        if not _NAME.fullmatch(vin) or not _NAME.fullmatch(kind):
            return "the VIN or the message type is not a plain name"
        if len(payload) > MAX_MESSAGE:
            return f"{len(payload)} bytes, at most {MAX_MESSAGE}"
        try:
            doc = json.loads(payload)
        except (ValueError, RecursionError):  # RecursionError: nested too deeply
            return "not JSON"
        if not isinstance(doc, dict):
            return "not a JSON object"
        with self._lock:
            if kind == "status":
                self.status[vin] = str(doc.get("state", "?"))
                atomic_write_json(self.store / vin / "status.json", doc)
            elif isinstance(doc.get("id"), str):
                why = self._store(vin, kind, doc)
                if why is not None:
                    return why
                if kind in OUT_KINDS:
                    self._ack(vin, doc["id"])
            else:
                return "no message id"
            self._lock.notify_all()
        return None

    def _store(self, vin: str, kind: str, doc: dict[str, Any]) -> str | None:
        msg_id = doc["id"]
        keys = self.report_keys.get(vin)
        if keys or self.require_signed:
            why = check_report(doc, vin, kind, keys or {})
            if why is not None:
                return why
        if (vin, msg_id) in self.seen:
            self.duplicates += 1
            return None
        body = doc.get("body") or {}
        if not isinstance(body, dict):
            return "the body is not a JSON object"
        if kind == "traces" and "trace_id" in body:
            part, count = body.get("part"), body.get("parts")
            if not (isinstance(part, int) and isinstance(count, int) and 0 <= part < count <= MAX_TRACE_PARTS
                    and isinstance(body.get("data"), str) and _BASE64.fullmatch(body["data"])):
                return "a trace part without a valid part, parts and base64 data"
        self.seen.add((vin, msg_id))
        if not self.claims.store_once(vin, kind, msg_id, doc):  # another collector of the store took it
            self.duplicates += 1
            return None
        self.messages.append(doc)
        if kind == "events" and body.get("event") == "content" and body.get("bundle_id"):
            self._content_state(vin, body)
        if self.diagnose and kind == "events" and isinstance(body, dict) and body.get("event") == "finished" \
                and body.get("outcome") == "failed" and body.get("campaign_id"):
            self._diagnose(vin, str(body["campaign_id"]))
        if kind == "traces" and "trace_id" in body:
            trace_id = str(body["trace_id"])
            got = self._parts.setdefault(trace_id, {})
            got[body["part"]] = body["data"]
            if self.share and len(got) < body["parts"]:  # the other parts may have gone to another collector
                got.update(self._shared_parts(vin, trace_id, body["part"], body["data"]))
            if len(got) == body["parts"] and set(got) == set(range(len(got))):
                try:
                    data = join_trace_parts([got[i] for i in range(len(got))])
                except ValueError as exc:
                    return str(exc)
                safe = "".join(ch for ch in trace_id if ch.isalnum() or ch in "._-") or "trace"
                atomic_write_bytes(self.store / vin / "traces" / f"{safe}.jsonl", data)
        return None

    def _shared_parts(self, vin: str, trace_id: str, part: int, data: str) -> dict[int, str]:
        """Collectors sharing a store put each trace part they store in ``<vin>/trace-parts/<trace>/``:
        the parts any of them stored so far (whoever stores the last part reassembles the trace)."""
        folder = self.store / vin / "trace-parts" / (safe_id(trace_id) or "trace")
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / str(part), data.encode())
        out = {}
        for f in folder.iterdir():
            if f.name.isdigit():
                try:
                    out[int(f.name)] = f.read_text()
                except OSError:
                    continue
        return out

    def _content_state(self, vin: str, body: dict[str, Any]) -> None:
        """What the owner's app shows: each content item's latest state, per bundle."""
        safe = "".join(ch for ch in str(body["bundle_id"]) if ch.isalnum() or ch in "._-").lstrip(".") or "bundle"
        path = self.store / vin / "content" / f"{safe}.json"
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            state = None
        if not isinstance(state, dict) or not isinstance(state.get("items"), dict):
            state = {"bundle_id": body["bundle_id"], "items": {}}
        state["bundle_version"] = body.get("bundle_version")
        if body.get("item"):
            state["items"][str(body["item"])] = {k: body[k] for k in ("status", "at", "reason", "detail") if k in body}
        else:
            state["status"] = body.get("status")
        atomic_write_json(path, state)

    def _diagnose(self, vin: str, campaign_id: str) -> None:
        """D10: the cloud analyses a failed campaign and stores the verdict beside its results."""
        from agent.adapters.diagnosis_files import inputs_from_store, load_rules
        from agent.core.diagnosis import diagnose, render_markdown

        mine = [m for m in self.messages if m.get("vin") == vin and isinstance(m.get("body"), dict)
                and m["body"].get("campaign_id") == campaign_id]
        results = [m["body"] for m in mine if m.get("type") == "results"]
        failure = next((m["body"].get("failure") for m in mine if m["body"].get("event") == "finished"), None)
        try:
            verdict = diagnose(inputs_from_store(results, self.store / vin / "traces", campaign_id), load_rules(),
                               "first", campaign_id, failure if isinstance(failure, dict) else None)
        except Exception:  # noqa: BLE001 - a diagnosis problem must not stop collecting
            log.exception("diagnosis of %s failed", campaign_id)
            return
        safe = "".join(ch for ch in campaign_id if ch.isalnum() or ch in "._-")
        atomic_write_json(self.store / vin / "diagnosis" / f"{safe}.json", verdict.to_json())
        atomic_write_bytes(self.store / vin / "diagnosis" / f"{safe}.md", render_markdown(verdict).encode())
        self.verdicts[campaign_id] = verdict.to_json()

    def wait_for(self, predicate: Any, timeout: float) -> bool:
        """Wait until ``predicate(self)`` holds (checked on every message)."""
        with self._lock:
            return self._lock.wait_for(lambda: predicate(self), timeout)
