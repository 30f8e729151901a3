"""The ACME bootloader's seed/key algorithm: the seed XOR a 4-byte mask, byte order reversed.

vota calls ``key(level, seed, params)`` for every SecurityAccess of an ECU whose flash profile
names ``acme-xor``; ``params`` holds the profile's ``seed_key.params`` and the ECU's
``seed_key_params`` (here: ``mask``)."""

import binascii


def key(level: int, seed: bytes, params: dict) -> bytes:
    if level != 0x11:
        raise ValueError(f"ACME bootloaders unlock level 0x11 only, not 0x{level:02X}")
    mask = int(params["mask"]).to_bytes(4, "big")
    return bytes(b ^ m for b, m in zip(seed, mask, strict=True))[::-1]


def crc16(data: bytes) -> bytes:
    """The block check ACME's check-memory routine compares: CRC-16/CCITT-FALSE."""
    return binascii.crc_hqx(data, 0xFFFF).to_bytes(2, "big")
