"""Selection rules with error feedback, on flat vectors (one call per gradient bucket and step).

Every rule takes the residual ``r`` (already holding ``r + g``), updates it in place so that
``sent + r_after == r_before`` element by element (error feedback: nothing is lost), and returns the
encoded payload (:mod:`sturdy.compression.codec`) plus what was sent.

* :func:`variance_select` (Tsuzuku et al. 2018): send element ``i`` iff ``r_i^2 > alpha * v_i``;
  sent elements reset ``v_i = 0``, all others decay ``v_i *= zeta``. With 4-bit values (one scale
  per parameter: its largest sent ``|r|``) an element below the smallest level ``scale * 2^-7``
  is *not* sent and keeps its residual (it decays
  like any unsent element) *(choice)*: rounding it up would overshoot and flip the residual's sign.
* :func:`strom_select` (Strom 2015): send ``+-tau`` where ``|r_i| > tau``.
* :func:`topk_select`: send the ``k = ceil(ratio * n)`` largest ``|r_i|`` as float32.

:func:`warm_up` compiles (or loads) the optional kernels of :mod:`~sturdy.compression.accel` once per
process, before the first step's collective.

Paths: CUDA buffers select and encode on the device (:mod:`~sturdy.compression.device_codec`, same bits;
the byte-budgeted selection stays on the host); CPU buffers use the compiled kernels when numba is
installed, else numpy. ``STURDY_DEVICE_CODEC=1`` forces the device path everywhere (tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from sturdy.compression import accel, codec, device_codec
from sturdy.compression.wire import HEADER_BYTES
from sturdy.errors import ConfigurationError

__all__ = ["Selection", "variance_select", "strom_select", "topk_select", "max_payload_bytes", "warm_up"]

_NO_SCALES = torch.zeros(0, dtype=torch.float32)


@dataclass(frozen=True)
class Selection:
    """What one rank sends for one bucket.

    Attributes:
        payload: the encoded message (``uint8``, empty when nothing is sent; on the CPU, or on the
            bucket's device where :mod:`~sturdy.compression.device_codec` encoded it).
        indices: sorted int64 indices sent (on ``r``'s device).
        values: the values exactly as the receiver decodes them (``r``'s dtype and device).
        wanted_bytes: the payload size before truncation to a byte budget (``max_bytes`` of
            :func:`variance_select`); the payload's own size when nothing was truncated.
    """

    payload: Tensor
    indices: Tensor
    values: Tensor
    wanted_bytes: int

    @property
    def count(self) -> int:
        """Number of elements sent."""
        return int(self.indices.numel())


def _empty(r: Tensor) -> Selection:
    return Selection(
        torch.zeros(0, dtype=torch.uint8),
        torch.zeros(0, dtype=torch.int64, device=r.device),
        torch.zeros(0, dtype=r.dtype, device=r.device),
        0,
    )


def variance_select(
    r: Tensor,
    v: Tensor,
    *,
    alpha: float,
    zeta: float,
    quantize: Optional[str],
    boundaries: Optional[Tensor] = None,
    max_bytes: Optional[int] = None,
) -> Selection:
    """Variance-based selection: send ``i`` iff ``r_i^2 > alpha * v_i``; updates ``r`` and ``v`` in place.

    Args:
        r: residual plus this step's mean gradient, 1-D.
        v: accumulated second moments ``sum s_i`` of the same shape.
        alpha: threshold factor, ``>= 0`` (``alpha = 0`` sends every nonzero element).
        zeta: decay of ``v`` for unsent elements, in ``[0, 1]``.
        quantize: ``"4bit"`` or ``None`` (float32 values).
        boundaries: segment offsets ``[0, ..., n]`` (one segment per parameter); the 4-bit scale is
            the largest sent ``|r|`` of each segment. ``None``: one segment.
        max_bytes: payload budget; when the selection does not fit, only the elements with the largest
            ``r_i^2 / v_i`` are sent and the others stay in the residual, unsent (``v`` decays).
            ``Selection.wanted_bytes`` reports the size the full selection would have had.
    """
    whole = _variance_select_4bit_whole(r, v, alpha=alpha, zeta=zeta, quantize=quantize,
                                        boundaries=boundaries, max_bytes=max_bytes)
    if whole is not None:
        return whole
    indices = torch.nonzero(_candidates(r, v, alpha)).flatten()
    v.mul_(zeta)
    if indices.numel() == 0:
        return _empty(r)
    values = r[indices]
    if quantize is None and max_bytes is None and device_codec.enabled_for(r.device):
        return _send_float32_on_device(r, v, indices, values)
    wire = _quantise_4bit_host(r, indices, values, boundaries) if quantize == "4bit" else _float32_wire(indices, values)
    if wire is None:
        return _empty(r)
    payload = _encode_wire(wire, length=r.numel())
    wanted = int(payload.numel())
    if max_bytes is not None and wanted > max_bytes:
        fitted = _fit_to_budget(r, v, payload, wire, max_bytes)
        if fitted is None:
            return Selection(torch.zeros(0, dtype=torch.uint8), wire.indices[:0], wire.sent[:0], wanted)
        payload, wire = fitted
    r.index_add_(0, wire.indices, -wire.sent)
    if quantize is None:
        r.index_fill_(0, wire.indices, 0.0)  # exact: r - r
    v.index_fill_(0, wire.indices, 0.0)
    return Selection(payload, wire.indices, wire.sent, wanted)


@dataclass(frozen=True)
class _Wire:
    """A selection ready to encode: its indices (on ``r``'s device and on the CPU), the values as the
    receiver decodes them, and the values, format and scales as they go on the wire."""

    indices: Tensor
    idx_cpu: Tensor
    sent: Tensor
    wire_values: Tensor
    fmt: str
    scales: Tensor


def _variance_select_4bit_whole(
    r: Tensor,
    v: Tensor,
    *,
    alpha: float,
    zeta: float,
    quantize: Optional[str],
    boundaries: Optional[Tensor],
    max_bytes: Optional[int],
) -> Optional[Selection]:
    """4-bit values without a byte budget in one call (device codec or CPU kernels); ``None``: no such path."""
    if quantize != "4bit" or max_bytes is not None:
        return None
    if device_codec.enabled_for(r.device) and r.dtype == v.dtype == torch.float32:
        payload, idx, quantised = device_codec.variance_select_4bit(r, v, alpha=alpha, zeta=zeta,
                                                                    boundaries=boundaries)
        return Selection(payload, idx, quantised, int(payload.numel())) if idx.numel() else _empty(r)
    if r.device.type == "cpu" and v.device.type == "cpu":
        return _variance_select_cpu(r, v, alpha=alpha, zeta=zeta, boundaries=boundaries)
    return None


def _candidates(r: Tensor, v: Tensor, alpha: float) -> Tensor:
    """The mask of elements the variance rule sends (``alpha = 0``: every nonzero element)."""
    if alpha == 0:
        return r != 0
    return r * r > alpha * v


def _send_float32_on_device(r: Tensor, v: Tensor, indices: Tensor, values: Tensor) -> Selection:
    """Float32 values without a byte budget, encoded on the device; resets ``r`` and ``v`` at ``indices``."""
    payload = device_codec.encode(indices, values, length=r.numel(), value_format="float32", scales=_NO_SCALES)
    r.index_fill_(0, indices, 0.0)  # exact: r - r
    v.index_fill_(0, indices, 0.0)
    return Selection(payload, indices, values, int(payload.numel()))


def _float32_wire(indices: Tensor, values: Tensor) -> _Wire:
    return _Wire(indices, indices.cpu(), values, values.cpu(), "float32", _NO_SCALES)


def _quantise_4bit_host(r: Tensor, indices: Tensor, values: Tensor, boundaries: Optional[Tensor]) -> Optional[_Wire]:
    """4-bit codes on the CPU in numpy (a few thousand values, many small operations); elements below the
    smallest level are dropped (``None`` when none is left)."""
    idx_cpu = indices.cpu()
    idx_np, val_np = idx_cpu.numpy(), values.detach().to("cpu", torch.float32).numpy()
    if boundaries is None:
        segments = np.zeros(idx_np.size, dtype=np.int64)
        scales_np = np.abs(val_np).max(keepdims=True)
    else:
        segments = np.searchsorted(boundaries.numpy()[1:-1], idx_np, side="right")
        scales_np = np.zeros(boundaries.numel() - 1, dtype=np.float32)
        np.maximum.at(scales_np, segments, np.abs(val_np))
    codes_np, quantised_np, ok = codec.quantize_down(val_np, scales_np, segments)
    if not ok.all():
        keep_np = np.flatnonzero(ok)
        if keep_np.size == 0:
            return None
        keep = torch.from_numpy(keep_np)
        indices, idx_cpu = indices[keep.to(indices.device)], idx_cpu[keep]
        codes_np, quantised_np = codes_np[keep_np], quantised_np[keep_np]
    sent = torch.from_numpy(quantised_np).to(r.device, r.dtype)
    return _Wire(indices, idx_cpu, sent, torch.from_numpy(codes_np), "4bit", torch.from_numpy(scales_np))


def _encode_wire(wire: _Wire, *, length: int) -> Tensor:
    return codec.encode_unchecked(wire.idx_cpu, wire.wire_values, length=length, value_format=wire.fmt,
                                  scales=wire.scales)


def _fit_to_budget(
    r: Tensor, v: Tensor, payload: Tensor, wire: _Wire, max_bytes: int
) -> Optional[Tuple[Tensor, _Wire]]:
    """Keeps the elements with the largest ``r_i^2 / v_i`` until the payload fits ``max_bytes``;
    ``None`` when nothing fits."""
    fixed = HEADER_BYTES + 4 * wire.scales.numel()
    priority = r[wire.indices] ** 2 / v[wire.indices].clamp_min(torch.finfo(v.dtype).tiny)
    while payload.numel() > max_bytes:
        keep = int(wire.indices.numel() * (max_bytes - fixed) / max(1, payload.numel() - fixed) * 0.95)
        if keep <= 0:
            return None
        chosen = torch.topk(priority, keep, sorted=False).indices.sort().values
        priority = priority[chosen]
        indices, sent = wire.indices[chosen], wire.sent[chosen]
        chosen = chosen.cpu()
        wire = replace(wire, indices=indices, sent=sent, idx_cpu=wire.idx_cpu[chosen],
                       wire_values=wire.wire_values[chosen])
        payload = _encode_wire(wire, length=r.numel())
    return payload, wire


def _variance_select_cpu(r: Tensor, v: Tensor, *, alpha: float, zeta: float, boundaries: Optional[Tensor]) -> Selection:
    """:func:`variance_select` with 4-bit values and no byte budget, in numpy on the CPU (same results).

    Works on numpy views of ``r`` and ``v`` (no copy): a bucket is a few ten thousand elements, where
    numpy's per-call cost is a fraction of torch's. With :mod:`~sturdy.compression.accel`'s compiled
    kernels (float32 buffers) the whole selection and encoding is one call.
    """
    rn, vn = r.detach().numpy(), v.detach().numpy()
    compiled = accel.kernels()
    if compiled is not None and rn.dtype == np.float32 and vn.dtype == np.float32:
        one_segment = boundaries is None or boundaries.numel() <= 2
        edges = np.array([0, rn.size]) if one_segment else boundaries.numpy()
        payload, idx, quantised = compiled.select_encode_4bit(rn, vn, alpha=alpha, zeta=zeta, edges=edges)
        if idx.size == 0:
            return _empty(r)
        return Selection(torch.from_numpy(payload), torch.from_numpy(idx), torch.from_numpy(quantised), payload.size)
    if alpha == 0:
        idx = np.flatnonzero(rn)
    else:
        idx = np.flatnonzero(rn * rn > alpha * vn)
    vn *= zeta
    if idx.size == 0:
        return _empty(r)
    val = rn[idx].astype(np.float32, copy=False)
    mag = np.abs(val)
    if boundaries is None or boundaries.numel() <= 2:
        segments = None
        scales = mag.max(keepdims=True)
    else:  # indices are sorted: each segment is a contiguous run, its scale a reduceat of that run
        edges = boundaries.numpy()
        starts = np.searchsorted(idx, edges[:-1])
        nonempty = starts < np.searchsorted(idx, edges[1:])
        scales = np.zeros(edges.size - 1, dtype=np.float32)
        scales[nonempty] = np.maximum.reduceat(mag, starts[nonempty])
        segments = np.searchsorted(edges[1:-1], idx, side="right")
    codes, quantised, ok = codec.quantize_down(val, scales, segments)
    if not ok.all():
        keep = np.flatnonzero(ok)
        if keep.size == 0:
            return _empty(r)
        idx, codes, quantised = idx[keep], codes[keep], quantised[keep]
    rn[idx] -= quantised.astype(rn.dtype, copy=False)  # r - q, as r.index_add_(-q) computes it
    vn[idx] = 0
    indices = torch.from_numpy(idx)
    payload = codec.encode_unchecked(indices, torch.from_numpy(codes), length=rn.size, value_format="4bit",
                                     scales=torch.from_numpy(scales))
    return Selection(payload, indices, torch.from_numpy(quantised).to(r.dtype), int(payload.numel()))


def _encode(indices: Tensor, values: Tensor, *, length: int, value_format: str, scales: Tensor) -> Tensor:
    """Encode on ``indices``'s device when the device path takes it, else on the CPU (same bytes)."""
    if device_codec.enabled_for(indices.device):
        return device_codec.encode(indices, values, length=length, value_format=value_format, scales=scales)
    return codec.encode_unchecked(indices.cpu(), values.cpu(), length=length, value_format=value_format,
                                  scales=scales)


def max_payload_bytes(length: int, *, value_format: str, num_scales: int) -> int:
    """Largest payload :func:`~sturdy.compression.codec.encode` can produce for a vector of ``length``."""
    values = codec.value_section_bytes(length, value_format)
    return HEADER_BYTES + 4 * num_scales + (length + 7) // 8 + values


def strom_select(r: Tensor, *, tau: float) -> Selection:
    """Strom's threshold method: send ``sign(r_i) * tau`` where ``|r_i| > tau``; updates ``r``."""
    indices = torch.nonzero(r.abs() > tau).flatten()
    if indices.numel() == 0:
        return _empty(r)
    signs = r[indices]
    tau32 = float(torch.tensor(tau, dtype=torch.float32))  # the receiver decodes a float32 magnitude
    sent = torch.where(signs < 0, -tau32, tau32).to(r.dtype)
    payload = _encode(indices, signs, length=r.numel(), value_format="sign",
                      scales=torch.tensor([tau32], dtype=torch.float32))
    r.index_add_(0, indices, -sent)
    return Selection(payload, indices, sent, int(payload.numel()))


def topk_select(r: Tensor, *, ratio: float) -> Selection:
    """Top-k with error feedback: send the ``ceil(ratio * n)`` largest ``|r_i|`` exactly; updates ``r``."""
    n = r.numel()
    if n == 0:
        return _empty(r)
    k = min(n, max(1, math.ceil(ratio * n)))
    indices = torch.topk(r.abs(), k, sorted=False).indices.sort().values
    values = r[indices]
    keep = values != 0
    indices, values = indices[keep], values[keep]
    if indices.numel() == 0:
        return _empty(r)
    payload = _encode(indices, values, length=n, value_format="float32", scales=_NO_SCALES)
    r.index_fill_(0, indices, 0.0)
    return Selection(payload, indices, values.clone(), int(payload.numel()))


def validate_rate(name: str, value: float, *, low: float, high: float, hint: str) -> float:
    """Check ``low <= value <= high`` (floats, finite) and return it as float."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ConfigurationError(f"{name} must be a finite number, got {value!r}; {hint}")
    if not low <= value <= high:
        raise ConfigurationError(f"{name} must lie in [{low}, {high}], got {value}; {hint}")
    return float(value)


_warmed: List[bool] = []


def warm_up() -> bool:
    """Compile (or load from numba's cache) the kernels for float32 buffers; returns :func:`accel.available`.

    Runs a tiny selection and decoding through the hook's own entry points, once per process. Worker
    processes started afterwards load the cached code instead of each compiling it.
    """
    if accel.kernels() is None:
        return False
    if not _warmed:
        boundaries = torch.tensor([0, 2, 4])
        selection = variance_select(torch.tensor([1.0, 0.0, -0.25, 2.0]), torch.zeros(4), alpha=1.0, zeta=0.5,
                                    quantize="4bit", boundaries=boundaries)
        codec.decode_add_(torch.zeros(4), selection.payload, boundaries=boundaries)
        _warmed.append(True)
    return True
