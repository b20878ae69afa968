"""The black-box search machinery shared by the Single Fourier Attack and the Fourier combination.

* :func:`enumerate_candidates`: the SFA search space ``(k, l, phi, s)``, every distinct perturbation once.
  When the phases contain ``phi + pi``, ``(phi, s)`` and ``(phi + pi, -s)`` are the same perturbation, so
  the first channel sign is fixed to ``+1``; a self-conjugate frequency keeps one phase per sign of its
  (one-dimensional) direction.
* :func:`halving_schedule` / :func:`successive_halving`: score every candidate on a small random image
  subset, keep the best ``1 / eta``, grow the (nested) subset ``eta`` times, until one candidate is left
  (then scored on the whole set) or the subset is the whole set (then the best survivor wins). Ties go to
  the candidate enumerated first.
* :func:`candidate_deltas`: the perturbations of candidates at a budget, generated on demand.
* :func:`count_fooled`: how many images' predicted labels each perturbation changes (labels only).

Queries count image evaluations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from sturdy.errors import ConfigurationError
from sturdy.fourier._common import Model
from sturdy.fourier.basis import SELF_CONJUGATE_COS_TOL, fourier_basis_batch, half_plane, is_self_conjugate
from sturdy.fourier.batching import BatchSizer, ModelRunner
from sturdy.fourier.limits import MAX_SIGN_CHANNELS as _MAX_SIGN_CHANNELS
from sturdy.fourier.limits import check_phases
from sturdy.fourier.perturbation import Bounds, shape_directions, sign_patterns

__all__ = [
    "Candidates",
    "HalvingOutcome",
    "enumerate_candidates",
    "candidate_deltas",
    "halving_schedule",
    "plan_queries",
    "count_fooled",
    "successive_halving",
]



@dataclass(frozen=True, eq=False)
class Candidates:
    """The SFA search space, one row per distinct candidate perturbation.

    Attributes:
        frequencies: ``(K, 2)`` canonical ``(k, l)``.
        phases: ``(K,)`` phases in radians (float64).
        signs: ``(K, C)`` channel signs in ``{-1, +1}``.
    """

    frequencies: Tensor
    phases: Tensor
    signs: Tensor

    def __len__(self) -> int:
        return int(self.frequencies.shape[0])

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able rows: ``frequencies``, ``phases`` and ``signs`` as lists."""
        return {
            "frequencies": self.frequencies.tolist(),
            "phases": self.phases.tolist(),
            "signs": self.signs.to(torch.int64).tolist(),
        }


def enumerate_candidates(
    channels: int, height: int, width: int, *, phases: int = 8, search_signs: bool = True
) -> Candidates:
    """All distinct SFA candidates for ``(C, H, W)`` images (see the module docstring)."""
    phases = check_phases(phases, channels, height, width, search_signs=search_signs)
    if search_signs and channels > _MAX_SIGN_CHANNELS:
        raise ConfigurationError(
            f"searching all 2^{channels} channel sign patterns is too large; pass search_signs=False "
            f"(all channels +1) for images with more than {_MAX_SIGN_CHANNELS} channels"
        )
    phase_values = [2 * math.pi * j / phases for j in range(phases)]
    if search_signs:
        patterns = sign_patterns(channels, fix_first=phases % 2 == 0)
    else:
        patterns = torch.ones(1, channels)
    # For a self-conjugate frequency only the sign of cos(phi) matters: keep one phase per sign.
    self_phases: List[float] = []
    for want_positive in (True, False):
        for p in phase_values:
            if (math.cos(p) >= -SELF_CONJUGATE_COS_TOL) == want_positive:
                self_phases.append(p)
                break
    freq_rows, phase_rows, sign_rows = [], [], []
    n_patterns = patterns.shape[0]
    for k, l in half_plane(height, width).tolist():  # noqa: E741
        plist = self_phases if is_self_conjugate(height, width, k, l) else phase_values
        for p in plist:
            freq_rows.extend([(k, l)] * n_patterns)
            phase_rows.extend([p] * n_patterns)
            sign_rows.append(patterns)
    return Candidates(
        frequencies=torch.tensor(freq_rows, dtype=torch.long),
        phases=torch.tensor(phase_rows, dtype=torch.float64),
        signs=torch.cat(sign_rows),
    )


def halving_schedule(n_candidates: int, n_images: int, *, initial_images: int, eta: int) -> List[Tuple[int, int]]:
    """The successive-halving plan: ``[(survivors, images_so_far), ...]`` per round.

    The cost of round ``r`` is ``survivors_r * (images_r - images_{r-1})`` queries (the subsets are
    nested, so earlier scores are reused); :func:`plan_queries` sums it.
    """
    plan = []
    survivors, images = n_candidates, min(initial_images, n_images)
    while True:
        plan.append((survivors, images))
        if images >= n_images:
            break
        if survivors == 1:
            plan.append((1, n_images))
            break
        survivors = math.ceil(survivors / eta)
        images = min(n_images, images * eta)
    return plan


def plan_queries(plan: Sequence[Tuple[int, int]]) -> int:
    """Image evaluations spent by a :func:`halving_schedule` plan (clean predictions not included)."""
    total, seen = 0, 0
    for survivors, images in plan:
        total += survivors * (images - seen)
        seen = images
    return total


def candidate_deltas(
    cands: Candidates, idx: Tensor, height: int, width: int, *, eps: float, norm: str, wave: str,
    dtype: torch.dtype, device: torch.device,
) -> Tensor:
    """The perturbations ``(len(idx), C, H, W)`` of the candidates ``idx`` at budget ``eps``."""
    u = fourier_basis_batch(height, width, cands.frequencies[idx], cands.phases[idx], dtype=dtype, device=device)
    signs = cands.signs[idx].to(device=device, dtype=dtype)
    return shape_directions(u, signs, eps=eps, norm=norm, wave=wave)


def make_sizer(batch_size: Union[None, int, BatchSizer], x: Tensor, total: int) -> BatchSizer:
    """``batch_size`` as a :class:`BatchSizer` (a given sizer is returned as is, to be shared by calls)."""
    if isinstance(batch_size, BatchSizer):
        return batch_size
    return BatchSizer(batch_size, device=x.device, total=max(1, total), item_bytes=x[0].numel() * x.element_size())


@torch.no_grad()
def count_fooled(
    model: Model,
    x: Tensor,
    clean: Tensor,
    make_deltas: Callable[[int, int], Tensor],
    n_deltas: int,
    images: Tensor,
    *,
    bounds: Bounds,
    batch_size: Union[None, int, BatchSizer],
    runner: Optional[ModelRunner] = None,
) -> Tensor:
    """How many of the images ``x[images]`` each perturbation fools: ``(n_deltas,)`` counts.

    The (perturbation, image) pairs are evaluated in perturbation-major order, in model calls of
    ``batch_size`` pairs; the counts do not depend on the slicing.

    Args:
        model: classifier on ``(N, C, H, W)`` images (used as given: the callers set eval mode).
        x: all images, on the model's device, in the perturbation dtype.
        clean: the clean predicted labels of ``x``.
        make_deltas: ``make_deltas(c0, c1)`` returns perturbations ``c0 .. c1 - 1`` as ``(c1 - c0, C, H, W)``;
            called once per model call, so the perturbations need never be held all at once.
        n_deltas: number of perturbations.
        images: indices of the images to count on.
        bounds: valid pixel range the perturbed images are clipped to (``None``: no clipping).
        batch_size: perturbed images per model call, ``None`` (chosen online), or a :class:`BatchSizer`
            shared by several calls.
        runner: how the model is called (autocast, memory format); default: plainly.
    """
    m = len(images)
    if m == 0 or n_deltas == 0:
        return torch.zeros(n_deltas, dtype=torch.long)
    counts = torch.zeros(n_deltas, dtype=torch.long, device=x.device)
    total = m * n_deltas
    sizer = make_sizer(batch_size, x, total)
    if runner is None:
        runner = ModelRunner(model, device=x.device, model_dtype=x.dtype)
    images = images.to(x.device)
    cached: Tuple[int, int, Optional[Tensor]] = (0, 0, None)
    pos = 0
    while pos < total:
        b = sizer.next(total - pos)
        sizer.start()
        c0, c1 = pos // m, (pos + b - 1) // m + 1
        if cached[2] is None or cached[0] != c0 or cached[1] != c1:
            cached = (c0, c1, make_deltas(c0, c1))
        delta = cached[2]
        pair = torch.arange(pos, pos + b, device=x.device)
        local, img = pair // m - c0, images[pair % m]
        batch = delta[local] + x[img]
        if bounds is not None:
            batch.clamp_(bounds[0], bounds[1])
        try:
            pred = runner.labels(batch)
        except torch.cuda.OutOfMemoryError:
            del batch
            if not sizer.shrink():
                raise
            torch.cuda.empty_cache()
            continue
        counts.index_add_(0, local + c0, (pred != clean[img]).long())
        sizer.stop(b)
        pos += b
    return counts.cpu()


class HalvingOutcome(NamedTuple):
    """What :func:`successive_halving` found: the winner, every candidate's count, the queries spent."""

    best: int
    counts: Tensor
    queries: int


def successive_halving(
    count: Callable[[Tensor, Tensor], Tensor],
    n_candidates: int,
    plan: Iterable[Tuple[int, int]],
    order: Tensor,
) -> HalvingOutcome:
    """Run a :func:`halving_schedule` plan over nested prefixes of the image ``order``.

    Args:
        count: ``count(candidates, images)`` returns the fooled count of each candidate index on the
            image indices (e.g. a closure over :func:`count_fooled`).
        n_candidates: number of candidates.
        plan: ``[(survivors, images_so_far), ...]``.
        order: image indices; round ``r`` adds ``order[images_{r-1}:images_r]``.

    Returns:
        The best candidate (ties: the first enumerated), the counts (of the images each candidate was
        scored on) and the queries spent.
    """
    survivors = torch.arange(n_candidates)
    counts = torch.zeros(n_candidates, dtype=torch.long)
    seen = queries = 0
    for r, (keep, images) in enumerate(plan):
        if r > 0:
            # Keep the best `keep` survivors by their count on the nested prefix (stable: ties -> first).
            ranking = torch.argsort(counts[survivors], descending=True, stable=True)
            survivors = torch.sort(survivors[ranking[:keep]]).values
        subset = order[seen:images]
        counts[survivors] += count(survivors, subset)
        queries += len(survivors) * len(subset)
        seen = images
    best = int(survivors[torch.argsort(counts[survivors], descending=True, stable=True)[0]])
    return HalvingOutcome(best=best, counts=counts, queries=queries)
