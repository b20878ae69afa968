"""Operator norms: guaranteed float64 upper bounds and power-iteration estimates.

* :func:`guaranteed_norm` returns an upper bound of ``||A||_2`` that is safe against rounding:
  exact dense SVD (in float64) when the dense matrix is small, else a structured bound: the
  circulant/FFT bound of Sedghi et al. (2019) for convolutions, the Hoelder bound
  ``sqrt(||A||_1 ||A||_inf)`` for non-negative operators (pooling), the closed form for diagonal
  maps. Every value is multiplied by a documented safety factor (see ``*_SAFETY`` constants).
* :func:`power_iteration` returns an estimate (a lower bound up to rounding) of ``||A||_2``.

Both take a :class:`~sturdy.lipschitz.operators.LinearOp`; :func:`conv2d_fft_norm`,
:func:`dense_spectral_norm` and :func:`padding_multiplicity` work on plain tensors and sizes.

Conventions: L2 operator norm of the map on flattened per-sample tensors.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional, Tuple

import torch
import torch.nn.functional as F

from sturdy.errors import UnsupportedModuleError

if TYPE_CHECKING:  # operators.py builds on this module; the type is only needed for annotations
    from sturdy.lipschitz.operators import LinearOp

__all__ = [
    "DENSE_MAX_ENTRIES",
    "DENSE_SAFETY",
    "FFT_SAFETY",
    "FFT_ABS_SAFETY",
    "guaranteed_norm",
    "dense_spectral_norm",
    "conv2d_fft_norm",
    "padding_multiplicity",
    "power_iteration",
]

DENSE_MAX_ENTRIES = 1 << 22  # dense matrices up to 4M entries (32 MiB in float64) get an exact SVD
# Relative safety of a float64 SVD: LAPACK's backward error is p(n) * eps * ||A|| with eps = 2.2e-16;
# 1e-9 covers p(n) up to ~4e6.
DENSE_SAFETY = 1.0 + 1e-9
# FFT path: float64 FFT error per entry <= c log2(N) eps sum|w| (tiny); SVD as above.
FFT_SAFETY = 1.0 + 1e-9
FFT_ABS_SAFETY = 1e-12  # times sqrt(C_out C_in) * sum|w|, covers the FFT's absolute rounding error


def dense_spectral_norm(matrix: torch.Tensor) -> float:
    """Largest singular value of a dense matrix, computed in float64 (no safety factor)."""
    m = matrix.to(torch.float64)
    if m.numel() == 0:
        return 0.0
    return float(torch.linalg.matrix_norm(m, ord=2))


def _polyphase_axis(
    n: int, k: int, stride: int, dilation: int, pad_lo: int, pad_hi: int
) -> Tuple[list, list, int, int]:
    """Per-axis polyphase form of ``y[i] = sum_t w_t x[i s + t d - p]``: tap ``t`` reads phase
    ``r_t = (t d - p) mod s`` at offset ``a_t = (t d - p) // s`` of ``x_r[m] = x[m s + r]``.

    Returns ``(phase, offset, m, size)``: the taps' phases and offsets, the phase length
    ``ceil(n / s)`` and a circulant size ``N`` for which the operator is a crop of the circulant.
    """
    q = [t * dilation - pad_lo for t in range(k)]
    phase = [v % stride for v in q]
    offset = [v // stride for v in q]
    m = -(-n // stride)
    out = (n + pad_lo + pad_hi - dilation * (k - 1) - 1) // stride + 1
    a_min, a_max = min(offset), max(offset)
    # row i, tap t reads phase column i + a_t; wrapped indices must never land on a real column [0, m)
    size = max(m + max(0, -a_min), out + max(0, a_max), a_max - a_min + 1, 1)
    return phase, offset, m, size


def conv2d_fft_norm(
    weight: torch.Tensor,
    *,
    input_hw: Tuple[int, int],
    pads: Tuple[int, int, int, int],
    dilation: Tuple[int, int] = (1, 1),
    groups: int = 1,
    stride: Tuple[int, int] = (1, 1),
    max_chunk_entries: int = 1 << 24,
) -> float:
    """Guaranteed upper bound of the L2 norm of a zero-padded 2-D convolution.

    A stride ``s`` is handled exactly by the polyphase decomposition: splitting the input into its
    ``s_h s_w`` phase images (a permutation) turns the strided convolution into a stride-1
    convolution with ``C_in s_h s_w`` input channels on the phase grid. That zero-padded stride-1
    convolution is a crop (rows and columns) of the circular convolution on ``N_h x N_w`` (``N``
    from :func:`_polyphase_axis`, large enough that no wrapped tap reaches a real input); cropping
    never increases the norm, and the circular multi-channel convolution is block-diagonalised by the
    2-D DFT (Sedghi et al. 2019), so its norm is the maximum over frequencies of
    ``sigma_max(K_hat[a, b])`` (``C_out/g x C_in s_h s_w/g`` per group). Computed in float64 with
    :data:`FFT_SAFETY` and :data:`FFT_ABS_SAFETY`.

    Args:
        weight: ``(C_out, C_in / groups, k_h, k_w)``.
        input_hw: spatial input size ``(H, W)``.
        pads: ``(top, bottom, left, right)`` zero padding.
        dilation: kernel dilation.
        groups: convolution groups.
        stride: convolution stride.
    """
    w = weight.detach().to(torch.float64)
    c_out, c_in_g, kh, kw = w.shape
    (sh, sw), (dh, dw) = stride, dilation
    ph_h, off_h, _, n_h = _polyphase_axis(input_hw[0], kh, sh, dh, pads[0], pads[1])
    ph_w, off_w, _, n_w = _polyphase_axis(input_hw[1], kw, sw, dw, pads[2], pads[3])
    lo_h, lo_w = min(off_h), min(off_w)
    grid = torch.zeros((c_out, c_in_g, sh, sw, n_h, n_w), dtype=torch.float64, device=w.device)
    for th in range(kh):
        for tw in range(kw):  # every tap lands on its own (phase, offset) cell: no collisions
            grid[:, :, ph_h[th], ph_w[tw], off_h[th] - lo_h, off_w[tw] - lo_w] = w[:, :, th, tw]
    c_in_phase = c_in_g * sh * sw
    spec = torch.fft.rfft2(grid.reshape(c_out, c_in_phase, n_h, n_w))  # other half of the spectrum: conjugate
    g = int(groups)
    spec = spec.reshape(g, c_out // g, c_in_phase, n_h, -1).permute(0, 3, 4, 1, 2)  # (g, N_h, N_w', o, i)
    per_row = max(1, max_chunk_entries // max(1, g * spec.shape[2] * (c_out // g) * c_in_phase))
    best = 0.0
    for start in range(0, n_h, per_row):
        block = spec[:, start : start + per_row]
        best = max(best, float(torch.linalg.matrix_norm(block, ord=2).max()))
    abs_err = FFT_ABS_SAFETY * math.sqrt(c_out * c_in_phase) * float(w.abs().sum())
    return best * FFT_SAFETY + abs_err


def padding_multiplicity(input_hw: Tuple[int, int], *, pads: Tuple[int, int, int, int], mode: str) -> int:
    """Largest number of copies of one input pixel made by ``F.pad(..., mode=mode)``.

    Padding by copying is ``x -> P x`` with one 1 per row of ``P``, so ``||P||_2 = sqrt(multiplicity)``.
    """
    h, w = input_hw
    idx = torch.arange(h * w, dtype=torch.float64).reshape(1, 1, h, w)
    padded = F.pad(idx, (pads[2], pads[3], pads[0], pads[1]), mode=mode)
    counts = torch.bincount(padded.flatten().long(), minlength=h * w)
    return int(counts.max())


def guaranteed_norm(op: LinearOp, *, dense_max_entries: int = DENSE_MAX_ENTRIES) -> Tuple[float, str]:
    """Guaranteed float64 upper bound of ``||op||_2`` and the method used.

    Methods: ``"closed-form"`` (diagonal maps), ``"dense-svd"`` (exact up to :data:`DENSE_SAFETY`),
    ``"fft"`` / ``"fft+pad"`` (convolutions), ``"holder"`` (non-negative operators).

    Raises:
        UnsupportedModuleError: the operator is too large for the dense path and has no structured bound.
    """
    closed = op.closed_form_norm()
    if closed is not None:
        return float(closed.detach().to(torch.float64)) * DENSE_SAFETY, "closed-form"
    if op.dense_size() <= dense_max_entries:
        mat = op.dense_matrix(dtype=torch.float64, device=op.param_device())
        return dense_spectral_norm(mat) * DENSE_SAFETY, "dense-svd"
    structured = op.structured_upper()
    if structured is None:
        raise UnsupportedModuleError(
            f"operator {type(op).__name__} ({op.kind}) has {op.dense_size()} matrix entries, more than "
            f"dense_max_entries={dense_max_entries}, and no structured bound; raise dense_max_entries",
            module=op,
        )
    return structured


@torch.no_grad()
def power_iteration(
    op: LinearOp,
    *,
    iterations: int = 50,
    generator: Optional[torch.Generator] = None,
    dtype: torch.dtype = torch.float64,
    start: Optional[torch.Tensor] = None,
) -> float:
    """Power-iteration estimate of ``||op||_2`` (a lower bound up to rounding): ``||A u||`` after
    ``iterations`` steps of ``u <- A^T A u / ||A^T A u||`` from a random (seeded) start."""
    closed = op.closed_form_norm()
    if closed is not None:
        return float(closed.detach())
    device = op.param_device()
    if start is None:
        u = torch.randn((1, *op.in_shape), generator=generator, dtype=dtype, device="cpu").to(device)
    else:
        u = start.to(dtype=dtype, device=device).clone()
    u = u / u.norm().clamp_min(1e-300)
    for _ in range(iterations):
        v = op.adjoint(op.apply(u))
        nv = v.norm()
        if float(nv) == 0.0:
            return 0.0
        u = v / nv
    return float(op.apply(u).norm())

