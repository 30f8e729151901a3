"""The typed configuration: one frozen dataclass per component."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from agent.core.flash_profile import FlashProfile, MemoryBlock, default_profile
from agent.errors import ConfigError
from agent.protocol.compression import Params

__all__ = [
    "Approval",
    "VehicleSignalsConfig",
    "DoipConfig",
    "CloudConfig",
    "PreconditionsConfig",
    "SegmentConfig",
    "EcuSimConfig",
    "EcuConfig",
    "GatewayConfig",
    "DeployConfig",
    "ContentConfig",
    "TboxConfig",
    "VehicleConfig",
]


@dataclass(frozen=True)
class CloudConfig:
    broker: str = "mqtt://127.0.0.1:1883"
    outbox: str = "var/tbox/outbox.db"
    topic_root: str = "vota/v1"
    keepalive: int = 30
    max_message_bytes: int = 128 * 1024
    reconnect_min_s: int = 1
    reconnect_max_s: int = 60
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    username: str | None = None
    password: str | None = None
    mqtt_version: str = "5"  # "5", or "3.1.1" for brokers without MQTT 5 (the demo's embedded one)
    # the broker keeps the TBOX's session (its subscriptions and the QoS 1 messages for it) this
    # long while it is offline: a campaign published meanwhile is delivered when it is back; 0: none
    session_expiry_s: int = 7 * 24 * 3600
    report_key: str | None = None  # the vehicle's Ed25519 private key (PEM) that signs every report
    # a report leaves the outbox when the cloud acknowledged storing it (<prefix>/ack), not at the
    # broker's PUBACK; one published but not acknowledged is sent again after ack_timeout_s
    app_acks: bool = True
    ack_timeout_s: int = 300

    def host_port(self) -> tuple[str, int, bool]:
        url = urlparse(self.broker)
        if url.scheme not in ("mqtt", "mqtts") or not url.hostname:
            raise ConfigError("cloud", "broker", f"expected mqtt://host:port or mqtts://host:port, got {self.broker!r}")
        tls = url.scheme == "mqtts" or self.tls_ca is not None
        return url.hostname, url.port or (8883 if tls else 1883), tls


@dataclass(frozen=True)
class SegmentConfig:
    """One CAN segment: python-can settings plus ISO-TP framing."""

    name: str
    bus: dict[str, Any]
    tx_data_length: int = 8
    bitrate: tuple[int, int | None] | None = None
    isotp: dict[str, Any] = field(default_factory=dict)
    receive_buffer: int = 4 * 1024 * 1024
    # python: can-isotp's stack in this process; kernel: the kernel's CAN_ISOTP sockets (SocketCAN only)
    isotp_backend: str = "python"

    @property
    def fd(self) -> bool:
        return self.tx_data_length > 8


@dataclass(frozen=True)
class EcuSimConfig:
    """What the ECU simulator answers and how it behaves (ignored by the gateway)."""

    part_number: str = "VOTA-ECU"
    serial: str = "SN000000"
    software_version: str = "1.0.0"
    supplier_version: str = "SUP-1.0"
    bootloader_version: str = "BL-1.0"
    max_block_length: int = 4095
    erase_ms: int = 500
    check_ms: int = 100
    reset_ms: int = 300
    s3_ms: int = 5000
    p2_ms: int = 50
    p2_star_ms: int = 5000
    pending_interval_ms: int = 1000
    max_attempts: int = 3
    lockout_ms: int = 10000
    state_dir: str = "var/ecu_sim"
    faults: tuple[str, ...] = ()
    # the compression methods the simulated bootloader really accepts; None: every one of the
    # ECU's ``compression`` (a smaller set simulates an ECU configured wrongly: NRC 0x31, fallback)
    accept_compression: tuple[str, ...] | None = None
    # whether the simulated bootloader applies delta images (false simulates one without: NRC 0x31)
    accept_delta: bool = True
    # the OEM's public key for this ECU model (Ed25519 or ECDSA P-256, PEM): the bootloader stages and
    # runs only images signed with it (agent/core/image_auth.py); None: it checks no signature
    image_key: str | None = None
    # the simulated ECU sends the vehicle_signals DBC's messages at their cycle times, with the
    # values of its signals.json (a message whose signals are not all there is not sent)
    broadcast: bool = False


@dataclass(frozen=True)
class EcuConfig:
    """One ECU as the gateway sees it: addresses, security, memory layout, routines."""

    name: str
    segment: str
    request_id: int
    response_id: int
    functional_id: int = 0x7DF
    security_level: int = 1
    security_secret: str = ""
    memory_address: int = 0x08000000
    memory_size: int = 0x200000
    erase_routine: int = 0xFF00
    check_memory_routine: int = 0x0202
    check_dependencies_routine: int = 0xFF01
    # vehicle-level campaigns: run the staged image at the next reset, forget it, go back to the
    # image the running one replaced, confirm the running one (docs/flashing.md: staging, activation, rollback and commit)
    activate_routine: int = 0xFF02
    discard_routine: int = 0xFF03
    rollback_routine: int = 0xFF04
    commit_routine: int = 0xFF05
    # delta images: the routine that checks, before anything is erased, that the active image is
    # the delta's base (option: base SHA-256, new image SHA-256)
    delta_base_routine: int = 0xFF06
    # signed images: after the download, the image's security version and signature (agent/core/image_auth.py)
    authenticate_routine: int = 0xFF07
    # 2: A/B banks (an image can be staged, activated, rolled back); 1: a single bank, flashed in
    # place: it cannot be staged, so a vehicle-level campaign flashes it last and is not fully revertible
    banks: int = 2
    # installed only in the safe state (parked, ignition off, speed zero), whatever the vehicle's
    # preconditions or a campaign say (agent/core/preconditions.py: tightest)
    safety_relevant: bool = False
    check_memory: str = "crc32"
    fingerprint_did: int = 0xF15A
    # its DoIP logical address behind the gateway (gateway/doip_entity.py); None: request_id & 0x0FFF
    logical_address: int | None = None
    p2_ms: int = 1000
    p2_star_ms: int = 6000
    # compressed transfer (agent/protocol/compression.py): (method, dataFormatIdentifier nibble)
    # pairs the ECU's bootloader accepts, in the order the gateway prefers them; the mapping is OEM-defined
    compression: tuple[tuple[str, int], ...] = ()
    compression_params: Params = field(default_factory=Params)  # LZMA dictionary, LZSS window and lookahead
    # delta images (agent/protocol/delta.py): the dataFormatIdentifier nibble that names a patch;
    # None: this ECU takes full images only
    delta: int | None = None
    sim: EcuSimConfig = field(default_factory=EcuSimConfig)
    # the programming sequence (agent/core/flash_profile.py, docs/flash-profiles.md); None: the
    # simulator's, built from the keys above
    profile: FlashProfile | None = None
    memory_blocks: tuple[MemoryBlock, ...] = ()  # the memory map; empty: one block at memory_address
    seed_key_params: dict[str, Any] = field(default_factory=dict)  # this ECU's parameters for the seed/key plug-in

    @property
    def flash_profile(self) -> FlashProfile:
        return self.profile if self.profile is not None else default_profile(self)

    @property
    def memory_map(self) -> tuple[MemoryBlock, ...]:
        return self.memory_blocks or (MemoryBlock(self.memory_address, self.memory_size, 0),)


@dataclass(frozen=True)
class GatewayConfig:
    results_dir: str = "var/gateway"
    tester_present_ms: int = 2000
    late_response_grace_ms: int = 1000
    reset_wait_ms: int = 5000
    retries: int = 2
    worker_stale_s: int = 300  # the install or a serving thread without progress this long: no watchdog pings
    worker_pong_s: int = 10  # a flash worker process that does not answer a ping this long is stuck: killed
    # how segments are flashed in parallel: each in a process of its own (no shared interpreter
    # lock), in threads of the gateway's process, or "auto": processes when more than one
    # segment flashes at once
    segment_workers: str = "auto"
    # a pipelined install (gateway/arrivals.py): a job whose package is still being deployed fails
    # when nothing at all was deployed for this long
    arrival_idle_s: int = 120
    owed_retry_s: int = 30  # a discard a failed install could not make is tried again this often (gateway/owed.py)
    keep_results: int = 30  # ended installs whose results are kept (gateway/retention.py)
    keep_days: int = 90  # ... and none older than this
    # what installs are checked against (gateway/verify.py); empty: the tbox section's, as on a vehicle
    # where both daemons read one vehicle.yaml
    trusted_keys: tuple[str, ...] = ()
    content_trusted_keys: tuple[str, ...] = ()
    root_keys: tuple[str, ...] = ()
    signature_threshold: int | None = None  # None: the tbox section's
    content_signature_threshold: int | None = None
    root_threshold: int | None = None
    vin: str | None = None
    # the DID the vehicle's RXSWIN set is served on to any tester (gateway/rxswin.py); read only
    rxswin_did: int = 0xF1EF


@dataclass(frozen=True)
class DoipConfig:
    """The gateway as a DoIP entity on the vehicle's Ethernet (ISO 13400-2; gateway/doip_entity.py)."""

    address: str = "0.0.0.0"  # where it listens: TCP (diagnostic messages) and UDP (identification)
    port: int = 13400
    logical_address: int = 0x1010  # the gateway's own services (deploy server, install routine)
    announce_to: str | None = "255.255.255.255"  # the vehicle announcement at start; None: not announced
    announce_port: int = 13400
    eid: bytes = b""  # the entity id (6 bytes, the MAC on a real one); empty: derived from the VIN
    gid: bytes = b""  # the group id; empty: the EID
    max_testers: int = 4  # routing activated on this many sockets at once, at most
    testers: tuple[int, int] = (0x0E00, 0x0FFF)  # the source addresses a tester may activate routing with
    functional_address: int = 0xE400  # a diagnostic message to it goes to every ECU of functional_group
    functional_group: tuple[str, ...] = ()  # empty: every ECU
    hold_s: float = 5.0  # a tester keeps an ECU while it talks to it, and this long after its last request
    initial_inactivity_s: float = 2.0  # a connection without routing activation this long is closed
    idle_s: float = 300.0  # ... and one without any message this long
    activation_secret: str | None = None  # activation type 0xE0 (central security) needs its authentication
    max_request: int = 0x10000  # the largest UDS request taken (bytes)
    vin: str = ""  # filled from gateway.vin or tbox.vin
    # TLS (ISO 13400-2's port 3496): the entity's certificate and key; a CA: testers must show a
    # certificate it signed; plain false: a routing activation on the plain port is refused (0x07)
    tls_port: int = 3496
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    plain: bool = True

    def ecu_address(self, ecu: "EcuConfig") -> int:
        return ecu.logical_address if ecu.logical_address is not None else ecu.request_id & 0x0FFF


@dataclass(frozen=True)
class VehicleSignalsConfig:
    """The vehicle's state as its broadcast CAN frames carry it, described by a DBC file
    (agent/adapters/bus_signals.py): read there instead of polling the preconditions ECU's DIDs."""

    dbc: str
    segment: str
    stale_ms: int = 0  # a value older than this is stale (unmet); 0: three times its message's cycle time


@dataclass(frozen=True)
class Approval:
    """A type approval (UN R156 7.2): the regulation, the vehicle's RXSWIN for it as it left the
    factory, and the ECUs whose software it identifies. A signed campaign changes the RXSWIN."""

    regulation: str
    rxswin: str
    ecus: tuple[str, ...]


@dataclass(frozen=True)
class DeployConfig:
    """The TBOX-gateway link: the TBOX is the UDS client, the gateway's deploy server answers."""

    segment: str
    request_id: int = 0x7D0
    response_id: int = 0x7D8
    max_block_length: int = 4095
    package_dir: str = "var/gateway/packages"
    p2_ms: int = 1000
    p2_star_ms: int = 6000
    late_response_grace_ms: int = 1000
    retries: int = 2  # a request answered busyRepeatRequest (NRC 0x21) is asked again this many times
    security_secret: str | None = None  # set: the TBOX must pass SecurityAccess before deploying or installing
    # compressed deploy (RequestFileTransfer's dataFormatIdentifier): (method, nibble) pairs the gateway
    # takes, in the order the TBOX prefers them (agent/protocol/compression.py)
    compression: tuple[tuple[str, int], ...] = ()
    lockout_s: int = 60  # after 3 wrong keys
    min_free_mib: int = 32  # a file that would leave less free in package_dir is refused (NRC 0x70)
    # with security_secret: every state-changing request carries freshness and a MAC bound to the
    # SecurityAccess session (agent/protocol/link.py, SecOC-style); false only for a TBOX that cannot
    authenticate_requests: bool = True
    # the link itself: "can" (ISO-TP on ``segment``) or "doip" (the gateway's DoIP entity, doip section)
    transport: str = "can"
    doip_host: str = ""  # transport doip: the gateway's address (doip.address unless set)
    doip_port: int = 13400  # ... its port (doip.port)
    doip_source: int = 0x0E80  # ... the TBOX's logical address (within doip.testers)
    doip_target: int = 0x1010  # ... the gateway's (doip.logical_address)
    doip_tls: bool = False  # ... over TLS (the port doip.tls.port), verifying the gateway with doip_tls_ca
    doip_tls_ca: str | None = None
    doip_tls_cert: str | None = None  # the TBOX's own certificate, when the entity asks for one
    doip_tls_key: str | None = None

    @property
    def secured(self) -> bool:
        """Requests after SecurityAccess carry an authenticator."""
        return self.security_secret is not None and self.authenticate_requests


@dataclass(frozen=True)
class ContentConfig:
    """Owner-customised content on the TBOX (C1-C8)."""

    vehicle_key: str | None = None  # X25519 private key (PEM) that decrypts owner resource items
    trusted_keys: tuple[str, ...] = ()  # the trust platform's keys; empty: the campaign keys
    signature_threshold: int = 1  # distinct trusted keys that must sign a bundle
    targets: tuple[tuple[str, str], ...] = ()  # resource target -> ECU that shows it (default: same name)
    app_dir: str | None = None  # the infotainment app area (default: <state_dir>/apps)
    light_ecu: str | None = None  # day/night from this ECU's light sensor DID ...
    light_did: int = 0xF1C1
    night_below_lux: int = 50
    night: tuple[str, str] = ("19:00", "06:00")  # ... else from the clock, in the content's time zone
    max_item_size: int = 64 * 1024 * 1024
    tick_ms: int = 500


@dataclass(frozen=True)
class PreconditionsConfig:
    """What must hold before an install starts (agent/core/preconditions.py), judged on the vehicle
    state DIDs of one ECU; without ``ecu``, none are checked."""

    ecu: str | None = None
    min_soc: float = 20.0  # % of charge always needed ...
    soc_per_minute: float = 0.5  # ... and this much more per minute of estimated install time
    min_battery_mv: int = 0
    parked: bool = True  # gear P
    ignition_off: bool = True  # power mode off
    speed_zero: bool = True
    charging: str = "allowed"  # or "forbidden"; a charging fault always blocks
    recheck_s: float = 10.0  # while unmet: read again this often ...
    window_s: float = 86400.0  # ... for at most this long (and never past the campaign's expiry): then failed


@dataclass(frozen=True)
class TboxConfig:
    vin: str
    state_dir: str = "var/tbox"
    trusted_keys: tuple[str, ...] = ()
    signature_threshold: int = 1  # distinct trusted keys that must sign a campaign
    root_keys: tuple[str, ...] = ()  # the keys that sign key lists (rotation, revocation); none: keys never change
    root_threshold: int = 1
    max_attempts: int = 3
    retry_delay_s: float = 2.0  # first pause after a transient problem; doubles each retry ...
    retry_max_delay_s: float = 60.0  # ... up to this
    max_retries: int = 20  # transient retries in a row before the campaign fails (retries_exhausted) ...
    retry_give_up_s: int = 300  # ... or once the pauses between them add up to this, whichever comes first
    install_timeout_s: int = 900
    storage_grace_s: int = 120  # a campaign the TBOX's full or failing storage stops this long ends with reason storage
    cancel_timeout_s: int = 60  # a failed campaign's install cancelled on the gateway (tbox/cancel.py): how long to try
    download_min_rate: int = 5000  # bytes/s over download_rate_window_s, below it a download is cut off ...
    download_rate_window_s: int = 60
    download_max_time_s: int = 3600  # ... as is one attempt longer than this (then resumed, within the retries)
    package_ca: str | None = None  # CA certificates that sign the package server's (https); none: the system's
    worker_stale_s: int = 300  # a worker without progress this long stops the systemd watchdog pings
    diagnose: bool = False
    # start an immediate (or confirmed) install once its manifest is on the gateway, so that an
    # ECU is flashed while the next package is still being deployed
    pipeline: bool = True
    # where removable media is mounted: a campaign found there is imported (tbox/offline.py); None: only
    # ``vota campaign import``
    media_dir: str | None = None
    keep_campaigns: int = 20  # ended campaigns kept (their evidence; packages go when a campaign ends)
    keep_days: int = 90  # ... and none older than this
    media_follow_links: bool = False  # symbolic links on removable media are refused unless this is set
    min_free_mib: int = 64  # a campaign is refused before it starts when less would stay free on the state directory
    hmi_socket: str | None = None  # the driver's HMI connects here (tbox/hmi.py); None: <state_dir>/hmi.sock
    preconditions: PreconditionsConfig = field(default_factory=PreconditionsConfig)
    cloud: CloudConfig = field(default_factory=lambda: _cloud_default())
    content: ContentConfig = field(default_factory=ContentConfig)


def _cloud_default() -> CloudConfig:
    return CloudConfig()


@dataclass(frozen=True)
class VehicleConfig:
    source: str
    segments: dict[str, SegmentConfig]
    ecus: dict[str, EcuConfig]
    gateway: GatewayConfig
    deploy: DeployConfig | None = None
    tbox: TboxConfig | None = None
    approvals: tuple[Approval, ...] = ()
    signals: VehicleSignalsConfig | None = None
    doip: DoipConfig | None = None

    def tbox_config(self) -> TboxConfig:
        if self.tbox is None:
            raise ConfigError(self.source, "tbox", "missing; the TBOX needs a tbox section (vin, trusted_keys, cloud)")
        return self.tbox

    def deploy_link(self) -> DeployConfig:
        if self.deploy is None:
            raise ConfigError(self.source, "deploy", "missing; the TBOX-gateway link needs a deploy section")
        return self.deploy

    def doip_entity(self) -> DoipConfig:
        if self.doip is None:
            raise ConfigError(self.source, "doip", "missing; the gateway's DoIP entity needs a doip section")
        return self.doip

    def ecu(self, name: str) -> EcuConfig:
        try:
            return self.ecus[name]
        except KeyError:
            known = ", ".join(sorted(self.ecus)) or "none"
            raise ConfigError(self.source, None, f"unknown ECU {name!r} (configured: {known})") from None
