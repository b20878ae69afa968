"""Operator norms: guaranteed float64 upper bounds and power-iteration estimates.

* :func:`guaranteed_norm` returns an upper bound of ``||A||_2`` that is safe against rounding:
  the exact circulant bound of circular-padded convolutions (any size), exact dense SVD (in float64)
  when the dense matrix is small, else a structured bound: the circulant/FFT bound of Sedghi et al.
  (2019) for convolutions, the Hoelder bound ``sqrt(||A||_1 ||A||_inf)`` for non-negative operators
  (pooling), the closed form for diagonal maps. Every value carries a documented safety factor for
  rounding (the ``*_SAFETY`` constants, :func:`max_singular_value_upper`).
* :func:`power_iteration` returns an estimate (a lower bound up to rounding) of ``||A||_2``.

The per-frequency blocks of a convolution are bounded by :func:`max_singular_value_upper`: Gram
matrices on the smaller side, a batched power iteration to find the largest blocks, an eigensolver on
those, and one batched Cholesky factorisation of ``t I - G`` certifying ``sigma_max <= sqrt(t)`` for all
the others (a Cholesky factorisation exists only for positive definite matrices). This is exact up to
the safety factor and several times cheaper than a batched SVD. Only half the frequencies are visited
(``rfft2``): a real kernel's spectrum is conjugate-symmetric, ``K_hat[-a, -b] = conj(K_hat[a, b])``.

Both take a :class:`~sturdy.lipschitz.operators.LinearOp`; :func:`conv2d_fft_norm`,
:func:`conv2d_circular_norm`, :func:`dense_spectral_norm` and :func:`padding_multiplicity` work on plain
tensors and sizes. This module holds a single idea, operator-norm algorithms, hence its length.

Conventions: L2 operator norm of the map on flattened per-sample tensors.
"""

from __future__ import annotations

import math
import weakref
from typing import TYPE_CHECKING, Any, List, Optional, Tuple

import torch
import torch.nn.functional as F

from sturdy.errors import ConfigurationError, UnsupportedModuleError

if TYPE_CHECKING:  # operators.py builds on this module; the type is only needed for annotations
    from sturdy.lipschitz.operators import LinearOp

__all__ = [
    "DENSE_MAX_ENTRIES",
    "DENSE_SAFETY",
    "FFT_SAFETY",
    "FFT_ABS_SAFETY",
    "CHOLESKY_MARGIN",
    "guaranteed_norm",
    "dense_spectral_norm",
    "max_singular_value_upper",
    "conv2d_fft_norm",
    "conv2d_circular_norm",
    "padding_multiplicity",
    "power_iteration",
]

DENSE_MAX_ENTRIES = 1 << 22  # dense matrices up to 4M entries (32 MiB in float64) get an exact SVD
# Relative safety of a float64 SVD: LAPACK's backward error is p(n) * eps * ||A|| with eps = 2.2e-16;
# 1e-9 covers p(n) up to ~4e6.
DENSE_SAFETY = 1.0 + 1e-9
# FFT path: float64 FFT error per entry <= c log2(N) eps sum|w| (tiny); block norms as below.
FFT_SAFETY = 1.0 + 1e-9
FFT_ABS_SAFETY = 1e-12  # times sqrt(C_out C_in) * sum|w|, covers the FFT's absolute rounding error
# Cholesky certificates test t (1 + CHOLESKY_MARGIN) I - G, so that a block whose top eigenvalue equals t
# up to rounding is not sent to the eigensolver; the bound is loose by at most half this margin.
CHOLESKY_MARGIN = 1e-10
_UNIT_ROUNDOFF = 2.0 ** -53
_POWER_STEPS = 8  # batched power-iteration steps on the blocks before the exact top blocks are chosen
_EXACT_TOP = 4  # blocks given an exact eigensolve up front (the largest lower estimates: the likely maxima)


def dense_spectral_norm(matrix: torch.Tensor) -> float:
    """Largest singular value of a dense matrix, computed in float64 (no safety factor)."""
    m = matrix.to(torch.float64)
    if m.numel() == 0:
        return 0.0
    return float(torch.linalg.matrix_norm(m, ord=2))


def _gram_relative_error(rows: int, cols: int) -> float:
    """Relative error bound on ``lambda_max`` of a Gram matrix formed and factorised in (complex) float64.

    Forming ``G = B B^H`` (inner size ``k``, side ``n``) errs by ``||dG|| <= gamma_k n ||B||^2``; a Cholesky
    factorisation that completes certifies ``M + E >= 0`` with ``||E|| <= gamma_{n+1} n ||M||`` (Higham,
    Thm 10.3 and its norm form); the Hermitian eigensolver errs by ``p(n) eps ||G||``. A factor 8 covers complex
    arithmetic (``|fl(ab) - ab| <= sqrt(5) u |ab|``) and ``||M|| <= 2 t``.
    """
    n, k = min(rows, cols), max(rows, cols)
    return 8.0 * _UNIT_ROUNDOFF * (k * n + 2 * (n + 1) * n + n * n)


def _block_chunks(count: int, per_block: int, max_entries: int) -> List[Tuple[int, int]]:
    step = max(1, max_entries // max(1, per_block))
    return [(s, min(count, s + step)) for s in range(0, count, step)]


def max_singular_value_upper(
    blocks: torch.Tensor, *, max_chunk_entries: int = 1 << 24, return_vector: bool = False
) -> Any:
    """Guaranteed upper bound of ``max_k sigma_max(blocks[k])`` for a batch ``(..., m, n)`` of matrices.

    Works on the Gram matrices ``G_k`` of the smaller side (``B B^H`` or ``B^H B``), in float64/complex128:

    1. a few batched power-iteration steps give every block a lower estimate;
    2. the blocks with the largest estimates get an exact Hermitian eigensolve: ``t = max lambda``;
    3. one batched Cholesky factorisation of ``t (1 + CHOLESKY_MARGIN) I - G_k`` per chunk certifies
       ``lambda_max(G_k) <= t (1 + CHOLESKY_MARGIN)``; blocks where it fails get an eigensolve and raise ``t``.

    The result is ``sqrt(t (1 + CHOLESKY_MARGIN) (1 + r) / (1 - r))`` with ``r`` from
    :func:`_gram_relative_error` (rounding of the Gram matrix, the factorisation and the eigensolver): an
    upper bound of the exact value that exceeds it by about ``CHOLESKY_MARGIN / 2`` relative.

    Args:
        blocks: ``(..., m, n)`` real or complex matrices.
        max_chunk_entries: matrices handled at once are capped at about this many entries.
        return_vector: also return ``(index, v)``: the flat index of the maximising block and its top right
            singular vector (unit norm).

    Raises:
        ConfigurationError: the matrices contain NaN or infinity.
    """
    m, n = int(blocks.shape[-2]), int(blocks.shape[-1])
    b = blocks.reshape(-1, m, n)
    b = b.to(torch.complex128) if b.is_complex() else b.to(torch.float64)
    if b.numel() == 0:
        return (0.0, None) if return_vector else 0.0
    left = m <= n  # Gram on the smaller side
    side = min(m, n)
    chunks = _block_chunks(b.shape[0], m * n + 2 * side * side, max_chunk_entries)
    grams, low = _grams_and_estimates(b, chunks, left=left)
    if not bool(torch.isfinite(low).all()):  # NaN/inf anywhere in a block reaches its estimate
        raise ConfigurationError("the operator's weights contain NaN or infinity; no norm bound exists")
    t = 0.0
    best_index = -1
    done = torch.zeros(b.shape[0], dtype=torch.bool, device=b.device)

    def exact(idx: torch.Tensor) -> None:
        nonlocal t, best_index
        for lo, g in grams:
            sel = idx[(idx >= lo) & (idx < lo + g.shape[0])]
            if sel.numel() == 0:
                continue
            lam = torch.linalg.eigvalsh(g[sel - lo])[:, -1]
            k = int(lam.argmax())
            if float(lam[k]) > t:
                t, best_index = float(lam[k]), int(sel[k])
            done[sel] = True

    exact(torch.argsort(low, descending=True)[: _EXACT_TOP])
    for lo, g in grams:
        todo = (~done[lo : lo + g.shape[0]]).nonzero().flatten()
        if todo.numel() == 0:
            continue
        level = max(t, 1e-300) * (1.0 + CHOLESKY_MARGIN)
        eye = torch.eye(side, dtype=b.dtype, device=b.device)
        _, info = torch.linalg.cholesky_ex(level * eye - g[todo])
        failed = todo[info != 0] + lo
        if failed.numel():
            exact(failed)
    r = _gram_relative_error(m, n)
    bound = math.sqrt(max(t, 0.0) * (1.0 + CHOLESKY_MARGIN) * (1.0 + r) / (1.0 - r))
    if not return_vector:
        return bound
    best_index = max(best_index, 0)  # every block is zero (e.g. a zero-initialised BatchNorm): any vector is top
    return bound, (best_index, _top_right_vector(b, grams, best_index, left=left))


def _grams_and_estimates(b: torch.Tensor, chunks: List[Tuple[int, int]], *, left: bool
                         ) -> Tuple[List[Tuple[int, torch.Tensor]], torch.Tensor]:
    """Gram matrices of every chunk of blocks (on the smaller side) and a few power-iteration steps' Rayleigh
    quotients: lower estimates of every block's ``lambda_max``."""
    side = min(int(b.shape[-2]), int(b.shape[-1]))
    grams: List[Tuple[int, torch.Tensor]] = []
    low_all: List[torch.Tensor] = []
    for lo, hi in chunks:
        chunk = b[lo:hi]
        g = chunk @ chunk.mH if left else chunk.mH @ chunk
        v = torch.ones((hi - lo, side, 1), dtype=b.dtype, device=b.device)
        v = v + 0.5 * torch.linspace(-1.0, 1.0, side, dtype=torch.float64, device=b.device).to(b.dtype)[:, None]
        for _ in range(_POWER_STEPS):
            v = g @ v
            v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-300)
        low_all.append((v.mH @ g @ v).real.flatten())  # Rayleigh quotients: lower estimates of lambda_max
        grams.append((lo, g))
    return grams, torch.cat(low_all)


def _top_right_vector(b: torch.Tensor, grams: List[Tuple[int, torch.Tensor]], index: int, *, left: bool
                      ) -> torch.Tensor:
    """The top right singular vector (unit norm) of block ``index``, from its Gram matrix."""
    lo_best, g_best = next((lo, g) for lo, g in grams if lo <= index < lo + g.shape[0])
    _, vec = torch.linalg.eigh(g_best[index - lo_best])
    top = vec[:, -1]
    if left:  # right singular vector from the left one: B^H u / ||B^H u||
        top = b[index].mH @ top
        norm = top.norm()
        if float(norm) == 0.0:  # a zero block: every unit vector is a top singular vector
            top = torch.zeros_like(top)
            top[0] = 1.0
            return top
        top = top / norm
    return top


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


def _spectrum_bound(
    grid: torch.Tensor, groups: int, max_chunk_entries: int, return_vector: bool
) -> Any:
    """Bound of the circular multi-channel convolution whose kernel is ``grid`` ``(C_out, C_in', N_h, N_w)``."""
    c_out, c_in, n_h, n_w = grid.shape
    spec = torch.fft.rfft2(grid)  # the other half of the spectrum is its conjugate
    g = int(groups)
    blocks = spec.reshape(g, c_out // g, c_in, n_h, -1).permute(0, 3, 4, 1, 2)  # (g, N_h, N_w', o, i)
    return max_singular_value_upper(blocks, max_chunk_entries=max_chunk_entries, return_vector=return_vector)


def _fft_abs_error(w: torch.Tensor, c_out: int, c_in: int) -> float:
    return FFT_ABS_SAFETY * math.sqrt(c_out * c_in) * float(w.abs().sum())


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
    ``sigma_max(K_hat[a, b])`` (``C_out/g x C_in s_h s_w/g`` per group), bounded by
    :func:`max_singular_value_upper`. A 1x1 kernel is ``sigma_max`` of its ``C_out x C_in`` matrix (every
    frequency block is that matrix up to a phase). Computed in float64 with :data:`FFT_SAFETY` and
    :data:`FFT_ABS_SAFETY`.

    Args:
        weight: ``(C_out, C_in / groups, k_h, k_w)``.
        input_hw: spatial input size ``(H, W)``.
        pads: ``(top, bottom, left, right)`` zero padding.
        dilation: kernel dilation.
        groups: convolution groups.
        stride: convolution stride.
    """
    return _conv2d_fft(weight, input_hw, pads, dilation, groups, stride, max_chunk_entries, False)


def _conv2d_fft(
    weight: torch.Tensor,
    input_hw: Tuple[int, int],
    pads: Tuple[int, int, int, int],
    dilation: Tuple[int, int],
    groups: int,
    stride: Tuple[int, int],
    max_chunk_entries: int,
    return_start: bool,
) -> Any:
    """:func:`conv2d_fft_norm`; with ``return_start`` also ``(C, H, W)`` start vectors of the power iteration
    (the top singular vector of the circulant as a plane wave on the input, both signs of its frequency)."""
    w = weight.detach().to(torch.float64)
    if not bool(torch.isfinite(w).all()):
        raise ConfigurationError("the operator's weights contain NaN or infinity; no norm bound exists")
    c_out, c_in_g, kh, kw = w.shape
    (sh, sw), (dh, dw) = stride, dilation
    h, w_ = input_hw
    if kh == kw == 1:  # every frequency block is the C_out x C_in matrix (times a phase)
        mats = w.reshape(groups, c_out // groups, c_in_g)
        bound = float(torch.linalg.matrix_norm(mats, ord=2).max()) * DENSE_SAFETY
        if not return_start:
            return bound
        grp = int(torch.linalg.matrix_norm(mats, ord=2).argmax())
        v = torch.linalg.svd(mats[grp])[2][0].conj()
        x = torch.zeros((1, c_in_g * groups, h, w_), dtype=torch.float64, device=w.device)
        rows = [i * sh - pads[0] for i in range((h + pads[0] + pads[1] - 1) // sh + 1) if 0 <= i * sh - pads[0] < h]
        cols = [j * sw - pads[2] for j in range((w_ + pads[2] + pads[3] - 1) // sw + 1) if 0 <= j * sw - pads[2] < w_]
        if rows and cols:
            x[0, grp * c_in_g : (grp + 1) * c_in_g, torch.tensor(rows)[:, None], torch.tensor(cols)[None, :]] = (
                v[:, None, None].to(torch.float64))
        return bound, x
    ph_h, off_h, _, n_h = _polyphase_axis(h, kh, sh, dh, pads[0], pads[1])
    ph_w, off_w, _, n_w = _polyphase_axis(w_, kw, sw, dw, pads[2], pads[3])
    lo_h, lo_w = min(off_h), min(off_w)
    grid = torch.zeros((c_out, c_in_g, sh, sw, n_h, n_w), dtype=torch.float64, device=w.device)
    for th in range(kh):
        for tw in range(kw):  # every tap lands on its own (phase, offset) cell: no collisions
            grid[:, :, ph_h[th], ph_w[tw], off_h[th] - lo_h, off_w[tw] - lo_w] = w[:, :, th, tw]
    c_in_phase = c_in_g * sh * sw
    res = _spectrum_bound(grid.reshape(c_out, c_in_phase, n_h, n_w), groups, max_chunk_entries, return_start)
    best, found = res if return_start else (res, None)
    bound = best * FFT_SAFETY + _fft_abs_error(w, c_out, c_in_phase)
    if not return_start:
        return bound
    index, v = found
    n_wr = n_w // 2 + 1
    grp, rest = divmod(index, n_h * n_wr)
    f_h, f_w = divmod(rest, n_wr)
    mh = torch.arange(h, dtype=torch.float64, device=w.device) // sh
    mw = torch.arange(w_, dtype=torch.float64, device=w.device) // sw
    rh, rw = torch.arange(h, device=w.device) % sh, torch.arange(w_, device=w.device) % sw
    v = v.to(torch.complex128).reshape(c_in_g, sh, sw)
    starts = torch.zeros((2, c_in_g * groups, h, w_), dtype=torch.float64, device=w.device)
    for k, sign in enumerate((1.0, -1.0)):  # the DFT's sign convention vs. the crop's: try both
        wave = torch.exp(sign * 2j * math.pi * (f_h * mh[:, None] / n_h + f_w * mw[None, :] / n_w))
        starts[k, grp * c_in_g : (grp + 1) * c_in_g] = (v[:, rh][:, :, rw] * wave).real
    return bound, starts


def _circular_axis(n: int, k: int, stride: int, dilation: int, pad_lo: int, pad_hi: int) -> Optional[Tuple]:
    """Per-axis form of ``y[i] = sum_t w_t x[(i s + t d - p) mod n]`` (circular padding, ``i < out``).

    Returns ``(phase, offset, size, exact)``, with ``size = n / s`` the circulant's length when ``s``
    divides ``n`` (else the stride is dropped: ``s = 1``, a row selection of the stride-1 circulant), or
    ``None`` when some output rows repeat (more outputs than circulant rows).
    """
    out = (n + pad_lo + pad_hi - dilation * (k - 1) - 1) // stride + 1
    s = stride if n % stride == 0 else 1
    size = n // s
    rows = out if s == stride else (out - 1) * stride + 1  # circulant rows the outputs read (distinct)
    if rows > size or out < 1:
        return None
    q = [t * dilation - pad_lo for t in range(k)]
    phase = [v % s for v in q]
    offset = [(v // s) % size for v in q]
    exact = s == stride and out == size
    return phase, offset, size, exact, s


def conv2d_circular_norm(
    weight: torch.Tensor,
    *,
    input_hw: Tuple[int, int],
    pads: Tuple[int, int, int, int],
    dilation: Tuple[int, int] = (1, 1),
    groups: int = 1,
    stride: Tuple[int, int] = (1, 1),
    max_chunk_entries: int = 1 << 24,
) -> Optional[Tuple[float, bool]]:
    """Circulant bound of a circular-padded 2-D convolution (``padding_mode="circular"``), at any size.

    With circular padding ``(p_lo, p_hi)`` per axis the convolution reads ``x[(i s + t d - p_lo) mod n]``:
    on the ``n``-torus it is a circular convolution, sampled at the outputs. When ``s`` divides ``n`` the
    polyphase decomposition (a permutation of the input) makes it a stride-1 circular convolution on the
    ``n / s`` phase grid with ``C_in s^2`` channels (taps that wrap onto the same cell add up), so its norm
    is the maximum over the DFT frequencies of ``sigma_max(K_hat[a, b])`` (Sedghi et al. 2019): exact when
    the outputs cover the whole phase grid (``p_lo + p_hi = d (k - 1)``), otherwise a row selection of it
    (an upper bound); when ``s`` does not divide ``n`` the stride-1 circulant is used (an upper bound).

    Returns:
        ``(bound, exact)`` (``exact``: equal to the norm up to the safety factors), or ``None`` when some
        output rows read the same circulant row twice (a padding larger than the kernel needs).
    """
    w = weight.detach().to(torch.float64)
    c_out, c_in_g, kh, kw = w.shape
    ax_h = _circular_axis(input_hw[0], kh, stride[0], dilation[0], pads[0], pads[1])
    ax_w = _circular_axis(input_hw[1], kw, stride[1], dilation[1], pads[2], pads[3])
    if ax_h is None or ax_w is None:
        return None
    (ph_h, off_h, n_h, ex_h, sh), (ph_w, off_w, n_w, ex_w, sw) = ax_h, ax_w
    grid = torch.zeros((c_out, c_in_g, sh, sw, n_h, n_w), dtype=torch.float64, device=w.device)
    for th in range(kh):
        for tw in range(kw):  # wrapped taps may share a cell: accumulate
            grid[:, :, ph_h[th], ph_w[tw], off_h[th], off_w[tw]] += w[:, :, th, tw]
    c_in_phase = c_in_g * sh * sw
    best = _spectrum_bound(grid.reshape(c_out, c_in_phase, n_h, n_w), groups, max_chunk_entries, False)
    return best * FFT_SAFETY + _fft_abs_error(w, c_out, c_in_phase), bool(ex_h and ex_w)


def padding_multiplicity(input_hw: Tuple[int, int], *, pads: Tuple[int, int, int, int], mode: str) -> int:
    """Largest number of copies of one input pixel made by ``F.pad(..., mode=mode)``.

    Padding by copying is ``x -> P x`` with one 1 per row of ``P``, so ``||P||_2 = sqrt(multiplicity)``.
    """
    h, w = input_hw
    idx = torch.arange(h * w, dtype=torch.float64).reshape(1, 1, h, w)
    padded = F.pad(idx, (pads[2], pads[3], pads[0], pads[1]), mode=mode)
    counts = torch.bincount(padded.flatten().long(), minlength=h * w)
    return int(counts.max())


def _conv_geometry(op: LinearOp) -> Optional[Tuple[Any, ...]]:
    """``(weight, (H, W), pads, dilation, groups, stride, padding_mode)`` of a 2-D convolution operator."""
    if not op.kind.startswith("conv2d") or len(op.in_shape) != 3:
        return None
    try:
        geometry = (op.pads, op.dilation, op.groups, op.stride, op.padding_mode)  # type: ignore[attr-defined]
    except AttributeError:
        return None
    weight = op.weight()
    if weight is None or weight.dim() != 4:
        return None
    pads, dilation, groups, stride, mode = geometry
    return weight.detach(), tuple(op.in_shape[-2:]), pads, dilation, groups, stride, mode


# Start vectors found while bounding a convolution, reused by power_iteration on the same operator and
# weights (keyed by the operator and a fingerprint of its weight; any start vector is valid).
_STARTS: weakref.WeakKeyDictionary[Any, Tuple[Tuple[float, ...], torch.Tensor]] = weakref.WeakKeyDictionary()


def _fingerprint(weight: torch.Tensor) -> Tuple[float, ...]:
    w = weight.detach().to(torch.float64)
    return (float(w.sum()), float((w * w).sum()), float(w.flatten()[0]), *map(float, w.shape))


def _conv_fft_with_start(op: LinearOp, geometry: Tuple[Any, ...]) -> float:
    weight, hw, pads, dilation, groups, stride, _ = geometry
    bound, start = _conv2d_fft(weight, hw, pads, dilation, groups, stride, 1 << 24, True)
    _STARTS[op] = (_fingerprint(weight), start)
    return bound


def _conv_start(op: LinearOp) -> Optional[torch.Tensor]:
    """Start vectors for the power iteration of a zero-padded convolution: the top singular vector of its
    circulant (a plane wave on the phase grid) restricted to the input; ``None`` for other operators."""
    geometry = _conv_geometry(op)
    if geometry is None or geometry[-1] != "zeros":
        return None
    cached = _STARTS.get(op)
    if cached is not None and cached[0] == _fingerprint(geometry[0]):
        return cached[1]
    _conv_fft_with_start(op, geometry)
    return _STARTS[op][1]


def _dense(op: LinearOp) -> torch.Tensor:
    """The operator's dense matrix, built from the side with fewer unit vectors (the adjoint's when the
    operator has fewer outputs than inputs, e.g. pooling)."""
    device = op.param_device()
    n_in = math.prod(op.in_shape)
    n_out = op.dense_size() // max(1, n_in)
    if n_out >= n_in or op.kind == "linear":
        return op.dense_matrix(dtype=torch.float64, device=device)
    with torch.no_grad():
        out_shape = op.apply(torch.zeros((1, *op.in_shape), dtype=torch.float64, device=device)).shape[1:]
        eye = torch.eye(n_out, dtype=torch.float64, device=device).reshape(n_out, *out_shape)
        return op.adjoint(eye).reshape(n_out, n_in)  # row j is A^T e_j: the rows of A


def guaranteed_norm(op: LinearOp, *, dense_max_entries: int = DENSE_MAX_ENTRIES) -> Tuple[float, str]:
    """Guaranteed float64 upper bound of ``||op||_2`` and the method used.

    Methods: ``"closed-form"`` (diagonal maps), ``"fft-circulant"`` (circular-padded convolutions, at any
    size: exact when the outputs cover the circulant, see :func:`conv2d_circular_norm`), ``"dense-svd"``
    (exact up to :data:`DENSE_SAFETY`), ``"fft"`` / ``"fft+pad"`` (convolutions), ``"holder"``
    (non-negative operators).

    Raises:
        UnsupportedModuleError: the operator is too large for the dense path and has no structured bound.
        ConfigurationError: the weights contain NaN or infinity.
    """
    closed = op.closed_form_norm()
    if closed is not None:
        return float(closed.detach().to(torch.float64)) * DENSE_SAFETY, "closed-form"
    geometry = _conv_geometry(op)
    circulant = None
    if geometry is not None and geometry[-1] == "circular":
        weight, hw, pads, dilation, groups, stride, _ = geometry
        circulant = conv2d_circular_norm(weight, input_hw=hw, pads=pads, dilation=dilation, groups=groups,
                                         stride=stride)
        if circulant is not None and circulant[1]:
            return circulant[0], "fft-circulant"
    if op.dense_size() <= dense_max_entries:
        return dense_spectral_norm(_dense(op)) * DENSE_SAFETY, "dense-svd"
    if geometry is not None and geometry[-1] == "zeros":
        return _conv_fft_with_start(op, geometry), "fft"  # = op.structured_upper(), keeping the start vector
    structured = op.structured_upper()
    if circulant is not None and (structured is None or circulant[0] < structured[0]):
        return circulant[0], "fft-circulant"
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
    dtype: Optional[torch.dtype] = None,
    start: Optional[torch.Tensor] = None,
    tol: float = 1e-7,
) -> float:
    """Power-iteration estimate of ``||op||_2`` (a lower bound up to rounding): ``||A u|| / ||u||``, evaluated
    in float64, after at most ``iterations`` steps of ``u <- A^T A u / ||A^T A u||``.

    The start is ``start`` when given; for a zero-padded convolution the top singular vector of its
    circulant restricted to the input (close to the answer; found by :func:`guaranteed_norm` or computed
    here); otherwise a random (seeded) vector. The steps run in ``dtype`` (default: float32, several times
    faster than float64; the rounding of ``u`` never invalidates the final float64 quotient) and stop
    early once ``||A u||`` grows by less than ``tol`` (relative) per step.
    """
    closed = op.closed_form_norm()
    if closed is not None:
        return float(closed.detach())
    device = op.param_device()
    if start is None and op.parametric:
        waves = _conv_start(op)
        if waves is not None:
            waves = waves.to(dtype=torch.float64, device=device)
            gains = op.apply(waves).flatten(1).norm(dim=1) / waves.flatten(1).norm(dim=1).clamp_min(1e-300)
            start = waves[int(gains.argmax())][None]
    step_dtype = torch.float32 if dtype is None else dtype
    if start is None:
        u = torch.randn((1, *op.in_shape), generator=generator, dtype=torch.float64, device="cpu")
        u = u.to(device=device, dtype=step_dtype)
    else:
        u = start.to(dtype=step_dtype, device=device).clone()
    u = u / u.norm().clamp_min(1e-30)
    prev = 0.0
    for _ in range(iterations):
        au = op.apply(u)
        gain = float(au.norm())
        if gain <= prev * (1.0 + tol):
            break
        prev = gain
        v = op.adjoint(au)
        nv = v.norm()
        if float(nv) == 0.0:
            return 0.0
        u = v / nv
    u64 = u.to(torch.float64)
    return float(op.apply(u64).norm() / u64.norm().clamp_min(1e-300))
