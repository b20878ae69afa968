"""Wire format of a sparse gradient update: indices plus quantised values, as a ``uint8`` tensor.

Layout of a non-empty payload (little endian), 13 header bytes then three sections::

    byte 0      format: bits 0-1 value format (0 float32, 1 4-bit, 2 sign), bit 2 index mode
                (0 delta varint, 1 bitmap)
    bytes 1-4   n, the number of elements sent (int32)
    bytes 5-8   k, the number of scales (int32)
    bytes 9-12  byte length of the index section (int32)
    scale section (k float32), index section, value section

An empty selection encodes to an empty payload (0 bytes). Indices are sorted and stored either as
LEB128 varints of the gaps ``i_k - i_{k-1} - 1`` or as a bitmap of ``ceil(length / 8)`` bytes,
whichever is smaller. Values:

* ``float32``: 4 bytes each, exact.
* ``4bit`` *(choice)*: one nibble per value, bit 3 the sign and bits 0-2 an exponent ``e`` in
  ``0..7``; the value is ``+-scale * 2^-e``. There is one scale per *segment* of the dense vector
  (``boundaries``, one segment per parameter tensor of a gradient bucket: the largest sent ``|r|``
  of that parameter), so the result does not depend on how DDP groups parameters into buckets.
  :func:`quantize_down` never rounds a magnitude up: it returns the largest level ``<= |r|`` and
  marks elements below the smallest level ``scale * 2^-7`` as not representable (the caller keeps
  them in the residual).
* ``sign``: one bit per value, the value is ``+-scale`` (one scale: Strom's threshold method).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from sturdy.errors import ConfigurationError, DataError

__all__ = [
    "VALUE_FORMATS",
    "HEADER_BYTES",
    "NUM_LEVELS",
    "DecodedPayload",
    "encode",
    "decode",
    "decode_add_",
    "quantize_down",
    "dequantize",
    "segment_ids",
    "segment_scales",
]

VALUE_FORMATS = ("float32", "4bit", "sign")
HEADER_BYTES = 13
NUM_LEVELS = 8  # exponents 0..7 of the 4-bit format
_DELTA, _BITMAP = 0, 1


@dataclass(frozen=True)
class DecodedPayload:
    """A decoded payload: sorted int64 ``indices`` and their ``values`` (float32)."""

    indices: Tensor
    values: Tensor


def dequantize(codes: Tensor, scale: Tensor) -> Tensor:
    """Values of 4-bit ``codes`` (int64, sign in bit 3, exponent in bits 0-2) for float32 ``scale``.

    ``scale`` is a 0-d tensor or one scale per code.
    """
    exponent = (codes & 7).to(torch.float32)
    magnitude = torch.ldexp(scale.to(torch.float32).expand_as(exponent), -exponent)
    return torch.where((codes & 8) != 0, -magnitude, magnitude)


def quantize_down(values: Tensor, scale: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Quantise ``values`` to ``+-scale * 2^-e`` (``e`` in 0..7), never rounding a magnitude up.

    Args:
        values: 1-D tensor of values with ``|value| <= scale``.
        scale: float32 tensor, 0-d or one per value: the largest magnitude (usually ``max |values|``
            of the value's segment).

    Returns:
        ``(codes, quantised, representable)``: int64 codes, the quantised values (float32, exactly
        what :func:`decode` returns) and a bool mask, False where ``|value| < scale * 2^-7`` (those
        must not be sent; their code and quantised value are meaningless).
    """
    mag = values.abs().to(torch.float32)
    scale = scale.to(torch.float32)
    safe = torch.where(mag > 0, mag, torch.ones_like(mag))
    ratio = (scale.to(torch.float64) / safe.to(torch.float64)).clamp(min=1.0)
    exponent = torch.ceil(torch.log2(ratio)).to(torch.int64).clamp(0, 62)
    level = torch.ldexp(scale.expand_as(mag), -exponent.to(torch.float32))
    exponent = torch.where(level > mag, exponent + 1, exponent)  # guard log2 rounding: never round up
    level = torch.ldexp(scale.expand_as(mag), -exponent.to(torch.float32))
    lower = torch.ldexp(scale.expand_as(mag), -(exponent - 1).clamp(min=0).to(torch.float32))
    exponent = torch.where((exponent > 0) & (lower <= mag), exponent - 1, exponent)
    representable = (exponent < NUM_LEVELS) & (mag > 0)
    codes = exponent.clamp(max=NUM_LEVELS - 1) | torch.where(values < 0, 8, 0)
    return codes, dequantize(codes, scale), representable


def segment_ids(indices: Tensor, boundaries: Optional[Tensor], length: int) -> Tensor:
    """Segment of each index for segment ``boundaries`` (``[0, ..., length]``; ``None``: one segment)."""
    if boundaries is None:
        return torch.zeros_like(indices)
    inner = boundaries[1:-1].to(indices.device, torch.int64)
    return torch.searchsorted(inner, indices, right=True)


def segment_scales(indices: Tensor, values: Tensor, boundaries: Optional[Tensor], length: int) -> Tensor:
    """Per-segment ``max |values|`` (float32, 0 where a segment has no value)."""
    k = 1 if boundaries is None else boundaries.numel() - 1
    seg = segment_ids(indices, boundaries, length)
    out = torch.zeros(k, dtype=torch.float32, device=values.device)
    return out.scatter_reduce(0, seg, values.abs().to(torch.float32), reduce="amax", include_self=True)


def _int32_bytes(x: int) -> Tensor:
    return torch.tensor([x], dtype=torch.int32).view(torch.uint8)


def _read_int32(payload: Tensor, offset: int) -> int:
    return int(payload[offset : offset + 4].clone().view(torch.int32)[0])


def _varint_encode(gaps: Tensor) -> Tensor:
    if gaps.numel() == 0:
        return torch.zeros(0, dtype=torch.uint8)
    nbytes = torch.ones_like(gaps)
    for k in range(1, 10):
        nbytes += ((gaps >> (7 * k)) > 0).to(gaps.dtype)
    width = int(nbytes.max())
    k = torch.arange(width, dtype=torch.int64)
    digits = (gaps.unsqueeze(1) >> (7 * k)) & 0x7F
    digits = digits | torch.where(k < nbytes.unsqueeze(1) - 1, 0x80, 0)
    return digits[k < nbytes.unsqueeze(1)].to(torch.uint8)


def _varint_decode(data: Tensor, count: int) -> Tensor:
    b = data.to(torch.int64)
    ends = (b & 0x80) == 0
    if int(ends.sum()) != count:
        raise DataError(f"corrupt payload: index section holds {int(ends.sum())} varints, header says {count}")
    group = torch.cumsum(ends.to(torch.int64), 0) - ends.to(torch.int64)
    end_pos = torch.nonzero(ends).flatten()
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), end_pos[:-1] + 1])
    position = torch.arange(b.numel(), dtype=torch.int64) - starts[group]
    gaps = torch.zeros(count, dtype=torch.int64).scatter_add_(0, group, (b & 0x7F) << (7 * position))
    return torch.cumsum(gaps + 1, 0) - 1


def _pack_bits(bits: Tensor) -> Tensor:
    n = bits.numel()
    padded = torch.zeros((n + 7) // 8 * 8, dtype=torch.int64)
    padded[:n] = bits.to(torch.int64)
    weights = torch.tensor([1 << j for j in range(8)], dtype=torch.int64)
    return (padded.reshape(-1, 8) * weights).sum(1).to(torch.uint8)


def _unpack_bits(data: Tensor, n: int) -> Tensor:
    shifts = torch.arange(8, dtype=torch.int64)
    bits = (data.to(torch.int64).unsqueeze(1) >> shifts) & 1
    return bits.reshape(-1)[:n].bool()


def encode(
    indices: Tensor,
    values: Tensor,
    *,
    length: int,
    value_format: str,
    scale: Union[float, Tensor] = 0.0,
) -> Tensor:
    """Encode a sparse update of a dense vector of ``length`` elements into a CPU ``uint8`` payload.

    Args:
        indices: 1-D int64, strictly increasing, in ``[0, length)``.
        values: for ``float32`` the values; for ``4bit`` the int64 codes of :func:`quantize_down`;
            for ``sign`` anything whose sign is the value's sign.
        length: size of the dense vector.
        value_format: one of :data:`VALUE_FORMATS`.
        scale: ``4bit``: the scales, one per segment (a float or 1-D tensor); ``sign``: the
            magnitude ``tau``; ignored for ``float32``.
    """
    if value_format not in VALUE_FORMATS:
        raise ConfigurationError(f"unknown value_format {value_format!r}; expected one of {VALUE_FORMATS}")
    indices = indices.detach().to("cpu", torch.int64).reshape(-1)
    values = values.detach().to("cpu").reshape(-1)
    n = indices.numel()
    if values.numel() != n:
        raise ConfigurationError(f"got {n} indices but {values.numel()} values; they must match")
    if n == 0:
        return torch.zeros(0, dtype=torch.uint8)
    if n > 1 and bool((indices[1:] <= indices[:-1]).any()):
        raise ConfigurationError("indices must be strictly increasing (sorted, no duplicates)")
    if int(indices[0]) < 0 or int(indices[-1]) >= length:
        raise ConfigurationError(f"indices must lie in [0, {length}), got [{int(indices[0])}, {int(indices[-1])}]")
    gaps = torch.cat([indices[:1], indices[1:] - indices[:-1] - 1])
    delta = _varint_encode(gaps)
    bitmap_bytes = (length + 7) // 8
    if delta.numel() <= bitmap_bytes:
        mode, index_section = _DELTA, delta
    else:
        mask = torch.zeros(length, dtype=torch.bool)
        mask[indices] = True
        mode, index_section = _BITMAP, _pack_bits(mask)
    if value_format == "float32":
        value_section = values.to(torch.float32).contiguous().view(torch.uint8)
    elif value_format == "4bit":
        codes = values.to(torch.int64) & 0xF
        if n % 2:
            codes = torch.cat([codes, torch.zeros(1, dtype=torch.int64)])
        value_section = (codes[0::2] | (codes[1::2] << 4)).to(torch.uint8)
    else:
        value_section = _pack_bits(values < 0)
    if value_format == "float32":
        scales = torch.zeros(0, dtype=torch.float32)
    else:
        scales = torch.as_tensor(scale, dtype=torch.float32).detach().cpu().reshape(-1)
        if value_format == "sign" and scales.numel() != 1:
            raise ConfigurationError(f"the sign format has one scale (tau), got {scales.numel()}")
    header = torch.cat(
        [
            torch.tensor([VALUE_FORMATS.index(value_format) | (mode << 2)], dtype=torch.uint8),
            _int32_bytes(n),
            _int32_bytes(scales.numel()),
            _int32_bytes(index_section.numel()),
        ]
    )
    return torch.cat([header, scales.contiguous().view(torch.uint8), index_section, value_section])


def decode(payload: Tensor, *, length: int, boundaries: Optional[Tensor] = None) -> DecodedPayload:
    """Decode a payload of :func:`encode` (an empty payload decodes to no element).

    ``boundaries`` are the segment offsets ``[0, ..., length]`` of a multi-scale 4-bit payload.
    """
    payload = payload.detach().to("cpu", torch.uint8).reshape(-1)
    if payload.numel() == 0:
        return DecodedPayload(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.float32))
    if payload.numel() < HEADER_BYTES:
        raise DataError(f"corrupt payload: {payload.numel()} bytes, shorter than the {HEADER_BYTES}-byte header")
    fmt = int(payload[0])
    value_format, mode = VALUE_FORMATS[fmt & 3], (fmt >> 2) & 1
    n = _read_int32(payload, 1)
    k = _read_int32(payload, 5)
    index_len = _read_int32(payload, 9)
    start = HEADER_BYTES + 4 * k
    scales = payload[HEADER_BYTES:start].clone().view(torch.float32)
    index_section = payload[start : start + index_len]
    value_section = payload[start + index_len :]
    if mode == _DELTA:
        indices = _varint_decode(index_section, n)
    else:
        indices = torch.nonzero(_unpack_bits(index_section, length)).flatten()
        if indices.numel() != n:
            raise DataError(f"corrupt payload: bitmap holds {indices.numel()} indices, header says {n}")
    if value_format == "float32":
        values = value_section.clone().view(torch.float32)
    elif value_format == "4bit":
        pairs = value_section.to(torch.int64)
        codes = torch.stack([pairs & 0xF, pairs >> 4], 1).reshape(-1)[:n]
        if k > 1 and (boundaries is None or boundaries.numel() != k + 1):
            raise DataError(f"payload has {k} scales: decode needs the {k + 1} segment boundaries")
        seg = segment_ids(indices, boundaries if k > 1 else None, length)
        values = dequantize(codes, scales[seg])
    else:
        negative = _unpack_bits(value_section, n)
        values = torch.where(negative, -scales[0], scales[0])
    if values.numel() != n:
        raise DataError(f"corrupt payload: value section holds {values.numel()} values, header says {n}")
    return DecodedPayload(indices, values)


def decode_add_(out: Tensor, payload: Tensor, *, boundaries: Optional[Tensor] = None) -> Tensor:
    """Decode ``payload`` and add its values into the dense vector ``out`` in place."""
    decoded = decode(payload, length=out.numel(), boundaries=boundaries)
    if decoded.indices.numel():
        out.index_add_(0, decoded.indices.to(out.device), decoded.values.to(out.device, out.dtype))
    return out
