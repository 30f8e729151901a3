"""Routing a DoIP tester's diagnostic messages onto the CAN segments (ISO 13400-2, the gateway's
routing of diagnostic messages by logical address).

A tester that sends a request to an ECU takes that ECU (``Buses.ecu``: the one-owner-per-ECU rule
every other piece of the gateway follows) and keeps it while it talks to it and ``doip.hold_s``
after its last request or the ECU's last answer: a session, a SecurityAccess, a download over
several requests are never cut in two by a campaign, and a campaign's flash is never interleaved
with a tester's request. What the ECU sends on its response id is forwarded as it comes (response
pending included); an ECU that does not answer gets nothing forwarded: the tester's P2 and P2*
timers handle it, as ISO 13400-2 leaves them to the tester.

A tester that leaves the ECU in the default session gives way to a campaign waiting for it
GIVE_WAY_S after its last exchange; one that has it in another session keeps it until quiet.
An ECU held by other work (a campaign's flash, another tester) is answered at once, on the ECU's
logical address, with the UDS negative response busyRepeatRequest (``7F <SID> 21``): the
documented busy answer (docs/doip.md). A message to the functional address goes, as a physical
request, to every ECU of ``doip.functional_group`` that is free; the negative responses an ECU
keeps to itself for a functional request (ISO 14229-1: 0x11, 0x12, 0x31, 0x7E, 0x7F) are dropped.
The gateway's own logical address reaches the deploy server, as the TBOX reaches it on CAN, one
tester at a time (``GatewayOwner``): the TBOX's deploy link and a workshop tester are never
interleaved there either.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Protocol

from agent.core.config import DoipConfig, EcuConfig, VehicleConfig
from agent.errors import VotaError
from agent.protocol import doip
from agent.protocol.uds import Nrc, negative
from gateway.buses import Buses, EcuBusy

__all__ = ["TesterRoutes", "GatewayOwner", "LocalServer", "SUPPRESSIBLE", "FUNCTIONAL_SILENT"]

log = logging.getLogger(__name__)

# services whose sub-function byte carries suppressPosRspMsgIndicationBit (ISO 14229-1)
SUPPRESSIBLE = frozenset({0x10, 0x11, 0x27, 0x28, 0x31, 0x3E, 0x85, 0x86, 0x87})
FUNCTIONAL_SILENT = frozenset({Nrc.ServiceNotSupported, Nrc.SubFunctionNotSupported, Nrc.RequestOutOfRange,
                               Nrc.SubFunctionNotSupportedInActiveSession, Nrc.ServiceNotSupportedInActiveSession})
GIVE_WAY_S = 0.1  # a tester in the default session lets an ECU go this soon when other work waits for it
FUNCTIONAL_HOLD_S = 1.0  # an ECU taken for a functional request is let go this long after its last answer
SEGMENT_WINDOW_S = 0.5  # the gateway's server spoken to on CAN this recently: a DoIP tester waits (its calls are ms apart)
ISOTP_MAX = 0xFFFF  # the longest message can-isotp sends (the escape sequence of the first frame)

Send = Callable[[int, bytes], None]  # (payload type, payload) to the tester


class LocalServer(Protocol):
    """The gateway's own services (the deploy server) as a DoIP target."""

    def serve(self, data: bytes, reply: Callable[[bytes], None]) -> None: ...

    def busy_on_segment(self, within: float) -> bool: ...


def suppressed(data: bytes) -> bool:
    return len(data) >= 2 and data[0] in SUPPRESSIBLE and bool(data[1] & 0x80)


class _Channel:
    """One tester's conversation with one ECU: the ECU held, an ISO-TP stack on its addresses, a
    thread sending the tester's requests in order and one forwarding the ECU's answers."""

    def __init__(self, buses: Buses, ecu: EcuConfig, address: int, tester: int, send: Send, hold_s: float,
                 temporary: bool = False) -> None:
        self.ecu, self.address, self.tester, self.send, self.hold_s = ecu, address, tester, send, hold_s
        self.temporary = temporary  # taken for a functional request only
        self.buses = buses
        self.answered = True  # the last request sent has had its final answer
        self.session = 0x01  # the session the ECU said it is in (DiagnosticSessionControl's answers passed on)
        self._held = contextlib.ExitStack()
        segment = self._held.enter_context(buses.ecu(ecu.name, f"DoIP tester 0x{tester:04X}", wait=0))  # EcuBusy
        self.segment = segment
        try:
            self.stack = segment.stack(ecu.request_id, ecu.response_id)
        except BaseException:
            self._held.close()
            raise
        self._queue: queue.Queue[tuple[bytes, bool]] = queue.Queue()
        self._lock = threading.Lock()
        self.closed = False
        self.last = time.monotonic()
        self._silent_sid: int | None = None  # a functional request's SID: its silent NRCs are dropped
        self._threads = [threading.Thread(target=self._sender, name=f"doip-{ecu.name}-tx", daemon=True),
                         threading.Thread(target=self._receiver, name=f"doip-{ecu.name}-rx", daemon=True)]
        for thread in self._threads:
            thread.start()

    def _hold(self) -> float:
        """How long the ECU is kept after the last request or answer: ``hold_s``, or, when other
        work (a campaign) waits for the ECU and the tester left it in the default session, none
        once its last request is answered (GIVE_WAY_S for one that gets no answer): a tester
        polling an ECU never starves a campaign, and one programming it (any other session) is
        never cut off between two requests."""
        if self.session != 0x01 or not self.buses.wanted(self.ecu.name):
            return self.hold_s
        return 0.0 if self.answered else GIVE_WAY_S

    def put(self, data: bytes, functional: bool = False) -> bool:
        """Queue a request; False when the channel has closed meanwhile (the caller opens another)."""
        with self._lock:
            if self.closed:
                return False
            self.last = time.monotonic()
            self.answered = False
            self._silent_sid = data[0] if functional else None
            self._queue.put((data, functional))
            return True

    def keep(self, hold_s: float) -> None:
        """A physical request on a channel taken for a functional one: kept as long as any."""
        with self._lock:
            self.temporary, self.hold_s = False, hold_s

    def _sender(self) -> None:
        while True:
            try:
                data, functional = self._queue.get(timeout=0.05)
            except queue.Empty:
                with self._lock:
                    if self.closed:
                        return
                    if not self._queue.empty() or time.monotonic() - self.last < self._hold():
                        continue
                    self.closed = True  # let go: nothing asked or answered for hold_s
                self._release()
                return
            try:
                self.stack.send(data, send_timeout=10.0 + 0.01 * len(data))
            except Exception as exc:  # noqa: BLE001 - the ECU did not take it (no flow control): the tester times out
                log.warning("DoIP 0x%04X -> %s: request %s not sent: %s", self.tester, self.ecu.name, data[:4].hex(), exc)
            with self._lock:
                # a functional request that wants no answer, on an ECU taken for it: let go at once
                self.last = 0.0 if self.temporary and functional and suppressed(data) else time.monotonic()

    def _receiver(self) -> None:
        while not self.closed:
            try:
                received = self.stack.recv(block=True, timeout=0.05)
            except Exception:  # noqa: BLE001 - a broken reception: the tester times out
                log.debug("DoIP %s: receive failed", self.ecu.name, exc_info=True)
                continue
            if not received:
                continue
            answer = bytes(received)
            with self._lock:
                self.last = time.monotonic()
                self.answered = answer[:1] != b"\x7f" or answer[2:3] != b"\x78"  # response pending: more to come
                if len(answer) >= 2 and answer[0] == 0x50:
                    self.session = answer[1]
                elif answer[:1] == b"\x51":  # reset: back in the default session
                    self.session = 0x01
                silent = self._silent_sid
            if silent is not None and len(answer) >= 3 and answer[0] == 0x7F and answer[1] == silent \
                    and answer[2] in FUNCTIONAL_SILENT:
                continue
            try:
                self.send(doip.PayloadType.DIAGNOSTIC_MESSAGE, doip.diagnostic_message(self.address, self.tester, answer))
            except OSError:
                return  # the tester is gone; the channel closes with its connection

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=2.0)
        self._release()

    def _release(self) -> None:
        with self._lock:
            stack, self.stack = self.stack, None  # type: ignore[assignment]
        if stack is not None:
            self.segment.release(stack)
            self._held.close()


class GatewayOwner:
    """Who talks to the gateway's own services over DoIP (the TBOX's deploy link, a workshop
    tester): one tester at a time, as with an ECU, kept while it talks and ``hold_s`` after its last
    answer, let go when its connection closes; another is answered busy (``7F <SID> 21``), and so
    is every tester while a client on the CAN backbone (the TBOX's deploy link there) talks to it."""

    def __init__(self, hold_s: float, local: LocalServer | None = None) -> None:
        """``local``: the server; a request it had on its CAN segment within SEGMENT_WINDOW_S (the
        TBOX's deploy link on CAN) makes it busy for DoIP testers too."""
        self.hold_s, self.local = hold_s, local
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._until = 0.0

    def take(self, tester: int) -> bool:
        if self.local is not None and self.local.busy_on_segment(SEGMENT_WINDOW_S):
            return False
        with self._lock:
            now = time.monotonic()
            if self._owner not in (None, tester) and now < self._until:
                return False
            self._owner, self._until = tester, now + self.hold_s
            return True

    def touch(self, tester: int) -> None:
        with self._lock:
            if self._owner == tester:
                self._until = time.monotonic() + self.hold_s

    def release(self, tester: int) -> None:
        with self._lock:
            if self._owner == tester:
                self._owner = None


class TesterRoutes:
    """The routes of one routing-activated tester (one TCP connection): its ECU channels, opened
    on its first request to an ECU and closed when it is let go or the connection ends."""

    def __init__(self, config: VehicleConfig, buses: Buses, tester: int, send: Send,
                 local: LocalServer | None, owner: GatewayOwner | None = None) -> None:
        self.config, self.buses, self.tester, self.send, self.local = config, buses, tester, send, local
        self.owner = owner or GatewayOwner(config.doip_entity().hold_s)
        self.doip: DoipConfig = config.doip_entity()
        self.by_address = {self.doip.ecu_address(e): e for e in config.ecus.values()}
        self._channels: dict[str, _Channel] = {}
        self._lock = threading.Lock()
        self._local: ThreadPoolExecutor | None = None

    def known(self, target: int) -> bool:
        return target in self.by_address or target == self.doip.functional_address or \
            (target == self.doip.logical_address and self.local is not None)

    def route(self, target: int, data: bytes) -> None:
        """A diagnostic message the entity acknowledged (``known(target)``), sent on."""
        if target == self.doip.functional_address:
            self._functional(data)
        elif target == self.doip.logical_address:
            self._to_gateway(data)
        else:
            self._to_ecu(self.by_address[target], target, data)

    def max_length(self, target: int) -> int:
        return self.doip.max_request if target == self.doip.logical_address else min(self.doip.max_request, ISOTP_MAX)

    def _to_ecu(self, ecu: EcuConfig, address: int, data: bytes) -> None:
        for _ in range(3):  # a channel that just let its ECU go is opened again
            try:
                channel = self._channel(ecu, address)
            except EcuBusy as exc:
                log.info("DoIP 0x%04X -> %s: busy (%s)", self.tester, ecu.name, exc.holder)
                self.send(doip.PayloadType.DIAGNOSTIC_MESSAGE,
                          doip.diagnostic_message(address, self.tester, negative(data[0], Nrc.BusyRepeatRequest)))
                return
            if channel.put(data):
                return
        raise VotaError(f"DoIP: no channel to {ecu.name}")

    def _channel(self, ecu: EcuConfig, address: int, functional: bool = False) -> _Channel:
        with self._lock:
            channel = self._channels.get(ecu.name)
            if channel is None or channel.closed:
                channel = _Channel(self.buses, ecu, address, self.tester, self.send,
                                   FUNCTIONAL_HOLD_S if functional else self.doip.hold_s, functional)
                self._channels[ecu.name] = channel
            elif not functional and channel.temporary:
                channel.keep(self.doip.hold_s)
            return channel

    def _functional(self, data: bytes) -> None:
        names = self.doip.functional_group or tuple(self.config.ecus)
        for name in names:
            ecu = self.config.ecus[name]
            address = self.doip.ecu_address(ecu)
            try:
                channel = self._channel(ecu, address, functional=True)
            except EcuBusy:
                log.info("DoIP 0x%04X: functional request not sent to %s (busy)", self.tester, name)
                continue
            channel.put(data, functional=True)

    def _to_gateway(self, data: bytes) -> None:
        """Served on a thread of its own (the tester's requests in order), so that the connection
        goes on reading (alive checks) while the gateway works (response pending)."""
        address = self.doip.logical_address

        def reply(answer: bytes) -> None:
            self.owner.touch(self.tester)
            self.send(doip.PayloadType.DIAGNOSTIC_MESSAGE, doip.diagnostic_message(address, self.tester, answer))

        if not self.owner.take(self.tester):  # another tester talks to the gateway: never interleaved with it
            log.info("DoIP 0x%04X -> gateway: busy", self.tester)
            reply_busy = negative(data[0], Nrc.BusyRepeatRequest)
            self.send(doip.PayloadType.DIAGNOSTIC_MESSAGE, doip.diagnostic_message(address, self.tester, reply_busy))
            return

        def run() -> None:
            try:
                self.local.serve(data, reply)  # type: ignore[union-attr]
            except OSError:
                pass  # the tester is gone
            except Exception:  # noqa: BLE001 - the tester gets no answer; the gateway goes on
                log.exception("DoIP 0x%04X: request %s to the gateway failed", self.tester, data[:4].hex())

        with self._lock:
            if self._local is None:
                self._local = ThreadPoolExecutor(max_workers=1, thread_name_prefix="doip-gateway")
            self._local.submit(run)

    def holding(self) -> list[str]:
        with self._lock:
            return sorted(n for n, c in self._channels.items() if not c.closed)

    def close(self) -> None:
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
            local, self._local = self._local, None
        for channel in channels:
            channel.close()
        if local is not None:
            local.shutdown(wait=False, cancel_futures=True)
        self.owner.release(self.tester)
