"""Constants of the wire format (layout in :mod:`sturdy.compression.codec`); imports nothing from the package.

The codec (numpy reference) and the compiled kernels both read their constants here, so neither
imports the other.
"""

from __future__ import annotations

__all__ = ["VALUE_FORMATS", "HEADER_BYTES", "NUM_LEVELS", "MAX_RICE_K", "DELTA", "BITMAP", "format_byte"]

VALUE_FORMATS = ("float32", "4bit", "sign")  # bits 0-1 of the format byte: the index in this tuple
HEADER_BYTES = 13  # format byte, then three int32: values sent, scales, index-section bytes
NUM_LEVELS = 8  # exponents 0..7 of the 4-bit format
MAX_RICE_K = 31  # the Rice parameter lives in bits 3-7 of the format byte
DELTA, BITMAP = 0, 1  # bit 2 of the format byte: the index mode


def format_byte(value_format: str, mode: int, rice_k: int) -> int:
    """The header's first byte for ``value_format``, index ``mode`` (:data:`DELTA` or :data:`BITMAP`) and Rice ``k``."""
    return VALUE_FORMATS.index(value_format) | (mode << 2) | (rice_k << 3)
