"""Gateway flashing of one ECU: its flash profile's programming sequence (agent/core/flash_profile.py,
docs/flash-profiles.md), traced header-only (D2), ending in the ECU's flash result (D3).
``gateway/orchestrator.py`` runs it for several ECUs and segments. Around the profile's steps::

    version_before   the profile's version DID (asked twice if unanswered when the rollback is guarded)
    pre              the profile's pre-programming steps (simulator: 10 03, 85 02, 28 03 01, 10 02, 27, 2E F15A)
    delta_base       31 01 <delta base> (a delta only: does the ECU run its base?)
    block            per memory block of the image: the profile's block steps, the download among them
                     (34 with its dataFormatIdentifier when compressed or a delta, 36..., 37)
    post             the profile's post steps; a reset step waits (untraced 3E 00) until the ECU answers,
                     and is left out when the image is only staged
    verify           the version DID again (staging: 22 F1A1, then the version as version_after)
"""

from __future__ import annotations

import datetime as _dt
import functools
import logging
import threading
import time
from typing import Any, Callable

from udsoncan import DataFormatIdentifier, MemoryLocation

from agent.adapters.canbus import Segment
from agent.adapters.plugins import check_for
from agent.adapters.uds_client import describe_failure
from agent.adapters.uds_sequence import Peer, UdsSequence
from agent.core.campaign import compare_versions
from agent.core.config import EcuConfig, GatewayConfig
from agent.core.faults import FaultSpec
from agent.core.flash_profile import profile_flow
from agent.core.trace import TraceHeader, TraceRecorder
from agent.errors import FlashError
from agent.protocol.compression import compress
from agent.protocol.ecu import DID, STAGED_NONE, decode_secure_version, decode_staged_image
from agent.protocol.images import ImageError
from agent.protocol.uds import Nrc
from gateway.jobs import DeltaImage, FlashJob, FlashResult, ImageBlock, Progress

__all__ = ["EcuFlasher", "flash_header"]

log = logging.getLogger(__name__)


def flash_header(ecu: EcuConfig, job: FlashJob) -> TraceHeader:
    extra: dict[str, Any] = {"segment": ecu.segment, "image_size": job.size, "image_version": job.version}
    if ecu.profile is not None:  # a sequence the diagnosis does not know: the header says what it is
        extra["profile"] = profile_flow(ecu.profile, ecu.delta_base_routine if ecu.delta is not None else None)
    return TraceHeader(stage="flash", client="GW", server=ecu.name, packet=ecu.name, request_id=ecu.request_id,
                       response_id=ecu.response_id, functional_id=ecu.functional_id, started=time.time(), extra=extra)


class EcuFlasher(UdsSequence[FlashResult]):
    """Runs the programming sequence against one ECU over an open segment."""

    def __init__(self, segment: Segment, ecu: EcuConfig, gateway: GatewayConfig, job: FlashJob,
                 progress: Progress | None = None, stop: threading.Event | None = None,
                 faults: list[FaultSpec] | None = None,
                 on_step: Callable[[str, str, TraceRecorder], None] | None = None) -> None:
        journal = (lambda step: on_step(ecu.name, step, self.recorder)) if on_step is not None else None
        peer = Peer.ecu(ecu, ecu.flash_profile.version.did, DID.IMAGE_DIGEST, DID.STAGED_IMAGE, DID.SECURE_VERSION,
                        ecu.fingerprint_did)
        super().__init__(segment, peer, flash_header(ecu, job), retries=gateway.retries,
                         late_grace_s=gateway.late_response_grace_ms / 1000.0, stop=stop,
                         faults=[f for f in faults or [] if f.applies_to("flash", ecu.name, "client")], on_step=journal)
        self.ecu, self.gateway, self.job = ecu, gateway, job
        self.report = progress or (lambda *a: None)
        self.sent = 0
        self.transfer_s = 0.0
        self.compression: str | None = None  # the method the image went with, if any
        self.total = job.size  # the bytes TransferData carries (fewer when compressed)
        self.fallbacks: list[str] = []  # methods the ECU refused first
        self.image_sent = "full"
        self.delta_refused: str | None = None
        self.profile = ecu.flash_profile
        self.check = check_for(ecu)
        self.trace_steps = self.profile.name != "vota-sim"  # a foreign sequence: its step names in the trace
        self.blocks: list[dict[str, Any]] = []  # per block: where, how much went on the bus
        self.block_method: str | None = None  # how the block being downloaded goes
        self.delta_choice: str | None = None  # a delta and its image deployed: which went, and why
        self.packed: dict[tuple[str, int, int], bytes] = {}  # compressed once, for the choice and the offer

    # ---- the engine's hooks -------------------------------------------------------------
    def new_result(self) -> FlashResult:
        return FlashResult.of(self.job)

    def progress(self, step: str) -> None:
        self.report(self.ecu.name, step, self.sent, self.total)

    def failed(self, result: FlashResult, error: FlashError) -> None:
        if error.nrc == Nrc.GeneralProgrammingFailure and error.step == "transfer_exit" and self.image_sent == "delta":
            self.delta_refused = f"the delta did not make the signed image: {error.reason}"

    def finished(self, result: FlashResult) -> None:
        result.bytes_transferred = self.sent
        result.transfer_s = round(self.transfer_s, 3)
        result.compression = self.compression
        result.compression_refused = list(self.fallbacks)
        result.transfer_ratio = round(self.sent / max(1, self.job.size), 4)
        result.image_sent, result.delta_refused = self.image_sent, self.delta_refused
        result.profile, result.blocks = self.profile.name, list(self.blocks)
        result.delta_choice = self.delta_choice

    # ---- the sequence -------------------------------------------------------------------
    def sequence(self, result: FlashResult) -> None:
        """The profile's steps: pre-programming, per block (the download among them), post."""
        self._check_rollback(result)
        try:  # a container that arrived with a pipelined install: its segments
            self.job = self.job.unpacked(self.ecu)
        except ImageError as exc:
            raise FlashError("request_download", str(exc)) from None
        ecu, job, profile = self.ecu, self.job, self.profile
        blocks = job.blocks(ecu)
        if job.delta is not None and ecu.delta is None:
            self._no_delta("this ECU takes no delta images (ecus.<name>.delta)")
        use_delta = job.delta is not None and ecu.delta is not None and self._delta_is_smaller()
        today = _dt.date.today()
        auth = {"signature": job.image_auth.signature, "security_version": job.image_auth.security_version} \
            if job.image_auth is not None else {}
        ctx = profile.context(version=job.version, today=today, **auth)
        for spec in profile.pre:
            self.profile_step(spec, ctx)
        delta = self._delta_base() if use_delta else None
        for block in blocks:
            check = self._check_value(block.data) if block.data or delta is None else self._delta_check()
            ctx = profile.context(version=job.version, today=today, address=block.address, size=block.size,
                                  block=block.number, data=block.data, check=check, **auth)
            for spec in profile.block:
                if spec.kind == "download":
                    self._download(block, delta)
                else:
                    self.profile_step(spec, ctx)
        for spec in profile.post:
            if spec.kind != "reset":
                self.profile_step(spec, ctx)
            elif not job.stage_only:  # staging: the ECU keeps running its image
                self.profile_step(spec, ctx)
                self.wait_back(spec.name, self.gateway.reset_wait_ms / 1000.0)
        result.version_after = self._staged() if job.stage_only else self._verify()

    def _delta_is_smaller(self) -> bool:
        """A delta and its full image both deployed: whichever is smaller on the bus goes, the patch
        or the image compressed with the best of the ECU's methods (both measured first)."""
        job, delta = self.job, self.job.delta
        assert delta is not None
        if not job.image:
            self.delta_choice = f"delta: only the patch was deployed ({len(delta.patch)} bytes)"
            return True
        sizes = {m: len(self._compressed(m, job.image)) for m, _ in self.ecu.compression}
        best = min(sizes, key=lambda m: sizes[m], default=None)
        full, how = (sizes[best], f"{best}-compressed") if best is not None and sizes[best] < len(job.image) \
            else (len(job.image), "uncompressed")
        if full < len(delta.patch):
            self.delta_choice = f"full: the {how} image ({full} bytes) is smaller than the patch ({len(delta.patch)} bytes)"
            log.info("%s: %s", self.ecu.name, self.delta_choice)
            self.total = len(job.image)
            return False
        self.delta_choice = f"delta: the patch ({len(delta.patch)} bytes) is smaller than the {how} image ({full} bytes)"
        return True

    def _compressed(self, method: str, data: bytes) -> bytes:
        key = (method, len(data), id(data))
        if key not in self.packed:
            self.packed[key] = compress(method, data, self.ecu.compression_params)
        return self.packed[key]

    def _check_value(self, data: bytes) -> bytes:
        return self.check(data)

    def _delta_check(self) -> bytes:
        """A delta's block: its check value from what the delta says of the new image."""
        delta = self.job.delta
        assert delta is not None
        if self.profile.check == "crc32":
            return delta.crc32.to_bytes(4, "big")
        if self.profile.check == "sha256":
            return bytes.fromhex(delta.sha256)
        if self.profile.check == "none":
            return b""
        raise FlashError("check_memory", f"a delta image cannot be checked with {self.profile.check!r} "
                                         "(crc32, sha256 or none): send the full image")

    def _check_rollback(self, result: FlashResult) -> None:
        """Before anything else: what the ECU runs; a guarded job refuses an older image, or an ECU
        that does not say (asked twice)."""
        job = self.job
        with self.link.step("version_before"):
            first = len(self.recorder.exchanges)
            result.version_before = self._read_version()
            if job.guard_rollback and result.version_before is None:  # never skip the check: ask once more
                result.version_before = self._read_version()
                if len(self.recorder.exchanges) > first:
                    self.recorder.exchanges[first].extra["retried"] = True  # asked again: the last one is judged
        running = result.version_before
        if job.image_auth is not None:
            running = self._verified_version(running)
        if job.guard_rollback and running is None:
            raise FlashError("rollback_check", "the ECU did not tell its version (F189), so a downgrade cannot be "
                                               "ruled out: not flashed")
        if job.guard_rollback and running and compare_versions(job.version, running) < 0:
            raise FlashError("rollback_check", f"the ECU runs {running}, newer than {job.version}: not flashed")

    def _verified_version(self, reported: str | None) -> str | None:
        """A signed image: what the ECU runs as its bootloader verified it (DID F1A3), not the version
        string it reports; an image below the ECU's security version counter is refused here."""
        with self.link.step("secure_version"):
            try:
                raw = self.client.read_data_by_identifier(DID.SECURE_VERSION).service_data.values[DID.SECURE_VERSION]
            except Exception:  # noqa: BLE001 - an ECU that does not tell: the reported version stands
                return reported
        secure = decode_secure_version(bytes(raw))
        auth = self.job.image_auth
        assert auth is not None
        if secure is None:
            return reported
        if auth.security_version < secure.counter:
            raise FlashError("rollback_check", f"the image's security version {auth.security_version} is below the ECU's "
                                               f"counter {secure.counter}: not flashed")
        return secure.version if secure.verified else reported

    def _read_version(self) -> str | None:
        spec = self.profile.version
        try:
            response = self.client.read_data_by_identifier(spec.did)
        except Exception:  # noqa: BLE001 - the version is informative only
            return None
        return spec.decode(bytes(response.service_data.values[spec.did]))

    def _download(self, block: ImageBlock, delta: DeltaImage | None) -> None:
        """RequestDownload (the delta, compressed or not), TransferData, RequestTransferExit."""
        region = MemoryLocation(block.address, block.size, 8 * self.profile.address_bytes, 8 * self.profile.size_bytes)
        response, payload = self._request_download(region, block.data, delta)
        self.max_block = int(response.service_data.max_length)
        if self.profile.max_block:
            self.max_block = min(self.max_block, self.profile.max_block)
        if self.max_block < 3:
            raise FlashError("request_download", f"maxNumberOfBlockLength {self.max_block} is too small")
        chunk = self.max_block - 2
        counter = 1
        began = time.monotonic()
        done = self.sent
        for offset in range(0, len(payload), chunk):
            data = payload[offset : offset + chunk]
            self.step("transfer_data", functools.partial(self.client.transfer_data, counter, data))
            self.sent = done + offset + len(data)
            counter = (counter + 1) & 0xFF
        self.step("transfer_exit", lambda: self.client.request_transfer_exit())
        self.transfer_s += time.monotonic() - began
        self.blocks.append({"number": block.number, "address": block.address, "size": block.size,
                            "bytes_transferred": len(payload), "compression": self.block_method})

    def _verify(self) -> str:
        """After the reset: the ECU must report the new version."""
        self.current = "verify"
        self.progress("verify")
        spec = self.profile.version
        with self.link.step("verify"):
            try:
                got = self.client.read_data_by_identifier(spec.did).service_data.values[spec.did]
            except Exception as exc:  # noqa: BLE001
                reason = describe_failure(exc)[0]
                raise FlashError("verify", f"cannot read the software version (DID 0x{spec.did:04X}) after reset: "
                                           f"{reason}") from None
        reported = spec.decode(bytes(got))
        if reported != self.job.version:
            raise FlashError("verify", f"ECU reports software {reported!r} after reset, expected {self.job.version!r}")
        return self.job.version

    def _no_delta(self, why: str) -> None:
        """The delta cannot go: the full image goes instead, or, when it was not deployed, the flash fails."""
        if not self.job.image:
            self.delta_refused = why  # the TBOX sends the full image in another round
            raise FlashError(self.current or "delta_base", f"{why}, and the full image was not deployed")
        log.warning("%s: %s: the full image goes instead of the delta", self.ecu.name, why)
        self.delta_refused = why
        self.total = len(self.job.image)

    def _delta_base(self) -> DeltaImage | None:
        """Before anything is erased: does the ECU run the delta's base? (The delta to send, or
        None when the ECU refused it and the full image goes.)"""
        delta = self.job.delta
        assert delta is not None
        option = bytes.fromhex(delta.base_sha256) + bytes.fromhex(delta.sha256)
        try:
            self.routine("delta_base", self.ecu.delta_base_routine, option)
        except FlashError as exc:
            if exc.nrc not in (Nrc.ConditionsNotCorrect, Nrc.RequestOutOfRange):
                raise
            if not self.job.image:
                self.delta_refused = f"the ECU refused the delta's base check: {exc.reason}"
                raise FlashError(exc.step, f"{self.delta_refused}, and the full image was not deployed", exc.nrc) from None
            self.mark(retried=True, fallback="full")  # judged: the full image's flash
            self._no_delta(f"the ECU refused the delta's base check: {exc.reason}")
            return None
        self.total = len(delta.patch)
        return delta

    def _request_download(self, region: MemoryLocation, data: bytes,
                          delta: DeltaImage | None = None) -> tuple[Any, bytes]:
        """RequestDownload of a delta (its nibble), or of the image compressed with the first of the
        ECU's methods that the ECU accepts (``offer_compressed``); an ECU that refuses the delta
        (NRC 0x31) is asked again with the full image. (The response, the bytes to transfer.)"""
        c = self.client
        if delta is not None and self.ecu.delta is not None:
            self.image_sent = "delta"  # what a failure from here on was sending
            try:
                response = self.step("request_download", functools.partial(
                    c.request_download, region, dfi=DataFormatIdentifier(compression=self.ecu.delta)))
            except FlashError as exc:
                if exc.nrc != Nrc.RequestOutOfRange:
                    raise
                self.image_sent = "full"
                if self.job.image:
                    self.mark(retried=True, csize=len(delta.patch), fallback="full")
                self._no_delta(f"the ECU does not take delta images: {exc.reason}")
            else:
                self.mark(csize=len(delta.patch), delta=delta.base_sha256[:16])
                self.image_sent, self.compression, self.total = "delta", "delta", len(delta.patch)
                self.block_method = "delta"
                return response, delta.patch

        def send(dfi: DataFormatIdentifier | None, payload: bytes) -> Any:
            return c.request_download(region) if dfi is None else c.request_download(region, dfi=dfi)

        methods = [m for m in self.ecu.compression if m[0] not in self.fallbacks]  # refused for an earlier block: not again
        offer = self.offer_compressed("request_download", methods, data, send, refused_on=self.profile.compression_fallback,
                                      pack=self._compressed)
        self.fallbacks.extend(offer.refused)
        self.block_method = offer.method
        if offer.method is not None:
            self.compression = offer.method
        self.total += len(offer.payload) - len(data)  # the bytes TransferData carries, block by block
        return offer.response, offer.payload

    def _staged(self) -> str:
        """Staging only (the post steps ran without the reset): read the staged image back (DID
        F1A1): it must be this image. The ECU still runs its old one."""
        self.current = "verify"
        with self.link.step("verify"):
            try:
                raw = bytes(self.client.read_data_by_identifier(DID.STAGED_IMAGE).service_data.values[DID.STAGED_IMAGE])
            except Exception as exc:  # noqa: BLE001
                raise FlashError("verify", f"cannot read the staged image: {describe_failure(exc)[0]}") from None
        staged = decode_staged_image(raw)
        if (staged is None or staged.status == STAGED_NONE or staged.sha256 != self.job.on_ecu_sha256
                or staged.version != self.job.version):
            raise FlashError("verify", f"the ECU does not hold this image staged ({raw[:40].hex()})")
        with self.link.step("version_after"):
            return self._read_version() or ""
