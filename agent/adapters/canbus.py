"""CAN segments: a python-can bus, its notifier, and ISO-TP stacks on it.

The bus settings of a segment go unchanged to ``can.Bus(**settings)``, so the same code
runs on ``socketcan`` (vcan0, can0) and on ``udp_multicast`` where SocketCAN is missing.

ISO-TP runs in Python (can-isotp's stack, fed by the segment's router), or, on SocketCAN with
``isotp_backend: kernel``, in the kernel's CAN_ISOTP sockets (Linux 5.10+): segmentation, flow
control and timing leave Python, which keeps only whole requests and responses. The python-can
bus stays open beside them for what needs single frames (TesterPresent, fault injection, the
stray frames a trace records).
"""

from __future__ import annotations

import errno
import logging
import select
import socket
import threading
import time
from typing import Any, Callable, Iterable, cast

import can
import isotp

from agent.adapters.capture import open_capture
from agent.core.config import SegmentConfig
from agent.errors import ConfigError, VotaError
from agent.protocol.can_timing import frame_time, physical_goodput

__all__ = ["Segment", "RoutedStack", "KernelStack", "BusClock", "frame_time", "isotp_params", "physical_goodput"]

log = logging.getLogger(__name__)

SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)


class BusClock:
    """Bus-timing emulation for one segment, in our own code: every frame this process sends
    takes its slot on the bus (``frame_time`` at the segment's rates, back to back with the
    frames before it); once the sender is more than ``burst`` seconds ahead of the bus it sleeps
    until it is ``slack`` ahead: no CPU is spent waiting, wake-ups come in batches, and no frame
    is ever held back for good (can-isotp's own rate limiter spins its thread while it holds
    frames, and can lose a single frame's completion). ``burst`` is the controller's transmit
    queue: a few frames may leave early, never more than ``burst`` seconds' worth."""

    def __init__(self, nominal: int, data: int | None, fd: bool, slack: float = 0.002, burst: float = 0.008) -> None:
        self.nominal, self.data, self.fd, self.slack, self.burst = nominal, data, fd, slack, burst
        self._free_at = 0.0  # monotonic time at which the bus is free again
        self._lock = threading.Lock()
        self._times: dict[tuple[int, bool], float] = {}

    def _frame_time(self, length: int, brs: bool) -> float:
        key = (length, brs)
        known = self._times.get(key)
        if known is None:
            if length > 8 or self.fd:
                known = frame_time(length, self.nominal, (self.data or self.nominal) if brs else self.nominal)
            else:
                known = frame_time(length, self.nominal)
            self._times[key] = known
        return known

    def take(self, length: int, brs: bool = False) -> None:
        """Reserve the slot of one frame of ``length`` data bytes; return when it may be sent."""
        duration = self._frame_time(max(8, length) if not self.fd else length, brs)
        with self._lock:
            now = time.monotonic()
            start = self._free_at if self._free_at > now else now
            self._free_at = start + duration
            ahead = start - now
        if ahead > self.burst:  # sleep in batches (fewer wake-ups), down to ``slack`` ahead
            time.sleep(ahead - self.slack)


def isotp_params(segment: SegmentConfig) -> dict[str, Any]:
    """can-isotp parameters for a segment (bus timing is emulated by the segment's ``BusClock``)."""
    params: dict[str, Any] = {
        "stmin": 0,
        "blocksize": 0,
        "tx_data_length": segment.tx_data_length,
        "tx_data_min_length": 8,
        "tx_padding": 0xCC,
        "can_fd": segment.fd,
        "bitrate_switch": segment.fd and bool(segment.bitrate and segment.bitrate[1]),
        "max_frame_size": 0x10000,
        "blocking_send": True,
        "rx_flowcontrol_timeout": 1000,
        "rx_consecutive_frame_timeout": 1000,
    }
    params.update(segment.isotp)
    return params


class RoutedStack(isotp.TransportLayer):
    """An ISO-TP stack fed only the frames of its receive id, straight from the notifier.

    can-isotp's NotifierBasedCanStack hands every frame on the bus to every stack, through a
    reader queue and a relay thread, and a udp_multicast bus also hears each frame it sent.
    The segment's router drops foreign frames in the notifier thread and puts the stack's
    own frames directly on the queue its main thread reads, one thread hop per frame
    instead of three; the relay thread of ``TransportLayer`` only idles.
    """

    def __init__(self, segment: "Segment", address: isotp.Address, params: dict[str, Any]) -> None:
        self.segment = segment
        super().__init__(rxfn=self._idle, txfn=self._tx, address=address, params=params)

    def _process_tx(self) -> Any:
        report = super()._process_tx()
        # can-isotp 2.0.7: a single frame the rate limiter held back (TRANSMIT_SF_STANDBY) goes out
        # without its send request being completed, so a blocking send never returns (seen as an
        # install stuck at transfer_exit on a bus with emulated timing). Complete it here.
        request = self.active_send_request
        if (self.tx_state == self.TxState.IDLE and request is not None and request.generator.depleted()
                and self.tx_standby_msg is None):
            request.complete(True)
            self.active_send_request = None
        return report

    def _idle(self, timeout: float) -> isotp.CanMessage | None:
        self.events.stop_requested.wait(timeout)
        return None

    def _tx(self, msg: isotp.CanMessage) -> None:
        clock = self.segment.clock
        if clock is not None:
            clock.take(len(msg.data), msg.bitrate_switch)
        frame = can.Message(arbitration_id=msg.arbitration_id, data=msg.data, is_extended_id=msg.is_extended_id,
                            is_fd=msg.is_fd, bitrate_switch=msg.bitrate_switch)
        self.segment.sending(frame)
        self.segment.bus.send(frame)

    def feed(self, msg: can.Message, as_id: int | None = None) -> None:
        """Hand one frame to the stack; ``as_id``: as if it came on that id (the stack's own)."""
        if not self.started:
            return
        self.rx_relay_queue.put(
            isotp.CanMessage(
                arbitration_id=msg.arbitration_id if as_id is None else as_id,
                data=cast(bytes, msg.data),  # a bytearray works and saves a copy per frame
                extended_id=msg.is_extended_id,
                is_fd=msg.is_fd,
                bitrate_switch=msg.bitrate_switch,
            )
        )


class KernelStack:
    """An ISO-TP channel in the kernel (can-isotp's ``isotp.socket``): the interface the
    segment's stacks offer (send a payload, receive one), the frames sent and reassembled by
    the kernel. Used on SocketCAN with ``isotp_backend: kernel``."""

    def __init__(self, segment: "Segment", address: isotp.Address, params: dict[str, Any], listen_only: bool = False) -> None:
        try:
            isotp.tpsock.check_support()
        except NotImplementedError as exc:
            raise ConfigError("segment " + segment.config.name, "isotp_backend", f"kernel: {exc}") from None
        self.address = address
        self.segment = segment
        self._sock = isotp.socket()
        flags = isotp.socket.flags.WAIT_TX_DONE | (isotp.socket.flags.LISTEN_MODE if listen_only else 0)
        self._sock.set_opts(optflag=flags, txpad=params.get("tx_padding"))
        self._sock.set_fc_opts(bs=int(params.get("blocksize", 0)), stmin=int(params.get("stmin", 0)))
        fd = bool(params.get("can_fd"))
        self._sock.set_ll_opts(mtu=isotp.socket.LinkLayerProtocol.CAN_FD if fd else isotp.socket.LinkLayerProtocol.CAN,
                               tx_dl=int(params.get("tx_data_length", 8)),
                               tx_flags=0x01 if params.get("bitrate_switch") else 0)  # CANFD_BRS
        try:
            self._sock.bind(str(segment.config.bus.get("channel")), address)
        except OSError as exc:
            self._sock.close()
            raise VotaError(f"segment {segment.config.name}: cannot bind a kernel ISO-TP socket: {exc.strerror}") from None

    def start(self) -> None:
        pass

    def send(self, payload: bytes, send_timeout: float | None = None) -> None:
        self._sock.settimeout(send_timeout)
        try:
            self._sock.send(payload)
        except OSError as exc:  # ECOMM (no flow control), a timeout: as can-isotp's own stack reports them
            raise isotp.BlockingSendFailure(f"kernel ISO-TP send: {exc}") from None

    def recv(self, block: bool = False, timeout: float | None = None) -> bytes | None:
        ready, _, _ = select.select([self._sock.fileno()], [], [], (timeout if timeout is not None else None) if block else 0)
        if not ready:
            return None
        try:
            return bytes(self._sock.recv())
        except OSError as exc:  # a reception the kernel gave up on (timeout, wrong sequence): nothing for us
            log.debug("kernel ISO-TP receive on %s: %s", self.segment.config.name, exc)
            return None

    def stop_receiving(self) -> None:
        pass

    def clear_rx_queue(self) -> None:
        while self.recv(block=False) is not None:
            pass

    def stop_sending(self) -> None:
        pass

    def clear_tx_queue(self) -> None:
        pass

    def stop(self) -> None:
        self._sock.close()


class Segment:
    """An open CAN segment. Owns the bus and one notifier; hands out ISO-TP stacks.

    ``shutdown()`` is idempotent and stops stacks, then the notifier, then the bus.
    """

    def __init__(self, config: SegmentConfig) -> None:
        self.config = config
        try:
            self.bus = can.Bus(**config.bus)
        except (can.CanError, OSError, ValueError, TypeError, ImportError, NotImplementedError) as exc:
            if isinstance(exc, OSError) and exc.errno == errno.ENODEV:
                # not a configuration error: the interface appears later at boot (systemd restarts us)
                raise VotaError(f"segment {config.name}: CAN interface {config.bus.get('channel')!r} does not exist "
                                f"(yet): {exc.strerror}") from None
            raise ConfigError("segment " + config.name, "bus", f"cannot open CAN bus {config.bus!r}: {exc}") from None
        self._raise_receive_buffer()
        self.clock: BusClock | None = None
        if config.bitrate is not None:
            self.clock = BusClock(config.bitrate[0], config.bitrate[1], config.fd)
        self._stacks: list[RoutedStack] = []
        self._routes: dict[tuple[int, bool], list[RoutedStack]] = {}
        self._fc_routes: dict[tuple[int, bool], list[RoutedStack]] = {}  # flow control only, from another id
        self._no_fc: set[RoutedStack] = set()  # stacks that never send, so never wait for flow control
        self._watchers: dict[int, list[Callable[[can.Message], None]]] = {}  # broadcast frames by id (watch)
        self._lock = threading.Lock()
        self._closed = False
        # every frame into a standard log, when asked (--capture); udp_multicast echoes our own frames
        self.capture = open_capture(config.name, echoes=config.bus.get("interface") == "udp_multicast")
        listeners: list[Any] = [self._route] if self.capture is None else [self._route, self._received]
        self.notifier = can.Notifier(self.bus, listeners, timeout=0.1)

    def _received(self, msg: can.Message) -> None:
        assert self.capture is not None
        self.capture.frame(msg, True)

    def sending(self, msg: can.Message) -> None:
        """A frame this process puts on the bus, into the capture when there is one (before it
        is sent: a bus that echoes it may hand it back before ``send`` returns)."""
        if self.capture is not None:
            self.capture.frame(msg, False)

    def _raise_receive_buffer(self) -> None:
        """udp_multicast drops datagrams when the socket buffer overflows: make it large."""
        sock = getattr(getattr(self.bus, "_multicast", None), "_socket", None)
        if sock is None:
            return
        size = self.config.receive_buffer
        for option in (SO_RCVBUFFORCE, socket.SO_RCVBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, size)
                return
            except OSError:
                continue
        log.warning("could not raise the receive buffer of segment %s", self.config.name)

    def _route(self, msg: can.Message) -> None:
        """Notifier listener: hand a frame to the stacks that receive its id, drop the rest."""
        if msg.is_error_frame or msg.is_remote_frame:
            return
        for watcher in self._watchers.get(msg.arbitration_id, ()):
            watcher(msg)
        key = (msg.arbitration_id, msg.is_extended_id)
        flow_control = bool(msg.data) and msg.data[0] >> 4 == 3
        for stack in self._routes.get(key, ()):
            if not (flow_control and stack in self._no_fc):
                stack.feed(msg)
        if flow_control:
            for stack in self._fc_routes.get(key, ()):
                stack.feed(msg, as_id=stack.address.get_rx_arbitration_id())

    def stack(self, txid: int, rxid: int, *, extended: bool | None = None, receive_only: bool = False,
              flow_control_from: int | None = None, **overrides: Any) -> RoutedStack:
        """A started ISO-TP stack sending on ``txid`` and receiving ``rxid``. A ``receive_only``
        stack (a server's functional address) is not fed flow control frames; a stack with
        ``flow_control_from`` also takes flow control frames sent on that id (a tester that
        answers the first frame of a reply to its functional request from the functional id)."""
        if extended is None:
            extended = txid > 0x7FF or rxid > 0x7FF
        mode = isotp.AddressingMode.Normal_29bits if extended else isotp.AddressingMode.Normal_11bits
        address = isotp.Address(mode, txid=txid, rxid=rxid)
        params = isotp_params(self.config)
        params.update(overrides)
        if self.config.isotp_backend == "kernel":  # the kernel reassembles; flow control from another id is not offered
            kernel = KernelStack(self, address, params, listen_only=receive_only)
            with self._lock:
                self._stacks.append(kernel)  # type: ignore[arg-type]
            return kernel  # type: ignore[return-value]
        try:
            stack = RoutedStack(self, address, params)
        except ValueError as exc:
            raise ConfigError("segment " + self.config.name, "isotp", str(exc)) from None
        stack.start()
        key = (rxid, extended)
        with self._lock:
            self._stacks.append(stack)
            self._routes = {**self._routes, key: [*self._routes.get(key, []), stack]}
            if receive_only:
                self._no_fc = self._no_fc | {stack}
            if flow_control_from is not None:
                fc_key = (flow_control_from, extended)
                self._fc_routes = {**self._fc_routes, fc_key: [*self._fc_routes.get(fc_key, []), stack]}
        return stack

    def watch(self, frame_ids: Iterable[int], watcher: Callable[[can.Message], None]) -> None:
        """``watcher`` is handed every frame with one of ``frame_ids`` (broadcast signals), in the
        notifier's thread."""
        with self._lock:
            for frame_id in frame_ids:
                self._watchers = {**self._watchers, frame_id: [*self._watchers.get(frame_id, []), watcher]}

    def release(self, stack: RoutedStack) -> None:
        with self._lock:
            if stack in self._stacks:
                self._stacks.remove(stack)
            self._routes = {k: [s for s in v if s is not stack] for k, v in self._routes.items()}
            self._fc_routes = {k: [s for s in v if s is not stack] for k, v in self._fc_routes.items()}
            self._no_fc = self._no_fc - {stack}
        stack.stop()

    def send_frame(self, can_id: int, data: bytes) -> None:
        """Send one raw frame (padded like the ISO-TP stacks pad theirs)."""
        if len(data) < 8:
            data = data + b"\xcc" * (8 - len(data))
        msg = can.Message(
            arbitration_id=can_id,
            data=data,
            is_extended_id=can_id > 0x7FF,
            is_fd=len(data) > 8,
            bitrate_switch=len(data) > 8 and bool(self.config.bitrate and self.config.bitrate[1]),
        )
        try:
            if self.clock is not None:
                self.clock.take(len(data), msg.bitrate_switch)
            self.sending(msg)
            self.bus.send(msg)
        except can.CanError as exc:
            raise VotaError(f"segment {self.config.name}: cannot send frame 0x{can_id:X}: {exc}") from exc

    def shutdown(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            stacks, self._stacks = self._stacks, []
        for stack in stacks:
            try:
                stack.stop()
            except Exception:  # noqa: BLE001 - shutdown must not raise
                log.debug("stack stop failed", exc_info=True)
        self.notifier.stop(timeout=1.0)
        self.bus.shutdown()  # the capture stays open: the segment may open again (agent/adapters/capture.py)

    def __enter__(self) -> "Segment":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
