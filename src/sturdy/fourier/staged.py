"""Query-frugal SFA searches: frequency first, then phase and signs (``"staged"``), and random search.

The SFA candidates of one frequency (every phase and sign pattern) mostly rise and fall together: a
frequency the model is sensitive to fools many images under most of its phases and signs. The staged
search exploits it in two stages, both on nested prefixes of one random image order:

1. **Screen** every frequency on ``m1`` images. The images are split into ``screen_configs`` groups
   (default: one per image) and each group sees, for every frequency, one (phase, signs) configuration
   drawn at random from that frequency's candidates, so a frequency's score averages over configurations
   (like a heat map) instead of betting on one. Configurations matter more than images: a frequency's
   best configuration can fool most images while most of its others fool almost none, so a screen of few
   configurations sometimes misses the best frequency (BENCHMARKS.md counts the misses of 4 configurations
   and of one configuration per image over 40 seeds per image size). Cost ``F * m1`` queries.
2. **Refine** the ``T`` best frequencies: every candidate of theirs (all phases and sign patterns) enters
   successive halving (:func:`~sturdy.fourier.search.successive_halving`) from ``m2`` images up to the
   whole attack set; the best survivor wins, with its count on every image.

Cost: ``n`` clean predictions + ``F * m1`` + the halving plan over ``T * (phases x signs)`` candidates.
With a query budget the stage sizes are fitted to it (40% of it to the screen, the refinement as wide as
the rest allows, shrinking ``m2`` then ``m1`` when even one frequency does not fit), so the budget is
never exceeded. Random search scores uniformly drawn candidates on every image until the budget is spent.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from sturdy.errors import ConfigurationError
from sturdy.fourier.search import Candidates, halving_schedule, plan_queries, successive_halving

__all__ = ["StagedPlan", "plan_staged", "staged_search", "random_search", "SCREEN_SHARE"]

SCREEN_SHARE = 0.4
"""Share of a query budget (after the clean predictions) given to the frequency screen."""

Count = Callable[[Tensor, Tensor], Tensor]


class StagedPlan(NamedTuple):
    """Stage sizes: screen images ``m1``, frequencies kept ``keep``, first refinement images ``m2``."""

    screen_images: int
    keep: int
    initial_images: int
    queries: int  # upper bound of the search's queries, clean predictions excluded


def frequency_groups(cands: Candidates) -> Tuple[Tensor, Tensor]:
    """Start index and size of each frequency's contiguous block of candidates (frequency-major order)."""
    _, sizes = torch.unique_consecutive(cands.frequencies, dim=0, return_counts=True)
    starts = torch.cumsum(sizes, 0) - sizes
    return starts, sizes


def _refine_cost(n_cand: int, n: int, m2: int, eta: int) -> int:
    return plan_queries(halving_schedule(n_cand, n, initial_images=m2, eta=eta))


def plan_staged(
    n_freq: int, per_freq: int, n: int, *, budget: Optional[int], screen_images: int, keep: int,
    initial_images: int, eta: int,
) -> StagedPlan:
    """Stage sizes for ``n_freq`` frequencies of at most ``per_freq`` candidates each on ``n`` images.

    ``budget`` counts queries after the clean predictions (``None``: the given sizes).

    Raises:
        ConfigurationError: the budget cannot hold a screen of one image plus one frequency's candidates.
    """
    if budget is None:
        m1, t, m2 = min(screen_images, n), min(keep, n_freq), min(initial_images, n)
        return StagedPlan(m1, t, m2, n_freq * m1 + _refine_cost(t * per_freq, n, m2, eta))
    m1 = max(1, min(n, int(SCREEN_SHARE * budget) // n_freq))
    while True:
        for m2 in sorted({min(initial_images, n), max(1, min(initial_images, n) // 2), 4, 2, 1}, reverse=True):
            if m2 > n:
                continue
            rest = budget - n_freq * m1
            if rest < _refine_cost(per_freq, n, m2, eta):
                continue
            lo, hi = 1, n_freq  # the most frequencies whose refinement fits
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if _refine_cost(mid * per_freq, n, m2, eta) <= rest:
                    lo = mid
                else:
                    hi = mid - 1
            return StagedPlan(m1, lo, m2, n_freq * m1 + _refine_cost(lo * per_freq, n, m2, eta))
        if m1 == 1:
            need = n_freq + _refine_cost(per_freq, n, 1, eta)
            raise ConfigurationError(
                f"max_queries is too small for the staged search: it needs at least {need} queries after the "
                f"{n} clean predictions ({n_freq} frequencies screened on one image, then {per_freq} candidates "
                "refined); raise it or use fewer images"
            )
        m1 = max(1, m1 // 2)


def staged_search(
    count: Count, cands: Candidates, order: Tensor, plan: StagedPlan, *, screen_configs: Optional[int], eta: int,
    generator: torch.Generator,
) -> Tuple[int, int, int]:
    """Run a :func:`plan_staged` plan; returns ``(best candidate, its count on every image, queries)``."""
    n = len(order)
    starts, sizes = frequency_groups(cands)
    n_freq = len(starts)
    screen = order[: plan.screen_images]
    scores = torch.zeros(n_freq, dtype=torch.long)
    groups = len(screen) if screen_configs is None else max(1, min(screen_configs, len(screen)))
    queries = 0
    for g in range(groups):
        images = screen[g::groups]
        pick = starts + (torch.rand(n_freq, generator=generator) * sizes).long().clamp_max(sizes - 1)
        scores += count(pick, images)
        queries += n_freq * len(images)
    top = torch.argsort(scores, descending=True, stable=True)[: plan.keep]
    top = torch.sort(top).values
    pool = torch.cat([torch.arange(int(starts[f]), int(starts[f] + sizes[f])) for f in top.tolist()])
    schedule = halving_schedule(len(pool), n, initial_images=plan.initial_images, eta=eta)

    def count_pool(idx: Tensor, images: Tensor) -> Tensor:
        return count(pool[idx], images)

    best, counts, spent = successive_halving(count_pool, len(pool), schedule, order)
    return int(pool[best]), int(counts[best]), queries + spent


def random_search(count: Count, n_cand: int, images: Tensor, *, budget: int, generator: torch.Generator
                  ) -> Tuple[int, int, int]:
    """Uniformly drawn candidates (without replacement), each on every image, within ``budget`` queries.

    Returns ``(best candidate, its count, queries)``; ties go to the candidate enumerated first.

    Raises:
        ConfigurationError: the budget cannot score one candidate.
    """
    n = len(images)
    draws = min(n_cand, budget // n)
    if draws < 1:
        raise ConfigurationError(f"max_queries leaves {budget} queries after the clean predictions, fewer than "
                                 f"the {n} one random candidate needs; raise it")
    picked = torch.sort(torch.randperm(n_cand, generator=generator)[:draws]).values
    counts = count(picked, images)
    best = int(torch.argsort(counts, descending=True, stable=True)[0])
    return int(picked[best]), int(counts[best]), draws * n


def default_budget(plan: StagedPlan) -> int:
    """The query budget (clean predictions excluded) random search gets when none is given: the staged one."""
    return int(math.ceil(plan.queries))
