"""How long CAN frames occupy the bus: what bus-timing emulation paces frames by, what
benchmarks compare goodput against, and what install-time estimates are made of."""

from __future__ import annotations

import math

__all__ = ["frame_time", "physical_goodput"]


def frame_time(data_length: int, bitrate: int, data_bitrate: int | None = None) -> float:
    """Seconds one data frame with 11-bit id occupies the bus, with average bit stuffing.

    Classic CAN: 47 framing bits + 8 per data byte, about 5 % stuffing on the stuffable
    part (111 bits for 8 bytes, ~116 with random data). CAN FD with bit-rate switch: about
    32 bits at the arbitration rate and data, DLC, stuff count and CRC at the data rate.
    """
    if data_bitrate is None:
        bits = 47 + 8 * data_length + math.ceil(0.05 * (34 + 8 * data_length))
        return bits / bitrate
    crc = 17 if data_length <= 16 else 21
    data_bits = (8 * data_length + 1 + 4 + 4 + crc + 1) * 1.03
    return 32 / bitrate + data_bits / data_bitrate


def physical_goodput(tx_data_length: int, bitrate: int, data_bitrate: int | None = None) -> float:
    """ISO-TP goodput limit in bytes/s: consecutive frames back to back."""
    return (tx_data_length - 1) / frame_time(tx_data_length, bitrate, data_bitrate)
