"""Held-out evaluation of a universal perturbation, and the random-noise baseline it is compared with.

:func:`evaluate_perturbation` adds one perturbation ``delta`` ``(C, H, W)`` to every image, clips to the
valid range and counts how many predictions change (fooling rate) or are wrong (error rate), optionally
under random circular shifts of ``delta`` (the SFA's shift invariance, :mod:`sturdy.fourier.shift`).
:func:`random_noise_baseline` is the chance level of a universal perturbation: the same evaluation for
Gaussian perturbations of the same budget.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from sturdy.fourier._common import Model, call_model, check_batch_size, check_labels, in_eval_mode, predict_labels
from sturdy.fourier.limits import check_draws, check_shifts
from sturdy.fourier.perturbation import (
    Bounds,
    apply_perturbation,
    check_bounds,
    check_delta,
    check_eps,
    check_images,
    check_norm,
)
from sturdy.fourier.shift import circular_shift, random_shifts
from sturdy.utils import model_device_dtype

__all__ = ["PerturbationReport", "evaluate_perturbation", "RandomNoiseBaseline", "random_noise_baseline"]


@dataclass(frozen=True)
class PerturbationReport:
    """Held-out evaluation of a universal perturbation (:func:`evaluate_perturbation`).

    Attributes:
        fooling_rate: fraction of images whose predicted label changes.
        error_rate: error rate of the perturbed images (prediction != label).
        clean_error_rate: error rate of the clean images.
        shifted_fooling_rate: fooling rate under random circular shifts of delta (``None`` if shifts=0).
        shifted_error_rate: error rate under the same shifts (``None`` if shifts=0).
        mean_l2: mean L2 norm actually applied after clipping.
        mean_linf: mean L-inf norm actually applied after clipping.
        n_images: number of images.
        shifts: number of random shifts per image.
    """

    fooling_rate: float
    error_rate: float
    clean_error_rate: float
    shifted_fooling_rate: Optional[float]
    shifted_error_rate: Optional[float]
    mean_l2: float
    mean_linf: float
    n_images: int
    shifts: int

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able fields."""
        return asdict(self)


@in_eval_mode
@torch.no_grad()
def evaluate_perturbation(
    model: Model,
    delta: Tensor,
    x: Tensor,
    y: Tensor,
    *,
    shifts: int = 0,
    bounds: Bounds = (0.0, 1.0),
    batch_size: int = 2048,
    seed: int = 0,
) -> PerturbationReport:
    """Fooling and error rates of ``clip(x + delta)`` on (held-out) images, optionally under shifts.

    Args:
        model: classifier on ``(N, C, H, W)`` images; an ``nn.Module`` is evaluated in eval mode and its
            training flags restored after.
        delta: universal perturbation ``(C, H, W)`` (any attack's), finite, with an L2 norm at most the
            farthest two images in ``bounds`` can be (:func:`~sturdy.fourier.perturbation.largest_eps`).
        x: images ``(N, C, H, W)`` in ``bounds``.
        y: integer labels ``(N,)`` in the model's class range.
        shifts: number of random circular shifts of ``delta`` per image (uniform over all ``H x W``
            shifts, seeded); their mean fooling rate is ``shifted_fooling_rate``.
        bounds: valid pixel range (``None``: no clipping).
        batch_size: images per model call.
        seed: seeds the shifts.
    """
    bounds = check_bounds(bounds)
    batch_size = check_batch_size(batch_size)
    check_images(x, bounds)
    shifts = check_shifts(shifts, x.shape[2], x.shape[3])
    device, dtype = model_device_dtype(model, x)
    check_delta(delta, x.shape[1:], bounds, dtype)
    y = check_labels(y, x.shape[0])
    x = x.to(device=device, dtype=dtype)
    n, channels, height, width = x.shape
    y = y.to(device)
    delta = delta.to(device=device, dtype=dtype)
    clean = predict_labels(model, x, batch_size=batch_size, y=y)
    fooled = errors = 0
    l2 = linf = 0.0
    for i0 in range(0, n, batch_size):
        xs = x[i0 : i0 + batch_size]
        out = apply_perturbation(xs, delta, bounds=bounds)
        pred = call_model(model, out.images).argmax(dim=1)
        fooled += int((pred != clean[i0 : i0 + batch_size]).sum())
        errors += int((pred != y[i0 : i0 + batch_size]).sum())
        l2 += float(out.l2.sum())
        linf += float(out.linf.sum())
    shifted_fooled = shifted_errors = 0
    gen = torch.Generator().manual_seed(seed)
    for _ in range(shifts):
        moves = random_shifts(n, height, width, generator=gen)
        for i0 in range(0, n, batch_size):
            xs = x[i0 : i0 + batch_size]
            rolled = circular_shift(delta, moves[i0 : i0 + batch_size])
            images = apply_perturbation(xs, rolled, bounds=bounds).images
            pred = call_model(model, images).argmax(dim=1)
            shifted_fooled += int((pred != clean[i0 : i0 + batch_size]).sum())
            shifted_errors += int((pred != y[i0 : i0 + batch_size]).sum())
    return PerturbationReport(
        fooling_rate=fooled / n,
        error_rate=errors / n,
        clean_error_rate=float((clean != y).double().mean()),
        shifted_fooling_rate=shifted_fooled / (n * shifts) if shifts else None,
        shifted_error_rate=shifted_errors / (n * shifts) if shifts else None,
        mean_l2=l2 / n,
        mean_linf=linf / n,
        n_images=n,
        shifts=shifts,
    )


@dataclass(frozen=True)
class RandomNoiseBaseline:
    """Fooling rates of random Gaussian universal perturbations (:func:`random_noise_baseline`).

    Attributes:
        fooling_rate: mean fooling rate over the draws.
        shifted_fooling_rate: mean fooling rate under random circular shifts (``None`` if shifts=0).
        fooling_rates: fooling rate of each draw.
        eps: budget of every draw in ``norm``.
        norm: ``"l2"`` or ``"linf"``.
        draws: number of perturbations drawn.
        n_images: number of images.
        shifts: random shifts per image and draw.
    """

    fooling_rate: float
    shifted_fooling_rate: Optional[float]
    fooling_rates: Tuple[float, ...]
    eps: float
    norm: str
    draws: int
    n_images: int
    shifts: int

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able fields."""
        out = asdict(self)
        out["fooling_rates"] = list(self.fooling_rates)
        return out


@in_eval_mode
@torch.no_grad()
def random_noise_baseline(
    model: Model,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    norm: str = "l2",
    draws: int = 8,
    shifts: int = 0,
    bounds: Bounds = (0.0, 1.0),
    batch_size: int = 2048,
    seed: int = 0,
) -> RandomNoiseBaseline:
    """Held-out fooling rate of ``draws`` random Gaussian universal perturbations of budget ``eps``.

    The chance level a universal attack is compared with: one draw varies a lot (0.01 to 0.2 on the
    digits CNN at L2 2.0), so the mean over draws is reported. Each draw is i.i.d. standard normal
    noise of the image shape (drawn in float64 from a generator seeded with ``seed``), scaled to L2 norm
    ``eps`` (``norm="l2"``) or peak ``eps`` (``norm="linf"``), and evaluated with
    :func:`evaluate_perturbation`.

    Args:
        model: classifier on ``(N, C, H, W)`` images; an ``nn.Module`` is evaluated in eval mode and its
            training flags restored after.
        x: images ``(N, C, H, W)`` in ``bounds``.
        y: integer labels ``(N,)`` in the model's class range.
        eps: budget (> 0) in ``norm``, at most the farthest two images in ``bounds`` can be
            (:func:`~sturdy.fourier.perturbation.largest_eps`).
        norm: ``"l2"`` or ``"linf"``.
        draws: number of perturbations (>= 1).
        shifts: random circular shifts per image and draw (see :func:`evaluate_perturbation`).
        bounds: valid pixel range (``None``: no clipping).
        batch_size: images per model call.
        seed: seeds the noise and the shifts.
    """
    eps = check_eps(eps)
    check_norm(norm)
    check_draws(draws)
    bounds = check_bounds(bounds)
    check_images(x, bounds)
    eps = check_eps(eps, norm=norm, bounds=bounds, image_shape=x.shape[1:])
    check_labels(y, x.shape[0])
    gen = torch.Generator().manual_seed(seed)
    reports = []
    for _ in range(draws):
        noise = torch.randn(x.shape[1:], generator=gen, dtype=torch.float64)
        noise = eps * noise / (noise.norm() if norm == "l2" else noise.abs().max())
        reports.append(evaluate_perturbation(model, noise, x, y, shifts=shifts, bounds=bounds,
                                             batch_size=batch_size, seed=seed))
    rates = tuple(r.fooling_rate for r in reports)
    shifted = [r.shifted_fooling_rate for r in reports if r.shifted_fooling_rate is not None]
    return RandomNoiseBaseline(
        fooling_rate=sum(rates) / draws,
        shifted_fooling_rate=sum(shifted) / draws if shifts else None,
        fooling_rates=rates,
        eps=eps,
        norm=norm,
        draws=draws,
        n_images=int(x.shape[0]),
        shifts=shifts,
    )
