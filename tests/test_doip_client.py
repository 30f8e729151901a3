"""The TBOX's DoIP channel (agent/adapters/doip_client.py) against a scripted DoIP entity on a
loopback socket: what it reports of each of DoIP's own failures, as the trace keeps it (x.doip)."""

from __future__ import annotations

import socket
import struct
import threading
from typing import Callable, Iterator

import pytest

from agent.adapters.doip_client import DoipChannel, DoipRefused
from agent.protocol import doip
from agent.protocol.doip import PayloadType as T

TBOX, GW = 0x0E80, 0x1010
Script = Callable[[socket.socket, doip.Framer], None]


def _next(conn: socket.socket, framer: doip.Framer) -> doip.Message:
    while True:
        items = framer.feed(conn.recv(4096))
        for item in items:
            if isinstance(item, doip.Message):
                return item


@pytest.fixture
def entity() -> Iterator[Callable[[Script], int]]:
    """A listening socket whose one connection is served by a script; returns its port."""
    servers: list[tuple[socket.socket, threading.Thread]] = []

    def start(script: Script) -> int:
        server = socket.create_server(("127.0.0.1", 0))

        def serve() -> None:
            conn, _ = server.accept()
            with conn:
                script(conn, doip.Framer(1 << 16))

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        servers.append((server, thread))
        return int(server.getsockname()[1])

    yield start
    for server, thread in servers:
        server.close()
        thread.join(timeout=5)


def activate(conn: socket.socket, framer: doip.Framer, code: int = 0x10) -> None:
    request = _next(conn, framer)
    assert request.payload_type == T.ROUTING_ACTIVATION_REQUEST and request.payload[:2] == struct.pack("!H", TBOX)
    conn.sendall(doip.encode(T.ROUTING_ACTIVATION_RESPONSE, doip.routing_activation_response(TBOX, GW, code)))


def test_a_refused_activation_says_its_code_and_meaning(entity) -> None:  # type: ignore[no-untyped-def]
    port = entity(lambda conn, framer: activate(conn, framer, 0x01))
    channel = DoipChannel("127.0.0.1", port, TBOX, GW, lazy=True)
    with pytest.raises(DoipRefused) as err:
        channel.send(bytes.fromhex("1003"))  # lazy: the first request connects
    assert (err.value.code, err.value.trace) == (0x01, {"act": 0x01})
    assert "code 0x01 (all sockets taken)" in str(err.value)


def test_a_negative_acknowledgement_fails_the_send(entity) -> None:  # type: ignore[no-untyped-def]
    def script(conn: socket.socket, framer: doip.Framer) -> None:
        activate(conn, framer)
        message = _next(conn, framer)
        assert doip.parse_diagnostic(message.payload) == (TBOX, GW, bytes.fromhex("22f189"))
        conn.sendall(doip.encode(T.DIAGNOSTIC_NACK, doip.diagnostic_nack(GW, TBOX, 0x06)))
        conn.recv(10)  # until the client closes

    with DoipChannel("127.0.0.1", entity(script), TBOX, GW) as channel, pytest.raises(DoipRefused) as err:
        channel.send(bytes.fromhex("22f189"))
    assert err.value.trace == {"nack": 0x06} and "target unreachable" in str(err.value)


def test_a_close_right_after_an_alive_check_is_the_alive_checks_timeout(entity) -> None:  # type: ignore[no-untyped-def]
    def script(conn: socket.socket, framer: doip.Framer) -> None:
        activate(conn, framer)
        _next(conn, framer)  # the request: acknowledged, then an alive check, then closed
        conn.sendall(doip.encode(T.DIAGNOSTIC_ACK, doip.diagnostic_ack(GW, TBOX)))
        conn.sendall(doip.encode(T.ALIVE_CHECK_REQUEST, b""))
        assert _next(conn, framer).payload == struct.pack("!H", TBOX)  # answered by the reader thread

    with DoipChannel("127.0.0.1", entity(script), TBOX, GW) as channel:
        channel.send(bytes.fromhex("3101ff00"))
        with pytest.raises(DoipRefused) as err:
            while channel.recv(block=True, timeout=5) is None:
                pass
    assert err.value.trace == {"closed": "alive_check"}


def test_a_close_without_alive_check_is_the_entitys_and_an_answer_before_it_is_kept(entity) -> None:  # type: ignore[no-untyped-def]
    def script(conn: socket.socket, framer: doip.Framer) -> None:
        activate(conn, framer)
        _next(conn, framer)
        conn.sendall(doip.encode(T.DIAGNOSTIC_ACK, doip.diagnostic_ack(GW, TBOX)))
        conn.sendall(doip.encode(T.DIAGNOSTIC_MESSAGE, doip.diagnostic_message(GW, TBOX, bytes.fromhex("5003"))))

    with DoipChannel("127.0.0.1", entity(script), TBOX, GW) as channel:
        channel.send(bytes.fromhex("1003"))
        assert channel.recv(block=True, timeout=5) == bytes.fromhex("5003")
        with pytest.raises(DoipRefused) as err:
            channel.recv(block=True, timeout=5)
        with pytest.raises(DoipRefused):
            channel.send(bytes.fromhex("1001"))  # and so does every later use
    assert err.value.trace == {"closed": "peer"}


def test_an_entity_not_listening_is_unreachable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        with pytest.raises(DoipRefused) as err:
            DoipChannel("127.0.0.1", port, TBOX, GW)
    assert err.value.trace == {"conn": "unreachable"} and f"port {port} unreachable" in str(err.value)
