"""The measurement of a Fourier heat map (:mod:`sturdy.fourier.heatmap`): the random draws of a frequency, and the
(frequency, image) pairs of a group of frequencies on a pass over the images (:mod:`sturdy.fourier.images`).

The work of one group is a stream of (frequency, image) pairs in frequency-major order over each batch of
images, cut into model calls of any size (:class:`~sturdy.fourier.batching.BatchSizer`); the draws of a pair
depend only on ``(seed, frequency, image index)``, so held images and streamed batches are measured alike.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sturdy.fourier.basis import fourier_basis_batch
from sturdy.fourier.batching import BatchSizer, ModelRunner
from sturdy.fourier.images import AnalysisImages
from sturdy.fourier.partial import HeatmapCounts
from sturdy.fourier.perturbation import Bounds, shape_directions

__all__ = ["HeatmapWork", "heatmap_draws", "measure_rows"]


def heatmap_draws(
    seed: int, index: int, n_images: int, channels: int, *, random_phase: bool
) -> Tuple[Tensor, Optional[Tensor]]:
    """The random channel signs ``(N, C)`` and (optionally) phases ``(N,)`` used for frequency ``index``.

    Drawn on the CPU from a generator seeded by ``(seed, index)`` so that any evaluation order (batched
    or one frequency at a time, any subset, any shard) sees the same draws.
    """
    gen = torch.Generator().manual_seed((seed % 2**31) * 2**32 + index)
    signs = 1.0 - 2.0 * torch.randint(0, 2, (n_images, channels), generator=gen).float()
    phases = torch.rand(n_images, generator=gen, dtype=torch.float64) * 2 * math.pi if random_phase else None
    return signs, phases


class _Draws:
    """The draws of the frequencies of the current slice, cached while a frequency spans several slices."""

    def __init__(self, seed: int, n: int, channels: int, random_phase: bool, device: torch.device,
                 dtype: torch.dtype, *, keep: bool = False) -> None:
        self.args = (seed, n, channels, random_phase, device, dtype)
        self.keep = keep  # streamed images: every batch of a pass needs the draws of the pass' frequencies
        self.cache: Dict[int, Tuple[Tensor, Optional[Tensor]]] = {}

    def get(self, rows: Sequence[int]) -> Tuple[Tensor, Optional[Tensor]]:
        seed, n, channels, random_phase, device, dtype = self.args
        if not self.keep:
            self.cache = {r: self.cache[r] for r in rows if r in self.cache}
        for r in rows:
            if r not in self.cache:
                signs, phases = heatmap_draws(seed, r, n, channels, random_phase=random_phase)
                self.cache[r] = (signs.to(device=device, dtype=dtype), None if phases is None else phases.to(device))
        signs = torch.stack([self.cache[r][0] for r in rows])
        phases = torch.stack([self.cache[r][1] for r in rows]) if random_phase else None  # type: ignore[misc]
        return signs, phases


def measure_rows(
    runner: ModelRunner, sizer: BatchSizer, x: Tensor, y: Tensor, clean: Tensor, freqs: Tensor, rows: Tensor,
    counts: HeatmapCounts, *, eps: float, norm: str, wave: str, phase: Optional[float], bounds: Bounds,
    draws: _Draws, bar: Any, offset: int = 0,
) -> int:
    """Measure the canonical frequencies ``rows`` on the images ``x`` (images ``offset ..`` of the draws) into
    ``counts``; returns the evaluations."""
    n, channels, height, width = x.shape
    device, dtype = x.device, x.dtype
    total = len(rows) * n
    pos = 0
    while pos < total:
        b = sizer.next(total - pos)
        sizer.start()
        f0, f1 = pos // n, (pos + b - 1) // n + 1
        slice_rows = rows[f0:f1].tolist()
        pair = torch.arange(pos, pos + b, device=device)
        local, img = pair // n - f0, pair % n
        signs, phases = draws.get(slice_rows)  # (f, N, C), (f, N)
        pair_signs = signs[local, img + offset]
        xs = x[img]
        if phase is None:
            u = fourier_basis_batch(height, width, freqs[rows[f0:f1]][local.cpu()], phases[local, img + offset],
                                    dtype=dtype, device=device)
            images = shape_directions(u, pair_signs, eps=eps, norm=norm, wave=wave).add_(xs)
        else:
            basis = fourier_basis_batch(height, width, freqs[rows[f0:f1]], phase, dtype=dtype, device=device)
            ones = torch.ones(len(slice_rows), channels, dtype=dtype, device=device)
            scaled = shape_directions(basis, ones, eps=eps, norm=norm, wave=wave)[:, :1]  # (f, 1, H, W)
            images = torch.addcmul(xs, pair_signs[:, :, None, None], scaled[local])
        if bounds is not None:
            images.clamp_(bounds[0], bounds[1])
        diff = (images - xs).flatten(1)
        budget = torch.linalg.vector_norm(diff, dim=1) if norm == "l2" else diff.abs().amax(dim=1)
        try:
            pred = runner.labels(images)
        except torch.cuda.OutOfMemoryError:
            del images, diff, xs
            if not sizer.shrink():
                raise
            torch.cuda.empty_cache()
            continue
        target = rows.to(device)[f0:f1][local]
        counts.errors.index_add_(0, target, (pred != y[img]).long())
        counts.fooled.index_add_(0, target, (pred != clean[img]).long())
        counts.applied.index_add_(0, target, budget.double())
        sizer.stop(b)
        done_before, pos = pos // n, pos + b
        bar.update(pos // n - done_before)
    counts.measured[rows.to(device)] = True
    return total


class HeatmapWork:
    """The passes of one heat map: each :meth:`run` measures a group of frequencies on every image (one pass over
    them); the first also computes the clean predictions (``clean``, ``wrong``); ``spent`` counts the evaluations."""

    def __init__(self, data: AnalysisImages, runner: ModelRunner, sizer: BatchSizer, freqs: Tensor, *, eps: float,
                 norm: str, wave: str, phase: Optional[float], bounds: Bounds, seed: int) -> None:
        self.data, self.runner, self.sizer, self.freqs = data, runner, sizer, freqs
        self.settings: Dict[str, Any] = dict(eps=eps, norm=norm, wave=wave, phase=phase, bounds=bounds)
        self.seed = seed
        self.clean = torch.empty(data.n, dtype=torch.long, device=data.device)
        self.wrong = self.spent = 0
        self.passes = 0

    def run(self, rows: Tensor, counts: HeatmapCounts, *, bar: Any) -> HeatmapCounts:
        """Measure the frequencies ``rows`` into ``counts`` (the first call reads the data even without rows)."""
        data, first = self.data, self.passes == 0
        if not first and not len(rows):
            return counts
        self.passes += 1
        channels = data.shape[1]
        draws = _Draws(self.seed, data.n, channels, self.settings["phase"] is None, data.device, data.dtype,
                       keep=data.streamed)
        quiet = tqdm(disable=True)
        for offset, xb, yb in data.passes():
            assert yb is not None
            clean = self.clean[offset : offset + len(xb)]
            if first:  # the clean predictions, on the first pass
                clean.copy_(self.runner.predict(xb, batch_size=self.sizer.next(len(xb)), y=yb))
                self.wrong += int((clean != yb).sum())
                self.spent += len(xb)
            self.spent += measure_rows(self.runner, self.sizer, xb, yb, clean, self.freqs, rows, counts,
                                       draws=draws, bar=quiet if data.streamed else bar, offset=offset,
                                       **self.settings)
        if data.streamed:
            bar.update(len(rows))
        return counts
