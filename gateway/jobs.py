"""What the gateway flashes and what comes of it: a job per ECU (the image, or a delta to it, or
a package still on its way), the ECU's flash result (D3), and the hooks an install journals
through. Plain data: the per-ECU sequence is ``gateway/flash.py``, the segments' orchestration
``gateway/orchestrator.py``."""

from __future__ import annotations

import dataclasses
import hashlib
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

from agent.adapters.uds_sequence import StepResult
from agent.core.image_auth import ImageAuth
from agent.core.trace import TraceRecorder
from agent.errors import FlashError
from agent.protocol.images import ImageError, read_image

__all__ = ["Progress", "FlashHooks", "DeltaImage", "Awaited", "FlashJob", "FlashResult", "ImageBlock"]

Progress = Callable[[str, str, int, int], None]


@dataclass(frozen=True)
class FlashHooks:
    """What an install journals (gateway/journal.py): ``step`` when an ECU starts a new step
    (with the trace so far), ``result`` when an ECU's result is on disk."""

    step: Callable[[str, str, TraceRecorder], None] | None = None
    result: Callable[["FlashResult"], None] | None = None
    # a pipelined install: the job with its package read and checked, once it arrived (FlashError if not)
    ready: Callable[["FlashJob"], "FlashJob"] | None = None


@dataclass(frozen=True)
class DeltaImage:
    """A delta to the new image (agent/protocol/delta.py) and what the new image must be."""

    patch: bytes
    base_sha256: str  # the image the ECU must run for the patch to apply
    size: int  # the new image's
    sha256: str
    crc32: int
    source: str = ""


@dataclass(frozen=True)
class Awaited:
    """The file a job waits for, as the signed campaign names it, and the image it makes."""

    file: str
    size: int
    sha256: str
    image_size: int
    image_sha256: str
    delta_base: str | None = None  # the file is a delta to the image: its base's SHA-256
    image_crc32: int = 0


@dataclass(frozen=True)
class ImageBlock:
    """One block of an image as it is programmed: its ECU memory block's number, where, how much,
    the bytes (empty for a delta's block: the patch goes instead)."""

    number: int
    address: int
    size: int
    data: bytes


@dataclass(frozen=True)
class FlashJob:
    ecu: str
    image: bytes  # the full image; empty when only a delta was deployed
    version: str
    source: str = ""
    stage_only: bool = False  # vehicle-level campaigns: stop once the image is staged, do not reset onto it
    # installs: refuse, before erasing, an image older than what the ECU runs, or when the ECU does not
    # tell its version (an empty F189, no valid application, is no version to protect)
    guard_rollback: bool = False
    delta: DeltaImage | None = None  # sent instead of the image when the ECU runs its base
    awaited: Awaited | None = None  # a pipelined install: the package is still on its way (gateway/arrivals.py)

    # an image container's memory segments ((address, bytes), agent/protocol/images.py); empty: the
    # image goes to the ECU's first memory block
    segments: tuple[tuple[int, bytes], ...] = ()
    ecu_sha256: str = ""  # a container's image as it lies in the ECU's memory: the digest the ECU reports (F1A0, F1A1)
    image_auth: ImageAuth | None = None  # the OEM's signature, for an ECU that verifies what it boots

    @property
    def on_ecu_sha256(self) -> str:
        """What the ECU reports once it runs (or holds staged) this image."""
        return self.ecu_sha256 or self.sha256

    def unpacked(self, ecu: Any) -> "FlashJob":
        """This job with its image read as a container (Intel HEX, S-record, VBF: its segments,
        and the digest of the memory they make from ``ecu``'s memory start), or as it is (a raw
        binary, or a job without its image yet); ImageError for a damaged container."""
        if self.segments or not self.image or self.delta is not None:
            return self
        container = read_image(self.image, self.source or self.ecu)
        if not container.segments:
            return self
        memory = bytearray()
        for address, data in container.segments:
            offset = address - ecu.memory_address
            if offset < 0:
                raise ImageError(f"{self.source}: segment 0x{address:X} lies below {ecu.name}'s memory (0x{ecu.memory_address:X})")
            memory[len(memory):offset] = bytes(max(0, offset - len(memory)))
            memory[offset : offset + len(data)] = data
        return dataclasses.replace(self, segments=container.segments, ecu_sha256=hashlib.sha256(memory).hexdigest())

    def blocks(self, ecu: Any) -> list[ImageBlock]:
        """The blocks to program on ``ecu`` (an EcuConfig), each inside one block of its memory map,
        or FlashError naming what does not fit."""
        memory = ecu.memory_map
        if not self.segments:
            first = memory[0]
            if self.size == 0 or self.size > first.size:
                raise FlashError("request_download", f"image of {self.size} bytes does not fit {first.size} bytes of memory")
            return [ImageBlock(first.number, first.address, self.size, self.image)]
        out = []
        for address, data in self.segments:
            while data:  # a segment that runs over several memory blocks (adjacent in the file) is split at their bounds
                home = next((m for m in memory if m.address <= address < m.address + m.size), None)
                if home is None:
                    raise FlashError("request_download", f"segment at 0x{address:X} lies outside {ecu.name}'s memory "
                                                         f"map ({', '.join(f'0x{m.address:X}+{m.size}' for m in memory)})")
                take = min(len(data), home.address + home.size - address)
                out.append(ImageBlock(home.number, address, take, data[:take]))
                address, data = address + take, data[take:]
        return out

    @property
    def size(self) -> int:
        if self.segments:
            return sum(len(d) for _, d in self.segments)
        if self.awaited is not None:
            return self.awaited.image_size
        return self.delta.size if self.delta is not None else len(self.image)

    @property
    def sha256(self) -> str:
        if self.awaited is not None:
            return self.awaited.image_sha256
        return self.delta.sha256 if self.delta is not None else hashlib.sha256(self.image).hexdigest()

    def check_value(self, algorithm: str) -> bytes:
        """What check memory compares the written image with."""
        if algorithm == "crc32":
            crc = self.delta.crc32 if self.delta is not None else zlib.crc32(self.image)
            return crc.to_bytes(4, "big")
        return bytes.fromhex(self.sha256)


@dataclass
class FlashResult(StepResult):
    ecu: str
    version: str
    image_size: int
    image_sha256: str
    version_before: str | None = None
    version_after: str | None = None
    bytes_transferred: int = 0  # TransferData payload bytes on the bus (compressed, when the image was)
    transfer_s: float = 0.0  # from the first TransferData to the transfer exit's answer: the measured rate's time
    compression: str | None = None  # the method the image went with (RequestDownload's dataFormatIdentifier)
    compression_refused: list[str] = field(default_factory=list)  # methods the ECU answered NRC 0x31 to first
    transfer_ratio: float = 0.0  # bytes_transferred / image_size
    image_sent: str = "full"  # full | delta: what TransferData carried
    delta_refused: str | None = None  # a delta was offered and the full image went instead: why
    delta_choice: str | None = None  # a delta and its full image deployed: which was smaller on the bus
    trace_bytes: int = 0
    trace_fraction: float = 0.0
    profile: str = "vota-sim"  # the flash profile that programmed it
    blocks: list[dict[str, Any]] = field(default_factory=list)  # per block: number, address, size, bytes_transferred, compression
    phase: str | None = None  # staged, activated, committed, discarded, rolled_back (gateway/install.py)
    actions: list[dict[str, Any]] = field(default_factory=list)  # activation-phase actions on this ECU, in order
    schema: str = field(default="vota-flash-result/1")

    @classmethod
    def of(cls, job: "FlashJob", result: str = "failed", **fields: Any) -> "FlashResult":
        """A result for ``job`` (its ECU, version and image) with ``fields``."""
        return cls(ecu=job.ecu, version=job.version, image_size=job.size, image_sha256=job.sha256, result=result, **fields)
