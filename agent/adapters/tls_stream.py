"""TLS over a connected TCP socket for DoIP (ISO 13400-2's port 3496), safe for one thread that
reads while others write. An ``ssl.SSLSocket`` must not be read in one thread and written in
another at the same time (OpenSSL's rule for one SSL object); this keeps the TLS state in an
``ssl.SSLObject`` over memory buffers, touched under a lock for microseconds, and does the socket's
own blocking reads and writes outside it. ``recv``, ``sendall``, ``settimeout``, ``shutdown`` and
``close`` behave as a socket's, so a DoIP connection uses either without knowing which.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time

__all__ = ["TlsStream", "server_context", "client_context"]


def server_context(cert: str, key: str, ca: str | None) -> ssl.SSLContext:
    """An entity's: its certificate; with ``ca``, a peer must show a certificate ``ca`` signed.
    (OSError or ssl.SSLError for a file that cannot be read or used.)"""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    if ca is not None:
        context.load_verify_locations(ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(ca: str, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """A client's: the entity verified against ``ca`` (its address in its certificate), and the
    client's own certificate when given."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(ca)
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


class TlsStream:
    def __init__(self, sock: socket.socket, context: ssl.SSLContext, *, server_side: bool,
                 server_hostname: str | None = None) -> None:
        self.sock = sock
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._obj = context.wrap_bio(self._in, self._out, server_side=server_side, server_hostname=server_hostname)
        self._state = threading.Lock()  # the SSLObject and its buffers
        self._tx = threading.Lock()  # what leaves the buffers goes out in order: taken before _state

    def handshake(self, timeout: float) -> None:
        """The TLS handshake within ``timeout`` s (``ssl.SSLError``, or ``TimeoutError``)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._state:
                try:
                    self._obj.do_handshake()
                    done = True
                except ssl.SSLWantReadError:
                    done = False
            self._flush()
            if done:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("TLS handshake timed out")
            previous = self.sock.gettimeout()
            self.sock.settimeout(left)
            try:
                if not self._feed():
                    raise ssl.SSLEOFError("the peer closed the connection during the TLS handshake")
            finally:
                self.sock.settimeout(previous)

    def peer_certificate(self) -> dict | None:  # type: ignore[type-arg]
        return self._obj.getpeercert()

    def recv(self, size: int) -> bytes:
        """Plain data (b"" once the peer closed); ``socket.timeout`` as the socket's own."""
        while True:
            with self._state:
                try:
                    data = self._obj.read(size)
                except ssl.SSLWantReadError:
                    data = None
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    return b""
            self._flush()  # whatever reading made TLS say (a key update, an alert)
            if data is not None:
                return data
            if not self._feed():
                return b""

    def sendall(self, data: bytes) -> None:
        with self._tx:
            with self._state:
                self._obj.write(data)
                out = self._out.read()
            self.sock.sendall(out)

    def _feed(self) -> bool:
        raw = self.sock.recv(65536)
        with self._state:
            if raw:
                self._in.write(raw)
            else:
                self._in.write_eof()
        return bool(raw)

    def _flush(self) -> None:
        with self._tx:
            with self._state:
                out = self._out.read()
            if out:
                self.sock.sendall(out)

    def settimeout(self, timeout: float | None) -> None:
        self.sock.settimeout(timeout)

    def gettimeout(self) -> float | None:
        return self.sock.gettimeout()

    def setsockopt(self, *args: int) -> None:
        self.sock.setsockopt(*args)

    def shutdown(self, how: int) -> None:
        self.sock.shutdown(how)

    def close(self) -> None:
        self.sock.close()
