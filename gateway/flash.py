"""Gateway flashing of one ECU: the standard UDS programming sequence, traced header-only
(D2), ending in the ECU's flash result (D3). ``gateway/orchestrator.py`` runs it for several
ECUs and segments."""

from __future__ import annotations

import datetime as _dt
import functools
import logging
import threading
import time
from typing import Any, Callable

from udsoncan import DataFormatIdentifier, MemoryLocation
from udsoncan.exceptions import NegativeResponseException, TimeoutException

from agent.adapters.canbus import Segment
from agent.adapters.uds_client import ClientFaults, RawCodec, UdsLink, describe_failure
from agent.core.campaign import compare_versions
from agent.core.config import EcuConfig, GatewayConfig
from agent.core.faults import FaultSpec
from agent.core.trace import TraceHeader, TraceRecorder
from agent.errors import FlashError
from agent.protocol.compression import compress
from agent.protocol.ecu import DID, STAGED_NONE, decode_staged_image, security_key
from agent.protocol.uds import (
    COMMUNICATION_ALL,
    COMMUNICATION_NORMAL,
    CommunicationType,
    DtcSetting,
    ResetType,
    RoutineType,
    Session,
)
from gateway.jobs import DeltaImage, FlashJob, FlashResult, Progress

__all__ = ["EcuFlasher", "fingerprint", "flash_header"]

log = logging.getLogger(__name__)

def flash_header(ecu: EcuConfig, job: FlashJob) -> TraceHeader:
    return TraceHeader(stage="flash", client="GW", server=ecu.name, packet=ecu.name, request_id=ecu.request_id,
                       response_id=ecu.response_id, functional_id=ecu.functional_id, started=time.time(),
                       extra={"segment": ecu.segment, "image_size": job.size, "image_version": job.version})


def fingerprint(version: str, today: _dt.date) -> bytes:
    """WriteDataByIdentifier F15A: date as BCD YYMMDD, length, software version (ASCII)."""
    text = version.encode("ascii", "replace")[:60]
    bcd = bytes(int(f"{v:02d}", 16) for v in (today.year % 100, today.month, today.day))
    return bcd + bytes((len(text),)) + text


class EcuFlasher:
    """Runs the programming sequence against one ECU over an open segment."""

    def __init__(
        self,
        segment: Segment,
        ecu: EcuConfig,
        gateway: GatewayConfig,
        job: FlashJob,
        progress: Progress | None = None,
        stop: threading.Event | None = None,
        faults: list[FaultSpec] | None = None,
        on_step: Callable[[str, str, TraceRecorder], None] | None = None,
    ) -> None:
        self.segment = segment
        self.on_step = on_step
        self.ecu = ecu
        self.faults = [f for f in faults or [] if f.applies_to("flash", ecu.name, "client")]
        self.gateway = gateway
        self.job = job
        self.progress = progress or (lambda *a: None)
        self.stop = stop or threading.Event()
        self.recorder = TraceRecorder(flash_header(ecu, job))
        self.step = ""
        self.max_block = 0
        self.sent = 0
        self.transfer_s = 0.0
        self.compression: str | None = None  # the method the image went with, if any
        self.total = job.size  # the bytes TransferData carries (fewer when compressed)
        self.fallbacks: list[str] = []  # methods the ECU refused first
        self.image_sent = "full"
        self.delta_refused: str | None = None

    # ---- the sequence -----------------------------------------------------------------
    def run(self) -> FlashResult:
        job, ecu = self.job, self.ecu
        started = time.time()
        result = FlashResult(ecu.name, "failed", job.version, job.size, job.sha256,
                             started=_dt.datetime.fromtimestamp(started, _dt.timezone.utc).isoformat(timespec="seconds"))
        link = UdsLink(
            self.segment,
            ecu.request_id,
            ecu.response_id,
            name=ecu.name,
            recorder=self.recorder,
            p2=ecu.p2_ms / 1000.0,
            p2_star=ecu.p2_star_ms / 1000.0,
            security=lambda level, seed: security_key(ecu.security_secret, seed),
            dids={d: RawCodec() for d in (DID.SOFTWARE_VERSION, DID.IMAGE_DIGEST, DID.STAGED_IMAGE, ecu.fingerprint_did)},
            watch_ids={ecu.functional_id},
            faults=ClientFaults(self.faults, ecu.name, "flash", lambda: self.max_block or None) if self.faults else None,
        )
        try:
            with link.step("version_before"):
                first = len(self.recorder.exchanges)
                result.version_before = self._read_version(link)
                if job.guard_rollback and result.version_before is None:  # never skip the check: ask once more
                    result.version_before = self._read_version(link)
                    if len(self.recorder.exchanges) > first:
                        self.recorder.exchanges[first].extra["retried"] = True  # asked again: the last one is judged
            running = result.version_before
            if job.guard_rollback and running is None:
                raise FlashError("rollback_check", "the ECU did not tell its version (F189), so a downgrade cannot be "
                                                   "ruled out: not flashed")
            if job.guard_rollback and running and compare_versions(job.version, running) < 0:
                raise FlashError("rollback_check", f"the ECU runs {running}, newer than {job.version}: not flashed")
            result.version_after = self._sequence(link)
            result.result = "success"
        except FlashError as exc:
            result.failed_step, result.reason, result.nrc = exc.step, exc.reason, exc.nrc
            if exc.nrc == 0x72 and exc.step == "transfer_exit" and self.image_sent == "delta":
                self.delta_refused = f"the delta did not make the signed image: {exc.reason}"
            log.warning("%s: flash failed at %s: %s", ecu.name, exc.step, exc.reason)
            if exc.nrc is None and self.gateway.late_response_grace_ms:
                link.connection.drain_late(self.gateway.late_response_grace_ms / 1000.0)
        finally:
            link.close()
        result.duration_s = round(time.time() - started, 3)
        result.bytes_transferred = self.sent
        result.transfer_s = round(self.transfer_s, 3)
        result.compression = self.compression
        result.compression_refused = list(self.fallbacks)
        result.transfer_ratio = round(self.sent / max(1, job.size), 4)
        result.image_sent, result.delta_refused = self.image_sent, self.delta_refused
        return result

    def _read_version(self, link: UdsLink) -> str | None:
        try:
            response = link.client.read_data_by_identifier(DID.SOFTWARE_VERSION)
        except Exception:  # noqa: BLE001 - the version is informative only
            return None
        return response.service_data.values[DID.SOFTWARE_VERSION].decode("ascii", "replace")

    def _do(self, step: str, action: Callable[[], Any]) -> Any:
        if self.stop.is_set():
            raise FlashError(step, "cancelled")
        if self.on_step is not None and step != self.step:
            self.on_step(self.ecu.name, step, self.recorder)
        self.step = step
        self.progress(self.ecu.name, step, self.sent, self.total)
        attempts = self.gateway.retries + 1
        for attempt in range(attempts):
            try:
                return action()
            except NegativeResponseException as exc:
                if exc.response.code == 0x21 and attempt + 1 < attempts:  # busyRepeatRequest
                    if self.recorder.current is not None:  # asked again: the last attempt is the one judged
                        self.recorder.current.extra["retried"] = True
                    time.sleep(0.1)
                    continue
                reason, nrc = describe_failure(exc)
                raise FlashError(step, reason, nrc) from None
            except FlashError:
                raise
            except Exception as exc:  # noqa: BLE001 - every other failure ends this ECU's flash
                reason, nrc = describe_failure(exc)
                if isinstance(exc, TimeoutException):
                    self.recorder.note(reason)
                raise FlashError(step, reason, nrc) from None
        raise AssertionError("unreachable")

    def _sequence(self, link: UdsLink) -> str:
        c, ecu, job = link.client, self.ecu, self.job
        region = MemoryLocation(ecu.memory_address, job.size, 32, 32)
        if job.size == 0 or job.size > ecu.memory_size:
            raise FlashError("request_download", f"image of {job.size} bytes does not fit {ecu.memory_size} bytes of memory")
        if job.delta is not None and ecu.delta is None:
            self._no_delta("this ECU takes no delta images (ecus.<name>.delta)")
        self._do("extended_session", lambda: c.change_session(Session.extendedDiagnosticSession))
        self._do("dtc_setting_off", lambda: c.control_dtc_setting(DtcSetting.off))
        self._do("communication_disable", lambda: c.communication_control(CommunicationType.disableRxAndTx, COMMUNICATION_NORMAL))
        self._do("programming_session", lambda: c.change_session(Session.programmingSession))
        self._do("security_access", lambda: c.unlock_security_access(ecu.security_level))
        self._do("write_fingerprint", lambda: c.write_data_by_identifier(
            ecu.fingerprint_did, fingerprint(self.job.version, _dt.date.today())))
        delta = self._delta_base(c) if job.delta is not None and ecu.delta is not None else None
        erase_option = region.alfid.get_byte() + region.get_address_bytes() + region.get_memorysize_bytes()
        self._do("erase", lambda: self._routine(c, ecu.erase_routine, erase_option))
        response, payload = self._request_download(c, region, delta)
        self.max_block = int(response.service_data.max_length)
        if self.max_block < 3:
            raise FlashError("request_download", f"maxNumberOfBlockLength {self.max_block} is too small")
        chunk = self.max_block - 2
        counter = 1
        began = time.monotonic()
        for offset in range(0, len(payload), chunk):
            block = payload[offset : offset + chunk]
            self._do("transfer_data", functools.partial(c.transfer_data, counter, block))
            self.sent = offset + len(block)
            counter = (counter + 1) & 0xFF
        self._do("transfer_exit", lambda: c.request_transfer_exit())
        self.transfer_s = time.monotonic() - began
        check = job.check_value(ecu.check_memory)
        self._do("check_memory", lambda: self._routine(c, ecu.check_memory_routine, check))
        self._do("check_dependencies", lambda: self._routine(c, ecu.check_dependencies_routine, None))
        if self.job.stage_only:
            return self._staged(link)
        self._do("ecu_reset", lambda: c.ecu_reset(ResetType.hardReset))
        self._wait_after_reset(link)
        self._do("post_extended_session", lambda: c.change_session(Session.extendedDiagnosticSession))
        self._do("communication_enable", lambda: c.communication_control(CommunicationType.enableRxAndTx, COMMUNICATION_ALL))
        self._do("dtc_setting_on", lambda: c.control_dtc_setting(DtcSetting.on))
        self._do("default_session", lambda: c.change_session(Session.defaultSession))
        self.progress(self.ecu.name, "verify", self.sent, self.total)
        self.step = "verify"
        with link.step("verify"):
            try:
                got = link.client.read_data_by_identifier(DID.SOFTWARE_VERSION).service_data.values[DID.SOFTWARE_VERSION]
            except Exception as exc:  # noqa: BLE001
                reason = describe_failure(exc)[0]
                raise FlashError("verify", f"cannot read the software version after reset: {reason}") from None
        reported = got.decode("ascii", "replace")
        if reported != self.job.version:
            raise FlashError("verify", f"ECU reports software {reported!r} after reset, expected {self.job.version!r}")
        return self.job.version

    def _no_delta(self, why: str) -> None:
        """The delta cannot go: the full image goes instead, or, when it was not deployed, the flash fails."""
        if not self.job.image:
            self.delta_refused = why  # the TBOX sends the full image in another round
            raise FlashError(self.step or "delta_base", f"{why}, and the full image was not deployed")
        log.warning("%s: %s: the full image goes instead of the delta", self.ecu.name, why)
        self.delta_refused = why
        self.total = len(self.job.image)

    def _delta_base(self, c: Any) -> DeltaImage | None:
        """Before anything is erased: does the ECU run the delta's base? (The delta to send, or
        None when the ECU refused it and the full image goes.)"""
        delta = self.job.delta
        assert delta is not None
        option = bytes.fromhex(delta.base_sha256) + bytes.fromhex(delta.sha256)
        try:
            self._do("delta_base", lambda: self._routine(c, self.ecu.delta_base_routine, option))
        except FlashError as exc:
            if exc.nrc not in (0x22, 0x31):
                raise
            if not self.job.image:
                self.delta_refused = f"the ECU refused the delta's base check: {exc.reason}"
                raise FlashError(exc.step, f"{self.delta_refused}, and the full image was not deployed", exc.nrc) from None
            if self.recorder.current is not None:
                self.recorder.current.extra.update(retried=True, fallback="full")  # judged: the full image's flash
            self._no_delta(f"the ECU refused the delta's base check: {exc.reason}")
            return None
        self.total = len(delta.patch)
        return delta

    def _request_download(self, c: Any, region: MemoryLocation, delta: DeltaImage | None = None) -> tuple[Any, bytes]:
        """RequestDownload of a delta (its nibble), or compressed with the first of the ECU's
        methods that makes the image smaller and that the ECU accepts; an ECU that refuses a
        delta or a method (NRC 0x31) is asked again with the full image, the next method, at last
        without compression. (The response, the bytes to transfer.)"""
        if delta is not None and self.ecu.delta is not None:
            try:
                response = self._do("request_download", functools.partial(
                    c.request_download, region, dfi=DataFormatIdentifier(compression=self.ecu.delta)))
            except FlashError as exc:
                if exc.nrc != 0x31:
                    raise
                if self.recorder.current is not None and self.job.image:
                    self.recorder.current.extra.update(retried=True, csize=len(delta.patch), fallback="full")
                self._no_delta(f"the ECU does not take delta images: {exc.reason}")
            else:
                if self.recorder.current is not None:
                    self.recorder.current.extra.update(csize=len(delta.patch), delta=delta.base_sha256[:16])
                self.image_sent, self.compression, self.total = "delta", "delta", len(delta.patch)
                return response, delta.patch
        image = self.job.image
        for method, nibble in self.ecu.compression:
            packed = compress(method, image)
            if len(packed) >= len(image):
                continue
            try:
                response = self._do("request_download", functools.partial(
                    c.request_download, region, dfi=DataFormatIdentifier(compression=nibble)))
            except FlashError as exc:
                if exc.nrc != 0x31:  # requestOutOfRange: this ECU does not take this method
                    raise
                if self.recorder.current is not None:
                    self.recorder.current.extra.update(retried=True, csize=len(packed))  # judged: the next attempt
                log.warning("%s refused %s compression (NRC 0x31): trying the next way", self.ecu.name, method)
                self.fallbacks.append(method)
                continue
            if self.recorder.current is not None:
                self.recorder.current.extra["csize"] = len(packed)  # the bytes TransferData carries
            self.compression, self.total = method, len(packed)
            return response, packed
        return self._do("request_download", lambda: c.request_download(region)), image

    def _staged(self, link: UdsLink) -> str:
        """Staging only: leave the programming session without a reset, then read the staged
        image back (DID F1A1): it must be this image. The ECU still runs its old one."""
        c = link.client
        self._do("post_extended_session", lambda: c.change_session(Session.extendedDiagnosticSession))
        self._do("communication_enable", lambda: c.communication_control(CommunicationType.enableRxAndTx, COMMUNICATION_ALL))
        self._do("dtc_setting_on", lambda: c.control_dtc_setting(DtcSetting.on))
        self._do("default_session", lambda: c.change_session(Session.defaultSession))
        self.step = "verify"
        with link.step("verify"):
            try:
                raw = bytes(c.read_data_by_identifier(DID.STAGED_IMAGE).service_data.values[DID.STAGED_IMAGE])
            except Exception as exc:  # noqa: BLE001
                raise FlashError("verify", f"cannot read the staged image: {describe_failure(exc)[0]}") from None
        staged = decode_staged_image(raw)
        digest = self.job.sha256
        if staged is None or staged.status == STAGED_NONE or staged.sha256 != digest or staged.version != self.job.version:
            raise FlashError("verify", f"the ECU does not hold this image staged ({raw[:40].hex()})")
        with link.step("version_after"):
            return self._read_version(link) or ""

    def _routine(self, c: Any, routine: int, data: bytes | None) -> Any:
        response = c.routine_control(routine, RoutineType.startRoutine, data)
        status = response.service_data.routine_status_record
        if status and status[0] != 0x00:
            raise FlashError(self.step, f"routine 0x{routine:04X} reported status 0x{status[0]:02X} (failed)")
        return response

    def _wait_after_reset(self, link: UdsLink) -> None:
        """Poll (untraced) until the ECU answers again; note when in the reset exchange."""
        reset_exchange = self.recorder.current
        if not link.wait_answering(self.gateway.reset_wait_ms / 1000.0):
            raise FlashError("ecu_reset", f"ECU did not come back within {self.gateway.reset_wait_ms} ms after reset")
        if reset_exchange is not None:
            reset_exchange.extra["back"] = round((time.time() - self.recorder.header.started) * 1000.0 - reset_exchange.t, 1)


