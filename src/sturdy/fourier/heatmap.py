"""Fourier sensitivity heat maps (Yin et al. 2019; Tsuzuku & Sato 2019).

For every distinct frequency ``(k, l)`` (the canonical half plane, or a subset of it, see
:mod:`sturdy.fourier.frequencies`), every image ``x_n`` is perturbed by ``d = eps * (s_n x u) / ||s_n x u||``
(see :mod:`sturdy.fourier.perturbation`), ``s_n`` a random channel sign pattern drawn per image and
frequency, clipped to the valid range, and classified. The map holds the error rate (prediction != label)
and the fooling rate (prediction != clean prediction), plus the mean budget actually applied after clipping.

The work is a stream of (frequency, image) pairs in frequency-major order, cut into model calls of any
size (:mod:`sturdy.fourier.batching` picks it when the user does not): peak memory is set by the batch
size whatever the number of frequencies, and the result does not depend on the slicing. The random draws
of a frequency depend only on ``(seed, frequency)``, so a subset, a shard or a resumed run measures each
frequency exactly as a full single-process run does.

**Pixel space.** The perturbation is added to ``x`` in pixel space (``bounds``, default ``[0, 1]``) and the
images are clipped there. A model that normalises its inputs must do it inside the model: wrap it with
:func:`sturdy.fourier.with_normalization` rather than passing normalised images (the budget would then be
measured in normalised units and the clipping would be wrong).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm.auto import tqdm

from sturdy.errors import ConfigurationError, DataError
from sturdy.fourier._common import Model, in_eval_mode
from sturdy.fourier.basis import DEFAULT_PHASE, check_phase, half_plane, to_full_map
from sturdy.fourier.batching import BatchSizer, ModelRunner
from sturdy.fourier.frequencies import FrequencyList, canonical_rows
from sturdy.fourier.heatmap_measure import HeatmapWork, heatmap_draws
from sturdy.fourier.images import AnalysisImages
from sturdy.fourier.limits import check_save_every
from sturdy.fourier.partial import HeatmapCounts, fingerprint, load_partial, save_partial
from sturdy.fourier.perturbation import (
    Bounds,
    check_bounds,
    check_eps,
    check_norm,
)
from sturdy.fourier.plots import plot_fourier_maps
from sturdy.utils import atomic_save_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["FourierHeatmap", "fourier_heatmap", "heatmap_draws"]

_MAPS = ("error", "fooling", "applied")
SAVES_PER_RUN = 20
DRAWS_BYTES = 1 << 28
"""Streamed images: the random draws one pass over the data holds (frequencies x images), at most this many bytes."""
"""With partial results and no ``save_every``, the state is saved about this many times per run."""


@dataclass(frozen=True, eq=False)
class FourierHeatmap:
    """Per-frequency sensitivity of a model at one budget.

    Values are stored per canonical frequency (rows of ``frequencies``, see
    :func:`~sturdy.fourier.half_plane`); :meth:`full` expands them to a centred symmetric map. A frequency
    that was not measured (a subset) holds NaN and ``measured`` is ``False`` there.

    Attributes:
        frequencies: ``(F, 2)`` canonical ``(k, l)`` (the whole half plane).
        error: ``(F,)`` error rate of the perturbed images (prediction != label); NaN where not measured.
        fooling: ``(F,)`` fooling rate (prediction != clean prediction); NaN where not measured.
        applied: ``(F,)`` mean budget actually applied after clipping, in ``norm``; NaN where not measured.
        measured: ``(F,)`` bool, which frequencies were measured.
        clean_error: error rate without perturbation.
        eps: budget requested.
        norm: ``"l2"`` or ``"linf"``.
        wave: ``"sine"`` or ``"square"``.
        phase: fixed phase, or ``None`` when drawn uniformly per image.
        height: image height H.
        width: image width W.
        n_images: number of images N.
        evaluations: model evaluations spent by this call over all ranks (images), clean ones included;
            frequencies loaded from partial results cost none.
        seconds: wall time.
        batch_size: perturbed images per model call (the one chosen when automatic).
        resumed: frequencies taken from partial results.
        world_size: processes the frequencies were split over.
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
    measured: Optional[Tensor] = None
    batch_size: int = 0
    resumed: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.measured is None:
            object.__setattr__(self, "measured", torch.ones(self.frequencies.shape[0], dtype=torch.bool))

    def values(self, which: str = "error") -> Tensor:
        """The per-frequency values of ``which`` in ``{"error", "fooling", "applied"}`` (NaN: not measured)."""
        if which not in _MAPS:
            raise DataError(f"which must be one of {_MAPS}, got {which!r}")
        return getattr(self, which)

    def full(self, which: str = "error", *, centered: bool = True) -> Tensor:
        """``(H, W)`` symmetric map of ``which``; frequency ``(0, 0)`` at the centre when ``centered``."""
        return to_full_map(self.values(which), self.height, self.width, centered=centered)

    def measured_map(self, *, centered: bool = True) -> Tensor:
        """``(H, W)`` bool map of the measured frequencies (same layout as :meth:`full`)."""
        return to_full_map(self.measured, self.height, self.width, centered=centered)

    def top(self, n: int = 5, which: str = "fooling") -> list:
        """The ``n`` most harmful measured canonical frequencies as ``[(k, l, value), ...]``."""
        vals = torch.where(self.measured, self.values(which), torch.full_like(self.values(which), -math.inf))
        order = torch.argsort(vals, descending=True, stable=True)[: min(n, int(self.measured.sum()))]
        return [(int(self.frequencies[i, 0]), int(self.frequencies[i, 1]), float(vals[i])) for i in order]

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able summary with the full centred maps as nested lists (``NaN``: not measured).

        ``measured`` is the centred bool map of the measured frequencies; means and maxima are over them.
        """
        m = self.measured

        def stat(which: str, fn: Any) -> float:
            vals = self.values(which)[m]
            return float(fn(vals)) if vals.numel() else math.nan

        return {
            "eps": self.eps,
            "norm": self.norm,
            "wave": self.wave,
            "phase": self.phase,
            "height": self.height,
            "width": self.width,
            "n_images": self.n_images,
            "clean_error": self.clean_error,
            "mean_error": stat("error", torch.mean),
            "max_error": stat("error", torch.max),
            "mean_fooling": stat("fooling", torch.mean),
            "max_fooling": stat("fooling", torch.max),
            "mean_applied": stat("applied", torch.mean),
            "top_fooling": [list(t) for t in self.top(5)],
            "evaluations": self.evaluations,
            "seconds": self.seconds,
            "batch_size": self.batch_size,
            "measured_frequencies": int(m.sum()),
            "total_frequencies": int(m.numel()),
            "resumed": self.resumed,
            "world_size": self.world_size,
            "error_map": self.full("error").tolist(),
            "fooling_map": self.full("fooling").tolist(),
            "measured": self.measured_map().tolist(),
        }

    def figure(self, which: Sequence[str] = ("error", "fooling"), *, title: str = "") -> Figure:
        """A matplotlib ``Figure`` of the centred maps (one panel per entry of ``which``; unmeasured: hatched)."""
        prefix = f"{title}: " if title else ""
        panels = [(f"{prefix}{w} (eps={self.eps:g}, {self.norm})", self.full(w)) for w in which]
        return plot_fourier_maps(panels)

    def plot(self, path, which: Sequence[str] = ("error", "fooling"), *, title: str = "") -> None:
        """Save :meth:`figure` as a PNG at ``path``, atomically (never a partial image)."""
        atomic_save_figure(self.figure(which, title=title), path, dpi=120, bbox_inches="tight")


def _group_size(data: AnalysisImages, per_rank: int, *, saving: bool, save_every: Optional[int]) -> int:
    """Frequencies measured between two saves of the partial results (all without them); for streamed images at
    most as many as keep the draws of a pass within :data:`DRAWS_BYTES`."""
    if not saving:
        chunk = max(1, per_rank)
    else:
        chunk = save_every if save_every is not None else max(1, -(-per_rank // SAVES_PER_RUN))
    if data.streamed:
        n, channels = data.shape[:2]
        per_frequency = n * (channels + 2) * torch.empty((), dtype=data.dtype).element_size()
        chunk = min(chunk, max(1, DRAWS_BYTES // per_frequency))
    return chunk


def _world(distributed: bool) -> Tuple[int, int]:
    if not isinstance(distributed, bool):
        raise ConfigurationError(f"distributed must be a bool, got {distributed!r}")
    if not distributed:
        return 0, 1
    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigurationError(
            "distributed=True needs an initialised default process group (torchrun, or "
            "sturdy.distributed.init_from_env() / run_local_workers)"
        )
    return dist.get_rank(), dist.get_world_size()


@in_eval_mode
@torch.no_grad()
def fourier_heatmap(
    model: Model,
    x: Any,
    y: Optional[Tensor] = None,
    *,
    eps: float,
    norm: str = "l2",
    wave: str = "sine",
    phase: Optional[float] = DEFAULT_PHASE,
    bounds: Bounds = (0.0, 1.0),
    frequencies: Optional[FrequencyList] = None,
    batch_size: Optional[int] = None,
    seed: int = 0,
    autocast: Optional[torch.dtype] = None,
    channels_last: bool = False,
    distributed: bool = False,
    partial: Optional[os.PathLike] = None,
    save_every: Optional[int] = None,
    progress: bool = False,
    count: Optional[int] = None,
) -> FourierHeatmap:
    """Error and fooling rate of ``model`` under every Fourier direction (or a subset) at budget ``eps``.

    The perturbation is added in pixel space, before any input normalisation: a model trained on
    normalised inputs must be passed as ``with_normalization(model, mean, std)`` with ``x`` in ``bounds``.

    Args:
        model: classifier taking ``(N, C, H, W)`` images and returning ``(N, classes)`` logits; an
            ``nn.Module`` is evaluated in eval mode and its training flags restored after. A
            ``torch.compile``d module or function is called as given.
        x: images ``(N, C, H, W)`` in ``bounds`` (pixel space); any H, W; grayscale or RGB. Or, without ``y``,
            any data of the contract of :mod:`sturdy.datasource` (an ``ImageDataset``, a ``Dataset`` of
            ``(image, label)`` pairs, a ``DataLoader``, an iterable of batches): streamed batch by batch, one
            on the device at a time, read once per group of frequencies whose random draws fit
            :data:`DRAWS_BYTES` (more than one pass, or ``partial``, needs data that can be read again); the
            counts equal those of the same images as tensors.
        y: integer labels ``(N,)`` in the model's class range, with tensor images ``x``.
        eps: budget (> 0) in ``norm``, at most the farthest two images in ``bounds`` can be
            (:func:`~sturdy.fourier.perturbation.largest_eps`).
        norm: ``"l2"`` or ``"linf"`` (see :mod:`sturdy.fourier.perturbation`).
        wave: ``"sine"`` or ``"square"``.
        phase: phase of every direction (finite, radians), or ``None`` for a uniform random phase per image
            and frequency.
        bounds: valid pixel range; perturbed images are clipped to it (``None``: no clipping).
        frequencies: ``None`` (every distinct frequency) or ``(F, 2)`` integer ``(k, l)`` to measure (any
            representative; see :func:`~sturdy.fourier.strided_frequencies` and
            :func:`~sturdy.fourier.band_frequencies`). Unmeasured frequencies are NaN in the result.
        batch_size: perturbed images per model call (sets the peak memory), or ``None``: chosen online for
            throughput (:class:`~sturdy.fourier.batching.BatchSizer`).
        seed: seeds the channel signs (random per image, channel and frequency) and random phases.
        autocast: ``None``, ``torch.bfloat16`` or ``torch.float16``: run the model under ``torch.autocast``;
            perturbations stay float32 (float64 for a float64 model) and rates are exact counts.
        channels_last: hand the model ``channels_last`` images.
        distributed: split the frequencies over the ranks of the default process group (torchrun; gloo on
            CPU, NCCL on GPU). Every rank passes the same arguments and gets the full map, equal to a
            single-process run with the same seed.
        partial: a JSON file of partial results: frequencies already measured there (under the same
            settings, images, labels and weights) are kept, and the state is saved there atomically as
            the map progresses (by rank 0); the frequencies of the result are those requested plus those
            loaded.
        save_every: frequencies per rank between saves of ``partial`` (default: about
            :data:`SAVES_PER_RUN` saves per run).
        progress: show a tqdm bar over frequencies (rank 0).
        count: the number of images of an iterable of batches (needed before the first pass: the draws depend on
            it; known for tensors, datasets and ``DataLoader``\\ s).

    Returns:
        A :class:`FourierHeatmap`; rates are means over the N images.

    Raises:
        DataError: images not ``(N, C, H, W)`` finite floats in ``bounds``; labels not integers, not one per
            image or outside the model's classes (checked on the clean predictions, before the map).
        ConfigurationError: a setting out of range (eps beyond the largest meaningful budget, a non-finite
            phase, ...).
    """
    start = time.perf_counter()
    check_eps(eps)
    check_norm(norm, wave)
    bounds = check_bounds(bounds)
    phase = check_phase(phase, allow_random=True)
    data = AnalysisImages(model, x, y, bounds=bounds, labels=True, what="the Fourier heat map", count=count,
                          batch_size=batch_size)
    eps = check_eps(eps, norm=norm, bounds=bounds, image_shape=data.shape[1:])
    rank, world = _world(distributed)
    device, model_dtype, dtype = data.device, data.model_dtype, data.dtype
    n, channels, height, width = data.shape
    freqs = half_plane(height, width)
    n_freq = freqs.shape[0]
    if save_every is not None:
        save_every = check_save_every(save_every, n_freq)
    requested = torch.arange(n_freq) if frequencies is None else canonical_rows(frequencies, height, width)
    if requested.numel() == 0:
        raise ConfigurationError("frequencies is empty: pass None (every frequency) or at least one (k, l)")
    runner = ModelRunner(model, device=device, model_dtype=model_dtype, autocast=autocast,
                         channels_last=channels_last)
    counts = HeatmapCounts(n_freq, device)
    settings: Dict[str, Any] = {}
    resumed = 0
    if partial is not None:
        data.require_passes(2)
        settings = {"eps": eps, "norm": norm, "wave": wave, "phase": phase,
                    "bounds": None if bounds is None else list(bounds), "seed": seed,
                    "shape": [n, channels, height, width], "autocast": str(autocast),
                    **fingerprint(model, ((xb, yb) for _, xb, yb in data.passes()), data.shape, dtype)}
        loaded = load_partial(partial, n_freq, settings, device)
        if loaded is not None:
            counts.add(loaded)
            resumed = int(loaded.measured.sum())
    pending = requested[~counts.measured.cpu()[requested]]
    mine = pending[rank::world]
    per_rank = -(-len(pending) // world)
    chunk = _group_size(data, per_rank, saving=partial is not None, save_every=save_every)
    chunks = -(-per_rank // chunk) if per_rank else 0
    data.require_passes(max(chunks, 1))
    sizer = BatchSizer(batch_size, device=device, total=max(1, per_rank * n),
                       item_bytes=channels * height * width * torch.empty((), dtype=dtype).element_size())
    bar = tqdm(total=len(mine), desc="fourier heatmap", unit="freq", disable=not progress or rank != 0, leave=False)
    work = HeatmapWork(data, runner, sizer, freqs, eps=eps, norm=norm, wave=wave, phase=phase, bounds=bounds,
                       seed=seed)
    for r in range(max(chunks, 1)):
        rows = mine[r * chunk : (r + 1) * chunk]
        part = work.run(rows, HeatmapCounts(n_freq, device), bar=bar)
        if not chunks:
            break
        if world > 1:
            part.all_reduce()
        counts.add(part)
        if partial is not None and rank == 0:
            save_partial(partial, counts, settings)
    bar.close()
    clean_error, spent = work.wrong / n, work.spent
    if world > 1:
        from sturdy.distributed import all_reduce_sum

        spent = int(all_reduce_sum([spent])[0])
    measured = counts.measured.cpu()
    nan = torch.tensor(math.nan, dtype=torch.float64)

    def rate(total: Tensor) -> Tensor:
        return torch.where(measured, total.cpu().double() / n, nan)

    return FourierHeatmap(
        frequencies=freqs,
        error=rate(counts.errors),
        fooling=rate(counts.fooled),
        applied=torch.where(measured, counts.applied.cpu() / n, nan),
        clean_error=clean_error,
        eps=eps,
        norm=norm,
        wave=wave,
        phase=phase,
        height=height,
        width=width,
        n_images=n,
        evaluations=spent,
        seconds=time.perf_counter() - start,
        measured=measured,
        batch_size=sizer.best,
        resumed=resumed,
        world_size=world,
    )
