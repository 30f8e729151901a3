"""What the driver is told (``agent/core/hmi.py``), as the vehicle's HMI gets it: each new HMI
state reported to the cloud (an ``hmi`` event, so also kept in the update log: what the driver was
shown and when), and every state and progress on a local Unix socket the HMI connects to
(``tbox.hmi_socket``), which also takes the driver's consent.

The socket speaks JSON lines. On connecting, a client gets the current state of every open
campaign, then each change::

    {"campaign_id": "c-7", "state": "installing", "percent": 42.0, "time_left_s": 61.3, ...}

and may send::

    {"consent": "c-7", "accept": true}      the driver agrees to install c-7 now
    {"consent": "c-7", "accept": false}     the driver postpones it (it stays offered)

each answered ``{"ok": true}`` or ``{"ok": false, "error": "..."}``; the consent (given or
postponed) is a ``consent`` event, with ``by: hmi``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from agent.core.hmi import HmiTracker
from tbox.ports import CloudPort

__all__ = ["HmiFeed", "HmiSocket"]

log = logging.getLogger(__name__)

MAX_CLIENTS = 8
MAX_LINE = 4096


class HmiFeed:
    """A CloudPort that passes every report on and, from the campaign events among them, keeps
    each campaign's HMI state: a new state is reported (``hmi``) and sent to ``listeners``."""

    def __init__(self, cloud: CloudPort, offer: Callable[[str], Mapping[str, Any] | None]) -> None:
        self.cloud = cloud
        self.tracker = HmiTracker(offer)
        self.current: dict[str, dict[str, Any]] = {}  # campaign -> the state shown now
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self._lock = threading.Lock()
        self._seq: dict[str, int] = {}

    def report(self, kind: str, body: dict[str, Any], msg_id: str | None = None) -> str:
        stored = self.cloud.report(kind, body, msg_id)
        if kind == "events" and body.get("event") != "hmi":
            self._observe(body)
        return stored

    def _observe(self, body: dict[str, Any]) -> None:
        with self._lock:
            now = time.time()
            seen = self.tracker.event(body, now)
            if seen is None:
                return
            state, new = seen
            cid = state["campaign_id"]
            state["at"] = round(now, 3)
            if state["state"] in ("succeeded", "failed"):
                self.current.pop(cid, None)
            else:
                self.current[cid] = state
            listeners = list(self.listeners)
        if new:
            n = self._seq[cid] = self._seq.get(cid, 0) + 1
            self.cloud.report("events", {"event": "hmi", **state}, msg_id=f"{cid}.hmi.{n}.{state['state']}")
        for listener in listeners:
            listener(state)

    def report_trace(self, trace_id: str, trace: bytes, meta: dict[str, Any]) -> list[str]:
        return self.cloud.report_trace(trace_id, trace, meta)

    def __getattr__(self, name: str) -> Any:  # the link's own (start, stop, connected, status...)
        return getattr(self.cloud, name)


class HmiSocket:
    """The local interface: a Unix stream socket at ``path`` (mode 0660: the HMI's group)."""

    def __init__(self, path: Path, feed: HmiFeed, consent: Callable[[str, bool], None],
                 stop: threading.Event) -> None:
        self.path, self.feed, self.consent, self.stop = path, feed, consent, stop
        self._clients: list[socket.socket] = []
        self._lock = threading.Lock()
        self._sending = threading.Lock()  # one line at a time on any client
        self._server: socket.socket | None = None

    def start(self) -> bool:
        """Listen; False (logged, the TBOX goes on without it) when the socket cannot be made."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.is_socket():
                self.path.unlink()  # left by a TBOX that was killed
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.bind(str(self.path))
            os.chmod(self.path, 0o660)
            server.listen(MAX_CLIENTS)
            server.settimeout(0.5)
        except OSError as exc:
            log.error("the HMI socket %s cannot be made (%s): the driver is told through the cloud only", self.path, exc)
            return False
        self._server = server
        self.feed.listeners.append(self._send_all)
        threading.Thread(target=self._accept, name="hmi-socket", daemon=True).start()
        log.info("HMI socket at %s", self.path)
        return True

    def _accept(self) -> None:
        assert self._server is not None
        while not self.stop.is_set():
            try:
                client, _ = self._server.accept()
            except socket.timeout:
                continue
            except OSError:
                break
            with self._lock:
                if len(self._clients) >= MAX_CLIENTS:
                    client.close()
                    continue
                self._clients.append(client)
            for state in list(self.feed.current.values()):
                self._send(client, state)
            threading.Thread(target=self._read, args=(client,), name="hmi-client", daemon=True).start()
        self._server.close()
        try:
            self.path.unlink()
        except OSError:
            pass

    def _read(self, client: socket.socket) -> None:
        buffer = b""
        client.settimeout(1.0)
        while not self.stop.is_set():
            try:
                chunk = client.recv(1024)
            except socket.timeout:
                continue
            except OSError:
                break
            if not chunk:
                break
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                self._send(client, self._answer(line))
            if len(buffer) > MAX_LINE:
                self._send(client, {"ok": False, "error": f"a line longer than {MAX_LINE} bytes"})
                break
        self._drop(client)

    def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            doc = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            return {"ok": False, "error": "not JSON"}
        if not isinstance(doc, dict) or not isinstance(doc.get("consent"), str) or not isinstance(doc.get("accept"), bool):
            return {"ok": False, "error": 'expected {"consent": CAMPAIGN, "accept": true|false}'}
        if doc["consent"] not in self.feed.current:
            return {"ok": False, "error": f"no campaign {doc['consent']!r} is offered"}
        self.consent(doc["consent"], doc["accept"])
        return {"ok": True}

    def _send_all(self, state: dict[str, Any]) -> None:
        with self._lock:
            clients = list(self._clients)
        for client in clients:
            self._send(client, state)

    def _send(self, client: socket.socket, doc: dict[str, Any]) -> None:
        try:
            with self._sending:
                client.settimeout(1.0)  # a stuck HMI loses its connection, it holds up nothing for long
                client.sendall(json.dumps(doc, separators=(",", ":")).encode() + b"\n")
        except OSError:
            self._drop(client)

    def _drop(self, client: socket.socket) -> None:
        with self._lock:
            if client in self._clients:
                self._clients.remove(client)
        client.close()
