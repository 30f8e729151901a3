"""The deploy link over DoIP (ISO 13400-2): a client channel with the interface of the segments'
ISO-TP stacks, and a link that hands such channels out as a CAN segment hands out stacks.

``DoipChannel``: ``send`` a UDS request, ``recv`` the next answer. It connects over TCP when first
used, activates routing with its source address, sends each request as a diagnostic message to one
target address and waits for the entity's acknowledgement (a negative one fails the send, as a
transmit error does on CAN), and answers the entity's alive checks from a reader thread. The traced
UDS connection (``agent/adapters/uds_client.py``) runs on it unchanged.

``DoipLink``: what the TBOX's sequences (deploy, install, inventory, content) open their UDS link
on when ``deploy.transport`` is ``doip``: each sequence gets its own connection, closed with it.

A failure of DoIP's own (activation refused, a negative acknowledgement, the connection lost, an
alive check that went unanswered) is a ``DoipRefused`` whose ``trace`` the recorder keeps in the
exchange's extras (``x.doip``) for the diagnosis (docs/doip.md).
"""

from __future__ import annotations

import queue
import socket
import ssl
import struct
import threading
import time
from typing import Any

from agent.adapters.canbus import Segment
from agent.adapters.tls_stream import TlsStream, client_context
from agent.core.config import DeployConfig, VehicleConfig
from agent.errors import ConfigError
from agent.protocol import doip
from agent.protocol.doip import PayloadType as T

__all__ = ["DoipChannel", "DoipLink", "DoipRefused", "open_deploy_link"]

ACK_TIMEOUT_S = 2.0  # A_DoIP_Diagnostic_Message
ALIVE_WINDOW_S = 3.0  # a close this soon after an alive check: the entity's alive check timed out (A_DoIP_Ctrl 2 s)


class DoipRefused(ConnectionError):
    """Routing activation refused, a diagnostic message negatively acknowledged, or the entity
    gone. ``code``: the refusal's code; ``trace``: what the trace records (``x.doip``)."""

    def __init__(self, what: str, code: int | None = None, trace: dict[str, Any] | None = None) -> None:
        super().__init__(what)
        self.code = code
        self.trace = trace or {}


class DoipChannel:
    def __init__(self, host: str, port: int, source: int, target: int, activation_type: int = 0,
                 oem: bytes | None = None, timeout: float = 5.0, *, lazy: bool = False,
                 tls: ssl.SSLContext | None = None) -> None:
        """``lazy``: connect at the first ``send`` (a failure is then that request's), else now;
        ``tls``: over TLS (the entity's TLS port), the entity verified with this context."""
        self.host, self.port, self.source, self.target = host, port, source, target
        self.activation_type, self.oem, self.timeout, self.tls = activation_type, oem, timeout, tls
        self.sock: socket.socket | TlsStream | None = None
        self._framer = doip.Framer(max_payload=1 << 20)
        self._answers: queue.Queue[bytes | None] = queue.Queue()
        self._control: queue.Queue[doip.Message | None] = queue.Queue()  # activation responses, ACKs, NACKs
        self._write = threading.Lock()
        self._closed = threading.Event()
        self._lost: DoipRefused | None = None  # why the connection ended, once it has
        self._alive_at = 0.0  # the last alive check the entity sent (monotonic)
        self._reader: threading.Thread | None = None
        if not lazy:
            self.connect()

    def connect(self) -> None:
        """Connect and activate routing (DoipRefused when either fails)."""
        try:
            raw = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except OSError as exc:
            raise DoipRefused(f"DoIP entity {self.host} port {self.port} unreachable: {exc.strerror or exc}",
                              trace={"conn": "unreachable"}) from None
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock: socket.socket | TlsStream = raw
        if self.tls is not None:
            sock = TlsStream(raw, self.tls, server_side=False, server_hostname=self.host)
            try:
                sock.handshake(self.timeout)
            except (OSError, ssl.SSLError) as exc:
                raw.close()
                raise DoipRefused(f"TLS handshake with {self.host} port {self.port} failed: {exc}",
                                  trace={"conn": "tls"}) from None
        self.sock = sock
        self._reader = threading.Thread(target=self._read, args=(sock,), name=f"doip-client-{self.source:04X}", daemon=True)
        self._reader.start()
        try:
            self._send(T.ROUTING_ACTIVATION_REQUEST,
                       struct.pack("!HB", self.source, self.activation_type) + bytes(4) + (self.oem or b""))
            answer = self._expect((T.ROUTING_ACTIVATION_RESPONSE,), self.timeout)
            code = answer.payload[4] if len(answer.payload) > 4 else -1
            if code != doip.RoutingCode.SUCCESS:
                meaning = doip.ACTIVATION_REFUSALS.get(code, ("reserved",))[0]
                raise DoipRefused(f"routing activation refused: code 0x{code:02X} ({meaning})",
                                  code, {"act": code})
        except BaseException:
            self.close()
            raise

    # ---- the ISO-TP stack's interface ------------------------------------------------------
    def send(self, payload: bytes, send_timeout: float | None = None) -> None:
        if self.sock is None:
            self.connect()
        self._send(T.DIAGNOSTIC_MESSAGE, doip.diagnostic_message(self.source, self.target, bytes(payload)))
        answer = self._expect((T.DIAGNOSTIC_ACK, T.DIAGNOSTIC_NACK), ACK_TIMEOUT_S)
        if answer.payload_type == T.DIAGNOSTIC_NACK:
            code = answer.payload[4]
            raise DoipRefused(f"diagnostic message negatively acknowledged: code 0x{code:02X} "
                              f"({doip.DIAGNOSTIC_NACKS.get(code, ('reserved',))[0]})", code, {"nack": code})

    def recv(self, block: bool = False, timeout: float | None = None) -> bytes | None:
        """The next answer, or None when none came in time; DoipRefused once the connection is
        gone and every answer that came before was taken."""
        try:
            answer = self._answers.get(block=block, timeout=timeout if block else None)
        except queue.Empty:
            return None
        if answer is None:
            self._answers.put(None)  # every later call learns it too
            raise self._lost or DoipRefused("the DoIP connection is closed", trace={"closed": "client"})
        return answer

    def stop_receiving(self) -> None:
        pass

    def stop_sending(self) -> None:
        pass

    def clear_rx_queue(self) -> None:
        try:
            while self.recv() is not None:
                pass
        except DoipRefused:
            pass

    def clear_tx_queue(self) -> None:
        pass

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout=2.0)

    def __enter__(self) -> "DoipChannel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- the connection ---------------------------------------------------------------------
    def _send(self, payload_type: int, payload: bytes) -> None:
        if self._lost is not None:
            raise self._lost
        assert self.sock is not None
        try:
            with self._write:
                self.sock.sendall(doip.encode(payload_type, payload))
        except OSError as exc:
            raise DoipRefused(f"DoIP connection lost: {exc.strerror or exc}", trace={"closed": "peer"}) from None

    def _expect(self, kinds: tuple[int, ...], timeout: float) -> doip.Message:
        while True:
            try:
                message = self._control.get(timeout=timeout)
            except queue.Empty:
                raise DoipRefused(f"no DoIP answer within {timeout:g} s", trace={"timeout": "ack"}) from None
            if message is None:
                self._control.put(None)
                raise self._lost or DoipRefused("the DoIP connection is closed", trace={"closed": "client"})
            if message.payload_type == T.GENERIC_NACK:
                raise DoipRefused(f"generic negative acknowledgement 0x{message.payload[0]:02X}", message.payload[0],
                                  {"gnack": message.payload[0]})
            if message.payload_type in kinds:
                return message

    def _read(self, sock: socket.socket | TlsStream) -> None:
        try:
            while not self._closed.is_set():
                try:
                    data = sock.recv(65536)
                except socket.timeout:
                    continue
                if not data:
                    break
                for item in self._framer.feed(data):
                    if isinstance(item, doip.Message):
                        self._take(item)
        except (OSError, DoipRefused):
            pass
        finally:
            if self._closed.is_set():
                self._lost = DoipRefused("the DoIP connection is closed", trace={"closed": "client"})
            elif time.monotonic() - self._alive_at < ALIVE_WINDOW_S:
                self._lost = DoipRefused("the DoIP entity closed the connection after an alive check (its answer did "
                                         "not arrive in time)", trace={"closed": "alive_check"})
            else:
                self._lost = DoipRefused("the DoIP entity closed the connection", trace={"closed": "peer"})
            self._control.put(None)
            self._answers.put(None)

    def _take(self, message: doip.Message) -> None:
        kind = message.payload_type
        if kind == T.ALIVE_CHECK_REQUEST:
            self._alive_at = time.monotonic()
            self._send(T.ALIVE_CHECK_RESPONSE, struct.pack("!H", self.source))
        elif kind == T.DIAGNOSTIC_MESSAGE:
            source, target, data = doip.parse_diagnostic(message.payload)
            if source == self.target and target == self.source:
                self._answers.put(data)
        else:
            self._control.put(message)


class DoipLink:
    """The deploy link over DoIP, handing out channels the way a CAN segment hands out ISO-TP
    stacks (``stack``/``release``): each UDS link its own connection, to the gateway's logical
    address. No CAN frames: ``notifier`` is None (no stray-frame listener), ``send_frame`` refuses."""

    notifier = None

    def __init__(self, link: DeployConfig, source: str = "<config>") -> None:
        self.link = link
        self.tls: ssl.SSLContext | None = None
        if link.doip_tls and link.doip_tls_ca is not None:
            try:
                self.tls = client_context(link.doip_tls_ca, link.doip_tls_cert, link.doip_tls_key)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(source, "deploy.tls", f"cannot use {link.doip_tls_ca}"
                                  f"{', ' + link.doip_tls_cert if link.doip_tls_cert else ''}: {exc}") from None

    def stack(self, txid: int, rxid: int, **_: Any) -> DoipChannel:
        return DoipChannel(self.link.doip_host, self.link.doip_port, self.link.doip_source, self.link.doip_target,
                           lazy=True, tls=self.tls)

    def release(self, stack: Any) -> None:
        stack.close()

    def send_frame(self, can_id: int, data: bytes) -> None:
        raise DoipRefused("a raw CAN frame cannot go on the DoIP link", trace={"conn": "can-frame"})

    def shutdown(self) -> None:
        pass

    def __enter__(self) -> "DoipLink":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def open_deploy_link(config: VehicleConfig) -> Segment | DoipLink:
    """The TBOX's side of the deploy link as ``deploy.transport`` says: its CAN segment opened, or
    the DoIP link to the gateway's entity (connections are made as the sequences need them)."""
    link = config.deploy_link()
    return DoipLink(link, config.source) if link.transport == "doip" else Segment(config.segments[link.segment])
