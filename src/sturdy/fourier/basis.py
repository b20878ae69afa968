"""Real Fourier basis directions of an H x W image plane, generated on the fly.

Conventions (docs/design.md section 2): for a frequency ``(k, l)`` with ``0 <= k < H`` and ``0 <= l < W`` let
``theta[p, q] = 2 pi (k p / H + l q / W)``. The direction of phase ``phi`` is ``cos(theta + phi)``
normalised to unit L2 norm. The default phase ``-pi/4`` gives ``(cos theta + sin theta) / ||.||``, i.e.
``Re((1 - i) F_{k,l})``. The frequencies ``(k, l)`` and ``(-k mod H, -l mod W)`` span the same real
subspace, so the *distinct* directions are the canonical half plane returned by :func:`half_plane`.

A frequency equal to its own conjugate (``2k = 0 mod H`` and ``2l = 0 mod W``: the constant and the
Nyquist rows/columns) has a one-dimensional real subspace: ``cos(theta + phi) = cos(phi) cos(theta)``.
There the direction is ``sign(cos phi) * cos(theta) / ||cos(theta)||`` with ``cos phi = 0`` counted as
positive *(choice)*, so every phase gives a unit vector.

Directions are produced in batches by ``torch.fft.irfft2`` from a sparse spectrum; an
``(H, W, H, W)`` array is never formed.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from sturdy.errors import ConfigurationError
from sturdy.validation import check_number

__all__ = [
    "DEFAULT_PHASE",
    "check_phase",
    "fourier_basis",
    "fourier_basis_batch",
    "half_plane",
    "is_self_conjugate",
    "canonical_index_map",
    "to_full_map",
]

DEFAULT_PHASE: float = -math.pi / 4
"""Phase of the default direction ``(cos theta + sin theta) / ||.||``."""


def check_phase(phase: Optional[float], *, allow_random: bool = False) -> Optional[float]:
    """A finite phase in radians as a float (``None``, a random phase, only when ``allow_random``)."""
    if phase is None and allow_random:
        return None
    hint = "an angle in radians, or None for a random phase" if allow_random else "an angle in radians"
    return check_number(phase, "phase", hint=hint)

SELF_CONJUGATE_COS_TOL = 1e-9
"""``cos(phi) >= -tol`` counts as positive when a self-conjugate direction picks its sign."""


def _check_size(height: int, width: int) -> None:
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigurationError(f"{name} must be a positive int, got {value!r}")


def is_self_conjugate(height: int, width: int, k: int, l: int) -> bool:  # noqa: E741
    """Whether ``(k, l)`` equals its conjugate ``(-k mod H, -l mod W)`` (one-dimensional subspace)."""
    _check_size(height, width)
    return (2 * k) % height == 0 and (2 * l) % width == 0


def _boundary_column(width: int, l: Tensor) -> Tensor:  # noqa: E741
    """Columns of the rfft half plane that contain both members of conjugate pairs (l = 0, Nyquist)."""
    mask = l == 0
    if width % 2 == 0:
        mask = mask | (l == width // 2)
    return mask


def half_plane(height: int, width: int, *, device: Optional[torch.device] = None) -> Tensor:
    """The canonical representatives of the distinct Fourier directions, as a ``(F, 2)`` long tensor.

    Rows are ``(k, l)`` with ``0 <= l <= W // 2``; on the columns ``l = 0`` and (for even ``W``)
    ``l = W / 2``, where ``(k, l)`` and ``(-k, l)`` are conjugate, only ``k <= H // 2`` is kept. The
    count is ``(H W + n_self) / 2`` with ``n_self`` the number of self-conjugate frequencies.

    Examples:
        >>> half_plane(3, 4).tolist()
        [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2], [2, 1]]
    """
    _check_size(height, width)
    k = torch.arange(height, device=device).repeat_interleave(width // 2 + 1)
    l = torch.arange(width // 2 + 1, device=device).repeat(height)  # noqa: E741
    keep = ~_boundary_column(width, l) | (k <= height // 2)
    return torch.stack([k[keep], l[keep]], dim=1)


def canonical_index_map(height: int, width: int) -> Tensor:
    """``(H, W)`` long tensor: for every frequency ``(k, l)`` the row of :func:`half_plane` spanning it."""
    freqs = half_plane(height, width)
    index = torch.full((height, width), -1, dtype=torch.long)
    rows = torch.arange(freqs.shape[0])
    index[freqs[:, 0], freqs[:, 1]] = rows
    index[(-freqs[:, 0]) % height, (-freqs[:, 1]) % width] = rows
    return index


def to_full_map(values: Tensor, height: int, width: int, *, centered: bool = True) -> Tensor:
    """Expand per-direction values ``(F,)`` (order of :func:`half_plane`) to a symmetric ``(H, W)`` map.

    Args:
        values: one value per canonical frequency.
        height: image height H.
        width: image width W.
        centered: apply ``fftshift`` so that frequency ``(0, 0)`` sits at the centre.
    """
    index = canonical_index_map(height, width).to(values.device)
    if values.shape != (int(index.max()) + 1,):
        raise ConfigurationError(
            f"values must have shape ({int(index.max()) + 1},) (one per half-plane frequency of a "
            f"{height}x{width} image), got {tuple(values.shape)}"
        )
    full = values[index]
    return torch.fft.fftshift(full, dim=(0, 1)) if centered else full


def fourier_basis_batch(
    height: int,
    width: int,
    frequencies: Union[Tensor, Sequence[Sequence[int]]],
    phases: Union[Tensor, float] = DEFAULT_PHASE,
    *,
    dtype: torch.dtype = torch.float32,
    device: Optional[Union[torch.device, str]] = None,
) -> Tensor:
    """Unit-L2 directions ``cos(theta + phi)`` for a batch of frequencies and phases: ``(B, H, W)``.

    Any integer ``(k, l)`` is accepted (taken modulo ``(H, W)``); a frequency outside the rfft half
    plane is mapped to its conjugate with the phase negated, which is the same direction.

    Args:
        height: image height H (any positive int, odd or even).
        width: image width W.
        frequencies: ``(B, 2)`` integers ``(k, l)``.
        phases: one phase in radians, or ``(B,)`` phases.
        dtype: real floating dtype of the result (computed with the matching complex dtype).
        device: device of the result.
    """
    _check_size(height, width)
    if not dtype.is_floating_point:
        raise ConfigurationError(f"dtype must be a real floating dtype, got {dtype}")
    freq = torch.as_tensor(frequencies, device=device)
    if freq.dtype.is_floating_point or freq.dtype.is_complex or freq.dtype == torch.bool:
        raise ConfigurationError(f"frequencies must be integers, got dtype {freq.dtype}")
    freq = freq.to(torch.long).reshape(-1, 2) if freq.numel() else freq.to(torch.long).reshape(0, 2)
    device = freq.device
    batch = freq.shape[0]
    phase = torch.as_tensor(phases, dtype=torch.float64, device=device)
    if phase.dim() == 0:
        phase = phase.expand(batch)
    if phase.shape != (batch,):
        raise ConfigurationError(f"phases must be a scalar or have shape ({batch},), got {tuple(phase.shape)}")
    k = freq[:, 0] % height
    l = freq[:, 1] % width  # noqa: E741
    flip = l > width // 2
    k = torch.where(flip, (-k) % height, k)
    l = torch.where(flip, (-l) % width, l)  # noqa: E741
    phase = torch.where(flip, -phase, phase)

    complex_dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    real_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    coeff = torch.polar(torch.ones_like(phase), phase).to(complex_dtype)
    spectrum = torch.zeros(batch, height, width // 2 + 1, dtype=complex_dtype, device=device)
    rows = torch.arange(batch, device=device)
    spectrum[rows, k, l] = coeff
    boundary = _boundary_column(width, l)
    partner = (-k) % height
    self_conj = boundary & (partner == k)
    pair = boundary & ~self_conj
    # On the l = 0 / Nyquist columns the conjugate partner is stored explicitly: irfft2 does not add it.
    spectrum[rows[pair], partner[pair], l[pair]] = coeff[pair].conj()
    sign = torch.where(torch.cos(phase) >= -SELF_CONJUGATE_COS_TOL, 1.0, -1.0).to(complex_dtype)
    spectrum[rows[self_conj], k[self_conj], l[self_conj]] = sign[self_conj]
    waves = torch.fft.irfft2(spectrum, s=(height, width)).to(real_dtype)
    waves = waves / torch.linalg.vector_norm(waves, dim=(-2, -1), keepdim=True)
    return waves.to(dtype)


def fourier_basis(
    height: int,
    width: int,
    k: int,
    l: int,  # noqa: E741
    *,
    phase: float = DEFAULT_PHASE,
    dtype: torch.dtype = torch.float32,
    device: Optional[Union[torch.device, str]] = None,
) -> Tensor:
    """The unit-L2 real direction of frequency ``(k, l)`` and phase ``phase``: an ``(H, W)`` tensor.

    Its 2-D DFT is supported on exactly ``{(k, l), (-k mod H, -l mod W)}``.

    Examples:
        >>> u = fourier_basis(4, 6, 1, 2, dtype=torch.float64)
        >>> round(float(u.norm()), 12)
        1.0
        >>> import math
        >>> p, q = torch.meshgrid(torch.arange(4.0), torch.arange(6.0), indexing="ij")
        >>> theta = 2 * math.pi * (p / 4 + 2 * q / 6)
        >>> direct = (torch.cos(theta) + torch.sin(theta)).double()
        >>> bool(torch.allclose(u, direct / direct.norm()))
        True
    """
    for name, value in (("k", k), ("l", l)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigurationError(f"{name} must be an int, got {value!r}")
    phase = check_phase(phase)
    return fourier_basis_batch(height, width, [[k, l]], phase, dtype=dtype, device=device)[0]
