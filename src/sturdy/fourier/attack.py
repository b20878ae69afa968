"""The Single Fourier Attack (SFA): a black-box, universal, shift-invariant perturbation.

The attack searches the candidates ``(k, l, phi, s)`` of :func:`~sturdy.fourier.enumerate_candidates`:
every canonical frequency (see :func:`~sturdy.fourier.half_plane`), ``phases`` phases
``phi = 2 pi j / phases`` and every channel sign pattern ``s``, for the one perturbation ``d`` (see
:mod:`sturdy.fourier.perturbation`) that changes the model's predicted label on the most images of the
attack set. It only reads predicted labels.

Searches (:mod:`sturdy.fourier.search`):

* ``"exhaustive"`` (the reference): every candidate on every image, ``K * N`` queries;
* ``"halving"`` (default): successive halving over a growing, nested random subset of the images:
  every candidate is scored on ``initial_images`` images, the best ``1 / eta`` survive, the subset
  grows by ``eta``, until one candidate is left (then scored on the whole set) or the subset is the
  whole set (then the best survivor wins).

Queries count image evaluations, the ``N`` clean predictions included. Ties go to the candidate
enumerated first (frequency-major order). Held-out evaluation lives in :mod:`sturdy.fourier.evaluate`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sturdy.errors import ConfigurationError
from sturdy.fourier._common import Model, check_batch_size, in_eval_mode, predict_labels
from sturdy.fourier.perturbation import Bounds, check_bounds, check_eps, check_images, check_norm
from sturdy.fourier.search import (
    candidate_deltas,
    count_fooled,
    enumerate_candidates,
    halving_schedule,
    plan_queries,
    successive_halving,
)
from sturdy.utils import model_device_dtype

__all__ = ["SEARCHES", "UniversalPerturbation", "single_fourier_attack"]

SEARCHES = ("halving", "exhaustive")


@dataclass(frozen=True, eq=False)
class UniversalPerturbation:
    """Result of :func:`single_fourier_attack`.

    Attributes:
        delta: the perturbation ``(C, H, W)`` (CPU, the model's dtype), to be added then clipped.
        frequency: its canonical frequency ``(k, l)``.
        phase: its phase in radians.
        signs: its channel signs.
        eps: budget; ``norm``/``wave`` give its kind.
        norm: ``"l2"`` or ``"linf"``.
        wave: ``"sine"`` or ``"square"``.
        fooling_rate: fraction of the attack images whose predicted label it changes.
        queries: image evaluations spent (clean predictions included).
        exhaustive_queries: what the exhaustive search costs on the same attack set.
        candidates: size of the search space.
        search: ``"halving"`` or ``"exhaustive"``.
        seconds: wall time.
    """

    delta: Tensor
    frequency: Tuple[int, int]
    phase: float
    signs: Tuple[int, ...]
    eps: float
    norm: str
    wave: str
    fooling_rate: float
    queries: int
    exhaustive_queries: int
    candidates: int
    search: str
    seconds: float

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able summary (without ``delta``)."""
        return {
            "frequency": list(self.frequency),
            "phase": self.phase,
            "signs": list(self.signs),
            "eps": self.eps,
            "norm": self.norm,
            "wave": self.wave,
            "attack_fooling_rate": self.fooling_rate,
            "queries": self.queries,
            "exhaustive_queries": self.exhaustive_queries,
            "candidates": self.candidates,
            "search": self.search,
            "seconds": self.seconds,
        }


@in_eval_mode
@torch.no_grad()
def single_fourier_attack(
    model: Model,
    x: Tensor,
    *,
    eps: float,
    norm: str = "l2",
    wave: str = "sine",
    search: str = "halving",
    phases: int = 8,
    search_signs: bool = True,
    max_queries: Optional[int] = None,
    initial_images: int = 16,
    eta: int = 2,
    bounds: Bounds = (0.0, 1.0),
    batch_size: int = 2048,
    seed: int = 0,
    progress: bool = False,
) -> UniversalPerturbation:
    """Find the single Fourier perturbation that fools ``model`` on the most images of ``x``.

    Black-box: only predicted labels (``argmax`` of the logits) are read. Universal: one ``delta`` for
    all images.

    Args:
        model: classifier on ``(N, C, H, W)`` images; an ``nn.Module`` is put in eval mode for the
            search and its training flags restored after.
        x: attack images in ``bounds``.
        eps: budget (> 0) in ``norm``.
        norm: ``"l2"`` or ``"linf"``.
        wave: ``"sine"`` or ``"square"`` (see :mod:`sturdy.fourier.perturbation`).
        search: ``"halving"`` (default, fewer queries) or ``"exhaustive"`` (reference).
        phases: number of phases ``2 pi j / phases`` searched (DESIGN: 8).
        search_signs: search the channel sign patterns (else all channels ``+1``).
        max_queries: hard query budget; halving shrinks ``initial_images`` to fit it, exhaustive refuses
            to start when it cannot fit.
        initial_images: images per candidate in the first halving round.
        eta: halving rate (keep ``1 / eta`` of the candidates, grow the subset ``eta`` times).
        bounds: valid pixel range; perturbed images are clipped to it.
        batch_size: perturbed images per model call.
        seed: seeds the random order of the images for halving.
        progress: show a tqdm bar over rounds.

    Returns:
        A :class:`UniversalPerturbation` whose ``fooling_rate`` is measured on all of ``x``.
    """
    start = time.perf_counter()
    eps = check_eps(eps)
    check_norm(norm, wave)
    bounds = check_bounds(bounds)
    batch_size = check_batch_size(batch_size)
    if search not in SEARCHES:
        raise ConfigurationError(f"search must be one of {SEARCHES}, got {search!r}")
    for name, value, low in (("initial_images", initial_images, 1), ("eta", eta, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigurationError(f"{name} must be an int >= {low}, got {value!r}")
    check_images(x, bounds)
    device, dtype = model_device_dtype(model, x)
    x = x.to(device=device, dtype=dtype)
    n, channels, height, width = x.shape
    cands = enumerate_candidates(channels, height, width, phases=phases, search_signs=search_signs)
    n_cand = len(cands)
    exhaustive_queries = n + n_cand * n
    if search == "exhaustive":
        plan = [(n_cand, n)]
    else:
        plan = halving_schedule(n_cand, n, initial_images=initial_images, eta=eta)
    if max_queries is not None:
        if isinstance(max_queries, bool) or not isinstance(max_queries, int) or max_queries < 1:
            raise ConfigurationError(f"max_queries must be a positive int or None, got {max_queries!r}")
        if search == "exhaustive" and exhaustive_queries > max_queries:
            raise ConfigurationError(
                f"exhaustive search over {n_cand} candidates on {n} images needs {exhaustive_queries} "
                f"queries, more than max_queries={max_queries}; use search='halving' or fewer images"
            )
        m0 = min(initial_images, n)
        while search == "halving" and n + plan_queries(plan) > max_queries and m0 > 1:
            m0 = max(1, m0 // 2)
            plan = halving_schedule(n_cand, n, initial_images=m0, eta=eta)
        if n + plan_queries(plan) > max_queries:
            raise ConfigurationError(
                f"max_queries={max_queries} is too small: halving over {n_cand} candidates on {n} images "
                f"needs at least {n + plan_queries(plan)} queries; raise it or use fewer images"
            )
    clean = predict_labels(model, x, batch_size=batch_size)

    def deltas(idx: Tensor) -> Tensor:
        return candidate_deltas(cands, idx, height, width, eps=eps, norm=norm, wave=wave, dtype=dtype, device=device)

    def count(idx: Tensor, images: Tensor) -> Tensor:
        return count_fooled(model, x, clean, lambda c0, c1: deltas(idx[c0:c1]), len(idx), images, bounds=bounds,
                            batch_size=batch_size)

    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen) if search == "halving" else torch.arange(n)
    rounds = tqdm(plan, desc=f"SFA {search}", disable=not progress, leave=False)
    best, counts, queries = successive_halving(count, n_cand, rounds, order)
    delta = deltas(torch.tensor([best]))[0]
    return UniversalPerturbation(
        delta=delta.detach().cpu(),
        frequency=(int(cands.frequencies[best, 0]), int(cands.frequencies[best, 1])),
        phase=float(cands.phases[best]),
        signs=tuple(int(s) for s in cands.signs[best].tolist()),
        eps=eps,
        norm=norm,
        wave=wave,
        fooling_rate=float(counts[best]) / n,
        queries=n + queries,
        exhaustive_queries=exhaustive_queries,
        candidates=n_cand,
        search=search,
        seconds=time.perf_counter() - start,
    )
