"""Compiled (numba) versions of the variance hook's per-step CPU work; load through :mod:`.accel`.

Each kernel returns bit-identical results to the numpy reference path
(:func:`sturdy.compression.compressor.variance_select` with :func:`sturdy.compression.codec.quantize_down`,
and :func:`sturdy.compression.codec.decode`);
``tests/compression/test_compression_accel.py`` compares them. Importing this module imports numba.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import numba
import numpy as np

from sturdy.compression.wire import BITMAP, DELTA, HEADER_BYTES, MAX_RICE_K, NUM_LEVELS, VALUE_FORMATS

FORMAT_4BIT = VALUE_FORMATS.index("4bit")

_jit = numba.njit(cache=True, nogil=True)


@_jit
def _rice_bits(gaps, count, k):
    quotients = 0
    for j in range(count):
        quotients += gaps[j] >> k
    return count * (k + 1) + quotients


@_jit
def _rice_parameter(gaps, count, total):
    """Same search as ``codec._rice_parameter`` (local search from log2 of the mean gap)."""
    mean = total // count
    start = -1
    while mean > 0:
        mean >>= 1
        start += 1
    k = min(MAX_RICE_K, max(0, start))
    bits = _rice_bits(gaps, count, k)
    for step in (-1, 1):
        moved = False
        while 0 <= k + step <= MAX_RICE_K:
            trial = _rice_bits(gaps, count, k + step)
            if trial >= bits:
                break
            k, bits, moved = k + step, trial, True
        if moved:
            break
    return k, bits


@_jit
def _put_int32(out, at, value):
    for b in range(4):
        out[at + b] = (value >> (8 * b)) & 0xFF


@_jit
def _select_encode(r, v, alpha, zeta, send_nonzero, edges):
    n = r.size
    segments = edges.size - 1
    # pass 1 counts the candidates (vectorised); pass 2 lists them without a branch and decays v
    count = 0
    if send_nonzero:
        for i in range(n):
            count += r[i] != 0
    else:
        for i in range(n):
            count += r[i] * r[i] > alpha * v[i]
    candidates = np.empty(count + 1, dtype=np.int64)
    found = 0
    if send_nonzero:
        for i in range(n):
            candidates[found] = i
            found += r[i] != 0
            v[i] *= zeta
    else:
        for i in range(n):
            candidates[found] = i
            found += r[i] * r[i] > alpha * v[i]
            v[i] *= zeta
    scales = np.zeros(segments, dtype=np.float32)  # per segment: the largest candidate |r|
    s = 0
    for j in range(count):
        i = candidates[j]
        while i >= edges[s + 1]:
            s += 1
        scales[s] = max(scales[s], abs(r[i]))
    indices = np.empty(count, dtype=np.int64)
    codes = np.empty(count, dtype=np.uint8)
    quantised = np.empty(count, dtype=np.float32)
    kept = 0
    s = 0
    m_s, e_s = math.frexp(np.float64(scales[0])) if segments else (0.0, 0)
    for j in range(count):  # the largest level <= |r| (never rounded up); update r and v
        i = candidates[j]
        if i >= edges[s + 1]:
            while i >= edges[s + 1]:
                s += 1
            m_s, e_s = math.frexp(np.float64(scales[s]))
        x = r[i]
        mag = abs(x)
        m_v, e_v = math.frexp(np.float64(mag))
        exponent = max(0, e_s - e_v + (1 if m_s > m_v else 0))
        if exponent >= NUM_LEVELS or not mag > 0:
            continue  # below the smallest level: stays in the residual
        q = np.float32(math.ldexp(np.float64(scales[s]), -exponent))
        code = exponent
        if x < 0:
            q = -q
            code |= 8
        r[i] = x - q
        v[i] = 0
        indices[kept] = i
        codes[kept] = code
        quantised[kept] = q
        kept += 1
    if kept == 0:
        return np.zeros(0, dtype=np.uint8), indices[:0], quantised[:0]
    gaps = np.empty(kept, dtype=np.int64)
    gaps[0] = indices[0]
    for j in range(1, kept):
        gaps[j] = indices[j] - indices[j - 1] - 1
    k, bits = _rice_parameter(gaps, kept, indices[kept - 1] + 1 - kept)
    bitmap_bytes = (n + 7) // 8
    delta = (bits + 7) // 8 < bitmap_bytes  # a tie goes to the bitmap, as in the codec
    index_bytes = (bits + 7) // 8 if delta else bitmap_bytes
    if not delta:
        k = 0
    start = HEADER_BYTES + 4 * segments
    values_at = start + index_bytes
    payload = np.zeros(values_at + (kept + 1) // 2, dtype=np.uint8)
    payload[0] = FORMAT_4BIT | ((DELTA if delta else BITMAP) << 2) | (k << 3)
    _put_int32(payload, 1, kept)
    _put_int32(payload, 5, segments)
    _put_int32(payload, 9, index_bytes)
    payload[HEADER_BYTES:start] = scales.view(np.uint8)
    if delta:  # all unary quotients (q ones, then a zero), then all k-bit remainders, LSB first
        pos = 0
        for j in range(kept):
            for _ in range(gaps[j] >> k):
                payload[start + (pos >> 3)] |= 1 << (pos & 7)
                pos += 1
            pos += 1
        for j in range(kept):
            for b in range(k):
                if (gaps[j] >> b) & 1:
                    payload[start + (pos >> 3)] |= 1 << (pos & 7)
                pos += 1
    else:
        for j in range(kept):
            i = indices[j]
            payload[start + (i >> 3)] |= 1 << (i & 7)
    for j in range(kept):
        payload[values_at + (j >> 1)] |= codes[j] << (4 * (j & 1))
    return payload, indices[:kept].copy(), quantised[:kept].copy()


@_jit
def _decode_add(out, index_section, delta, k, count, length, scales, inner, value_section):
    indices = np.empty(count, dtype=np.int64)
    if delta:
        unary_limit = 8 * index_section.size - count * k
        found = 0
        pos = 0
        quotient = 0
        while pos < unary_limit and found < count:
            if (index_section[pos >> 3] >> (pos & 7)) & 1:
                quotient += 1
            else:
                indices[found] = quotient
                found += 1
                quotient = 0
            pos += 1
        if found != count or (pos + count * k + 7) // 8 != index_section.size:
            return 1
        previous = -1
        for j in range(count):
            if indices[j] > (length >> k):  # a gap past the vector's end (and no int64 overflow below)
                return 2
            low = 0
            for b in range(k):
                bit = pos + j * k + b
                low |= ((index_section[bit >> 3] >> (bit & 7)) & 1) << b
            previous += ((indices[j] << k) | low) + 1
            indices[j] = previous
        if indices[count - 1] >= length:
            return 2
    else:
        found = 0
        for byte in range(index_section.size):
            bits = index_section[byte]
            if bits == 0:
                continue
            for b in range(8):
                if (bits >> b) & 1:
                    i = 8 * byte + b
                    if i >= length:  # padding bits past the vector are ignored, as by the codec
                        break
                    if found == count:
                        return 3
                    indices[found] = i
                    found += 1
        if found != count:
            return 3
    segment = 0
    for j in range(count):
        i = indices[j]
        while segment < inner.size and i >= inner[segment]:
            segment += 1
        code = (value_section[j >> 1] >> (4 * (j & 1))) & 0xF
        value = np.float32(math.ldexp(np.float64(scales[segment]), -(code & 7)))
        if code & 8:
            value = -value
        out[i] += value
    return 0


def select_encode_4bit(
    r: np.ndarray, v: np.ndarray, *, alpha: float, zeta: float, edges: np.ndarray
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Variance selection with 4-bit values and its payload; updates float32 ``r`` and ``v`` in place.

    Returns ``(payload, indices, quantised values)`` exactly as the numpy path computes them.
    ``edges``: segment offsets ``[0, ..., n]``.
    """
    return _select_encode(
        r, v, np.float32(alpha), np.float32(zeta), alpha == 0, np.ascontiguousarray(edges, dtype=np.int64)
    )


_NO_EDGES = np.zeros(0, dtype=np.int64)


def decode_add_4bit(
    out: np.ndarray,
    index_section: np.ndarray,
    *,
    delta: bool,
    k: int,
    count: int,
    scales: np.ndarray,
    inner: Optional[np.ndarray],
    value_section: np.ndarray,
) -> int:
    """Add the values of a 4-bit payload into the flat ``out`` (its header checked by the caller).

    ``inner``: the inner segment boundaries (``None`` for one scale). Returns 0, or a nonzero code when
    the index section is corrupt; ``out`` is then unchanged.
    """
    return int(
        _decode_add(
            out, index_section, delta, k, count, out.size, scales,
            _NO_EDGES if inner is None else np.ascontiguousarray(inner, dtype=np.int64), value_section,
        )
    )
