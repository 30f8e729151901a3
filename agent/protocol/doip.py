"""Diagnostics over IP (ISO 13400-2): the generic header, the payload types a DoIP entity serves,
their codes, and the framing of a TCP stream with the header checks the standard prescribes.
Pure: bytes in, messages or the negative acknowledgement to send out.

Generic header (8 bytes)::

    VV ~VV TTTT LLLLLLLL payload     version (0x02: 2012, 0x03: 2019; 0xFF in a vehicle
                                     identification request), its inverse, payload type, length

What a header that does not hold gets (ISO 13400-2, the generic header's handling): a wrong
pattern (the version's inverse, an unknown version) 0x00 and the connection closed; an unknown
payload type 0x01, its payload skipped; a length above what the entity takes 0x02 (0x03 when above
what it can hold now), skipped; a length the payload type cannot have 0x04 and the connection closed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

__all__ = ["PayloadType", "Nack", "RoutingCode", "DiagNack", "HEADER", "Message", "Problem", "encode", "Framer",
           "VERSIONS", "ANY_VERSION", "vehicle_identification", "routing_activation_response", "diagnostic_message",
           "diagnostic_ack", "diagnostic_nack", "parse_routing_activation", "parse_diagnostic", "entity_status",
           "power_mode", "UDP_PORT", "TCP_PORT", "TLS_PORT", "ACTIVATION_REFUSALS", "DIAGNOSTIC_NACKS"]

HEADER = 8
VERSIONS = (0x02, 0x03)
ANY_VERSION = 0xFF  # a vehicle identification request may carry it: the entity answers in its own
UDP_PORT = TCP_PORT = 13400
TLS_PORT = 3496


class PayloadType(IntEnum):
    GENERIC_NACK = 0x0000
    VEHICLE_ID_REQUEST = 0x0001
    VEHICLE_ID_REQUEST_EID = 0x0002
    VEHICLE_ID_REQUEST_VIN = 0x0003
    VEHICLE_ANNOUNCEMENT = 0x0004  # also the vehicle identification response
    ROUTING_ACTIVATION_REQUEST = 0x0005
    ROUTING_ACTIVATION_RESPONSE = 0x0006
    ALIVE_CHECK_REQUEST = 0x0007
    ALIVE_CHECK_RESPONSE = 0x0008
    ENTITY_STATUS_REQUEST = 0x4001
    ENTITY_STATUS_RESPONSE = 0x4002
    POWER_MODE_REQUEST = 0x4003
    POWER_MODE_RESPONSE = 0x4004
    DIAGNOSTIC_MESSAGE = 0x8001
    DIAGNOSTIC_ACK = 0x8002
    DIAGNOSTIC_NACK = 0x8003


class Nack(IntEnum):
    """Generic DoIP header negative acknowledgement codes."""

    INCORRECT_PATTERN = 0x00
    UNKNOWN_PAYLOAD_TYPE = 0x01
    MESSAGE_TOO_LARGE = 0x02
    OUT_OF_MEMORY = 0x03
    INVALID_PAYLOAD_LENGTH = 0x04


class RoutingCode(IntEnum):
    UNKNOWN_SOURCE_ADDRESS = 0x00
    ALL_SOCKETS_ACTIVE = 0x01
    SOURCE_ADDRESS_MISMATCH = 0x02
    SOURCE_ADDRESS_IN_USE = 0x03
    MISSING_AUTHENTICATION = 0x04
    REJECTED_CONFIRMATION = 0x05
    UNSUPPORTED_ACTIVATION_TYPE = 0x06
    TLS_REQUIRED = 0x07
    SUCCESS = 0x10
    CONFIRMATION_REQUIRED = 0x11


class DiagNack(IntEnum):
    INVALID_SOURCE_ADDRESS = 0x02
    UNKNOWN_TARGET_ADDRESS = 0x03
    MESSAGE_TOO_LARGE = 0x04
    OUT_OF_MEMORY = 0x05
    TARGET_UNREACHABLE = 0x06
    UNKNOWN_NETWORK = 0x07
    TRANSPORT_PROTOCOL_ERROR = 0x08


# what the codes a DoIP client is refused with mean (ISO 13400-2), and whose doing each is: a
# refusal for the client's own address, authentication or request (client), or for the entity's
# state or the network behind it (server)
ACTIVATION_REFUSALS = {0x00: ("unknown source address", "client"), 0x01: ("all sockets taken", "server"),
                       0x02: ("source address differs on this socket", "client"),
                       0x03: ("source address active on another socket", "client"),
                       0x04: ("missing authentication", "client"), 0x05: ("confirmation rejected", "server"),
                       0x06: ("unsupported activation type", "client"), 0x07: ("TLS required", "client")}
DIAGNOSTIC_NACKS = {0x02: ("invalid source address", "client"), 0x03: ("unknown target address", "client"),
                    0x04: ("message too large", "client"), 0x05: ("out of memory", "server"),
                    0x06: ("target unreachable", "server"), 0x07: ("unknown network", "server"),
                    0x08: ("transport protocol error", "server")}


# the payload lengths a request of each type may have (None: at least the first number)
_LENGTHS: dict[int, tuple[int, ...] | int] = {
    PayloadType.GENERIC_NACK: (1,),
    PayloadType.VEHICLE_ID_REQUEST: (0,),
    PayloadType.VEHICLE_ID_REQUEST_EID: (6,),
    PayloadType.VEHICLE_ID_REQUEST_VIN: (17,),
    PayloadType.VEHICLE_ANNOUNCEMENT: (32, 33),
    PayloadType.ROUTING_ACTIVATION_REQUEST: (7, 11),
    PayloadType.ROUTING_ACTIVATION_RESPONSE: (9, 13),
    PayloadType.ALIVE_CHECK_REQUEST: (0,),
    PayloadType.ALIVE_CHECK_RESPONSE: (2,),
    PayloadType.ENTITY_STATUS_REQUEST: (0,),
    PayloadType.ENTITY_STATUS_RESPONSE: (3, 7),
    PayloadType.POWER_MODE_REQUEST: (0,),
    PayloadType.POWER_MODE_RESPONSE: (1,),
    PayloadType.DIAGNOSTIC_MESSAGE: 5,  # source, target and at least one byte of UDS
    PayloadType.DIAGNOSTIC_ACK: 5,
    PayloadType.DIAGNOSTIC_NACK: 5,
}


@dataclass(frozen=True)
class Message:
    version: int
    payload_type: int
    payload: bytes


@dataclass(frozen=True)
class Problem:
    """A header that does not hold: the NACK to send, and whether the connection is closed after it."""

    nack: Nack
    close: bool
    why: str


def encode(payload_type: int, payload: bytes, version: int = 0x02) -> bytes:
    return struct.pack("!BBHL", version, version ^ 0xFF, payload_type, len(payload)) + payload


def length_ok(payload_type: int, length: int) -> bool:
    allowed = _LENGTHS.get(payload_type)
    if allowed is None:
        return False
    return length >= allowed if isinstance(allowed, int) else length in allowed


class Framer:
    """A TCP stream into messages. ``feed`` takes bytes and returns what they complete: messages,
    and Problems (a NACK to send; after one that closes, nothing more is read). ``max_payload``: the
    largest payload taken (a diagnostic message: 4 + the largest UDS request); ``room``: what can be
    held now (beyond it: out of memory)."""

    def __init__(self, max_payload: int, room: int | None = None, udp: bool = False) -> None:
        self.max_payload, self.room, self.udp = max_payload, room if room is not None else max_payload, udp
        self._buffer = bytearray()
        self._skip = 0  # bytes of a refused payload still to drop
        self.closed = False

    def feed(self, data: bytes) -> list[Message | Problem]:
        out: list[Message | Problem] = []
        if self.closed:
            return out
        self._buffer += data
        while True:
            if self._skip:
                dropped = min(self._skip, len(self._buffer))
                del self._buffer[:dropped]
                self._skip -= dropped
                if self._skip:
                    return out
            if len(self._buffer) < HEADER:
                return out
            version, inverse, kind, length = struct.unpack_from("!BBHL", self._buffer)
            problem = self._check(version, inverse, kind, length)
            if problem is not None:
                out.append(problem)
                if problem.close:
                    self.closed = True
                    self._buffer.clear()
                    return out
                del self._buffer[:HEADER]
                self._skip = length
                continue
            if len(self._buffer) < HEADER + length:
                return out
            out.append(Message(version, kind, bytes(self._buffer[HEADER:HEADER + length])))
            del self._buffer[:HEADER + length]

    def _check(self, version: int, inverse: int, kind: int, length: int) -> Problem | None:
        known_version = version in VERSIONS or (version == ANY_VERSION and kind in (
            PayloadType.VEHICLE_ID_REQUEST, PayloadType.VEHICLE_ID_REQUEST_EID, PayloadType.VEHICLE_ID_REQUEST_VIN))
        if inverse != version ^ 0xFF or not known_version:
            return Problem(Nack.INCORRECT_PATTERN, True, f"protocol version {version:#04x}/{inverse:#04x}")
        if kind not in _LENGTHS:
            return Problem(Nack.UNKNOWN_PAYLOAD_TYPE, False, f"payload type {kind:#06x}")
        if length > self.max_payload:
            return Problem(Nack.MESSAGE_TOO_LARGE, False, f"{length} bytes of payload, {self.max_payload} at most")
        if length > self.room:
            return Problem(Nack.OUT_OF_MEMORY, False, f"{length} bytes of payload, room for {self.room}")
        if not length_ok(kind, length):
            return Problem(Nack.INVALID_PAYLOAD_LENGTH, True, f"{length} bytes of payload for type {kind:#06x}")
        return None


# ---- the payloads an entity sends and parses ------------------------------------------------------
def vehicle_identification(vin: str, address: int, eid: bytes, gid: bytes, further: int = 0,
                           sync: int | None = None) -> bytes:
    """Announcement / identification response: VIN, logical address, EID, GID, further action, [sync]."""
    out = vin.encode("ascii")[:17].ljust(17, b"\x00") + struct.pack("!H", address) + eid[:6].ljust(6, b"\x00") + \
        gid[:6].ljust(6, b"\x00") + bytes((further,))
    return out + (bytes((sync,)) if sync is not None else b"")


def parse_routing_activation(payload: bytes) -> tuple[int, int, bytes | None]:
    """(source address, activation type, OEM-specific bytes or None)."""
    source, kind = struct.unpack_from("!HB", payload)
    return source, kind, payload[7:11] if len(payload) == 11 else None


def routing_activation_response(tester: int, entity: int, code: int, oem: bytes | None = None) -> bytes:
    return struct.pack("!HHBL", tester, entity, code, 0) + (oem if oem is not None else b"")


def parse_diagnostic(payload: bytes) -> tuple[int, int, bytes]:
    """(source address, target address, UDS data)."""
    source, target = struct.unpack_from("!HH", payload)
    return source, target, payload[4:]


def diagnostic_message(source: int, target: int, data: bytes) -> bytes:
    return struct.pack("!HH", source, target) + data


def diagnostic_ack(source: int, target: int, echo: bytes = b"") -> bytes:
    """The entity's positive acknowledgement of a diagnostic message (``source``: the entity's side)."""
    return struct.pack("!HHB", source, target, 0x00) + echo


def diagnostic_nack(source: int, target: int, code: int, echo: bytes = b"") -> bytes:
    return struct.pack("!HHB", source, target, code) + echo


def entity_status(node_type: int, max_sockets: int, open_sockets: int, max_data: int | None = None) -> bytes:
    out = struct.pack("!BBB", node_type, max_sockets, open_sockets)
    return out + (struct.pack("!L", max_data) if max_data is not None else b"")


def power_mode(ready: bool) -> bytes:
    return bytes((0x01 if ready else 0x00,))
