"""The stand-in cloud's package server: static files over HTTP, or HTTPS with ``tls`` (its
certificate and key), with byte ranges. The TLS handshake runs in each connection's own
thread: a client that connects and says nothing holds up nobody else.

``cut_after`` (drop the connection after N bytes of a response), ``extra_bytes`` (send
more than the file holds) and ``throttle`` (bytes per second) let tests and the bench
misbehave the way real networks and servers do.
"""

from __future__ import annotations

import logging
import re
import ssl
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

__all__ = ["PackageServer"]

log = logging.getLogger(__name__)
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    tls: ssl.SSLContext | None = None

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.tls is not None:
            request.settimeout(30)
            try:
                request = self.tls.wrap_socket(request, server_side=True)
            except (OSError, ssl.SSLError) as exc:
                log.info("package server: TLS handshake with %s failed: %s", client_address[0], exc)
                return
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("package server: a connection from %s ended badly", client_address[0], exc_info=True)


class PackageServer:
    def __init__(self, root: str | Path, host: str = "127.0.0.1", port: int = 0, tls: tuple[str, str] | None = None) -> None:
        self.root = Path(root)
        self.cut_after: int | None = None
        self.extra_bytes = 0
        self.throttle: int | None = None  # bytes per second, like a slow cellular link
        self.requests: list[dict[str, Any]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug("package server: " + fmt, *args)

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                server._get(self)

        self.httpd = _Server((host, port), Handler)
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.httpd.tls = context
        self.scheme = "https" if tls is not None else "http"
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="package-server",
                                        daemon=True)

    def url(self, name: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/packages/{name}"

    def start(self) -> "PackageServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)

    def _get(self, h: BaseHTTPRequestHandler) -> None:
        self.requests.append({"path": h.path, "range": h.headers.get("Range")})
        name = h.path.removeprefix("/packages/")
        path = self.root / name
        if not h.path.startswith("/packages/") or "/" in name or not path.is_file():
            h.send_error(HTTPStatus.NOT_FOUND)
            return
        data = path.read_bytes()
        start, end = 0, len(data) - 1
        status = HTTPStatus.OK
        wanted = h.headers.get("Range")
        if wanted:
            m = _RANGE.match(wanted.strip())
            if not m or int(m.group(1)) >= len(data):
                h.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                h.send_header("Content-Range", f"bytes */{len(data)}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            start = int(m.group(1))
            end = min(int(m.group(2)), len(data) - 1) if m.group(2) else len(data) - 1
            status = HTTPStatus.PARTIAL_CONTENT
        body = data[start : end + 1] + b"\0" * self.extra_bytes
        h.send_response(status)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("Content-Length", str(len(body)))
        if status == HTTPStatus.PARTIAL_CONTENT:
            h.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        h.end_headers()
        if self.cut_after is not None and len(body) > self.cut_after:
            h.wfile.write(body[: self.cut_after])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(2)  # the network breaks in the middle of the body
            return
        rate = self.throttle
        try:
            if rate:
                step = max(1, rate // 20)  # 20 writes a second, down to a byte at a time
                for i in range(0, len(body), step):
                    h.wfile.write(body[i : i + step])
                    h.wfile.flush()
                    time.sleep(step / rate)
                return
            h.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            log.debug("client went away during %s", h.path)  # a vehicle that lost power
