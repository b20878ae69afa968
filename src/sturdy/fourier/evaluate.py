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

from sturdy.fourier._common import Model, call_model, check_batch_size, in_eval_mode, predict_labels
from sturdy.fourier.images import AnalysisImages
from sturdy.fourier.limits import check_draws, check_shifts
from sturdy.fourier.perturbation import (
    Bounds,
    apply_perturbation,
    check_bounds,
    check_delta,
    check_eps,
    check_norm,
)
from sturdy.fourier.shift import circular_shift, random_shifts

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
    x: Any,
    y: Optional[Tensor] = None,
    *,
    shifts: int = 0,
    bounds: Bounds = (0.0, 1.0),
    batch_size: int = 2048,
    seed: int = 0,
    count: Optional[int] = None,
) -> PerturbationReport:
    """Fooling and error rates of ``clip(x + delta)`` on (held-out) images, optionally under shifts.

    Args:
        model: classifier on ``(N, C, H, W)`` images; an ``nn.Module`` is evaluated in eval mode and its
            training flags restored after.
        delta: universal perturbation ``(C, H, W)`` (any attack's), finite, with an L2 norm at most the
            farthest two images in ``bounds`` can be (:func:`~sturdy.fourier.perturbation.largest_eps`).
        x: images ``(N, C, H, W)`` in ``bounds``; or, without ``y``, any data of the contract of
            :mod:`sturdy.datasource` (an ``ImageDataset``, a ``Dataset``, a ``DataLoader``, an iterable of batches),
            read once, one batch on the device at a time (the rates are counts over images).
        y: integer labels ``(N,)`` in the model's class range.
        shifts: number of random circular shifts of ``delta`` per image (uniform over all ``H x W``
            shifts, seeded); their mean fooling rate is ``shifted_fooling_rate``.
        bounds: valid pixel range (``None``: no clipping).
        batch_size: images per model call.
        seed: seeds the shifts.
        count: the number of images of an iterable of batches without a length.
    """
    bounds = check_bounds(bounds)
    batch_size = check_batch_size(batch_size)
    data = AnalysisImages(model, x, y, bounds=bounds, labels=True, what="evaluate_perturbation", count=count,
                          batch_size=batch_size, work=False)
    n, channels, height, width = data.shape
    shifts = check_shifts(shifts, height, width)
    check_delta(delta, data.shape[1:], bounds, data.dtype)
    delta = delta.to(device=data.device, dtype=data.dtype)
    gen = torch.Generator().manual_seed(seed)
    moves = [random_shifts(n, height, width, generator=gen) for _ in range(shifts)]  # the draws of every image
    clean_errors = fooled = errors = shifted_fooled = shifted_errors = 0
    l2 = linf = 0.0
    for offset, xb, yb in data.passes():
        assert yb is not None
        clean = predict_labels(model, xb, batch_size=batch_size, y=yb)
        clean_errors += int((clean != yb).sum())
        for i0 in range(0, len(xb), batch_size):
            xs, ys, cs = xb[i0 : i0 + batch_size], yb[i0 : i0 + batch_size], clean[i0 : i0 + batch_size]
            out = apply_perturbation(xs, delta, bounds=bounds)
            pred = call_model(model, out.images).argmax(dim=1)
            fooled += int((pred != cs).sum())
            errors += int((pred != ys).sum())
            l2 += float(out.l2.sum())
            linf += float(out.linf.sum())
        for move in moves:
            for i0 in range(0, len(xb), batch_size):
                xs = xb[i0 : i0 + batch_size]
                rolled = circular_shift(delta, move[offset + i0 : offset + i0 + len(xs)])
                pred = call_model(model, apply_perturbation(xs, rolled, bounds=bounds).images).argmax(dim=1)
                shifted_fooled += int((pred != clean[i0 : i0 + batch_size]).sum())
                shifted_errors += int((pred != yb[i0 : i0 + batch_size]).sum())
    return PerturbationReport(
        fooling_rate=fooled / n,
        error_rate=errors / n,
        clean_error_rate=clean_errors / n,
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
    x: Any,
    y: Optional[Tensor] = None,
    *,
    eps: float,
    norm: str = "l2",
    draws: int = 8,
    shifts: int = 0,
    bounds: Bounds = (0.0, 1.0),
    batch_size: int = 2048,
    seed: int = 0,
    count: Optional[int] = None,
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
        count: the number of images of an iterable of batches without a length (one pass per draw: such data must
            be readable again).
    """
    eps = check_eps(eps)
    check_norm(norm)
    check_draws(draws)
    bounds = check_bounds(bounds)
    data = AnalysisImages(model, x, y, bounds=bounds, labels=True, what="random_noise_baseline", count=count,
                          batch_size=batch_size, work=False, passes=draws)
    eps = check_eps(eps, norm=norm, bounds=bounds, image_shape=data.shape[1:])
    gen = torch.Generator().manual_seed(seed)
    reports = []
    for _ in range(draws):
        noise = torch.randn(data.shape[1:], generator=gen, dtype=torch.float64)
        noise = eps * noise / (noise.norm() if norm == "l2" else noise.abs().max())
        reports.append(evaluate_perturbation(model, noise, x, y, shifts=shifts, bounds=bounds,
                                             batch_size=batch_size, seed=seed, count=count))
    rates = tuple(r.fooling_rate for r in reports)
    shifted = [r.shifted_fooling_rate for r in reports if r.shifted_fooling_rate is not None]
    return RandomNoiseBaseline(
        fooling_rate=sum(rates) / draws,
        shifted_fooling_rate=sum(shifted) / draws if shifts else None,
        fooling_rates=rates,
        eps=eps,
        norm=norm,
        draws=draws,
        n_images=data.n,
        shifts=shifts,
    )
