"""The gateway as a DoIP entity (ISO 13400-2) on the vehicle's Ethernet.

UDP (``doip.port``, 13400): vehicle identification requests (plain, by EID, by VIN) answered to
the asker, entity status and diagnostic power mode; the vehicle announcement sent three times at
start (``doip.announce_to``). TCP (the same port): a tester connects, activates routing with its
source address (``doip.testers``) and then sends diagnostic messages by logical address: to an
ECU (routed onto its CAN segment, gateway/doip_routing.py), to the functional address, or to the
gateway itself (the deploy server). Routing is active on ``doip.max_testers`` sockets at most; a
source address already active elsewhere, or a full house, is settled by an alive check of the
sockets concerned, as the standard prescribes. A header that does not hold gets the generic
negative acknowledgement (agent/protocol/doip.py) and, where the standard says so, the socket
closed; the entity itself never stops for what a tester sends.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import logging
import random
import socket
import ssl
import threading
import time
from typing import Any, Callable, Iterator

from agent.adapters.tls_stream import TlsStream, server_context
from agent.core.config import DoipConfig, VehicleConfig
from agent.errors import ConfigError, VotaError
from agent.protocol import doip
from agent.protocol.doip import PayloadType as T
from agent.protocol.doip import RoutingCode
from gateway.buses import Buses
from gateway.doip_routing import GatewayOwner, LocalServer, TesterRoutes

__all__ = ["DoipEntity", "activation_key", "ACTIVATION_TYPES"]

log = logging.getLogger(__name__)

ACTIVATION_TYPES = {0x00: "default", 0x01: "WWH-OBD", 0xE0: "central security"}
ALIVE_CHECK_S = 0.5  # T_TCP_Alive_Check
NODE_GATEWAY = 0x00


def activation_key(secret: str, source: int, eid: bytes) -> bytes:
    """The OEM-specific field of a central-security routing activation (type 0xE0) with
    ``doip.activation_secret``: HMAC-SHA256(secret, source address | EID), first 4 bytes. A hook,
    not a protection on its own (it is the same at every activation): TLS is (docs/doip.md)."""
    return hmac.new(secret.encode(), source.to_bytes(2, "big") + eid, hashlib.sha256).digest()[:4]


class _Connection:
    def __init__(self, sock: socket.socket | TlsStream, peer: tuple[str, int]) -> None:
        self.sock, self.peer = sock, peer
        self.secure = isinstance(sock, TlsStream)
        self.version = 0x02
        self.tester: int | None = None  # the source address routing is active for
        self.routes: TesterRoutes | None = None
        self.opened = self.last = time.monotonic()
        self.alive = threading.Event()
        self.closed = threading.Event()
        self._write = threading.Lock()

    def send(self, payload_type: int, payload: bytes) -> None:
        self.send_raw(doip.encode(payload_type, payload, self.version))

    def send_raw(self, data: bytes) -> None:
        with self._write:
            self.sock.sendall(data)

    def close(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        if self.routes is not None:
            self.routes.close()


class DoipEntity:
    def __init__(self, config: VehicleConfig, buses: Buses, local: LocalServer | None = None) -> None:
        self.config, self.buses, self.local = config, buses, local
        self.doip: DoipConfig = config.doip_entity()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._connections: list[_Connection] = []
        self._threads: list[threading.Thread] = []
        self._gateway_owner = GatewayOwner(self.doip.hold_s, local)  # the gateway's own services: one tester at a time
        tls: ssl.SSLContext | None = None
        if self.doip.tls_cert is not None and self.doip.tls_key is not None:
            try:
                tls = server_context(self.doip.tls_cert, self.doip.tls_key, self.doip.tls_ca)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(config.source, "doip.tls", f"cannot use {self.doip.tls_cert}, {self.doip.tls_key}"
                                  f"{', ' + self.doip.tls_ca if self.doip.tls_ca else ''}: {exc}") from None
        self._udp = self._socket(socket.SOCK_DGRAM, self.doip.port)
        self._listeners: list[tuple[socket.socket, ssl.SSLContext | None]] = [
            (self._socket(socket.SOCK_STREAM, self.doip.port), None)]
        if tls is not None:
            self._listeners.append((self._socket(socket.SOCK_STREAM, self.doip.tls_port), tls))
        self._udp.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        self.stats = {"connections": 0, "refused": 0, "nacks": 0, "routed": 0}

    def _socket(self, kind: int, port: int) -> socket.socket:
        """Bound (and listening, for TCP), or a ConfigError naming the address and port; every
        socket opened before is closed with it."""
        sock = socket.socket(socket.AF_INET6 if ":" in self.doip.address else socket.AF_INET, kind)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.doip.address, port))
            if kind == socket.SOCK_STREAM:
                sock.listen(16)
            sock.settimeout(0.2)
        except OSError as exc:
            sock.close()
            for other in [getattr(self, "_udp", None), *(s for s, _ in getattr(self, "_listeners", []))]:
                if other is not None:
                    other.close()
            if exc.errno == errno.EADDRNOTAVAIL:  # not a configuration error: the address comes later at boot
                raise VotaError(f"doip.address {self.doip.address} is not (yet) an address of this machine: "
                                f"{exc.strerror}") from None
            raise ConfigError(self.config.source, "doip.address",
                              f"cannot listen on {self.doip.address} port {port}: {exc.strerror}") from None
        return sock

    # ---- life cycle -------------------------------------------------------------------
    def start(self) -> None:
        work: list[tuple[Callable[..., None], tuple[Any, ...], str]] = [(self._serve_udp, (), "doip-udp"),
                                                                       (self._announce, (), "doip-announce")]
        work += [(self._accept, (sock, tls), "doip-tls" if tls else "doip-tcp") for sock, tls in self._listeners]
        for target, args, name in work:
            thread = threading.Thread(target=target, args=args, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("DoIP entity 0x%04X on %s port %d%s", self.doip.logical_address, self.doip.address, self.doip.port,
                 f", TLS on port {self.doip.tls_port}" if len(self._listeners) > 1 else "")

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=2.0)
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            connection.close()
        self._udp.close()
        for sock, _ in self._listeners:
            sock.close()

    def testers(self) -> dict[int, list[str]]:
        """The active testers and the ECUs each holds (status, tests)."""
        with self._lock:
            active = [c for c in self._connections if c.tester is not None and not c.closed.is_set()]
        return {c.tester: (c.routes.holding() if c.routes else []) for c in active if c.tester is not None}

    # ---- UDP: identification, status, power mode ----------------------------------------
    def identification(self) -> bytes:
        return doip.vehicle_identification(self.doip.vin, self.doip.logical_address, self.doip.eid, self.doip.gid,
                                           further=0x00, sync=0x00)

    def _announce(self) -> None:
        if self.doip.announce_to is None:
            return
        if self._stop.wait(random.uniform(0.0, 0.5)):  # A_DoIP_Announce_Wait
            return
        for _ in range(3):  # A_DoIP_Announce_Num, A_DoIP_Announce_Interval apart
            try:
                self._udp.sendto(doip.encode(T.VEHICLE_ANNOUNCEMENT, self.identification()),
                                 (self.doip.announce_to, self.doip.announce_port))
            except OSError as exc:
                log.warning("DoIP announcement to %s not sent: %s", self.doip.announce_to, exc)
            if self._stop.wait(0.5):
                return

    def _incoming(self, take: Callable[[], tuple[Any, Any]]) -> Iterator[tuple[Any, Any]]:
        """What ``take`` (a socket's accept or recvfrom, with a timeout) brings, until stopped."""
        while not self._stop.is_set():
            try:
                yield take()
            except OSError:  # a timeout, or the socket closed by stop()
                continue

    def _serve_udp(self) -> None:
        for data, peer in self._incoming(lambda: self._udp.recvfrom(4096)):
            try:
                answer = self.udp_answer(data)
                if answer is not None:
                    self._udp.sendto(answer, peer)
            except Exception:  # noqa: BLE001 - a datagram must not stop the entity
                log.exception("DoIP: datagram from %s", peer)

    def udp_answer(self, data: bytes) -> bytes | None:
        """The answer to one datagram (one DoIP message each), or None."""
        out = doip.Framer(max_payload=64, udp=True).feed(data)
        if not out:
            return None  # shorter than its header says: nothing to answer
        first = out[0]
        if isinstance(first, doip.Problem):
            self.stats["nacks"] += 1
            return doip.encode(T.GENERIC_NACK, bytes((first.nack,)))
        version = first.version if first.version in doip.VERSIONS else 0x02
        kind, payload = first.payload_type, first.payload
        if kind == T.VEHICLE_ID_REQUEST or (kind == T.VEHICLE_ID_REQUEST_EID and payload == self.doip.eid) or \
                (kind == T.VEHICLE_ID_REQUEST_VIN and payload == self.doip.vin.encode("ascii", "replace")[:17].ljust(17, b"\0")):
            return doip.encode(T.VEHICLE_ANNOUNCEMENT, self.identification(), version)
        if kind in (T.VEHICLE_ID_REQUEST_EID, T.VEHICLE_ID_REQUEST_VIN):
            return None  # another vehicle's
        if kind == T.ENTITY_STATUS_REQUEST:
            return doip.encode(T.ENTITY_STATUS_RESPONSE, self._status(), version)
        if kind == T.POWER_MODE_REQUEST:
            return doip.encode(T.POWER_MODE_RESPONSE, doip.power_mode(True), version)
        self.stats["nacks"] += 1
        return doip.encode(T.GENERIC_NACK, bytes((doip.Nack.UNKNOWN_PAYLOAD_TYPE,)), version)

    def _status(self) -> bytes:
        with self._lock:
            active = sum(1 for c in self._connections if c.tester is not None and not c.closed.is_set())
        return doip.entity_status(NODE_GATEWAY, min(self.doip.max_testers, 255), min(active, 255),
                                  self.doip.max_request + 4)

    # ---- TCP: connections -------------------------------------------------------------
    def _accept(self, listener: socket.socket, tls: ssl.SSLContext | None) -> None:
        for sock, peer in self._incoming(listener.accept):
            with self._lock:
                crowded = len(self._connections) > 2 * self.doip.max_testers  # unactivated ones close in 2 s
            if crowded:
                self.stats["refused"] += 1
                sock.close()
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(0.1)
            # TLS: the handshake is the connection's own thread's first work
            connection = _Connection(TlsStream(sock, tls, server_side=True) if tls else sock, peer)
            with self._lock:
                self._connections.append(connection)
            self.stats["connections"] += 1
            threading.Thread(target=self._serve, args=(connection,), name=f"doip-{peer[0]}:{peer[1]}", daemon=True).start()

    def _serve(self, c: _Connection) -> None:
        framer = doip.Framer(max_payload=self.doip.max_request + 4)
        try:
            if isinstance(c.sock, TlsStream):
                try:
                    c.sock.handshake(self.doip.initial_inactivity_s)
                except (OSError, ssl.SSLError) as exc:
                    log.warning("DoIP %s: TLS handshake failed: %s", c.peer[0], exc)
                    return
            while not self._stop.is_set() and not c.closed.is_set():
                now = time.monotonic()
                if c.tester is None and now - c.opened > self.doip.initial_inactivity_s or now - c.last > self.doip.idle_s:
                    log.info("DoIP %s: closed for inactivity", c.peer[0])
                    return
                try:
                    data = c.sock.recv(65536)
                except socket.timeout:
                    continue
                except OSError:
                    return
                if not data:
                    return
                c.last = time.monotonic()
                for item in framer.feed(data):
                    if not self._handle(c, item):
                        return
        except OSError as exc:  # the tester went away while it was answered
            log.info("DoIP %s: connection lost: %s", c.peer[0], exc)
        except Exception:  # noqa: BLE001 - one tester's trouble is not the entity's
            log.exception("DoIP %s: connection failed", c.peer[0])
        finally:
            c.close()
            with self._lock:
                if c in self._connections:
                    self._connections.remove(c)

    def _handle(self, c: _Connection, item: doip.Message | doip.Problem) -> bool:
        """One message of a connection; False: the connection is closed."""
        if isinstance(item, doip.Problem):
            self.stats["nacks"] += 1
            log.info("DoIP %s: generic NACK 0x%02X: %s", c.peer[0], item.nack, item.why)
            c.send(T.GENERIC_NACK, bytes((item.nack,)))
            return not item.close
        if item.version in doip.VERSIONS:
            c.version = item.version
        kind, payload = item.payload_type, item.payload
        if kind == T.ROUTING_ACTIVATION_REQUEST:
            return self._activate(c, payload)
        if kind == T.ALIVE_CHECK_RESPONSE:
            c.alive.set()
            return True
        if kind == T.ALIVE_CHECK_REQUEST:  # some testers ask too: answered with the entity's address
            c.send(T.ALIVE_CHECK_RESPONSE, self.doip.logical_address.to_bytes(2, "big"))
            return True
        if kind == T.ENTITY_STATUS_REQUEST:
            c.send(T.ENTITY_STATUS_RESPONSE, self._status())
            return True
        if kind == T.POWER_MODE_REQUEST:
            c.send(T.POWER_MODE_RESPONSE, doip.power_mode(True))
            return True
        if kind == T.DIAGNOSTIC_MESSAGE:
            return self._diagnostic(c, payload)
        if kind in (T.VEHICLE_ID_REQUEST, T.VEHICLE_ID_REQUEST_EID, T.VEHICLE_ID_REQUEST_VIN):
            answer = self.udp_answer(doip.encode(kind, payload, c.version))
            if answer is not None:
                c.send_raw(answer)
            return True
        # a type an entity sends, not takes (responses, acknowledgements): not for us
        self.stats["nacks"] += 1
        c.send(T.GENERIC_NACK, bytes((doip.Nack.UNKNOWN_PAYLOAD_TYPE,)))
        return True

    def _activate(self, c: _Connection, payload: bytes) -> bool:
        source, kind, oem = doip.parse_routing_activation(payload)
        code = self._activation_code(c, source, kind, oem)
        if code == RoutingCode.SUCCESS and c.tester is None:  # active before the tester hears it
            c.routes = TesterRoutes(self.config, self.buses, source, c.send, self.local, self._gateway_owner)
            c.tester = source
        c.send(T.ROUTING_ACTIVATION_RESPONSE, doip.routing_activation_response(source, self.doip.logical_address, code))
        log.info("DoIP %s: routing activation 0x%04X type 0x%02X: 0x%02X", c.peer[0], source, kind, code)
        # refused: the socket is closed, except when only the authentication is missing
        return code in (RoutingCode.SUCCESS, RoutingCode.MISSING_AUTHENTICATION)

    def _activation_code(self, c: _Connection, source: int, kind: int, oem: bytes | None) -> int:
        low, high = self.doip.testers
        if not low <= source <= high:
            return RoutingCode.UNKNOWN_SOURCE_ADDRESS
        if not c.secure and not self.doip.plain:
            return RoutingCode.TLS_REQUIRED  # the standard's answer: the tester comes back on the TLS port
        if kind not in ACTIVATION_TYPES:
            return RoutingCode.UNSUPPORTED_ACTIVATION_TYPE
        if c.tester is not None:
            return RoutingCode.SUCCESS if c.tester == source else RoutingCode.SOURCE_ADDRESS_MISMATCH
        with self._lock:
            others = [o for o in self._connections if o is not c and o.tester is not None]
        same = [o for o in others if o.tester == source]
        if same and self._alive(same):
            return RoutingCode.SOURCE_ADDRESS_IN_USE
        if not same and len(others) >= self.doip.max_testers:
            self._alive(others)  # those that do not answer lose their socket
            if sum(1 for o in others if not o.closed.is_set()) >= self.doip.max_testers:
                return RoutingCode.ALL_SOCKETS_ACTIVE
        if kind == 0xE0:
            secret = self.doip.activation_secret
            if secret is None:
                return RoutingCode.UNSUPPORTED_ACTIVATION_TYPE
            if oem is None or not hmac.compare_digest(oem, activation_key(secret, source, self.doip.eid)):
                return RoutingCode.MISSING_AUTHENTICATION
        return RoutingCode.SUCCESS

    def _alive(self, connections: list[_Connection]) -> bool:
        """Alive check of ``connections``: those that do not answer in time are closed. True if
        any of them is still there (its socket stays taken)."""
        for o in connections:
            o.alive.clear()
            try:
                o.send(T.ALIVE_CHECK_REQUEST, b"")
            except OSError:
                o.close()
        deadline = time.monotonic() + ALIVE_CHECK_S
        for o in connections:  # one that closes meanwhile (a tester that just went) is not waited for
            while not (o.alive.is_set() or o.closed.is_set()) and time.monotonic() < deadline:
                o.alive.wait(0.01)
        answered = False
        for o in connections:
            if o.alive.is_set() and not o.closed.is_set():
                answered = True
            else:
                log.info("DoIP %s: no alive check response, socket closed", o.peer[0])
                o.close()
        return answered

    def _diagnostic(self, c: _Connection, payload: bytes) -> bool:
        source, target, data = doip.parse_diagnostic(payload)
        routes = c.routes
        if routes is None or source != c.tester:
            c.send(T.DIAGNOSTIC_NACK, doip.diagnostic_nack(target, source, doip.DiagNack.INVALID_SOURCE_ADDRESS))
            return False  # ISO 13400-2: the socket is closed
        if not routes.known(target):
            c.send(T.DIAGNOSTIC_NACK, doip.diagnostic_nack(target, source, doip.DiagNack.UNKNOWN_TARGET_ADDRESS))
            return True
        if len(data) > routes.max_length(target):
            c.send(T.DIAGNOSTIC_NACK, doip.diagnostic_nack(target, source, doip.DiagNack.MESSAGE_TOO_LARGE))
            return True
        c.send(T.DIAGNOSTIC_ACK, doip.diagnostic_ack(target, source))  # before any answer can be forwarded
        self.stats["routed"] += 1
        routes.route(target, data)
        return True

