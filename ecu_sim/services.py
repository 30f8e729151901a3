"""The simulated ECU's UDS services: a table of handlers, each (state, request) -> response.

Handlers do no bus I/O and read no clock; the flash banks are the only storage they touch.
Byte layouts follow ISO 14229-1 and the usual OEM flash bootloader (see the README).
"""

from __future__ import annotations

import hmac
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from agent.config import EcuConfig
from agent.file_transfer import NAME, request_file_transfer
from agent.file_transfer import transfer_data as file_transfer_data
from agent.file_transfer import transfer_exit as file_transfer_exit
from agent.identifiers import DID, security_key
from agent.uds_server import (
    SESSION_DEFAULT,
    SESSION_EXTENDED,
    SESSION_PROGRAMMING,
    BlockCounter,
    Nrc,
    Outcome,
    Request,
    Service,
    negative,
    session_response,
    tester_present,
)
from ecu_sim.content import ROUTINE_SHOW_CONTENT, ROUTINE_STOP_CONTENT, ContentStore
from ecu_sim.flash_banks import FlashBanks

__all__ = ["EcuState", "SERVICES", "security_key", "DID"]

NON_DEFAULT = frozenset({SESSION_PROGRAMMING, SESSION_EXTENDED})
PROGRAMMING = frozenset({SESSION_PROGRAMMING})


@dataclass
class EcuState:
    config: EcuConfig
    banks: FlashBanks
    random: Callable[[int], bytes] = os.urandom
    session: int = SESSION_DEFAULT
    unlocked: bool = False
    seed: bytes | None = None
    failed_attempts: int = 0
    locked_until: float = 0.0
    dtc_setting_on: bool = True
    communication: int = 0x00
    fingerprint: bytes = b""
    # download state
    download_active: bool = False
    download_size: int = 0
    received: int = 0
    counter: BlockCounter = field(default_factory=BlockCounter)
    resets: int = 0
    erased_region: tuple[int, int] | None = field(default=None)
    content: ContentStore | None = None
    sensors: Path | None = None  # sensors.json: {"ambient_lux": N}, the simulated light sensor

    def session_timeout(self) -> None:
        self._leave_session()
        self.session = SESSION_DEFAULT

    def _leave_session(self) -> None:
        self.unlocked = False
        self.seed = None
        if self.content is not None:
            self.content.files.abort()
        if self.download_active:
            self.download_active = False
            self.banks.close()

    def reset(self) -> None:
        """What a power cycle does: default session, locked, new image active if ready."""
        self._leave_session()
        self.session = SESSION_DEFAULT
        self.dtc_setting_on = True
        self.communication = 0x00
        self.banks.activate_if_ready()
        self.banks.pending_version = ""
        self.resets += 1

    @property
    def sim(self):  # type: ignore[no-untyped-def]
        return self.config.sim


# ---- diagnostic session control, tester present, reset -----------------------------------
def session_control(s: EcuState, r: Request) -> bytes:
    target = r.data[1]
    if len(r.data) != 2:
        return negative(0x10, Nrc.INCORRECT_LENGTH)
    if target not in (SESSION_DEFAULT, SESSION_PROGRAMMING, SESSION_EXTENDED):
        return negative(0x10, Nrc.SUBFUNCTION_NOT_SUPPORTED)
    if target == SESSION_PROGRAMMING and s.session == SESSION_DEFAULT:
        return negative(0x10, Nrc.SUBFUNCTION_NOT_IN_SESSION)  # programming only via extended
    if target != s.session or target == SESSION_DEFAULT:
        s._leave_session()
    s.session = target
    return session_response(target, s.sim.p2_ms, s.sim.p2_star_ms)


def ecu_reset(s: EcuState, r: Request) -> Outcome | bytes:
    if len(r.data) != 2:
        return negative(0x11, Nrc.INCORRECT_LENGTH)
    if r.data[1] not in (0x01, 0x03):
        return negative(0x11, Nrc.SUBFUNCTION_NOT_SUPPORTED)
    return Outcome(bytes((0x51, r.data[1])), after=s.reset, silent=s.sim.reset_ms / 1000.0)


def control_dtc_setting(s: EcuState, r: Request) -> bytes:
    if r.data[1] not in (0x01, 0x02):
        return negative(0x85, Nrc.SUBFUNCTION_NOT_SUPPORTED)
    s.dtc_setting_on = r.data[1] == 0x01
    return bytes((0xC5, r.data[1]))


def communication_control(s: EcuState, r: Request) -> bytes:
    if len(r.data) != 3:
        return negative(0x28, Nrc.INCORRECT_LENGTH)
    if r.data[1] > 0x03:
        return negative(0x28, Nrc.SUBFUNCTION_NOT_SUPPORTED)
    if r.data[2] & 0x0F not in (0x01, 0x02, 0x03):
        return negative(0x28, Nrc.OUT_OF_RANGE)
    s.communication = r.data[1]
    return bytes((0x68, r.data[1]))


# ---- identification ----------------------------------------------------------------------
def _did_value(s: EcuState, did: int) -> bytes | None:
    info = s.banks.active_info
    values = {
        DID.BOOT_SOFTWARE: s.sim.bootloader_version.encode(),
        DID.PART_NUMBER: s.sim.part_number.encode(),
        DID.SOFTWARE_VERSION: info.version.encode(),
        DID.SERIAL: s.sim.serial.encode(),
        DID.SUPPLIER_VERSION: s.sim.supplier_version.encode(),
        DID.ACTIVE_SESSION: bytes((s.session,)),
        DID.IMAGE_DIGEST: bytes.fromhex(info.sha256) if info.sha256 else bytes(32),
        DID.FINGERPRINT: s.fingerprint,
        DID.FINGERPRINT_ALT: s.fingerprint,
        DID.ACTIVE_CONTENT: (s.content.active or "").encode() if s.content is not None else b"",
    }
    if did == DID.AMBIENT_LIGHT:
        return _ambient_light(s)
    return values.get(did)


def _ambient_light(s: EcuState) -> bytes | None:
    """The simulated light sensor: fitted when ``sensors.json`` exists in the ECU's state
    directory (a bench or test writes it), else the DID is not supported."""
    if s.sensors is None:
        return None
    try:
        lux = json.loads(s.sensors.read_text())["ambient_lux"]
        return max(0, min(0xFFFF, int(lux))).to_bytes(2, "big")
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_data_by_identifier(s: EcuState, r: Request) -> bytes:
    body = r.data[1:]
    if not body or len(body) % 2:
        return negative(0x22, Nrc.INCORRECT_LENGTH)
    out = bytearray(b"\x62")
    found = False
    for i in range(0, len(body), 2):
        did = int.from_bytes(body[i : i + 2], "big")
        value = _did_value(s, did)
        if value is None:
            continue
        found = True
        out += body[i : i + 2] + value
    if not found:
        return negative(0x22, Nrc.OUT_OF_RANGE)
    return bytes(out)


def write_data_by_identifier(s: EcuState, r: Request) -> bytes:
    if len(r.data) < 4:
        return negative(0x2E, Nrc.INCORRECT_LENGTH)
    did = int.from_bytes(r.data[1:3], "big")
    if did not in (DID.FINGERPRINT, DID.FINGERPRINT_ALT):
        return negative(0x2E, Nrc.OUT_OF_RANGE)
    if s.session != SESSION_PROGRAMMING:
        return negative(0x2E, Nrc.CONDITIONS_NOT_CORRECT)
    if not s.unlocked:
        return negative(0x2E, Nrc.SECURITY_ACCESS_DENIED)
    value = r.data[3:]
    if len(value) < 4 or len(value) > 64:
        return negative(0x2E, Nrc.INCORRECT_LENGTH)
    s.fingerprint = value
    # Fingerprint layout: 3 bytes date (BCD YYMMDD), 1 byte length, then the software version.
    version_length = value[3]
    if 4 + version_length <= len(value):
        s.banks.pending_version = value[4 : 4 + version_length].decode("ascii", "replace")
    return b"\x6e" + r.data[1:3]


# ---- security access -----------------------------------------------------------------------
def security_access(s: EcuState, r: Request) -> bytes:
    level = r.data[1]
    if level != s.config.security_level and level != s.config.security_level + 1:
        return negative(0x27, Nrc.SUBFUNCTION_NOT_SUPPORTED)
    if level % 2 == 1:  # request seed
        if len(r.data) != 2:
            return negative(0x27, Nrc.INCORRECT_LENGTH)
        if r.now < s.locked_until:
            return negative(0x27, Nrc.TIME_DELAY_NOT_EXPIRED)
        if s.unlocked:
            return bytes((0x67, level)) + bytes(4)
        s.seed = s.random(4)
        return bytes((0x67, level)) + s.seed
    # send key
    if s.seed is None:
        return negative(0x27, Nrc.REQUEST_SEQUENCE_ERROR)
    if len(r.data) != 6:
        return negative(0x27, Nrc.INCORRECT_LENGTH)
    if hmac.compare_digest(r.data[2:], security_key(s.config.security_secret, s.seed)):
        s.unlocked, s.seed, s.failed_attempts = True, None, 0
        return bytes((0x67, level))
    s.seed = None
    s.failed_attempts += 1
    if s.failed_attempts >= s.sim.max_attempts:
        s.failed_attempts = 0
        s.locked_until = r.now + s.sim.lockout_ms / 1000.0
        return negative(0x27, Nrc.EXCEEDED_ATTEMPTS)
    return negative(0x27, Nrc.INVALID_KEY)


# ---- programming -----------------------------------------------------------------------
def _memory(data: bytes) -> tuple[int, int] | None:
    """Parse addressAndLengthFormatIdentifier + address + size."""
    if not data:
        return None
    alfid = data[0]
    a_len, s_len = alfid & 0x0F, alfid >> 4
    if not (1 <= a_len <= 4 and 1 <= s_len <= 4) or len(data) != 1 + a_len + s_len:
        return None
    address = int.from_bytes(data[1 : 1 + a_len], "big")
    size = int.from_bytes(data[1 + a_len :], "big")
    return address, size


def _in_memory(s: EcuState, address: int, size: int) -> bool:
    cfg = s.config
    return cfg.memory_address <= address and address + size <= cfg.memory_address + cfg.memory_size and size > 0


def _content_routine(s: EcuState, r: Request, routine: int) -> bytes:
    """Show stored owner content (C6: no software flash), or stop showing it."""
    if s.content is None:
        return negative(0x31, Nrc.OUT_OF_RANGE)
    if r.data[1] != 0x01:
        return negative(0x31, Nrc.SUBFUNCTION_NOT_SUPPORTED)
    name = r.data[4:].decode("ascii", "replace")
    if routine == ROUTINE_SHOW_CONTENT:
        if not name or not NAME.match(name) or not s.content.files.path(name).is_file():
            return negative(0x31, Nrc.OUT_OF_RANGE)
        s.content.show(name)
    else:
        if len(r.data) != 4:
            return negative(0x31, Nrc.INCORRECT_LENGTH)
        s.content.show(None)
    return b"\x71" + r.data[1:4] + b"\x00"


def routine_control(s: EcuState, r: Request) -> Outcome | bytes:
    if len(r.data) < 4:
        return negative(0x31, Nrc.INCORRECT_LENGTH)
    kind, routine = r.data[1], int.from_bytes(r.data[2:4], "big")
    if routine in (ROUTINE_SHOW_CONTENT, ROUTINE_STOP_CONTENT):
        return _content_routine(s, r, routine)
    cfg = s.config
    if routine not in (cfg.erase_routine, cfg.check_memory_routine, cfg.check_dependencies_routine):
        return negative(0x31, Nrc.OUT_OF_RANGE)
    if kind != 0x01:
        return negative(0x31, Nrc.SUBFUNCTION_NOT_SUPPORTED)
    if s.session != SESSION_PROGRAMMING:
        return negative(0x31, Nrc.SERVICE_NOT_IN_SESSION)
    if not s.unlocked:
        return negative(0x31, Nrc.SECURITY_ACCESS_DENIED)
    if s.download_active:
        return negative(0x31, Nrc.REQUEST_SEQUENCE_ERROR)
    head = b"\x71" + r.data[1:4]
    option = r.data[4:]
    if routine == cfg.erase_routine:
        region = _memory(option)
        if region is None:
            return negative(0x31, Nrc.INCORRECT_LENGTH)
        if not _in_memory(s, *region):
            return negative(0x31, Nrc.OUT_OF_RANGE)
        s.banks.erase()
        s.erased_region = region
        return Outcome(head + b"\x00", busy=s.sim.erase_ms / 1000.0)
    if routine == cfg.check_memory_routine:
        expected_len = 4 if cfg.check_memory == "crc32" else 32
        if len(option) != expected_len:
            return negative(0x31, Nrc.INCORRECT_LENGTH)
        ok = s.banks.check(cfg.check_memory, option)
        return Outcome(head + (b"\x00" if ok else b"\x01"), busy=s.sim.check_ms / 1000.0)
    if option:
        return negative(0x31, Nrc.INCORRECT_LENGTH)
    ok = s.banks.check_dependencies()
    return head + (b"\x00" if ok else b"\x01")


def request_download(s: EcuState, r: Request) -> bytes:
    if len(r.data) < 5:
        return negative(0x34, Nrc.INCORRECT_LENGTH)
    if s.session != SESSION_PROGRAMMING:
        return negative(0x34, Nrc.SERVICE_NOT_IN_SESSION)
    if not s.unlocked:
        return negative(0x34, Nrc.SECURITY_ACCESS_DENIED)
    if r.data[1] != 0x00:  # dataFormatIdentifier: no compression, no encryption
        return negative(0x34, Nrc.OUT_OF_RANGE)
    region = _memory(r.data[2:])
    if region is None:
        return negative(0x34, Nrc.INCORRECT_LENGTH)
    address, size = region
    if not _in_memory(s, address, size):
        return negative(0x34, Nrc.OUT_OF_RANGE)
    if s.download_active:
        return negative(0x34, Nrc.CONDITIONS_NOT_CORRECT)
    if not s.banks.erased or s.erased_region is None or not (
        s.erased_region[0] <= address and address + size <= sum(s.erased_region)
    ):
        return negative(0x34, Nrc.UPLOAD_DOWNLOAD_NOT_ACCEPTED)
    s.banks.begin_write(size)
    s.download_active, s.download_size, s.received = True, size, 0
    s.counter = BlockCounter()
    return b"\x74\x20" + s.sim.max_block_length.to_bytes(2, "big")


def transfer_data(s: EcuState, r: Request) -> bytes:
    if len(r.data) < 2:
        return negative(0x36, Nrc.INCORRECT_LENGTH)
    if not s.download_active:
        return negative(0x36, Nrc.REQUEST_SEQUENCE_ERROR)
    counter = r.data[1]
    kind = s.counter.classify(counter)
    if kind == "repeat":
        return bytes((0x76, counter))  # a repeated block: acknowledged, not written twice
    if kind == "wrong":
        return negative(0x36, Nrc.WRONG_BLOCK_SEQUENCE_COUNTER)
    if len(r.data) > s.sim.max_block_length or len(r.data) == 2:
        return negative(0x36, Nrc.INCORRECT_LENGTH)
    data = r.data[2:]
    if s.received + len(data) > s.download_size:
        return negative(0x36, Nrc.TRANSFER_SUSPENDED)
    s.banks.write(s.received, data)
    s.received += len(data)
    s.counter.accept(counter)
    return bytes((0x76, counter))


def request_transfer_exit(s: EcuState, r: Request) -> bytes:
    if not s.download_active:
        return negative(0x37, Nrc.REQUEST_SEQUENCE_ERROR)
    if s.received != s.download_size:
        return negative(0x37, Nrc.REQUEST_SEQUENCE_ERROR)
    s.banks.finish_write(s.received)
    s.download_active = False
    return b"\x77"


def _request_content_transfer(s: EcuState, r: Request) -> bytes:
    if s.content is None:
        return negative(0x38, Nrc.SERVICE_NOT_SUPPORTED)
    if s.download_active:
        return negative(0x38, Nrc.CONDITIONS_NOT_CORRECT)
    return request_file_transfer(s.content.files, r)


def _transfer_data_or_content(s: EcuState, r: Request) -> bytes:
    if s.content is not None and s.content.files.busy:
        return file_transfer_data(s.content.files, r)
    return transfer_data(s, r)


def _transfer_exit_or_content(s: EcuState, r: Request) -> bytes:
    if s.content is not None and s.content.files.busy:
        return file_transfer_exit(s.content.files, r)
    return request_transfer_exit(s, r)


SERVICES: dict[int, Service[EcuState]] = {
    0x10: Service(session_control, min_length=2, subfunction=True),
    0x11: Service(ecu_reset, min_length=2, subfunction=True),
    0x22: Service(read_data_by_identifier, min_length=3),
    0x27: Service(security_access, min_length=2, sessions=NON_DEFAULT, subfunction=True),
    0x28: Service(communication_control, min_length=3, sessions=NON_DEFAULT, subfunction=True),
    0x2E: Service(write_data_by_identifier, min_length=4, sessions=NON_DEFAULT),
    0x31: Service(routine_control, min_length=4, sessions=NON_DEFAULT, subfunction=True),
    0x34: Service(request_download, min_length=5, sessions=PROGRAMMING),
    0x36: Service(_transfer_data_or_content, min_length=2, sessions=NON_DEFAULT),
    0x37: Service(_transfer_exit_or_content, min_length=1, sessions=NON_DEFAULT),
    0x38: Service(_request_content_transfer, min_length=2, sessions=NON_DEFAULT),
    0x3E: Service(tester_present, min_length=2, subfunction=True),
    0x85: Service(control_dtc_setting, min_length=2, sessions=NON_DEFAULT, subfunction=True),
}
