"""The simulated bootloader's delta applier never writes past the memory the download announced,
whatever image size the patch claims (a 4 KiB block of a patch for a 32 MiB image wrote 28 MB
before the size was checked)."""

from __future__ import annotations

import io
import tracemalloc

from agent.protocol.delta import make_delta
from ecu_sim.delta import DeltaApplier


def test_a_patch_claiming_a_huge_image_stops_at_the_announced_size() -> None:
    base = bytes(4096)
    patch = make_delta(base, bytes(32 * 1024 * 1024))  # compresses to almost nothing: a bomb for the applier
    applier = DeltaApplier(io.BytesIO(base))
    tracemalloc.start()
    try:
        out = applier.feed(patch[:4096], 65536)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        applier.close()
    assert len(out) == 65537  # one byte past the announced 64 KiB: the caller refuses it (0x71)
    assert peak < 16 * 1024 * 1024, peak  # detools buffers a few MiB; not the 32 MiB image (66 MB peak before)


def test_a_patch_within_the_announced_size_is_applied_whole() -> None:
    base = bytes(range(256)) * 64
    new = base[::-1] + b"tail"
    applier = DeltaApplier(io.BytesIO(base))
    patch = make_delta(base, new)
    out = b"".join(applier.feed(patch[i:i + 512], len(new)) for i in range(0, len(patch), 512))
    out += applier.feed(b"", len(new) - len(out))
    applier.close()
    assert out == new
