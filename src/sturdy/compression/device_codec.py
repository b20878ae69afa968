"""The variance selection and the wire format in torch operations on the bucket's device (the GPU path).

Same selection and same bytes as the numpy reference (:func:`sturdy.compression.compressor.variance_select`,
:func:`sturdy.compression.codec.quantize_down`, :func:`~sturdy.compression.codec.encode` and
:func:`~sturdy.compression.codec.decode_add_`): the variance test, the 4-bit levels that never round
up, the residual and variance updates, the header, the scales, the nibbles, and the Rice or bitmap index
section (whichever the reference picks: every encoder runs :func:`~sturdy.compression.codec.rice_search`).
``tests/compression/test_compression_device_codec.py`` compares them bit for bit on the CPU.

How, without a per-element loop: positions come from prefix sums (``cummax`` of the selected indices
gives every gap, ``cumsum`` of ``quotient + 1`` every end of a unary code), bits are packed and unpacked
with shifts over a trailing axis of 8, and the Rice size for *every* ``k`` comes from four byte
histograms of the gaps (``sum_j (g_j >> k) = sum_b C_b 2^(b-k)`` with ``C_b`` the number of gaps
with bit ``b`` set), so choosing ``k`` costs no pass per candidate.

Host synchronisation: an encoding reads 34 integers (the count, the last index and the Rice sizes) in
one device-to-host copy: the payload's size, which the collective needs on the host anyway. Decoding
reads nothing when the caller passes the header (the capacity all-gather reads every rank's header
with its size, :mod:`sturdy.compression.collective`); :func:`decode_add_unchecked` returns a validity
flag on the device, which the exchange checks once per bucket.

Dispatch: :func:`enabled_for` is true for CUDA tensors; the environment variable
``STURDY_DEVICE_CODEC=1`` (or :func:`forced`) selects this path on any device (tests), ``=0`` never.
"""

from __future__ import annotations

import os
import struct
import sys
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from sturdy.compression import codec
from sturdy.compression.wire import BITMAP, DELTA, HEADER_BYTES, MAX_RICE_K, NUM_LEVELS, format_byte
from sturdy.errors import DataError

__all__ = [
    "enabled_for",
    "forced",
    "variance_select_4bit",
    "encode",
    "decode_add_",
    "decode_add_unchecked",
    "corrupt_error",
]

_HEADER = struct.Struct("<Biii")
_ENV = "STURDY_DEVICE_CODEC"
_forced: List[Optional[bool]] = [{"1": True, "0": False}.get(os.environ.get(_ENV, ""), None)]


def enabled_for(device: torch.device) -> bool:
    """Whether tensors on ``device`` take this path (CUDA by default; see the module docstring)."""
    flag = _forced[0]
    return device.type == "cuda" if flag is None else flag


@contextmanager
def forced(flag: Optional[bool]) -> Iterator[None]:
    """Inside the block, every device (``True``), none (``False``) or CUDA only (``None``) takes this path."""
    saved = _forced[0]
    _forced[0] = flag
    try:
        yield
    finally:
        _forced[0] = saved


class _Constants:
    """Small tables per device (levels ``2^-e``, bit shifts, the bits of every byte value, powers of two)."""

    def __init__(self, device: torch.device) -> None:
        self.levels = torch.tensor([2.0**-e for e in range(NUM_LEVELS)], dtype=torch.float32, device=device)
        self.shifts8 = torch.arange(8, dtype=torch.uint8, device=device)
        self.shifts8_i32 = self.shifts8.to(torch.int32)
        values = torch.arange(256, dtype=torch.int64, device=device)
        self.byte_bits = (values.unsqueeze(1) >> self.shifts8.to(torch.int64)) & 1  # (256, 8)
        b = torch.arange(63, dtype=torch.int64, device=device).unsqueeze(1)
        k = torch.arange(MAX_RICE_K + 1, dtype=torch.int64, device=device).unsqueeze(0)
        self.pow2 = torch.where(b >= k, torch.ones((), dtype=torch.int64, device=device) << (b - k).clamp_min(0), 0)


_constants: Dict[torch.device, _Constants] = {}
_segments: Dict[Tuple[torch.device, Tuple[int, ...]], Tuple[Tensor, Tensor]] = {}


def _const(device: torch.device) -> _Constants:
    table = _constants.get(device)
    if table is None:
        table = _constants[device] = _Constants(device)
    return table


def _segment_tables(boundaries: Sequence[int], device: torch.device) -> Tuple[Tensor, Tensor]:
    """``(lengths, inner boundaries)`` of a bucket's segments on ``device`` (cached: copied once per bucket)."""
    key = (device, tuple(boundaries))
    hit = _segments.get(key)
    if hit is None:
        if len(_segments) > 256:
            _segments.clear()
        b = torch.tensor(key[1], dtype=torch.int64)
        hit = _segments[key] = (b.diff().to(device), b[1:-1].to(device))
    return hit


def _first_nonzero(mask: Tensor, size: int, fill: int) -> Tensor:
    """The first ``size`` indices where ``mask`` is set, padded with ``fill`` (no host read where torch has
    ``nonzero_static``)."""
    if hasattr(torch, "nonzero_static"):
        return torch.nonzero_static(mask, size=size, fill_value=fill).view(-1)
    found = torch.nonzero(mask).view(-1)[:size]
    return torch.cat([found, found.new_full((size - found.numel(),), fill)])


def _pack_bits(bits: Tensor) -> Tensor:
    """Bytes from a ``uint8`` tensor of 0/1 whose length is a multiple of 8 (least significant bit first)."""
    return (bits.view(-1, 8).to(torch.int32) << _const(bits.device).shifts8_i32).sum(1, dtype=torch.int32).to(
        torch.uint8)


def _unpack_bits(data: Tensor) -> Tensor:
    """The bits of ``uint8`` bytes, least significant first (8 per byte)."""
    return ((data.unsqueeze(1) >> _const(data.device).shifts8) & 1).reshape(-1)


def _rice_sums(gaps: Tensor, length: int) -> Tensor:
    """``sum_j (gaps_j >> k)`` for ``k = 0..MAX_RICE_K`` (int64), for non-negative ``gaps < length``, exactly.

    From byte histograms: ``C_b``, the number of gaps with bit ``b`` set, then ``sum_b C_b 2^(b - k)``.
    Every product is at most the sum of the gaps (< ``length``), so nothing overflows.
    """
    table = _const(gaps.device)
    width = 4 if length < 2**31 else 8
    as_bytes = gaps.to(torch.int32 if width == 4 else torch.int64).contiguous().view(torch.uint8).view(-1, width)
    hist = torch.stack([torch.bincount(as_bytes[:, j], minlength=256) for j in range(width)])  # (width, 256)
    counts = (hist.unsqueeze(2) * table.byte_bits).sum(1).reshape(-1)  # C_b, little-endian bytes
    nbits = max(1, int(length).bit_length())
    return (counts[:nbits].unsqueeze(1) * table.pow2[:nbits]).sum(0)


def _index_mode(count: int, last: int, sums: Sequence[int], length: int) -> Tuple[bool, int, int, int]:
    """``(delta, k, index bytes, unary bits)``: the reference's choice between Rice code and bitmap."""
    k, bits = codec.rice_search(count, last + 1 - count, lambda k: count * (k + 1) + sums[k])
    if (bits + 7) // 8 < (length + 7) // 8:  # a tie goes to the bitmap, as in the codec
        return True, k, (bits + 7) // 8, count + sums[k]
    return False, 0, (length + 7) // 8, 0


def _rice_section(gaps: Tensor, k: int, unary_bits: int, index_bytes: int) -> Tensor:
    """All unary quotients (``q`` ones, then a zero), then all ``k``-bit remainders, LSB first, packed."""
    device = gaps.device
    bits = torch.zeros(8 * index_bytes, dtype=torch.uint8, device=device)
    bits[:unary_bits] = 1
    ends = torch.cumsum((gaps >> k) + 1, 0) - 1
    bits.index_fill_(0, ends, 0)
    if k:
        shifts = torch.arange(k, dtype=gaps.dtype, device=device)
        low = ((gaps.unsqueeze(1) >> shifts) & 1).to(torch.uint8).reshape(-1)
        bits[unary_bits : unary_bits + low.numel()] = low
    return _pack_bits(bits)


def _bitmap_section(mask: Tensor) -> Tensor:
    bits = torch.zeros(8 * ((mask.numel() + 7) // 8), dtype=torch.uint8, device=mask.device)
    bits[: mask.numel()] = mask
    return _pack_bits(bits)


def _nibbles(codes: Tensor) -> Tensor:
    codes = codes.to(torch.uint8) & 0xF
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    pairs = codes.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def _assemble(value_format: str, delta: bool, k: int, count: int, scales: Tensor, index_section: Tensor,
              value_section: Tensor) -> Tensor:
    fmt = format_byte(value_format, DELTA if delta else BITMAP, k)
    head = _HEADER.pack(fmt, count, scales.numel(), index_section.numel())
    header = torch.tensor(list(head), dtype=torch.uint8).to(index_section.device, non_blocking=True)
    scale_bytes = scales.to(torch.float32).contiguous().view(torch.uint8)
    return torch.cat([header, scale_bytes, index_section, value_section])


def _empty(device: torch.device) -> Tuple[Tensor, Tensor, Tensor]:
    return (torch.zeros(0, dtype=torch.uint8, device=device), torch.zeros(0, dtype=torch.int64, device=device),
            torch.zeros(0, dtype=torch.float32, device=device))


def variance_select_4bit(
    r: Tensor, v: Tensor, *, alpha: float, zeta: float, boundaries: Optional[Tensor]
) -> Tuple[Tensor, Tensor, Tensor]:
    """The variance selection with 4-bit values on ``r``'s device; updates float32 ``r`` and ``v`` in place.

    Returns ``(payload, indices, quantised values)`` on the device, bit-identical to the reference
    (:func:`sturdy.compression.compressor.variance_select`). ``boundaries``: segment offsets (CPU).
    """
    device, n = r.device, r.numel()
    table = _const(device)
    if n == 0:
        return _empty(device)
    candidates = r != 0 if alpha == 0 else r * r > alpha * v
    mag = r.abs()
    chosen_mag = torch.where(candidates, mag, 0.0)
    positions = torch.arange(n, dtype=torch.int64, device=device)
    if boundaries is None or boundaries.numel() <= 2:
        scales = chosen_mag.amax().reshape(1)
        scale_of = scales
    else:
        lengths, inner = _segment_tables(boundaries.tolist(), device)
        scales = torch.segment_reduce(chosen_mag, "max", lengths=lengths, unsafe=True, initial=0.0)
        scale_of = scales[torch.searchsorted(inner, positions, right=True)]
    mant_s, exp_s = torch.frexp(scale_of)
    # the largest level scale 2^-e <= |r| (exact, no logarithm; see codec.quantize_down)
    mant_v, exp_v = torch.frexp(mag)
    exponent = (exp_s - exp_v + (mant_s > mant_v).to(torch.int32)).clamp_(min=0)
    sent = candidates & (exponent < NUM_LEVELS) & (mag > 0)
    exponent.clamp_(max=NUM_LEVELS - 1)
    negative = r < 0
    quantised = scale_of * table.levels[exponent.long()]
    quantised = torch.where(negative, -quantised, quantised)
    codes = exponent.to(torch.uint8) | (negative.to(torch.uint8) << 3)
    r.sub_(torch.where(sent, quantised, 0.0))  # r - q where sent, r - 0 == r elsewhere
    v.mul_(zeta).masked_fill_(sent, 0.0)
    # gaps in place: the previous sent index from a running maximum
    previous = torch.cummax(torch.where(sent, positions, -1), 0).values
    gaps = torch.where(sent, positions - torch.cat([previous.new_full((1,), -1), previous[:-1]]) - 1, 0)
    host = torch.cat([sent.sum().reshape(1), previous[-1:], _rice_sums(gaps, n)]).tolist()  # the one sync
    count, last, sums = host[0], host[1], host[2:]
    if count == 0:
        return _empty(device)
    indices = _first_nonzero(sent, count, 0)
    delta, k, index_bytes, unary_bits = _index_mode(count, last, sums, n)
    index_section = _rice_section(gaps[indices], k, unary_bits, index_bytes) if delta else _bitmap_section(sent)
    payload = _assemble("4bit", delta, k, count, scales, index_section, _nibbles(codes[indices]))
    return payload, indices, quantised[indices]


def encode(indices: Tensor, values: Tensor, *, length: int, value_format: str, scales: Tensor) -> Tensor:
    """:func:`sturdy.compression.codec.encode_unchecked` on ``indices``'s device (same bytes).

    ``indices``: sorted int64 on the device; ``values`` as for the codec (codes for ``4bit``);
    ``scales``: float32 (one for ``sign``, none for ``float32``).
    """
    device, count = indices.device, indices.numel()
    if count == 0:
        return torch.zeros(0, dtype=torch.uint8, device=device)
    indices = indices.to(torch.int64)
    gaps = indices - torch.cat([indices.new_full((1,), -1), indices[:-1]]) - 1
    host = torch.cat([indices[-1:], _rice_sums(gaps, length)]).tolist()  # the one sync
    delta, k, index_bytes, unary_bits = _index_mode(count, host[0], host[1:], length)
    if delta:
        index_section = _rice_section(gaps, k, unary_bits, index_bytes)
    else:
        bits = torch.zeros(8 * index_bytes, dtype=torch.uint8, device=device)
        bits[indices] = 1
        index_section = _pack_bits(bits)
    values = values.reshape(-1).to(device)
    if value_format == "float32":
        value_section = values.to(torch.float32).contiguous().view(torch.uint8)
    elif value_format == "4bit":
        value_section = _nibbles(values.to(torch.int64))
    else:
        value_section = _bitmap_section(values < 0)
    return _assemble(value_format, delta, k, count, scales.to(device), index_section, value_section)


def _header_of(payload: Tensor, header: Optional[bytes]) -> bytes:
    if header is not None:
        return header
    return bytes(payload[:HEADER_BYTES].cpu().tolist())


def _decode(out: Tensor, payload: Tensor, boundaries: Optional[Tensor], header: Optional[bytes]
            ) -> Tuple[Tensor, Tensor, Tensor]:
    """``(indices, values, ok)`` of a non-empty payload on ``out``'s device; header errors raise here."""
    length, size, device = out.numel(), payload.numel(), out.device
    h = codec.parse_header(_header_of(payload, header), size, length)
    inner = None
    if h.value_format == "4bit" and h.num_scales > 1:
        if boundaries is None or boundaries.numel() != h.num_scales + 1:
            raise DataError(f"payload has {h.num_scales} scales: decode needs the {h.num_scales + 1} segment "
                            "boundaries")
        inner = _segment_tables(boundaries.tolist(), device)[1]
    payload = payload.reshape(-1).to(device)
    section = payload[h.index_start : h.value_start]
    count, k = h.count, h.rice_k
    if h.delta:
        if count * k > 8 * section.numel():
            raise DataError(f"corrupt payload: index section of {section.numel()} bytes does not hold {count} "
                            "Rice codes")
        bits = _unpack_bits(section)
        ends = _first_nonzero(bits[: bits.numel() - count * k] == 0, count, -1)
        unary_bits = ends[-1] + 1
        ok = (unary_bits > 0) & ((unary_bits + count * k + 7) // 8 == section.numel())
        gaps = ends - torch.cat([ends.new_full((1,), -1), ends[:-1]]) - 1
        if k:
            where = unary_bits + torch.arange(count * k, device=device).view(count, k)
            low = bits[where.clamp_(0, max(0, bits.numel() - 1))].to(torch.int64)
            gaps = (gaps << k) | (low << torch.arange(k, device=device)).sum(1)
        indices = torch.cumsum(gaps + 1, 0) - 1
        ok &= indices[-1] < length
    else:
        bits = _unpack_bits(section)[:length]
        indices = _first_nonzero(bits, count, 0)
        ok = bits.sum() == count
    values_bytes = payload[h.value_start :]
    scales = payload[HEADER_BYTES : h.index_start].clone().view(torch.float32)
    if h.value_format == "float32":
        values = values_bytes.clone().view(torch.float32)
    elif h.value_format == "4bit":
        codes = torch.stack([values_bytes & 0xF, values_bytes >> 4], 1).reshape(-1)[:count]
        scale = scales if inner is None else scales[torch.searchsorted(inner, indices, right=True).clamp_(
            0, h.num_scales - 1)]
        values = scale * _const(device).levels[(codes & 7).long()]
        values = torch.where((codes & 8) != 0, -values, values)
    else:
        negative = _unpack_bits(values_bytes)[:count] != 0
        values = torch.where(negative, -scales[0], scales[0])
    return indices, values, ok


def corrupt_error(payload: Tensor, length: int, boundaries: Optional[Tensor]) -> DataError:
    """The reference decoder's error for a payload the device decoder refused (same message where it has one)."""
    try:
        codec.decode(payload.cpu(), length=length, boundaries=None if boundaries is None else boundaries.cpu())
    except DataError as exc:
        return exc
    return DataError("corrupt payload: its index section does not decode")


def decode_add_(out: Tensor, payload: Tensor, *, boundaries: Optional[Tensor] = None,
                header: Optional[bytes] = None) -> Tensor:
    """:func:`sturdy.compression.codec.decode_add_` in torch operations on ``out``'s device.

    A corrupt payload raises :class:`~sturdy.errors.DataError` and leaves ``out`` unchanged (one
    device-to-host read of the validity flag). ``header``: the payload's first bytes when the caller
    already has them on the host.
    """
    if payload.numel() == 0:
        return out
    indices, values, ok = _decode(out, payload, boundaries, header)
    if not bool(ok):
        raise corrupt_error(payload, out.numel(), boundaries)
    out.index_add_(0, indices, values.to(out.dtype))
    return out


def decode_add_unchecked(out: Tensor, payload: Tensor, *, boundaries: Optional[Tensor] = None,
                         header: Optional[bytes] = None) -> Tensor:
    """Like :func:`decode_add_` without reading the validity flag: returns it (a bool on the device).

    Header errors still raise. When the flag is false, ``out`` holds garbage (never an out-of-range
    write): the caller must check the flag and discard ``out``.
    """
    if payload.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=out.device)
    indices, values, ok = _decode(out, payload, boundaries, header)
    if out.numel():
        out.index_add_(0, indices.clamp(0, out.numel() - 1), values.to(out.dtype))
    return ok


codec.use_device_codec(sys.modules[__name__])
