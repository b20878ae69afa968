"""Fourier perturbations under an L2 or L-inf budget, channel sign patterns and clipping.

Conventions (docs/design.md section 2): images live in ``[lo, hi]^{C x H x W}`` (default ``[0, 1]``).
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

from sturdy import validation
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


EPS_OVERFLOW = math.sqrt(torch.finfo(torch.float32).max)
"""Largest budget taken without pixel bounds: squared perturbation entries stay finite in float32."""


def largest_eps(norm: str, bounds: Bounds, image_shape: Sequence[int]) -> float:
    """The largest meaningful budget for images ``(C, H, W)`` in ``bounds``: the farthest two images can be.

    L2: ``sqrt(C * H * W) * (hi - lo)``; L-inf: ``hi - lo``. Without bounds: :data:`EPS_OVERFLOW`.
    """
    if bounds is None:
        return EPS_OVERFLOW
    span = float(bounds[1]) - float(bounds[0])
    return math.sqrt(math.prod(int(s) for s in image_shape)) * span if norm == "l2" else span


def check_eps(
    eps: float, *, norm: str = "l2", bounds: Bounds = None, image_shape: Optional[Sequence[int]] = None
) -> float:
    """Validate a perturbation budget: a finite number > 0, and (with ``image_shape``) at most :func:`largest_eps`.

    A larger budget only moves every pixel to a bound after clipping (or overflows without bounds), so it is
    refused with the largest meaningful value. Without ``image_shape`` only the sign and finiteness are checked.
    """
    eps = validation.check_number(eps, "eps", low=0, low_open=True, hint="eps is the perturbation budget")
    if image_shape is None:
        return eps
    limit = largest_eps(norm, bounds, image_shape)
    if eps > limit * (1 + 1e-9):
        if bounds is None:
            why = "without pixel bounds larger budgets overflow float32"
        else:
            c, h, w = (int(s) for s in image_shape)
            lo, hi = bounds
            why = (f"no {norm} change of {c}x{h}x{w} images in [{lo:g}, {hi:g}] is larger"
                   f"{' (sqrt(C*H*W) * (hi - lo))' if norm == 'l2' else ' (hi - lo)'}")
        raise ConfigurationError(f"eps={eps:g} is beyond the largest meaningful {norm} budget {limit:.6g}: {why}; "
                                 f"pass eps <= {limit:.6g}")
    return eps


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


def check_images(x: Tensor, bounds: Bounds, *, name: str = "x") -> Tensor:
    """Validate a batch of images: a ``(N, C, H, W)`` floating tensor, finite, inside ``bounds``.

    The shared :func:`sturdy.validation.check_images` (a :class:`~sturdy.errors.DataError` otherwise).
    """
    return validation.check_images(x, name=name, bounds=bounds)


def check_delta(delta: Any, image_shape: Sequence[int], bounds: Bounds, dtype: torch.dtype) -> Tensor:
    """Validate a universal perturbation ``(C, H, W)``: finite, and no larger than :func:`largest_eps` in L2.

    Raises:
        DataError: another shape, NaN/inf values (also after casting to ``dtype``), or an L2 norm beyond
            the farthest two images in ``bounds`` can be.
    """
    shape = tuple(int(s) for s in image_shape)
    if not isinstance(delta, Tensor) or tuple(delta.shape) != shape:
        got = tuple(delta.shape) if isinstance(delta, Tensor) else type(delta).__name__
        raise DataError(f"delta must have the image shape {shape}, got {got}")
    if not bool(torch.isfinite(delta).all()):
        raise DataError("delta contains NaN or infinite values")
    size = float(torch.linalg.vector_norm(delta.detach().double()))
    limit = largest_eps("l2", bounds, shape)
    if bounds is not None and size > limit * (1 + 1e-4):
        raise DataError(f"delta has L2 norm {size:.6g}, beyond the largest meaningful {limit:.6g} for images {shape} "
                        f"in [{bounds[0]:g}, {bounds[1]:g}] (sqrt(C*H*W) * (hi - lo)); scale it down")
    if not bool(torch.isfinite(delta.to(dtype)).all()):
        raise DataError(f"delta holds values beyond the range of {dtype}; scale it down")
    return delta


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
    check_eps(eps)
    check_norm(norm, wave)
    if len(shape) != 3:
        raise ConfigurationError(f"shape must be (C, H, W), got {tuple(shape)}")
    channels, height, width = (int(s) for s in shape)
    eps = check_eps(eps, norm=norm, image_shape=(channels, height, width))
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
    check_images(x, bounds)
    images = x + delta
    if bounds is not None:
        images = images.clamp_(bounds[0], bounds[1])
    diff = (images - x).flatten(1)
    return AppliedPerturbation(
        images=images, l2=torch.linalg.vector_norm(diff, dim=1), linf=diff.abs().amax(dim=1)
    )
