"""Fourier sensitivity heat maps (Yin et al. 2019; Tsuzuku & Sato 2019).

For every distinct frequency ``(k, l)`` (the canonical half plane), every image ``x_n`` is perturbed by
``d = eps * (s_n x u) / ||s_n x u||`` (see :mod:`sturdy.fourier.perturbation`), ``s_n`` a random channel
sign pattern drawn per image and frequency, clipped to the valid range, and classified. The map holds
the error rate (prediction != label) and the fooling rate (prediction != clean prediction), plus the
mean budget actually applied after clipping. Work is batched over (frequency x image) and streamed:
peak memory is set by ``batch_size`` whatever the number of frequencies.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sturdy.errors import DataError
from sturdy.fourier._common import Model, call_model, check_batch_size, check_labels, in_eval_mode, predict_labels
from sturdy.fourier.basis import DEFAULT_PHASE, fourier_basis_batch, half_plane, to_full_map
from sturdy.fourier.perturbation import (
    Bounds,
    check_bounds,
    check_eps,
    check_images,
    check_norm,
    shape_directions,
)
from sturdy.fourier.plots import plot_fourier_maps
from sturdy.utils import model_device_dtype

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["FourierHeatmap", "fourier_heatmap", "heatmap_draws"]

_MAPS = ("error", "fooling", "applied")


def heatmap_draws(
    seed: int, index: int, n_images: int, channels: int, *, random_phase: bool
) -> Tuple[Tensor, Optional[Tensor]]:
    """The random channel signs ``(N, C)`` and (optionally) phases ``(N,)`` used for frequency ``index``.

    Drawn on the CPU from a generator seeded by ``(seed, index)`` so that any evaluation order (batched
    or one frequency at a time) sees the same draws.
    """
    gen = torch.Generator().manual_seed((seed % 2**31) * 2**32 + index)
    signs = 1.0 - 2.0 * torch.randint(0, 2, (n_images, channels), generator=gen).float()
    phases = torch.rand(n_images, generator=gen, dtype=torch.float64) * 2 * math.pi if random_phase else None
    return signs, phases


@dataclass(frozen=True, eq=False)
class FourierHeatmap:
    """Per-frequency sensitivity of a model at one budget.

    Values are stored per canonical frequency (rows of ``frequencies``, see
    :func:`~sturdy.fourier.half_plane`); :meth:`full` expands them to a centred symmetric map.

    Attributes:
        frequencies: ``(F, 2)`` canonical ``(k, l)``.
        error: ``(F,)`` error rate of the perturbed images (prediction != label).
        fooling: ``(F,)`` fooling rate (prediction != clean prediction).
        applied: ``(F,)`` mean budget actually applied after clipping, in ``norm``.
        clean_error: error rate without perturbation.
        eps: budget requested.
        norm: ``"l2"`` or ``"linf"``.
        wave: ``"sine"`` or ``"square"``.
        phase: fixed phase, or ``None`` when drawn uniformly per image.
        height: image height H.
        width: image width W.
        n_images: number of images N.
        evaluations: model evaluations spent (images), clean ones included.
        seconds: wall time.
    """

    frequencies: Tensor
    error: Tensor
    fooling: Tensor
    applied: Tensor
    clean_error: float
    eps: float
    norm: str
    wave: str
    phase: Optional[float]
    height: int
    width: int
    n_images: int
    evaluations: int
    seconds: float

    def values(self, which: str = "error") -> Tensor:
        """The per-frequency values of ``which`` in ``{"error", "fooling", "applied"}``."""
        if which not in _MAPS:
            raise DataError(f"which must be one of {_MAPS}, got {which!r}")
        return getattr(self, which)

    def full(self, which: str = "error", *, centered: bool = True) -> Tensor:
        """``(H, W)`` symmetric map of ``which``; frequency ``(0, 0)`` at the centre when ``centered``."""
        return to_full_map(self.values(which), self.height, self.width, centered=centered)

    def top(self, n: int = 5, which: str = "fooling") -> list:
        """The ``n`` most harmful canonical frequencies as ``[(k, l, value), ...]``."""
        vals = self.values(which)
        order = torch.argsort(vals, descending=True, stable=True)[:n]
        return [(int(self.frequencies[i, 0]), int(self.frequencies[i, 1]), float(vals[i])) for i in order]

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able summary with the full centred maps as nested lists."""
        return {
            "eps": self.eps,
            "norm": self.norm,
            "wave": self.wave,
            "phase": self.phase,
            "height": self.height,
            "width": self.width,
            "n_images": self.n_images,
            "clean_error": self.clean_error,
            "mean_error": float(self.error.mean()),
            "max_error": float(self.error.max()),
            "mean_fooling": float(self.fooling.mean()),
            "max_fooling": float(self.fooling.max()),
            "mean_applied": float(self.applied.mean()),
            "top_fooling": [list(t) for t in self.top(5)],
            "evaluations": self.evaluations,
            "seconds": self.seconds,
            "error_map": self.full("error").tolist(),
            "fooling_map": self.full("fooling").tolist(),
        }

    def figure(self, which: Sequence[str] = ("error", "fooling"), *, title: str = "") -> Figure:
        """A matplotlib ``Figure`` of the centred maps (one panel per entry of ``which``)."""
        prefix = f"{title}: " if title else ""
        panels = [(f"{prefix}{w} (eps={self.eps:g}, {self.norm})", self.full(w)) for w in which]
        return plot_fourier_maps(panels)

    def plot(self, path, which: Sequence[str] = ("error", "fooling"), *, title: str = "") -> None:
        """Save :meth:`figure` as a PNG at ``path``."""
        self.figure(which, title=title).savefig(path, dpi=120, bbox_inches="tight")


@in_eval_mode
@torch.no_grad()
def fourier_heatmap(
    model: Model,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    norm: str = "l2",
    wave: str = "sine",
    phase: Optional[float] = DEFAULT_PHASE,
    bounds: Bounds = (0.0, 1.0),
    batch_size: int = 2048,
    seed: int = 0,
    progress: bool = False,
) -> FourierHeatmap:
    """Error and fooling rate of ``model`` under every Fourier direction at budget ``eps``.

    Args:
        model: classifier taking ``(N, C, H, W)`` images and returning ``(N, classes)`` logits; an
            ``nn.Module`` is evaluated in eval mode and its training flags restored after.
        x: images ``(N, C, H, W)`` in ``bounds``; any H, W; grayscale or RGB.
        y: labels ``(N,)``.
        eps: budget (> 0) in ``norm``.
        norm: ``"l2"`` or ``"linf"`` (see :mod:`sturdy.fourier.perturbation`).
        wave: ``"sine"`` or ``"square"``.
        phase: phase of every direction, or ``None`` for a uniform random phase per image and frequency.
        bounds: valid pixel range; perturbed images are clipped to it (``None``: no clipping).
        batch_size: perturbed images per model call; sets the peak memory.
        seed: seeds the channel signs (random per image, channel and frequency) and random phases.
        progress: show a tqdm bar over frequencies.

    Returns:
        A :class:`FourierHeatmap`; rates are means over the N images.
    """
    start = time.perf_counter()
    eps = check_eps(eps)
    check_norm(norm, wave)
    bounds = check_bounds(bounds)
    batch_size = check_batch_size(batch_size)
    check_images(x, bounds)
    y = check_labels(y, x.shape[0])
    device, dtype = model_device_dtype(model, x)
    x = x.to(device=device, dtype=dtype)
    y = y.to(device)
    n, channels, height, width = x.shape
    clean = predict_labels(model, x, batch_size=batch_size)
    clean_error = float((clean != y).double().mean())
    freqs = half_plane(height, width)
    n_freq = freqs.shape[0]
    errors = torch.zeros(n_freq, dtype=torch.float64, device=device)
    fooled = torch.zeros_like(errors)
    applied = torch.zeros_like(errors)
    img_chunk = min(n, batch_size)
    freq_chunk = max(1, batch_size // img_chunk)
    random_phase = phase is None
    bar = tqdm(total=n_freq, desc="fourier heatmap", unit="freq", disable=not progress, leave=False)
    for f0 in range(0, n_freq, freq_chunk):
        f1 = min(n_freq, f0 + freq_chunk)
        draws = [heatmap_draws(seed, i, n, channels, random_phase=random_phase) for i in range(f0, f1)]
        signs = torch.stack([d[0] for d in draws]).to(device=device, dtype=dtype)  # (f, N, C)
        chunk_freqs = freqs[f0:f1]
        if not random_phase:
            basis = fourier_basis_batch(height, width, chunk_freqs, phase, dtype=dtype, device=device)
        for i0 in range(0, n, img_chunk):
            i1 = min(n, i0 + img_chunk)
            m = i1 - i0
            if random_phase:
                phases = torch.stack([d[1][i0:i1] for d in draws]).reshape(-1).to(device)
                rep = chunk_freqs.repeat_interleave(m, dim=0)
                u = fourier_basis_batch(height, width, rep, phases, dtype=dtype, device=device)
                u = u.view(f1 - f0, m, height, width)
            else:
                u = basis[:, None]
            xs = x[i0:i1]
            # (f, m, C, H, W): one broadcast product, then x added in place.
            images = shape_directions(u, signs[:, i0:i1], eps=eps, norm=norm, wave=wave).add_(xs)
            images = images.view(-1, channels, height, width)
            if bounds is not None:
                images.clamp_(bounds[0], bounds[1])
            diff = (images.view(f1 - f0, m, -1) - xs.view(1, m, -1))
            if norm == "l2":
                budget = torch.linalg.vector_norm(diff, dim=2)
            else:
                budget = diff.abs().amax(dim=2)
            pred = call_model(model, images).argmax(dim=1).view(f1 - f0, m)
            errors[f0:f1] += (pred != y[i0:i1]).sum(dim=1)
            fooled[f0:f1] += (pred != clean[i0:i1]).sum(dim=1)
            applied[f0:f1] += budget.sum(dim=1).double()
        bar.update(f1 - f0)
    bar.close()
    return FourierHeatmap(
        frequencies=freqs,
        error=(errors / n).cpu(),
        fooling=(fooled / n).cpu(),
        applied=(applied / n).cpu(),
        clean_error=clean_error,
        eps=eps,
        norm=norm,
        wave=wave,
        phase=None if phase is None else float(phase),
        height=height,
        width=width,
        n_images=n,
        evaluations=n * (n_freq + 1),
        seconds=time.perf_counter() - start,
    )
