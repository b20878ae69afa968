"""Fourier perturbations under an L2 or L-inf budget, channel sign patterns and clipping.

Conventions (DESIGN section 2): images live in ``[lo, hi]^{C x H x W}`` (default ``[0, 1]``).
For a unit direction ``u`` (H x W) and a channel sign pattern ``s in {-1, +1}^C``:

* ``norm="l2"``, ``wave="sine"``: ``d = eps * (s x u) / ||s x u||_2`` (so ``||d||_2 = eps``);
* ``norm="linf"``, ``wave="sine"``: amplitude ``eps``: ``d = eps * (s x u) / max|u|`` *(choice)*;
* ``wave="square"``: ``u`` is replaced by ``sign(u)`` (pixels with ``|u| < 1e-6 max|u|`` get 0) and then
  scaled as above (for L-inf this is ``eps * s x sign(u)``).

``x + d`` is clipped to ``[lo, hi]``; :func:`apply_perturbation` reports the budget actually applied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from sturdy.errors import ConfigurationError, DataError
from sturdy.fourier.basis import DEFAULT_PHASE, fourier_basis

__all__ = [
    "NORMS",
    "WAVES",
    "Bounds",
    "AppliedPerturbation",
    "shape_directions",
    "fourier_perturbation",
    "apply_perturbation",
    "sign_patterns",
]

NORMS: Tuple[str, ...] = ("l2", "linf")
WAVES: Tuple[str, ...] = ("sine", "square")
Bounds = Optional[Tuple[float, float]]

_SQUARE_ZERO_TOL = 1e-6


def check_eps(eps: float) -> float:
    """Validate a perturbation budget: a finite number > 0."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ConfigurationError(f"eps must be a finite number > 0 (the perturbation budget), got {eps!r}")
    return float(eps)


def check_norm(norm: str, wave: str = "sine") -> None:
    """Validate the ``norm`` and ``wave`` names."""
    if norm not in NORMS:
        raise ConfigurationError(f"norm must be one of {NORMS}, got {norm!r}")
    if wave not in WAVES:
        raise ConfigurationError(f"wave must be one of {WAVES}, got {wave!r}")


def check_bounds(bounds: Bounds) -> Bounds:
    """Validate the valid pixel range ``(lo, hi)`` (``None``: no clipping)."""
    if bounds is None:
        return None
    try:
        lo, hi = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise ConfigurationError(f"bounds must be None or a pair (lo, hi), got {bounds!r}") from None
    if not lo < hi:
        raise ConfigurationError(f"bounds must satisfy lo < hi, got {bounds!r}")
    return (lo, hi)


def check_images(x: Tensor, bounds: Bounds, *, name: str = "x") -> None:
    """Validate a batch of images: a ``(N, C, H, W)`` floating tensor, finite, inside ``bounds``."""
    if not isinstance(x, Tensor):
        raise DataError(f"{name} must be a torch.Tensor of images (N, C, H, W), got {type(x).__name__}")
    if x.dim() != 4:
        raise DataError(
            f"{name} must be a batch of images with shape (N, C, H, W), got shape {tuple(x.shape)}; "
            "Fourier directions need a spatial H x W grid (add a channel axis with x.unsqueeze(1) for "
            "grayscale (N, H, W) data)"
        )
    if x.shape[0] == 0:
        raise DataError(f"{name} holds no images (shape {tuple(x.shape)})")
    if not x.dtype.is_floating_point:
        raise DataError(f"{name} must be a floating tensor with values in the valid range, got {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise DataError(f"{name} contains NaN or infinite values; clean or drop those images first")
    if bounds is not None:
        lo, hi = bounds
        tol = 1e-6 * max(1.0, hi - lo)
        low, high = float(x.min()), float(x.max())
        if low < lo - tol or high > hi + tol:
            raise DataError(
                f"{name} has values in [{low:.4g}, {high:.4g}], outside the valid range [{lo:g}, {hi:g}]; "
                "rescale the images or pass bounds=(lo, hi) (None disables clipping)"
            )


def shape_directions(
    directions: Tensor, signs: Tensor, *, eps: float, norm: str = "l2", wave: str = "sine"
) -> Tensor:
    """Turn unit directions ``(B, H, W)`` and sign patterns ``(B, C)`` into perturbations ``(B, C, H, W)``.

    Args:
        directions: unit-L2 real directions (e.g. from :func:`~sturdy.fourier.fourier_basis_batch`).
        signs: per-channel signs in ``{-1, +1}``.
        eps: budget in the given norm.
        norm: ``"l2"`` or ``"linf"``.
        wave: ``"sine"`` (the direction itself) or ``"square"`` (its sign).
    """
    check_norm(norm, wave)
    u = directions
    peak = u.abs().amax(dim=(-2, -1), keepdim=True)
    if wave == "square":
        u = torch.where(u.abs() < _SQUARE_ZERO_TOL * peak, torch.zeros_like(u), torch.sign(u))
        peak = torch.ones_like(peak)
    channels = signs.shape[-1]
    if norm == "l2":
        scale = eps / (torch.linalg.vector_norm(u, dim=(-2, -1), keepdim=True) * math.sqrt(channels))
    else:
        scale = eps / peak
    return signs.to(u.dtype)[..., :, None, None] * (u * scale).unsqueeze(-3)


def fourier_perturbation(
    shape: Sequence[int],
    k: int,
    l: int,  # noqa: E741
    *,
    eps: float,
    norm: str = "l2",
    wave: str = "sine",
    phase: float = DEFAULT_PHASE,
    signs: Optional[Sequence[int]] = None,
    dtype: torch.dtype = torch.float32,
    device: Optional[Union[torch.device, str]] = None,
) -> Tensor:
    """One Fourier perturbation of an image of shape ``(C, H, W)``.

    Args:
        shape: ``(C, H, W)``.
        k: vertical frequency.
        l: horizontal frequency.
        eps: budget (> 0) in ``norm``.
        norm: ``"l2"`` or ``"linf"``.
        wave: ``"sine"`` or ``"square"``.
        phase: phase of the wave in radians.
        signs: ``C`` signs in ``{-1, +1}`` (default all ``+1``).
        dtype: floating dtype of the result.
        device: device of the result.

    Examples:
        >>> d = fourier_perturbation((3, 8, 8), 1, 2, eps=2.0, signs=(1, -1, 1), dtype=torch.float64)
        >>> round(float(d.norm()), 9)
        2.0
        >>> float(fourier_perturbation((1, 8, 8), 1, 2, eps=0.1, norm="linf", wave="square").abs().max())
        0.10000000149011612
    """
    eps = check_eps(eps)
    check_norm(norm, wave)
    if len(shape) != 3:
        raise ConfigurationError(f"shape must be (C, H, W), got {tuple(shape)}")
    channels, height, width = (int(s) for s in shape)
    if channels < 1:
        raise ConfigurationError(f"shape must have at least one channel, got {tuple(shape)}")
    sign_tensor = torch.ones(channels, dtype=dtype, device=device)
    if signs is not None:
        sign_tensor = torch.as_tensor(signs, dtype=dtype, device=device)
        if sign_tensor.shape != (channels,) or not bool((sign_tensor.abs() == 1).all()):
            raise ConfigurationError(f"signs must be {channels} values in {{-1, +1}}, got {signs!r}")
    u = fourier_basis(height, width, k, l, phase=phase, dtype=dtype, device=device)
    return shape_directions(u[None], sign_tensor[None], eps=eps, norm=norm, wave=wave)[0]


def sign_patterns(channels: int, *, fix_first: bool = False) -> Tensor:
    """All channel sign patterns ``{-1, +1}^C`` as a ``(2^C, C)`` (or ``(2^(C-1), C)``) float tensor.

    Args:
        channels: number of channels C.
        fix_first: keep only patterns whose first sign is ``+1`` (the others are their negatives).
    """
    free = channels - 1 if fix_first else channels
    bits = (torch.arange(2**free)[:, None] >> torch.arange(free)) & 1
    patterns = 1.0 - 2.0 * bits.float()
    if fix_first:
        patterns = torch.cat([torch.ones(patterns.shape[0], 1), patterns], dim=1)
    return patterns


@dataclass(frozen=True, eq=False)
class AppliedPerturbation:
    """Perturbed images and the budget actually applied after clipping.

    Attributes:
        images: ``clip(x + delta)``, shape ``(N, C, H, W)``.
        l2: per-image L2 norm of ``images - x``, shape ``(N,)``.
        linf: per-image L-inf norm of ``images - x``, shape ``(N,)``.
    """

    images: Tensor
    l2: Tensor
    linf: Tensor

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able applied norms per image (without the images)."""
        return {"l2": self.l2.tolist(), "linf": self.linf.tolist()}


def apply_perturbation(x: Tensor, delta: Tensor, *, bounds: Bounds = (0.0, 1.0)) -> AppliedPerturbation:
    """Add ``delta`` (broadcast against ``x``) and clip to ``bounds``; report the applied norms.

    Examples:
        >>> x = torch.full((1, 1, 2, 2), 0.9)
        >>> out = apply_perturbation(x, torch.full((1, 2, 2), 0.2))
        >>> out.images.max().item(), round(out.linf.item(), 6)
        (1.0, 0.1)
    """
    bounds = check_bounds(bounds)
    images = x + delta
    if bounds is not None:
        images = images.clamp_(bounds[0], bounds[1])
    diff = (images - x).flatten(1)
    return AppliedPerturbation(
        images=images, l2=torch.linalg.vector_norm(diff, dim=1), linf=diff.abs().amax(dim=1)
    )
