"""The Single Fourier Attack (SFA): a black-box, universal, shift-invariant perturbation.

The attack searches the candidates ``(k, l, phi, s)`` of :func:`~sturdy.fourier.enumerate_candidates`:
every canonical frequency (see :func:`~sturdy.fourier.half_plane`), ``phases`` phases
``phi = 2 pi j / phases`` and every channel sign pattern ``s``, for the one perturbation ``d`` (see
:mod:`sturdy.fourier.perturbation`) that changes the model's predicted label on the most images of the
attack set. It only reads predicted labels.

Searches (:mod:`sturdy.fourier.search`, :mod:`sturdy.fourier.staged`):

* ``"staged"`` (default): screen every frequency with random phases and signs on a few images, then
  successive halving over every phase and sign pattern of the best frequencies (far fewer queries than
  exhaustive: BENCHMARKS.md);
* ``"exhaustive"`` (the reference): every candidate on every image, ``K * N`` queries;
* ``"halving"``: successive halving over every candidate and a growing, nested random subset of the
  images: every candidate is scored on ``initial_images`` images, the best ``1 / eta`` survive, the subset
  grows by ``eta``, until one candidate is left (then scored on the whole set) or the subset is the
  whole set (then the best survivor wins);
* ``"random"`` (baseline): uniformly drawn candidates, each on every image, within the budget (the
  staged search's when none is given).

``max_queries`` is a hard budget: no search spends more, and the result reports what it spent.

Queries count image evaluations, the ``N`` clean predictions included. Ties go to the candidate
enumerated first (frequency-major order). Held-out evaluation lives in :mod:`sturdy.fourier.evaluate`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sturdy.errors import ConfigurationError
from sturdy.fourier._common import Model, check_batch_size, in_eval_mode
from sturdy.fourier.batching import BatchSizer, ModelRunner
from sturdy.fourier.images import AnalysisImages
from sturdy.fourier.perturbation import Bounds, check_bounds, check_eps, check_norm
from sturdy.fourier.search import (
    Candidates,
    candidate_deltas,
    enumerate_candidates,
    halving_schedule,
    plan_queries,
    successive_halving,
)
from sturdy.fourier.staged import (
    Count,
    StagedPlan,
    default_budget,
    frequency_groups,
    plan_staged,
    random_search,
    staged_search,
)

__all__ = ["SEARCHES", "UniversalPerturbation", "single_fourier_attack"]

SEARCHES = ("staged", "halving", "exhaustive", "random")


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
        search: one of :data:`SEARCHES`.
        seconds: wall time.
        max_queries: the budget it was given (``None``: none).
        batch_size: perturbed images per model call (the one chosen when automatic).
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
    max_queries: Optional[int] = None
    batch_size: int = 0

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
            "max_queries": self.max_queries,
            "batch_size": self.batch_size,
        }


@in_eval_mode
@torch.no_grad()
def single_fourier_attack(
    model: Model,
    x: Any,
    *,
    eps: float,
    norm: str = "l2",
    wave: str = "sine",
    search: str = "staged",
    phases: int = 8,
    search_signs: bool = True,
    max_queries: Optional[int] = None,
    initial_images: int = 16,
    eta: int = 2,
    screen_images: int = 32,
    keep_frequencies: int = 16,
    screen_configs: Optional[int] = None,
    bounds: Bounds = (0.0, 1.0),
    batch_size: Optional[int] = None,
    seed: int = 0,
    autocast: Optional[torch.dtype] = None,
    channels_last: bool = False,
    progress: bool = False,
    count: Optional[int] = None,
) -> UniversalPerturbation:
    """Find the single Fourier perturbation that fools ``model`` on the most images of ``x``.

    Black-box: only predicted labels (``argmax`` of the logits) are read. Universal: one ``delta`` for
    all images. Pixel space: a model trained on normalised inputs is passed as
    ``with_normalization(model, mean, std)``.

    Args:
        model: classifier on ``(N, C, H, W)`` images; an ``nn.Module`` is put in eval mode for the
            search and its training flags restored after.
        x: attack images in ``bounds``; or any data of the contract of :mod:`sturdy.datasource` (a ``Dataset``, a
            ``DataLoader`` or another iterable of ``(images, labels)`` batches; the labels are not read), streamed
            one batch on the device at a time. The search reads the images once per round (every halving round, the
            screen's groups): such data must be readable again (a generator is refused); the counts equal those of
            the same images held as tensors.
        eps: budget (> 0) in ``norm``, at most the farthest two images in ``bounds`` can be
            (:func:`~sturdy.fourier.perturbation.largest_eps`).
        norm: ``"l2"`` or ``"linf"``.
        wave: ``"sine"`` or ``"square"`` (see :mod:`sturdy.fourier.perturbation`).
        search: ``"staged"`` (default), ``"halving"``, ``"exhaustive"`` (reference) or ``"random"``.
        phases: number of phases ``2 pi j / phases`` searched (docs/design.md section 2: 8).
        search_signs: search the channel sign patterns (else all channels ``+1``).
        max_queries: hard query budget, clean predictions included; never exceeded. Staged and random
            searches fit their sizes to it, halving shrinks ``initial_images``, exhaustive refuses to
            start when it cannot fit.
        initial_images: images per candidate in the first halving round (halving; staged refinement).
        eta: halving rate (keep ``1 / eta`` of the candidates, grow the subset ``eta`` times).
        screen_images: staged: images of the frequency screen (without ``max_queries``).
        keep_frequencies: staged: frequencies refined (without ``max_queries``).
        screen_configs: staged: random (phase, signs) configurations per frequency in the screen
            (``None``: one per screen image, the most robust; see :mod:`sturdy.fourier.staged`).
        bounds: valid pixel range; perturbed images are clipped to it.
        batch_size: perturbed images per model call, or ``None``: chosen online on the search's own
            calls (no query is spent on probing).
        seed: seeds the random image order and the staged / random choices.
        autocast: ``None``, ``torch.bfloat16`` or ``torch.float16``: run the model under autocast
            (perturbations stay float32, counts exact).
        channels_last: hand the model ``channels_last`` images.
        progress: show a tqdm bar over halving rounds.
        count: the number of images of an iterable of batches without a length (needed before the search).

    Returns:
        A :class:`UniversalPerturbation` whose ``fooling_rate`` is measured on all of ``x``.
    """
    start = time.perf_counter()
    eps, bounds = _check_arguments(eps, norm=norm, wave=wave, bounds=bounds, batch_size=batch_size, search=search,
                                   sizes=(initial_images, eta, screen_images, keep_frequencies, screen_configs),
                                   max_queries=max_queries)
    data = AnalysisImages(model, x, bounds=bounds, labels=False, what="the Single Fourier Attack", count=count,
                          batch_size=batch_size, passes=2)  # the clean predictions, then every round of the search
    eps = check_eps(eps, norm=norm, bounds=bounds, image_shape=data.shape[1:])
    device, model_dtype, dtype = data.device, data.model_dtype, data.dtype
    n, channels, height, width = data.shape
    cands = enumerate_candidates(channels, height, width, phases=phases, search_signs=search_signs)
    n_cand = len(cands)
    exhaustive_queries = n + n_cand * n
    if max_queries is not None and max_queries <= n:
        raise ConfigurationError(
            f"max_queries={max_queries} does not even cover the {n} clean predictions; raise it or use fewer images"
        )
    budget = None if max_queries is None else max_queries - n
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen) if search != "exhaustive" else torch.arange(n)
    plan, staged = _plan_search(search, cands, n, max_queries=max_queries, initial_images=initial_images, eta=eta,
                                screen_images=screen_images, keep_frequencies=keep_frequencies)
    total = plan_queries(plan) if plan is not None else (budget or staged.queries)
    runner = ModelRunner(model, device=device, model_dtype=model_dtype, autocast=autocast,
                         channels_last=channels_last)
    sizer = BatchSizer(batch_size, device=device, total=max(1, total + n),
                       item_bytes=channels * height * width * torch.empty((), dtype=dtype).element_size())
    clean = data.labels(lambda xb: runner.predict(xb, batch_size=sizer.next(len(xb))))

    def deltas(idx: Tensor) -> Tensor:
        return candidate_deltas(cands, idx, height, width, eps=eps, norm=norm, wave=wave, dtype=dtype, device=device)

    def count(idx: Tensor, images: Tensor) -> Tensor:
        return data.count_fooled(model, clean, lambda c0, c1: deltas(idx[c0:c1]), len(idx), images, bounds=bounds,
                                 batch_size=sizer, runner=runner)

    best, best_count, queries = _run_search(search, count, cands, order, plan=plan, staged=staged, budget=budget,
                                            screen_configs=screen_configs, eta=eta, generator=gen, progress=progress)
    delta = deltas(torch.tensor([best]))[0]
    return UniversalPerturbation(
        delta=delta.detach().cpu(),
        frequency=(int(cands.frequencies[best, 0]), int(cands.frequencies[best, 1])),
        phase=float(cands.phases[best]),
        signs=tuple(int(s) for s in cands.signs[best].tolist()),
        eps=eps,
        norm=norm,
        wave=wave,
        fooling_rate=best_count / n,
        queries=n + queries,
        exhaustive_queries=exhaustive_queries,
        candidates=n_cand,
        search=search,
        seconds=time.perf_counter() - start,
        max_queries=max_queries,
        batch_size=sizer.best,
    )


def _check_arguments(
    eps: float,
    *,
    norm: str,
    wave: str,
    bounds: Bounds,
    batch_size: Optional[int],
    search: str,
    sizes: Tuple[int, int, int, int, Optional[int]],
    max_queries: Optional[int],
) -> Tuple[float, Bounds]:
    """Checks the arguments that do not depend on the images; returns ``eps`` and ``bounds`` as checked.

    ``sizes``: ``(initial_images, eta, screen_images, keep_frequencies, screen_configs)``.
    """
    eps = check_eps(eps)
    check_norm(norm, wave)
    bounds = check_bounds(bounds)
    if batch_size is not None:
        check_batch_size(batch_size)
    if search not in SEARCHES:
        raise ConfigurationError(f"search must be one of {SEARCHES}, got {search!r}")
    initial_images, eta, screen_images, keep_frequencies, screen_configs = sizes
    limits: Tuple[Tuple[str, Any, int], ...] = (
        ("initial_images", initial_images, 1), ("eta", eta, 2), ("screen_images", screen_images, 1),
        ("keep_frequencies", keep_frequencies, 1))
    if screen_configs is not None:
        limits += (("screen_configs", screen_configs, 1),)
    for name, value, low in limits:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigurationError(f"{name} must be an int >= {low}, got {value!r}")
    if max_queries is not None and (isinstance(max_queries, bool) or not isinstance(max_queries, int)
                                    or max_queries < 1):
        raise ConfigurationError(f"max_queries must be a positive int or None, got {max_queries!r}")
    return eps, bounds


def _plan_search(
    search: str,
    cands: Candidates,
    n: int,
    *,
    max_queries: Optional[int],
    initial_images: int,
    eta: int,
    screen_images: int,
    keep_frequencies: int,
) -> Tuple[Optional[List[Tuple[int, int]]], Optional[StagedPlan]]:
    """The rounds of an exhaustive or halving search, or the plan of a staged or random one, within the budget."""
    n_cand = len(cands)
    budget = None if max_queries is None else max_queries - n
    if search == "exhaustive":
        if budget is not None and n + n_cand * n > max_queries:
            raise ConfigurationError(
                f"exhaustive search over {n_cand} candidates on {n} images needs {n + n_cand * n} "
                f"queries, more than max_queries={max_queries}; use search='staged' or fewer images"
            )
        return [(n_cand, n)], None
    if search == "halving":
        return _halving_plan(n_cand, n, budget=budget, max_queries=max_queries, initial_images=initial_images,
                             eta=eta), None
    _, sizes = frequency_groups(cands)
    return None, plan_staged(len(sizes), int(sizes.max()), n, budget=budget, screen_images=screen_images,
                             keep=keep_frequencies, initial_images=initial_images, eta=eta)


def _halving_plan(
    n_cand: int, n: int, *, budget: Optional[int], max_queries: Optional[int], initial_images: int, eta: int
) -> List[Tuple[int, int]]:
    """The halving rounds; ``initial_images`` halves until they fit the budget."""
    plan = halving_schedule(n_cand, n, initial_images=initial_images, eta=eta)
    m0 = min(initial_images, n)
    while budget is not None and plan_queries(plan) > budget and m0 > 1:
        m0 = max(1, m0 // 2)
        plan = halving_schedule(n_cand, n, initial_images=m0, eta=eta)
    if budget is not None and plan_queries(plan) > budget:
        raise ConfigurationError(
            f"max_queries={max_queries} is too small: halving over {n_cand} candidates on {n} images "
            f"needs at least {n + plan_queries(plan)} queries; raise it or use fewer images"
        )
    return plan


def _run_search(
    search: str,
    count: Count,
    cands: Candidates,
    order: Tensor,
    *,
    plan: Optional[List[Tuple[int, int]]],
    staged: Optional[StagedPlan],
    budget: Optional[int],
    screen_configs: Optional[int],
    eta: int,
    generator: torch.Generator,
    progress: bool,
) -> Tuple[int, int, int]:
    """``(best candidate, images it fools, queries spent)`` of the planned search."""
    if plan is not None:
        rounds = tqdm(plan, desc=f"SFA {search}", disable=not progress, leave=False)
        best, counts, queries = successive_halving(count, len(cands), rounds, order)
        return best, int(counts[best]), queries
    if search == "staged":
        return staged_search(count, cands, order, staged, screen_configs=screen_configs, eta=eta, generator=generator)
    budget_r = budget if budget is not None else default_budget(staged)
    return random_search(count, len(cands), order, budget=budget_r, generator=generator)
