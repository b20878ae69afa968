"""Wire format of a sparse gradient update: indices plus quantised values, as a ``uint8`` tensor.

Layout of a non-empty payload (little endian), 13 header bytes then three sections::

    byte 0      format: bits 0-1 value format (0 float32, 1 4-bit, 2 sign), bit 2 index mode
                (0 delta, 1 bitmap), bits 3-7 the Rice parameter k of the delta mode
    bytes 1-4   n, the number of elements sent (int32)
    bytes 5-8   k, the number of scales (int32)
    bytes 9-12  byte length of the index section (int32)
    scale section (k float32), index section, value section

An empty selection encodes to an empty payload (0 bytes). Indices are sorted and stored either as
a Golomb-Rice code of the gaps ``g = i_k - i_{k-1} - 1`` or as a bitmap of ``ceil(length / 8)``
bytes, whichever is smaller. The Rice code with parameter ``k`` spends ``1 + (g >> k) + k`` bits
on a gap (unary quotient, ``k`` low bits), with the ``k`` that minimises the total: about
``log2(mean gap) + 1.5`` bits per index for the geometric gaps of a sparse selection, where
byte-aligned varints spend 8 or 16. The section holds all quotients first, then all remainders,
so that both directions are vectorised. Values:

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

import struct
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from sturdy.compression import accel
from sturdy.compression.wire import BITMAP, DELTA, HEADER_BYTES, MAX_RICE_K, NUM_LEVELS, VALUE_FORMATS, format_byte
from sturdy.errors import ConfigurationError, DataError

__all__ = [
    "VALUE_FORMATS",
    "HEADER_BYTES",
    "NUM_LEVELS",
    "MAX_RICE_K",
    "DecodedPayload",
    "encode",
    "decode",
    "decode_add_",
    "quantize_down",
    "encode_unchecked",
    "value_section_bytes",
    "rice_search",
    "Header",
    "parse_header",
]


@dataclass(frozen=True)
class DecodedPayload:
    """A decoded payload: sorted int64 ``indices`` and their ``values`` (float32)."""

    indices: Tensor
    values: Tensor


def value_section_bytes(count: int, value_format: str) -> int:
    """Bytes of the value section for ``count`` values in ``value_format``."""
    return {"float32": 4 * count, "4bit": (count + 1) // 2, "sign": (count + 7) // 8}[value_format]


def quantize_down(
    values: np.ndarray, scales: np.ndarray, segments: Optional[np.ndarray] = None
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantise float32 ``values`` to ``+-scale * 2^-e`` (``e`` in 0..7), never rounding a magnitude up.

    The numpy reference of the 4-bit format (the compiled kernels of :mod:`~sturdy.compression.accel`
    compute the same bits).

    Args:
        values: 1-D float32 array with ``|value| <= scale`` of its segment.
        scales: float32 scales: one per segment (the largest ``|value|`` of the segment), or one per
            value when ``segments`` is ``None`` (a single scale broadcasts).
        segments: segment of each value (an index into ``scales``), or ``None``.

    Returns:
        ``(codes, quantised, representable)``: ``uint8`` codes (sign in bit 3, exponent in bits 0-2),
        the quantised float32 values (exactly what :func:`decode` returns) and a bool mask, False
        where ``|value| < scale * 2^-7`` or ``value == 0`` (those must not be sent; their code and
        quantised value are meaningless).
    """
    mag = np.abs(values).astype(np.float32, copy=False)
    # |v| = m_v 2^e_v and scale = m_s 2^e_s with mantissas in [0.5, 1): the largest level
    # scale 2^-e <= |v| has e = e_s - e_v, plus one when m_s > m_v (exact, no logarithm).
    scales = np.asarray(scales, dtype=np.float32)
    m_s, e_s = np.frexp(scales)  # once per segment
    if segments is not None:
        scales, m_s, e_s = scales[segments], m_s[segments], e_s[segments]
    m_v, e_v = np.frexp(mag)
    exponent = e_s - e_v
    exponent += m_s > m_v
    np.maximum(exponent, 0, out=exponent)
    representable = (exponent < NUM_LEVELS) & (mag > 0)
    np.minimum(exponent, NUM_LEVELS - 1, out=exponent)
    negative = values < 0
    quantised = np.ldexp(np.broadcast_to(scales, mag.shape), -exponent).astype(np.float32, copy=False)
    np.negative(quantised, out=quantised, where=negative)
    codes = exponent.astype(np.uint8) | (negative.astype(np.uint8) << 3)
    return codes, quantised, representable


_HEADER = struct.Struct("<Biii")
_NUMPY_ADD_DTYPES = (torch.float32, torch.float64)

# The byte-level work below runs in numpy on the CPU: payloads are small and numpy's per-call
# overhead is a fraction of torch's, which is what keeps the hook cheap per step.


def _rice_bits(gaps: np.ndarray, k: int) -> int:
    """Bits of the Rice code of ``gaps`` with parameter ``k``: a unary quotient plus ``k`` low bits each."""
    return gaps.size * (k + 1) + int((gaps >> k).sum())


def _rice_parameter(gaps: np.ndarray, total: int) -> Tuple[int, int]:
    """``(k, bits)``: the ``k`` in ``0..MAX_RICE_K`` with the fewest bits for ``gaps`` (which sum to ``total``)."""
    return rice_search(gaps.size, total, lambda k: _rice_bits(gaps, k))


def rice_search(count: int, total: int, bits_of: Callable[[int], int]) -> Tuple[int, int]:
    """``(k, bits)`` minimising ``bits_of(k)``, the Rice code size of ``count`` gaps summing to ``total``.

    The size is convex in ``k`` (its increment ``n - sum(ceil(floor(g / 2^k) / 2))`` never
    decreases), so a local search from ``log2`` of the mean gap finds the global minimum (two or
    three evaluations usually). Every encoder (numpy, compiled, torch) runs this same search, so
    ties resolve alike.
    """
    k = min(MAX_RICE_K, max(0, (total // count).bit_length() - 1))
    bits = bits_of(k)
    for step in (-1, 1):
        moved = False
        while 0 <= k + step <= MAX_RICE_K:
            trial = bits_of(k + step)
            if trial >= bits:
                break
            k, bits, moved = k + step, trial, True
        if moved:  # convexity: the other direction cannot be better
            break
    return k, bits


def _rice_encode(gaps: np.ndarray, k: int) -> np.ndarray:
    """Rice code of non-negative ``gaps``: all unary quotients (``q`` ones, then a zero), then all
    ``k``-bit remainders (least significant bit first), packed little-endian into bytes."""
    quotients = gaps >> k
    unary_bits = gaps.size + int(quotients.sum())
    bits = np.ones(unary_bits + gaps.size * k, dtype=np.uint8)
    bits[np.cumsum(quotients + 1) - 1] = 0
    if k:
        width = _word_bytes(k)  # remainders as little-endian words, their bits unpacked row by row
        words = (gaps & ((1 << k) - 1)).astype(f"<u{width}")
        low = np.unpackbits(words.view(np.uint8), bitorder="little").reshape(-1, 8 * width)[:, :k]
        bits[unary_bits:].reshape(-1, k)[:] = low
    return np.packbits(bits, bitorder="little")


def _word_bytes(k: int) -> int:
    """Bytes of the smallest unsigned numpy integer with at least ``k`` bits."""
    return next(w for w in (1, 2, 4, 8) if 8 * w >= k)


def _rice_decode(data: np.ndarray, count: int, k: int) -> np.ndarray:
    """Sorted indices from the Rice-coded gaps in ``data`` (see :func:`_rice_encode`)."""
    bits = np.unpackbits(data, bitorder="little")
    ends = np.flatnonzero(bits[: bits.size - count * k] == 0)[:count]  # the quotients come first
    unary_bits = int(ends[-1]) + 1 if ends.size else 0
    if ends.size != count or (unary_bits + count * k + 7) // 8 != data.size:
        raise DataError(f"corrupt payload: index section of {data.size} bytes does not hold {count} Rice codes")
    gaps = np.empty(count, dtype=np.int64)  # the quotients, then shifted and completed
    gaps[0] = ends[0]
    np.subtract(ends[1:], ends[:-1], out=gaps[1:])
    gaps[1:] -= 1
    if k:
        gaps <<= k
        weights = np.left_shift(1, np.arange(k, dtype=np.int64))
        gaps |= bits[unary_bits : unary_bits + count * k].reshape(count, k) @ weights
    return np.cumsum(gaps + 1) - 1


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
        values: for ``float32`` the values; for ``4bit`` the codes of :func:`quantize_down`;
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
    if n > 1 and bool((indices[1:] <= indices[:-1]).any()):
        raise ConfigurationError("indices must be strictly increasing (sorted, no duplicates)")
    if n and (int(indices[0]) < 0 or int(indices[-1]) >= length):
        raise ConfigurationError(f"indices must lie in [0, {length}), got [{int(indices[0])}, {int(indices[-1])}]")
    if value_format == "float32":
        scales = torch.zeros(0, dtype=torch.float32)
    else:
        scales = torch.as_tensor(scale, dtype=torch.float32).detach().cpu().reshape(-1)
        if value_format == "sign" and scales.numel() != 1:
            raise ConfigurationError(f"the sign format has one scale (tau), got {scales.numel()}")
    return encode_unchecked(indices, values, length=length, value_format=value_format, scales=scales)


def encode_unchecked(indices: Tensor, values: Tensor, *, length: int, value_format: str, scales: Tensor) -> Tensor:
    """:func:`encode` without argument checks (CPU tensors, valid sorted indices; the hooks' fast path)."""
    n = indices.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.uint8)
    idx = indices.numpy()
    gaps = np.empty_like(idx)
    gaps[0] = idx[0]
    np.subtract(idx[1:], idx[:-1], out=gaps[1:])
    gaps[1:] -= 1
    k, bits = _rice_parameter(gaps, int(idx[-1]) + 1 - n)  # the gaps sum to last index + 1 - n
    if (bits + 7) // 8 < (length + 7) // 8:  # a tie goes to the bitmap (cheaper to decode)
        mode, index_section = DELTA, _rice_encode(gaps, k)
    else:
        k = 0
        mask = np.zeros(length, dtype=bool)
        mask[idx] = True
        mode, index_section = BITMAP, np.packbits(mask, bitorder="little")
    if value_format == "float32":
        value_section = values.to(torch.float32).numpy().view(np.uint8)
    elif value_format == "4bit":
        codes = values.numpy().astype(np.uint8) & 0xF
        if n % 2:
            codes = np.concatenate([codes, np.zeros(1, dtype=np.uint8)])
        value_section = codes[0::2] | (codes[1::2] << 4)
    else:
        value_section = np.packbits(values.numpy() < 0, bitorder="little")
    fmt = format_byte(value_format, mode, k)
    header = np.frombuffer(_HEADER.pack(fmt, n, scales.numel(), index_section.size), dtype=np.uint8)
    scale_bytes = scales.to(torch.float32).numpy().view(np.uint8)
    return torch.from_numpy(np.concatenate([header, scale_bytes, index_section, value_section]))


@dataclass(frozen=True)
class Header:
    """The checked header of a non-empty payload and where its sections lie (byte offsets)."""

    value_format: str
    delta: bool
    rice_k: int
    count: int
    num_scales: int
    index_start: int
    value_start: int


def parse_header(head: bytes, size: int, length: int) -> Header:
    """Check the first :data:`HEADER_BYTES` bytes ``head`` of a payload of ``size`` bytes for a vector of ``length``.

    Raises DataError for every inconsistency between the header and the payload's size (the checks
    every decoder shares; the index section's content is checked while decoding it).
    """
    if size < HEADER_BYTES:
        raise DataError(f"corrupt payload: {size} bytes, shorter than the {HEADER_BYTES}-byte header")
    fmt, n, k, index_len = _HEADER.unpack(bytes(head[:HEADER_BYTES]))
    if (fmt & 3) >= len(VALUE_FORMATS) or n < 0 or k < 0 or index_len < 0:
        raise DataError(f"corrupt payload: bad header (format {fmt}, n {n}, scales {k}, index bytes {index_len})")
    value_format, mode = VALUE_FORMATS[fmt & 3], (fmt >> 2) & 1
    start = HEADER_BYTES + 4 * k
    if start + index_len > size:
        raise DataError(f"corrupt payload: header announces {start + index_len - HEADER_BYTES} bytes of scales and "
                        f"indices, the payload has {size - HEADER_BYTES}")
    expected_scales = {"float32": k == 0, "4bit": k >= 1, "sign": k == 1}[value_format]
    if not expected_scales or n == 0:
        raise DataError(f"corrupt payload: {n} {value_format} values with {k} scales")
    if size - start - index_len != value_section_bytes(n, value_format):
        raise DataError(f"corrupt payload: value section holds {size - start - index_len} bytes for {n} "
                        f"{value_format} values")
    if mode == BITMAP and index_len != (length + 7) // 8:
        raise DataError(f"corrupt payload: bitmap of {index_len} bytes for {length} elements")
    return Header(value_format, mode == DELTA, fmt >> 3, n, k, start, start + index_len)


@dataclass(frozen=True)
class _Sections:
    """A payload split along its header (every header field checked against the payload)."""

    value_format: str
    delta: bool
    rice_k: int
    count: int
    scales: np.ndarray
    index_section: np.ndarray
    value_section: np.ndarray


def _sections(buf: np.ndarray, length: int) -> _Sections:
    h = parse_header(buf[:HEADER_BYTES].tobytes(), buf.size, length)
    scales = buf[HEADER_BYTES : h.index_start].copy().view(np.float32)
    if not bool(np.isfinite(scales).all()):  # an encoder writes max |r| of finite residuals: damaged in transit
        raise DataError("corrupt payload: its value scales hold NaN or infinite numbers")
    return _Sections(h.value_format, h.delta, h.rice_k, h.count, scales, buf[h.index_start : h.value_start],
                     buf[h.value_start :])


def _inner_boundaries(num_scales: int, boundaries: Optional[Tensor]) -> Optional[np.ndarray]:
    """Inner segment offsets for a 4-bit payload with ``num_scales`` scales (``None`` for one scale)."""
    if num_scales == 1:
        return None
    if boundaries is None or boundaries.numel() != num_scales + 1:
        raise DataError(f"payload has {num_scales} scales: decode needs the {num_scales + 1} segment boundaries")
    return boundaries.numpy()[1:-1]


def decode(payload: Tensor, *, length: int, boundaries: Optional[Tensor] = None) -> DecodedPayload:
    """Decode a payload of :func:`encode` (an empty payload decodes to no element).

    ``boundaries`` are the segment offsets ``[0, ..., length]`` of a multi-scale 4-bit payload.
    """
    buf = payload.detach().to("cpu", torch.uint8).reshape(-1).numpy()
    if buf.size == 0:
        return DecodedPayload(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.float32))
    return _decode_sections(_sections(buf, length), length, boundaries)


def _decode_sections(sec: _Sections, length: int, boundaries: Optional[Tensor]) -> DecodedPayload:
    n, scales = sec.count, sec.scales
    if sec.delta:
        indices = _rice_decode(sec.index_section, n, sec.rice_k)
        if indices[-1] >= length:
            raise DataError(f"corrupt payload: index {int(indices[-1])} outside a vector of {length} elements")
    else:
        indices = np.flatnonzero(np.unpackbits(sec.index_section, count=length, bitorder="little"))
        if indices.size != n:
            raise DataError(f"corrupt payload: bitmap holds {indices.size} indices, header says {n}")
    if sec.value_format == "float32":
        values = sec.value_section.copy().view(np.float32)
        if not bool(np.isfinite(values).all()):
            raise DataError("corrupt payload: its float32 values hold NaN or infinite numbers")
    elif sec.value_format == "4bit":
        codes = np.empty(2 * sec.value_section.size, dtype=np.uint8)
        codes[0::2] = sec.value_section & 0xF
        codes[1::2] = sec.value_section >> 4
        codes = codes[:n]
        inner = _inner_boundaries(scales.size, boundaries)
        scale = np.full(n, scales[0], dtype=np.float32) if inner is None else scales[
            np.searchsorted(inner, indices, side="right")]
        values = np.ldexp(scale, -(codes & 7).astype(np.int32)).astype(np.float32, copy=False)
        values[(codes & 8) != 0] *= -1
    else:
        negative = np.unpackbits(sec.value_section, count=n, bitorder="little").astype(bool)
        values = np.where(negative, -scales[0], scales[0]).astype(np.float32)
    return DecodedPayload(torch.from_numpy(indices.astype(np.int64, copy=False)), torch.from_numpy(values))


_device_module: Optional[ModuleType] = None


def use_device_codec(module: ModuleType) -> None:
    """Register :mod:`~sturdy.compression.device_codec` (it calls this when imported, so this module
    never imports it): tensors it is enabled for (CUDA, or forced) then decode on their device."""
    global _device_module
    _device_module = module


def _device_path(device: torch.device) -> Optional[ModuleType]:
    module = _device_module
    return module if module is not None and module.enabled_for(device) else None


def decode_add_(out: Tensor, payload: Tensor, *, boundaries: Optional[Tensor] = None) -> Tensor:
    """Decode ``payload`` and add its values into the dense vector ``out`` in place.

    CUDA tensors decode on the device (:mod:`~sturdy.compression.device_codec`, same sums). A corrupt
    payload raises :class:`~sturdy.errors.DataError` and leaves ``out`` unchanged.
    """
    device_path = _device_path(out.device)
    if device_path is not None:
        return device_path.decode_add_(out, payload, boundaries=boundaries)
    buf = payload.detach().to("cpu", torch.uint8).reshape(-1).numpy()
    if buf.size == 0:
        return out
    length = out.numel()
    sec = _sections(buf, length)
    on_cpu = out.device.type == "cpu" and out.dtype in _NUMPY_ADD_DTYPES and out.is_contiguous()
    compiled = accel.kernels()
    if compiled is not None and on_cpu and not out.requires_grad and sec.value_format == "4bit":
        status = compiled.decode_add_4bit(
            out.view(-1).numpy(), sec.index_section, delta=sec.delta, k=sec.rice_k, count=sec.count,
            scales=sec.scales, inner=_inner_boundaries(sec.scales.size, boundaries), value_section=sec.value_section,
        )
        if status:  # out is unchanged; the reference decoder names what is wrong
            _decode_sections(sec, length, boundaries)
            raise DataError("corrupt payload: its index section does not decode")
        return out
    decoded = _decode_sections(sec, length, boundaries)
    if on_cpu and not out.requires_grad:
        flat = out.view(-1).numpy()  # indices are unique: the same sums as index_add_, without its overhead
        flat[decoded.indices.numpy()] += decoded.values.numpy()
    else:
        out.index_add_(0, decoded.indices.to(out.device), decoded.values.to(out.device, out.dtype))
    return out
