"""Delta images: only what changed between the image an ECU runs and the new one.

A delta is a detools *sequential* patch (bsdiff differences, the patch LZMA-compressed): the
receiver reads the old image front to back (the active bank) and writes the new one front to
back (the inactive bank), so it is applied while it arrives, block by block, in the memory of
a bootloader; detools' C applier is what embedded targets run. The patch names the new
image's size in its header; which old image it applies to is the campaign's (``base_sha256``)
and the ECU's to check before anything is erased.

On the bus a delta is a download like any other: RequestDownload's dataFormatIdentifier names
it in the compression nibble (``ecus.<name>.delta``, OEM-defined like the compression methods),
memorySize announces the new image, TransferData carries the patch.
"""

from __future__ import annotations

import io

__all__ = ["make_delta", "apply_delta", "patched_size", "DeltaError", "PATCH_COMPRESSION"]

PATCH_COMPRESSION = "lzma"  # the patch compression this project makes and ECUs apply


class DeltaError(ValueError):
    """Not a delta this project makes (another patch type or compression, or not a patch)."""


def make_delta(base: bytes, new: bytes) -> bytes:
    """The sequential patch from ``base`` to ``new``."""
    import detools  # noqa: PLC0415 - only the cloud side makes deltas

    patch = io.BytesIO()
    detools.create_patch(io.BytesIO(base), io.BytesIO(new), patch, compression=PATCH_COMPRESSION,
                         patch_type="sequential", algorithm="bsdiff")
    return patch.getvalue()


def patched_size(patch: bytes) -> int:
    """The size of the image the patch makes (its header), or DeltaError."""
    from detools.apply import read_header_sequential  # noqa: PLC0415
    from detools.errors import Error  # noqa: PLC0415

    try:
        compression, size = read_header_sequential(io.BytesIO(patch[:16]))
    except (Error, IndexError, ValueError) as exc:
        raise DeltaError(f"not a sequential patch ({exc})") from None
    if compression != PATCH_COMPRESSION or size <= 0:
        raise DeltaError(f"a sequential patch compressed with {PATCH_COMPRESSION} is expected, got {compression} "
                         f"for {size} bytes")
    return int(size)


def apply_delta(base: bytes, patch: bytes) -> bytes:
    """The whole new image at once (the cloud's check of a delta it made, and tests); a patch
    that is not one this project makes, or that is damaged or cut short, is DeltaError. (The
    ECU applies it block by block as it arrives: ``ecu_sim/delta.py``.)"""
    from detools import apply_patch  # noqa: PLC0415
    from detools.errors import Error  # noqa: PLC0415

    patched_size(patch)  # the type and compression this project makes
    out = io.BytesIO()
    try:
        apply_patch(io.BytesIO(base), io.BytesIO(patch), out)
    except (Error, ValueError, IndexError, EOFError) as exc:
        raise DeltaError(f"the patch does not apply ({exc})") from None
    return out.getvalue()
