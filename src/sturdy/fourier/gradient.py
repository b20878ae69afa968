"""Gradient fast path: predict the sensitive Fourier frequencies from one backward pass per batch.

To first order the loss change along the perturbation ``eps * (s x u) / sqrt(C)`` is
``eps / sqrt(C) * sum_c s_c <g_c, u>`` with ``g = grad_x loss``; with random signs its mean square is
``eps^2 / C * sum_c <g_c, u>^2``, and averaged over the phase of ``u`` this is proportional to
``sum_c |G_c(k, l)|^2``, the power spectrum of the input gradient at the frequency of ``u``. The
average power spectrum over images therefore ranks frequencies like the forward heat map, at the cost
of one forward and one backward pass per image instead of one forward per image and frequency.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from sturdy.datasource import data_source
from sturdy.errors import ConfigurationError, DataError
from sturdy.fourier._common import Model, call_model, check_batch_size, check_label_range, check_labels, in_eval_mode
from sturdy.fourier.basis import half_plane, to_full_map
from sturdy.fourier.perturbation import Bounds, check_images
from sturdy.utils import model_device_dtype

__all__ = ["GradientSpectrum", "gradient_spectrum", "rank_correlation"]


@dataclass(frozen=True, eq=False)
class GradientSpectrum:
    """Mean power spectrum of input gradients of the cross-entropy loss (sum over channels).

    Attributes:
        frequencies: ``(F, 2)`` canonical ``(k, l)`` (rows of :func:`~sturdy.fourier.half_plane`).
        power: ``(F,)`` mean over images of ``sum_c |DFT(grad_c)[k, l]|^2`` (unnormalised DFT).
        height: image height H.
        width: image width W.
        n_images: number of images.
        seconds: wall time.
    """

    frequencies: Tensor
    power: Tensor
    height: int
    width: int
    n_images: int
    seconds: float

    def full(self, *, centered: bool = True) -> Tensor:
        """``(H, W)`` symmetric map of the power; ``(0, 0)`` at the centre when ``centered``."""
        return to_full_map(self.power, self.height, self.width, centered=centered)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able summary."""
        return {"n_images": self.n_images, "seconds": self.seconds, "power_map": self.full().tolist()}


def _check_batch_labels(y: Tensor, logits: Tensor, index: int, first: int) -> None:
    """The labels of a streamed batch against the model's classes, the batch named in the error."""
    try:
        check_label_range(y, logits)
    except DataError as exc:
        raise DataError(f"batch {index} (samples {first} to {first + len(y) - 1}): {exc}") from None


@in_eval_mode
def gradient_spectrum(
    model: Model, x: Any, y: Optional[Tensor] = None, *, batch_size: int = 256, bounds: Bounds = (0.0, 1.0)
) -> GradientSpectrum:
    """Average power spectrum of ``grad_x CE(model(x), y)`` per canonical frequency.

    Args:
        model: differentiable classifier on ``(N, C, H, W)`` images; an ``nn.Module`` is evaluated in eval
            mode and its training flags restored after (its parameters get no gradients).
        x: images ``(N, C, H, W)`` in ``bounds``; or, without ``y``, any data of the contract of
            :mod:`sturdy.datasource` (an ``ImageDataset``, a ``Dataset``, a ``DataLoader``, an iterable of batches),
            read once, one batch on the device at a time (the spectrum is a sum over images).
        y: integer labels ``(N,)`` in the model's class range (checked on the first batch's logits).
        batch_size: images per backward pass (per-image gradients: the loss is summed over images).
        bounds: valid range checked on ``x``.
    """
    start = time.perf_counter()
    batch_size = check_batch_size(batch_size)
    if isinstance(x, Tensor):
        check_images(x, bounds)
        y = check_labels(y, x.shape[0])
        device, dtype = model_device_dtype(model, x)
        batches: Iterator[Tuple[Tensor, Tensor]] = ((x[i : i + batch_size], y[i : i + batch_size])
                                                    for i in range(0, x.shape[0], batch_size))
    else:  # the contract of sturdy.datasource: checked batch by batch, one on the device at a time
        device, dtype = model_device_dtype(model)
        batches = data_source(x, batch_size=batch_size).batches(
            device=device, dtype=dtype, check_x=lambda xb, name: check_images(xb, bounds, name=name))
    power: Optional[Tensor] = None
    n = 0
    for index, (xb, yb) in enumerate(batches):
        xs = xb.to(device=device, dtype=dtype).requires_grad_(True)
        with torch.enable_grad():
            logits = call_model(model, xs)
            if isinstance(x, Tensor):
                if n == 0:
                    check_label_range(y, logits)
            else:
                _check_batch_labels(yb, logits, index, n)
            loss = F.cross_entropy(logits, yb.to(device), reduction="sum")
            (grad,) = torch.autograd.grad(loss, xs)
        spec = torch.fft.rfft2(grad.double())
        batch_power = (spec.real**2 + spec.imag**2).sum(dim=(0, 1))
        power = batch_power if power is None else power + batch_power
        n += int(xs.shape[0])
    assert power is not None  # tensors hold images (check_images), a stream at least one batch (data_source)
    height, width = int(power.shape[0]), int(xs.shape[-1])
    freqs = half_plane(height, width)
    power = (power / n)[freqs[:, 0].to(device), freqs[:, 1].to(device)]
    return GradientSpectrum(
        frequencies=freqs, power=power.cpu(), height=height, width=width, n_images=n,
        seconds=time.perf_counter() - start,
    )


def _average_ranks(v: Tensor) -> Tensor:
    order = torch.argsort(v, stable=True)
    sorted_v = v[order]
    ranks = torch.empty(len(v), dtype=torch.float64)
    i = 0
    while i < len(v):
        j = i
        while j + 1 < len(v) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0
        i = j + 1
    return ranks


def rank_correlation(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two equal-length vectors (average ranks for ties).

    Examples:
        >>> round(rank_correlation(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 30.0, 20.0])), 12)
        0.5
    """
    a = torch.as_tensor(a).detach().flatten().double().cpu()
    b = torch.as_tensor(b).detach().flatten().double().cpu()
    if a.shape != b.shape or a.numel() < 2:
        raise ConfigurationError(f"need two vectors of equal length >= 2, got {tuple(a.shape)} and {tuple(b.shape)}")
    ra, rb = _average_ranks(a), _average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denom if denom > 0 else float("nan")
