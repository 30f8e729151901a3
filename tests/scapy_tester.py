"""scapy's own ISO-TP and UDS stacks (not can-isotp, not udsoncan) as an independent tester on
a python-can bus: what a workshop tester or an attacker on a segment would send and see."""

from __future__ import annotations

from typing import Any

from agent.core.rxswin import decode_did


def scapy_requests(bus: dict[str, Any], requests: list[bytes], tx_id: int = 0x7D0, rx_id: int = 0x7D8) -> list[bytes]:
    """Each request sent from a node of its own with ``tx_id``, its answer (empty: none in 2 s)."""
    from scapy.config import conf

    conf.contribs["CANSocket"] = {"use-python-can": True}
    conf.contribs["ISOTP"] = {"use-can-isotp-kernel-module": False}
    from scapy.contrib.automotive.uds import UDS
    from scapy.contrib.cansocket_python_can import PythonCANSocket
    from scapy.contrib.isotp import ISOTPSocket

    answers = []
    sock = PythonCANSocket(**{k: v for k, v in bus.items() if k != "fd"})
    try:
        with ISOTPSocket(sock, tx_id=tx_id, rx_id=rx_id, basecls=UDS, padding=True) as node:
            for request in requests:
                answer = node.sr1(UDS(request), timeout=2, verbose=False)
                answers.append(bytes(answer) if answer is not None else b"")
    finally:
        sock.close()
    return answers


def read_rxswin(bus: dict[str, Any], did: int = 0xF1EF) -> dict[str, str]:
    """The vehicle's RXSWIN set, read from the gateway in the default session as any tester would."""
    answer = scapy_requests(bus, [b"\x22" + did.to_bytes(2, "big")])[0]
    assert answer[:3] == b"\x62" + did.to_bytes(2, "big"), answer.hex()
    return decode_did(answer[3:])
