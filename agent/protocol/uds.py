"""ISO 14229-1 basics shared by every UDS server and client here, in udsoncan's names.

``Nrc`` is udsoncan's ``Response.Code``; ``Session`` its DiagnosticSessionControl session
types. A server handler answers through the request it serves (``r.negative(nrc)``,
``r.positive(...)``), so a response can never name another service.
"""

from __future__ import annotations

from dataclasses import dataclass

from udsoncan import Response
from udsoncan.services import (
    CommunicationControl,
    ControlDTCSetting,
    DiagnosticSessionControl,
    ECUReset,
    RoutineControl,
)

__all__ = ["Nrc", "Session", "ResetType", "DtcSetting", "CommunicationType", "RoutineType", "COMMUNICATION_NORMAL",
           "COMMUNICATION_ALL", "Request", "BlockCounter", "negative", "session_response", "malformed", "mismatched",
           "plausible_reply"]

Nrc = Response.Code
Session = DiagnosticSessionControl.Session
ResetType = ECUReset.ResetType
DtcSetting = ControlDTCSetting.SettingType
CommunicationType = CommunicationControl.ControlType
RoutineType = RoutineControl.ControlType
# communicationType of CommunicationControl (ISO 14229-1, B.1): which messages a request concerns
COMMUNICATION_NORMAL = 0x01
COMMUNICATION_ALL = 0x03

NEGATIVE = 0x7F



def negative(sid: int, nrc: int) -> bytes:
    """``7F SID NRC``; inside a handler use ``Request.negative`` instead."""
    return bytes((NEGATIVE, sid, nrc))


@dataclass(frozen=True)
class Request:
    """One request as a server sees it: its bytes, the time it arrived, how it was addressed."""

    data: bytes
    now: float
    functional: bool = False
    # the sub-function's suppressPosRspMsgIndicationBit, taken off ``data`` before the handler sees
    # it (an authenticated request is checked as it was sent, with the bit)
    suppressed: bool = False

    def as_sent(self) -> bytes:
        """The request's bytes as they came, the suppress bit put back."""
        if not self.suppressed or len(self.data) < 2:
            return bytes(self.data)
        return bytes(self.data[:1]) + bytes((self.data[1] | 0x80,)) + bytes(self.data[2:])

    @property
    def sid(self) -> int:
        return self.data[0]

    def negative(self, nrc: int) -> bytes:
        """The negative response to this request: ``7F <this SID> NRC``."""
        return negative(self.sid, nrc)

    def positive(self, body: bytes = b"") -> bytes:
        """The positive response to this request: its SID + 0x40, then ``body``."""
        return bytes(((self.sid + 0x40) & 0xFF,)) + body


def session_response(session: int, p2_ms: int, p2_star_ms: int) -> bytes:
    """Positive DiagnosticSessionControl response: P2 in ms, P2* in units of 10 ms."""
    return bytes((0x50, session)) + p2_ms.to_bytes(2, "big") + (p2_star_ms // 10).to_bytes(2, "big")


@dataclass
class BlockCounter:
    """TransferData's blockSequenceCounter: starts at 01, wraps FF -> 00; a repeat of the last
    accepted block is acknowledged without being written again; anything else is NRC 0x73."""

    expected: int = 1
    last: int | None = None

    def classify(self, counter: int) -> str:
        if counter == self.expected:
            return "next"
        if counter == self.last:
            return "repeat"
        return "wrong"

    def accept(self, counter: int) -> None:
        self.last = counter
        self.expected = (counter + 1) & 0xFF


def malformed(response: bytes) -> bytes:
    """A response that breaks the format: a positive one cut to its SID, or a bare 7F."""
    if response[0] == NEGATIVE:
        return response[:2]
    if len(response) > 1:
        return response[:1]
    return bytes((NEGATIVE,))


def mismatched(request: bytes, response: bytes) -> bytes:
    """A well-formed response that answers another request: wrong echo, else wrong SID."""
    if response[0] != NEGATIVE and len(response) >= 2 and len(request) >= 2:
        echo = bytearray(response)
        echo[1] = (echo[1] + 1) & 0xFF
        return bytes(echo)
    if response[0] == NEGATIVE:
        return bytes((NEGATIVE, (request[0] + 1) & 0xFF)) + response[2:]
    return bytes(((response[0] + 1) & 0xFF,)) + response[1:]


def plausible_reply(request: bytes) -> bytes:
    """A well-formed positive answer to ``request``, laid out as the service's real one (a
    session's P2/P2*, a seed, a block length): what a client that leaves a request out
    (fault ``skip_step``) takes as its answer, so that it goes on and the next request is the
    one out of sequence."""
    sid, sub = request[0], request[1:2]
    if sid == 0x10:
        return session_response(sub[0] if sub else 0x01, 50, 5000)
    if sid == 0x27:  # an odd sub-function asks for a seed, an even one sends the key
        return b"\x67" + sub + (b"\x5a" * 4 if sub and sub[0] % 2 else b"")
    if sid == 0x31:
        return b"\x71" + request[1:4] + b"\x00"  # routine done, status 00
    if sid == 0x34:
        return b"\x74\x20\x0f\xff"  # maxNumberOfBlockLength 4095
    if sid == 0x38:  # mode, lengthFormat 2, maxNumberOfBlockLength 4095, dataFormat; a resume starts at 0
        return b"\x78" + sub + b"\x02\x0f\xff\x00" + (bytes(8) if sub == b"\x06" else b"")
    if sid in (0x22, 0x2E):
        return bytes((sid + 0x40,)) + request[1:3]
    if sid in (0x36, 0x11, 0x28, 0x85, 0x3E):
        return bytes((sid + 0x40,)) + sub
    return bytes(((sid + 0x40) & 0xFF,)) + request[1:4]
