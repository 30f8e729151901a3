"""A DoIP client channel (ISO 13400-2) with the interface of the segments' ISO-TP stacks: ``send``
a UDS request, ``recv`` the next answer. It connects over TCP, activates routing with its source
address, sends each request as a diagnostic message to one target address and waits for the
entity's acknowledgement (a negative one fails the send, as a transmit error does on CAN), and
answers the entity's alive checks from a reader thread while it waits for nothing. The traced UDS
connection (``agent/adapters/uds_client.py``) runs on it unchanged: the first step of the deploy
link over DoIP (docs/doip.md).
"""

from __future__ import annotations

import queue
import socket
import struct
import threading
from typing import Any

from agent.errors import VotaError
from agent.protocol import doip
from agent.protocol.doip import PayloadType as T

__all__ = ["DoipChannel", "DoipRefused"]

ACK_TIMEOUT_S = 2.0  # A_DoIP_Diagnostic_Message


class DoipRefused(VotaError):
    """Routing activation refused, a diagnostic message negatively acknowledged, or the entity gone."""

    def __init__(self, what: str, code: int | None = None) -> None:
        super().__init__(what)
        self.code = code


class DoipChannel:
    def __init__(self, host: str, port: int, source: int, target: int, activation_type: int = 0,
                 oem: bytes | None = None, timeout: float = 5.0) -> None:
        self.source, self.target = source, target
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise DoipRefused(f"DoIP entity {host} port {port}: {exc.strerror or exc}") from None
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._framer = doip.Framer(max_payload=1 << 20)
        self._answers: queue.Queue[bytes] = queue.Queue()
        self._control: queue.Queue[doip.Message | None] = queue.Queue()  # activation responses, ACKs, NACKs
        self._write = threading.Lock()
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._read, name=f"doip-client-{source:04X}", daemon=True)
        self._reader.start()
        try:
            self._send(T.ROUTING_ACTIVATION_REQUEST, struct.pack("!HB", source, activation_type) + bytes(4) + (oem or b""))
            answer = self._expect((T.ROUTING_ACTIVATION_RESPONSE,), timeout)
            code = answer.payload[4]
            if code != doip.RoutingCode.SUCCESS:
                raise DoipRefused(f"routing activation refused: code 0x{code:02X}", code)
        except BaseException:
            self.close()
            raise

    # ---- the ISO-TP stack's interface ------------------------------------------------------
    def send(self, payload: bytes, send_timeout: float | None = None) -> None:
        self._send(T.DIAGNOSTIC_MESSAGE, doip.diagnostic_message(self.source, self.target, bytes(payload)))
        answer = self._expect((T.DIAGNOSTIC_ACK, T.DIAGNOSTIC_NACK), ACK_TIMEOUT_S)
        if answer.payload_type == T.DIAGNOSTIC_NACK:
            code = answer.payload[4]
            raise DoipRefused(f"diagnostic message negatively acknowledged: code 0x{code:02X}", code)

    def recv(self, block: bool = False, timeout: float | None = None) -> bytes | None:
        try:
            return self._answers.get(block=block, timeout=timeout if block else None)
        except queue.Empty:
            return None

    def stop_receiving(self) -> None:
        pass

    def stop_sending(self) -> None:
        pass

    def clear_rx_queue(self) -> None:
        while self.recv() is not None:
            pass

    def clear_tx_queue(self) -> None:
        pass

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        if self._reader is not threading.current_thread():
            self._reader.join(timeout=2.0)

    def __enter__(self) -> "DoipChannel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- the connection ---------------------------------------------------------------------
    def _send(self, payload_type: int, payload: bytes) -> None:
        try:
            with self._write:
                self.sock.sendall(doip.encode(payload_type, payload))
        except OSError as exc:
            raise DoipRefused(f"DoIP connection lost: {exc.strerror or exc}") from None

    def _expect(self, kinds: tuple[int, ...], timeout: float) -> doip.Message:
        while True:
            try:
                message = self._control.get(timeout=timeout)
            except queue.Empty:
                raise DoipRefused(f"no DoIP answer within {timeout:g} s") from None
            if message is None:
                raise DoipRefused("the DoIP entity closed the connection")
            if message.payload_type == T.GENERIC_NACK:
                raise DoipRefused(f"generic negative acknowledgement 0x{message.payload[0]:02X}", message.payload[0])
            if message.payload_type in kinds:
                return message

    def _read(self) -> None:
        try:
            while not self._closed.is_set():
                try:
                    data = self.sock.recv(65536)
                except socket.timeout:
                    continue
                if not data:
                    return
                for item in self._framer.feed(data):
                    if isinstance(item, doip.Message):
                        self._take(item)
        except (OSError, DoipRefused):
            return
        finally:
            self._control.put(None)

    def _take(self, message: doip.Message) -> None:
        kind = message.payload_type
        if kind == T.ALIVE_CHECK_REQUEST:
            self._send(T.ALIVE_CHECK_RESPONSE, struct.pack("!H", self.source))
        elif kind == T.DIAGNOSTIC_MESSAGE:
            source, target, data = doip.parse_diagnostic(message.payload)
            if source == self.target and target == self.source:
                self._answers.put(data)
        else:
            self._control.put(message)
