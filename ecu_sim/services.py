"""The simulated ECU's UDS services: a table of handlers, each (state, request) -> response.

Handlers do no bus I/O and read no clock; the flash banks are the only storage they touch.
Byte layouts follow ISO 14229-1 and the usual OEM flash bootloader (docs/flashing.md, docs/wire-formats.md).
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Literal

from udsoncan import services as svc

from agent.adapters.file_store import request_file_transfer
from agent.adapters.file_store import transfer_data as file_transfer_data
from agent.adapters.file_store import transfer_exit as file_transfer_exit
from agent.adapters.uds_server import Outcome, Service, tester_present
from agent.core.config import EcuConfig
from agent.core.image_auth import ImageAuth, verify_image
from agent.protocol.compression import DecompressError, decompressor, named_by
from agent.protocol.ecu import ROUTINE_SHOW_CONTENT, ROUTINE_STOP_CONTENT
from agent.protocol.files import is_name
from agent.protocol.uds import BlockCounter, DtcSetting, Nrc, Request, ResetType, RoutineType, Session, session_response
from ecu_sim.delta import DeltaApplier
from ecu_sim.identification import read_data_by_identifier, write_data_by_identifier
from ecu_sim.state import EcuState

__all__ = ["EcuState", "SERVICES"]

NON_DEFAULT = frozenset({Session.programmingSession, Session.extendedDiagnosticSession})
PROGRAMMING = frozenset({Session.programmingSession})


# ---- diagnostic session control, tester present, reset -----------------------------------
def session_control(s: EcuState, r: Request) -> bytes:
    target = r.data[1]
    if len(r.data) != 2:
        return r.negative(Nrc.IncorrectMessageLengthOrInvalidFormat)
    if target not in (Session.defaultSession, Session.programmingSession, Session.extendedDiagnosticSession):
        return r.negative(Nrc.SubFunctionNotSupported)
    if target == Session.programmingSession and s.session == Session.defaultSession:
        return r.negative(Nrc.SubFunctionNotSupportedInActiveSession)  # programming only via extended
    if target != s.session or target == Session.defaultSession:
        s._leave_session()
        s.banks.dependencies_ok = False  # out of the programming session: a staged image waits for activate
    s.session = target
    return session_response(target, s.sim.p2_ms, s.sim.p2_star_ms)


def ecu_reset(s: EcuState, r: Request) -> Outcome | bytes:
    if len(r.data) != 2:
        return r.negative(Nrc.IncorrectMessageLengthOrInvalidFormat)
    if r.data[1] not in (ResetType.hardReset, ResetType.softReset):
        return r.negative(Nrc.SubFunctionNotSupported)
    return Outcome(bytes((0x51, r.data[1])), after=s.reset, silent=s.sim.reset_ms / 1000.0)


def control_dtc_setting(s: EcuState, r: Request) -> bytes:
    if r.data[1] not in (DtcSetting.on, DtcSetting.off):
        return r.negative(Nrc.SubFunctionNotSupported)
    s.dtc_setting_on = r.data[1] == DtcSetting.on
    return bytes((0xC5, r.data[1]))


def communication_control(s: EcuState, r: Request) -> bytes:
    if len(r.data) != 3:
        return r.negative(Nrc.IncorrectMessageLengthOrInvalidFormat)
    if r.data[1] > 0x03:
        return r.negative(Nrc.SubFunctionNotSupported)
    if r.data[2] & 0x0F not in (0x01, 0x02, 0x03):
        return r.negative(Nrc.RequestOutOfRange)
    s.communication = r.data[1]
    return bytes((0x68, r.data[1]))


# ---- security access -----------------------------------------------------------------------
def security_access(s: EcuState, r: Request) -> bytes:
    level = r.data[1]
    if level not in s.speaks.security_levels and level - 1 not in s.speaks.security_levels:
        return r.negative(Nrc.SubFunctionNotSupported)
    if level % 2 == 1:  # request seed
        if len(r.data) != 2:
            return r.negative(Nrc.IncorrectMessageLengthOrInvalidFormat)
        if r.now < s.locked_until:
            return r.negative(Nrc.RequiredTimeDelayNotExpired)
        if s.unlocked:
            return bytes((0x67, level)) + bytes(4)
        s.seed = s.random(4)
        return bytes((0x67, level)) + s.seed
    # send key
    if s.seed is None:
        return r.negative(Nrc.RequestSequenceError)
    expected = s.speaks.key(level - 1, s.seed)  # the profile's seed/key plug-in
    if len(r.data) != 2 + len(expected):
        return r.negative(Nrc.IncorrectMessageLengthOrInvalidFormat)
    if hmac.compare_digest(r.data[2:], expected):
        had_failures = s.failed_attempts
        s.unlocked, s.seed, s.failed_attempts = True, None, 0
        if had_failures:
            s.save_security(r.now)
        return bytes((0x67, level))
    s.seed = None
    s.failed_attempts += 1
    if s.failed_attempts >= s.sim.max_attempts:
        s.failed_attempts = 0
        s.locked_until = r.now + s.sim.lockout_ms / 1000.0
        s.save_security(r.now)
        return r.negative(Nrc.ExceedNumberOfAttempts)
    s.save_security(r.now)
    return r.negative(Nrc.InvalidKey)


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
        return r.negative(Nrc.RequestOutOfRange)
    if r.data[1] != 0x01:
        return r.negative(Nrc.SubFunctionNotSupported)
    name = r.data[4:].decode("ascii", "replace")
    if routine == ROUTINE_SHOW_CONTENT:
        if not is_name(name) or not s.content.files.path(name).is_file():
            return r.negative(Nrc.RequestOutOfRange)
        s.content.show(name)
    else:
        if len(r.data) != 4:
            return r.negative(Nrc.IncorrectMessageLengthOrInvalidFormat)
        s.content.show(None)
    return b"\x71" + r.data[1:4] + b"\x00"


def routine_control(s: EcuState, r: Request) -> Outcome | bytes:
    if len(r.data) < 4:
        return r.negative(Nrc.IncorrectMessageLengthOrInvalidFormat)
    kind, routine = r.data[1], int.from_bytes(r.data[2:4], "big")
    if routine in (ROUTINE_SHOW_CONTENT, ROUTINE_STOP_CONTENT):
        return _content_routine(s, r, routine)
    cfg, d = s.config, s.speaks
    if routine in (cfg.activate_routine, cfg.discard_routine, cfg.rollback_routine, cfg.commit_routine):
        return _bank_routine(s, r, routine)
    known = {d.erase_routine, d.check_routine, cfg.delta_base_routine, cfg.authenticate_routine} | d.dependencies_routines \
        | d.other_routines
    if routine not in known:
        return r.negative(Nrc.RequestOutOfRange)
    if kind != 0x01:
        return r.negative(Nrc.SubFunctionNotSupported)
    head = b"\x71" + r.data[1:4]
    if routine in d.other_routines:  # a routine of the profile the simulator has no part in (preconditions): ok
        return head + b"\x00"
    if s.session != Session.programmingSession:  # RoutineControl is served here, these routines are not
        return r.negative(Nrc.RequestOutOfRange)  # ISO 14229-1: a routine not supported in the active session
    if not s.unlocked:
        return r.negative(Nrc.SecurityAccessDenied)
    if s.download_active:
        return r.negative(Nrc.RequestSequenceError)
    option = r.data[4:]
    if routine == cfg.delta_base_routine:
        return _delta_base(s, r, head, option)
    if routine == cfg.authenticate_routine:
        return _authenticate(s, r, head, option)
    if routine == d.erase_routine:
        return _erase(s, r, head, option)
    if routine == d.check_routine:
        if d.check_with_block and (not option or d.blocks.get(option[0]) is None):
            return r.negative(Nrc.RequestOutOfRange)
        value = option[1:] if d.check_with_block else option
        if len(value) != len(d.check(b"")):
            return r.negative(Nrc.IncorrectMessageLengthOrInvalidFormat)
        ok = s.banks.check(d.check, value)
        return Outcome(head + (b"\x00" if ok else b"\x01"), busy=s.sim.check_ms / 1000.0)
    if option:
        return r.negative(Nrc.IncorrectMessageLengthOrInvalidFormat)
    if s.image_key is not None and s.banks.banks[s.banks.target].state == "verified" \
            and not s.banks.banks[s.banks.target].verified:
        return r.negative(Nrc.AuthenticationRequired)  # no valid signature: never staged, never run
    ok = s.banks.check_dependencies()
    return head + (b"\x00" if ok else b"\x01")


def _authenticate(s: EcuState, r: Request, head: bytes, option: bytes) -> bytes:
    """After the download: the image's security version and the OEM's signature over it
    (agent/core/image_auth.py). A bootloader without a trust anchor answers requestOutOfRange; a
    record of the wrong length incorrectMessageLength; an image not yet written and checked
    requestSequenceError; a signature that does not verify (another key, image, version or ECU)
    authenticationRequired; a security version below the ECU's counter conditionsNotCorrect."""
    if s.image_key is None:
        return r.negative(Nrc.RequestOutOfRange)
    auth = ImageAuth.from_record(option)
    if auth is None:
        return r.negative(Nrc.IncorrectMessageLengthOrInvalidFormat)
    info = s.banks.banks[s.banks.target]
    if info.state != "verified":
        return r.negative(Nrc.RequestSequenceError)
    if not verify_image(s.image_key, auth, s.config.name, info.version, info.sha256):
        return r.negative(Nrc.AuthenticationRequired)
    if auth.security_version < s.banks.counter:
        return r.negative(Nrc.ConditionsNotCorrect)
    s.banks.authenticate(auth.security_version)
    return head + b"\x00"


def _erase(s: EcuState, r: Request, head: bytes, option: bytes) -> Outcome | bytes:
    """Erase by region (alfid, address, size), by logical block number, or all of the memory."""
    d, cfg = s.speaks, s.config
    if d.erase_by == "block":
        region = d.blocks.get(option[0]) if len(option) == 1 else None
        if len(option) != 1:
            return r.negative(Nrc.IncorrectMessageLengthOrInvalidFormat)
    elif d.erase_by == "region":
        region = _memory(option)
        if region is None:
            return r.negative(Nrc.IncorrectMessageLengthOrInvalidFormat)
    else:
        region = (cfg.memory_address, cfg.memory_size)
    if region is None or not _in_memory(s, *region):
        return r.negative(Nrc.RequestOutOfRange)
    s.banks.erase(region[0] - cfg.memory_address, region[1])
    s.erased_region = region
    return Outcome(head + b"\x00", busy=s.sim.erase_ms / 1000.0)


def _bank_routine(s: EcuState, r: Request, routine: int) -> bytes:
    """Vehicle-level campaigns: activate (run the staged image at the next reset), discard it,
    roll back (run the image the running one replaced at the next reset), commit (confirm the
    running one, drop the old). Extended or programming session, security unlocked. Discard and
    commit always succeed (asked again after a restart, they find the work done); activate with
    nothing staged, and rollback with no previous image kept, answer conditionsNotCorrect. A
    single-bank ECU answers requestOutOfRange: it has none of them."""
    cfg = s.config
    if s.banks.single:
        return r.negative(Nrc.RequestOutOfRange)  # a single-bank ECU has none of these routines
    if r.data[1] != RoutineType.startRoutine:
        return r.negative(Nrc.SubFunctionNotSupported)
    if len(r.data) != 4:
        return r.negative(Nrc.IncorrectMessageLengthOrInvalidFormat)
    if s.session == Session.defaultSession:
        return r.negative(Nrc.ServiceNotSupportedInActiveSession)
    if not s.unlocked:
        return r.negative(Nrc.SecurityAccessDenied)
    if s.download_active:
        return r.negative(Nrc.RequestSequenceError)
    staged = s.banks.staged
    if routine == cfg.activate_routine and s.image_key is not None and staged is not None and (
            not staged.verified or staged.security_version < s.banks.counter):
        return r.negative(Nrc.AuthenticationRequired if not staged.verified else Nrc.ConditionsNotCorrect)
    if routine == cfg.activate_routine and not s.banks.select_staged():
        return r.negative(Nrc.ConditionsNotCorrect)
    if routine == cfg.rollback_routine and not s.banks.select_previous():
        return r.negative(Nrc.ConditionsNotCorrect)
    if routine == cfg.discard_routine:
        s.banks.discard()
    elif routine == cfg.commit_routine:
        s.banks.commit()
    return r.positive(r.data[1:4] + b"\x00")


def _delta_base(s: EcuState, r: Request, head: bytes, option: bytes) -> bytes:
    """Before a delta is erased for: is the active image the delta's base? Option: the base's and
    the new image's SHA-256. A bootloader without deltas (or a single bank, which a sequential
    patch cannot be applied in) answers requestOutOfRange; another active image
    conditionsNotCorrect, and nothing is erased."""
    if s.config.delta is None or not s.sim.accept_delta or s.banks.single:
        return r.negative(Nrc.RequestOutOfRange)
    if len(option) != 64:
        return r.negative(Nrc.IncorrectMessageLengthOrInvalidFormat)
    base, new = option[:32].hex(), option[32:].hex()
    if s.banks.active_info.state != "valid" or hashlib.sha256(s.banks.active_image()).hexdigest() != base:
        s.delta = None
        return r.negative(Nrc.ConditionsNotCorrect)
    s.delta = (base, new)
    return head + b"\x00"


def request_download(s: EcuState, r: Request) -> bytes:
    if len(r.data) < 5:
        return r.negative(Nrc.IncorrectMessageLengthOrInvalidFormat)
    if s.session != Session.programmingSession:
        return r.negative(Nrc.ServiceNotSupportedInActiveSession)
    if not s.unlocked:
        return r.negative(Nrc.SecurityAccessDenied)
    method = _data_format(s.config, r.data[1])  # dataFormatIdentifier: compression nibble, encryption nibble
    if method is False:
        return r.negative(Nrc.RequestOutOfRange)
    region = _memory(r.data[2:])
    if region is None:
        return r.negative(Nrc.IncorrectMessageLengthOrInvalidFormat)
    address, size = region
    if not _in_memory(s, address, size):
        return r.negative(Nrc.RequestOutOfRange)
    if s.download_active:
        return r.negative(Nrc.ConditionsNotCorrect)
    if not s.banks.erased or s.erased_region is None or not (
        s.erased_region[0] <= address and address + size <= sum(s.erased_region)
    ):
        return r.negative(Nrc.UploadDownloadNotAccepted)
    if method == "delta" and s.delta is None:
        return r.negative(Nrc.RequestSequenceError)  # the delta base routine comes first
    s.download_offset = address - s.config.memory_address
    s.banks.begin_write(size, s.download_offset)
    s.download_active, s.download_size, s.received = True, size, 0
    s.written = hashlib.sha256()
    if method == "delta":  # applied from the active bank while it arrives
        s.decompressor = DeltaApplier(s.banks.path(s.banks.active))
    else:
        s.decompressor = decompressor(method, size, s.config.compression_params) if method else None
        s.delta = None
    s.counter = BlockCounter()
    return b"\x74\x20" + s.sim.max_block_length.to_bytes(2, "big")


def _data_format(ecu: EcuConfig, identifier: int) -> str | None | Literal[False]:
    """The compression method a dataFormatIdentifier names (None: no compression); False when
    this ECU does not accept it (an encryption method, or a compression it was not built with)."""
    accepted = ecu.sim.accept_compression
    if ecu.delta is not None and identifier == ecu.delta << 4:
        return "delta" if ecu.sim.accept_delta else False
    return named_by(identifier, [(m, n) for m, n in ecu.compression if accepted is None or m in accepted])


def transfer_data(s: EcuState, r: Request) -> bytes:
    if len(r.data) < 2:
        return r.negative(Nrc.IncorrectMessageLengthOrInvalidFormat)
    if not s.download_active:
        return r.negative(Nrc.RequestSequenceError)
    counter = r.data[1]
    kind = s.counter.classify(counter)
    if kind == "repeat":
        return bytes((0x76, counter))  # a repeated block: acknowledged, not written twice
    if kind == "wrong":
        return r.negative(Nrc.WrongBlockSequenceCounter)
    if len(r.data) > s.sim.max_block_length or len(r.data) == 2:
        return r.negative(Nrc.IncorrectMessageLengthOrInvalidFormat)
    data = r.data[2:]
    if s.decompressor is not None:  # decompressed as it arrives; never more than memorySize announced
        try:
            data = s.decompressor.feed(data, s.download_size - s.received)
        except DecompressError:
            return r.negative(Nrc.RequestOutOfRange)  # the transferRequestParameterRecord is not valid data
    if s.received + len(data) > s.download_size:
        return r.negative(Nrc.TransferDataSuspended)
    s.banks.write(s.download_offset + s.received, data)
    s.written.update(data)
    s.received += len(data)
    s.counter.accept(counter)
    return bytes((0x76, counter))


def request_transfer_exit(s: EcuState, r: Request) -> bytes:
    if not s.download_active:
        return r.negative(Nrc.RequestSequenceError)
    if s.received != s.download_size or (s.decompressor is not None and not s.decompressor.finished):
        return r.negative(Nrc.RequestSequenceError)
    if s.delta is not None and s.written.hexdigest() != s.delta[1]:
        return r.negative(Nrc.GeneralProgrammingFailure)  # the patch made another image: wrong base, or damaged
    s.banks.finish_write(s.received, s.download_offset)
    s._end_download()
    s.delta = None
    return b"\x77"


def _request_content_transfer(s: EcuState, r: Request) -> bytes:
    if s.content is None:
        return r.negative(Nrc.ServiceNotSupported)
    if s.download_active:
        return r.negative(Nrc.ConditionsNotCorrect)
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
    svc.DiagnosticSessionControl.request_id(): Service(session_control, min_length=2, subfunction=True, subfunctions=frozenset({1, 2, 3})),
    svc.ECUReset.request_id(): Service(ecu_reset, min_length=2, subfunction=True, subfunctions=frozenset({1, 3})),
    svc.ReadDataByIdentifier.request_id(): Service(read_data_by_identifier, min_length=3),
    svc.SecurityAccess.request_id(): Service(security_access, min_length=2, sessions=NON_DEFAULT, subfunction=True),
    svc.CommunicationControl.request_id(): Service(communication_control, min_length=3, sessions=NON_DEFAULT, subfunction=True,
                                                         subfunctions=frozenset({0, 1, 2, 3})),
    svc.WriteDataByIdentifier.request_id(): Service(write_data_by_identifier, min_length=4, sessions=NON_DEFAULT),
    svc.RoutineControl.request_id(): Service(routine_control, min_length=4, sessions=NON_DEFAULT, subfunction=True,
                                                  subfunctions=frozenset({1})),  # startRoutine only
    svc.RequestDownload.request_id(): Service(request_download, min_length=5, sessions=PROGRAMMING),
    svc.TransferData.request_id(): Service(_transfer_data_or_content, min_length=2, sessions=NON_DEFAULT),
    svc.RequestTransferExit.request_id(): Service(_transfer_exit_or_content, min_length=1, sessions=NON_DEFAULT),
    svc.RequestFileTransfer.request_id(): Service(_request_content_transfer, min_length=2, sessions=NON_DEFAULT),
    svc.TesterPresent.request_id(): Service(tester_present, min_length=2, subfunction=True, subfunctions=frozenset({0})),
    svc.ControlDTCSetting.request_id(): Service(control_dtc_setting, min_length=2, sessions=NON_DEFAULT, subfunction=True,
                                                      subfunctions=frozenset({1, 2})),
}
