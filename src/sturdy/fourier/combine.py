"""Beyond the paper: a black-box universal perturbation made of a few Fourier directions.

Starting from the Single Fourier Attack's perturbation ``d``, each round tries ``d + w * a`` for every
atom ``a`` of a pool (the ``pool`` single Fourier perturbations of budget ``eps`` that fool most images
of a small random scan subset) and every weight ``w`` in ``weights``, projected back onto the budget
(L2: rescaled to norm exactly ``eps``; L-inf: clipped to ``[-eps, eps]``). The best mixture is chosen by
successive halving over nested random image subsets (the SFA's schedule) and kept if it fools more
attack images than ``d``; the search stops after ``patience`` rounds without gain or ``rounds`` rounds. Only
predicted labels are read. The result is no longer exactly shift invariant (its components shift by
different phases), which :func:`~sturdy.fourier.evaluate_perturbation` measures.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sturdy.errors import ConfigurationError
from sturdy.fourier._common import Model, check_batch_size, in_eval_mode, predict_labels
from sturdy.fourier.attack import UniversalPerturbation, single_fourier_attack
from sturdy.fourier.images import AnalysisImages
from sturdy.fourier.limits import check_pool, check_rounds
from sturdy.fourier.perturbation import Bounds, check_bounds, check_eps, check_norm
from sturdy.fourier.search import (
    candidate_deltas,
    enumerate_candidates,
    halving_schedule,
    successive_halving,
)

__all__ = ["FourierCombination", "fourier_combination_attack", "project_budget"]

Step = Tuple[int, int, float, Tuple[int, ...], float]


def project_budget(delta: Tensor, *, eps: float, norm: str) -> Tensor:
    """Project perturbations ``(B, C, H, W)`` onto the budget: L2 rescaled to norm ``eps``; L-inf clipped."""
    if norm == "l2":
        scale = torch.linalg.vector_norm(delta.flatten(1), dim=1).clamp_min(torch.finfo(delta.dtype).tiny)
        return delta * (eps / scale)[:, None, None, None]
    return delta.clamp(-eps, eps)


@dataclass(frozen=True, eq=False)
class FourierCombination:
    """Result of :func:`fourier_combination_attack`.

    Attributes:
        delta: the perturbation ``(C, H, W)`` (CPU, the model's dtype).
        steps: ``(k, l, phase, signs, weight)`` of the atom added at each accepted round (before the
            projection rescales the mixture).
        initial: the single-direction SFA result the search started from.
        eps: budget; ``norm``/``wave`` give its kind.
        norm: ``"l2"`` or ``"linf"``.
        wave: ``"sine"`` or ``"square"``.
        fooling_rate: fraction of the attack images whose predicted label it changes.
        queries: image evaluations spent, those of the initial SFA included.
        rounds: rounds run (accepted or not).
        seconds: wall time, the initial SFA's included (also when it was passed in).
    """

    delta: Tensor
    steps: Tuple[Step, ...]
    initial: UniversalPerturbation
    eps: float
    norm: str
    wave: str
    fooling_rate: float
    queries: int
    rounds: int
    seconds: float

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able summary (without ``delta``)."""
        return {
            "steps": [[k, col, p, list(s), w] for k, col, p, s, w in self.steps],
            "initial": self.initial.to_dict(),
            "eps": self.eps,
            "norm": self.norm,
            "wave": self.wave,
            "attack_fooling_rate": self.fooling_rate,
            "queries": self.queries,
            "rounds": self.rounds,
            "seconds": self.seconds,
        }


def _count(model: Model, data: AnalysisImages, clean: Tensor, deltas: Tensor, images: Tensor, *, bounds: Bounds,
           batch_size: int) -> Tensor:
    """Fooled counts ``(B,)`` of perturbations ``deltas`` on the images with indices ``images``."""
    return data.count_fooled(model, clean, lambda c0, c1: deltas[c0:c1], deltas.shape[0], images, bounds=bounds,
                             batch_size=batch_size)


@in_eval_mode
@torch.no_grad()
def fourier_combination_attack(
    model: Model,
    x: Any,
    *,
    eps: float,
    norm: str = "l2",
    wave: str = "sine",
    initial: Optional[UniversalPerturbation] = None,
    pool: int = 32,
    weights: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
    rounds: int = 12,
    patience: int = 2,
    scan_images: int = 32,
    initial_images: int = 16,
    eta: int = 2,
    bounds: Bounds = (0.0, 1.0),
    batch_size: int = 2048,
    seed: int = 0,
    progress: bool = False,
    count: Optional[int] = None,
) -> FourierCombination:
    """Grow the SFA perturbation into a mixture of a few Fourier directions (black-box, universal).

    Args:
        model: classifier on ``(N, C, H, W)`` images; an ``nn.Module`` is put in eval mode for the
            search and its training flags restored after.
        x: attack images in ``bounds``, or data of the contract of :mod:`sturdy.datasource` that can be read again
            (as for :func:`single_fourier_attack`; the counts equal those of the same images as tensors).
        eps: budget (> 0) in ``norm``, at most the farthest two images in ``bounds`` can be
            (:func:`~sturdy.fourier.perturbation.largest_eps`).
        norm: ``"l2"`` or ``"linf"``.
        wave: ``"sine"`` or ``"square"`` (of the atoms).
        initial: a :func:`single_fourier_attack` result on the same images and budget (computed with
            the default halving search when ``None``).
        pool: number of atoms tried per round.
        weights: relative weights ``w`` of the atom added to the current perturbation.
        rounds: maximum number of rounds.
        patience: stop after this many consecutive rounds without gain (each round draws new subsets).
        scan_images: images of the scan that ranks the atoms.
        initial_images: images of the first halving step of each round.
        eta: halving rate.
        bounds: valid pixel range.
        batch_size: perturbed images per model call.
        seed: seeds the image subsets.
        progress: show a tqdm bar over rounds.
        count: the number of images of an iterable of batches without a length.
    """
    start = time.perf_counter()
    eps = check_eps(eps)
    check_norm(norm, wave)
    bounds = check_bounds(bounds)
    batch_size = check_batch_size(batch_size)
    limits = (("pool", pool, 1), ("rounds", rounds, 0), ("patience", patience, 1), ("scan_images", scan_images, 1),
              ("initial_images", initial_images, 1), ("eta", eta, 2))
    for name, value, low in limits:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigurationError(f"{name} must be an int >= {low}, got {value!r}")
    weights_t = torch.as_tensor(list(weights), dtype=torch.float64)
    if weights_t.dim() != 1 or len(weights_t) == 0 or not bool((weights_t > 0).all()):
        raise ConfigurationError(f"weights must be a non-empty sequence of numbers > 0, got {weights!r}")
    data = AnalysisImages(model, x, bounds=bounds, labels=False, what="the Fourier combination attack",
                          count=count, batch_size=batch_size, work=False,
                          passes=2)  # the clean predictions, the scan, then every halving round
    n, channels, height, width = data.shape
    eps = check_eps(eps, norm=norm, bounds=bounds, image_shape=data.shape[1:])
    check_rounds(rounds, height, width)  # every count checked against the problem before any work
    check_pool(pool, len(weights_t), channels, height, width)
    device, dtype = data.device, data.dtype
    given_seconds = 0.0 if initial is None else initial.seconds
    if initial is None:
        initial = single_fourier_attack(model, x if data.streamed else data.tensor, eps=eps, norm=norm, wave=wave,
                                        bounds=bounds, batch_size=batch_size, seed=seed, count=count)
    elif tuple(initial.delta.shape) != data.shape[1:] or initial.eps != eps or initial.norm != norm:
        raise ConfigurationError(
            f"initial must be a single_fourier_attack result for images {data.shape[1:]}, eps={eps}, "
            f"norm={norm!r}; got delta {tuple(initial.delta.shape)}, eps={initial.eps}, norm={initial.norm!r}"
        )
    queries = initial.queries + n  # the clean predictions below are queries of this search too
    clean = data.labels(lambda xb: predict_labels(model, xb, batch_size=batch_size))
    gen = torch.Generator().manual_seed(seed + 1)
    cands = enumerate_candidates(channels, height, width)
    scan = torch.randperm(n, generator=gen)[: min(scan_images, n)]

    def make_atoms(idx: Tensor) -> Tensor:
        return candidate_deltas(cands, idx, height, width, eps=eps, norm=norm, wave=wave, dtype=dtype, device=device)

    scores = data.count_fooled(model, clean, lambda c0, c1: make_atoms(torch.arange(c0, c1)), len(cands), scan,
                               bounds=bounds, batch_size=batch_size)
    queries += len(cands) * len(scan)
    top = torch.argsort(scores, descending=True, stable=True)[: min(pool, len(cands))]
    atoms = make_atoms(top)  # (pool, C, H, W)
    delta = initial.delta.to(device=device, dtype=dtype)
    best = int(_count(model, data, clean, delta[None], torch.arange(n), bounds=bounds, batch_size=batch_size)[0])
    queries += n
    steps = []
    w = weights_t.to(device=device, dtype=dtype)
    done = misses = 0
    for _ in tqdm(range(rounds), desc="Fourier combination", disable=not progress, leave=False):
        done += 1
        mix = delta[None, None] + w[None, :, None, None, None] * atoms[:, None]  # (pool, W, C, H, W)
        mix = project_budget(mix.reshape(-1, channels, height, width), eps=eps, norm=norm)
        plan = halving_schedule(mix.shape[0], n, initial_images=initial_images, eta=eta)
        order = torch.randperm(n, generator=gen)

        def count(idx: Tensor, images: Tensor, mix: Tensor = mix) -> Tensor:
            return _count(model, data, clean, mix[idx], images, bounds=bounds, batch_size=batch_size)

        winner, counts, spent = successive_halving(count, mix.shape[0], plan, order)
        queries += spent
        if int(counts[winner]) <= best:
            misses += 1
            if misses >= patience:
                break
            continue
        misses = 0
        best = int(counts[winner])
        delta = mix[winner]
        atom = int(top[winner // len(w)])
        steps.append((int(cands.frequencies[atom, 0]), int(cands.frequencies[atom, 1]), float(cands.phases[atom]),
                      tuple(int(s) for s in cands.signs[atom].tolist()), float(weights_t[winner % len(w)])))
    return FourierCombination(
        delta=delta.detach().cpu(), steps=tuple(steps), initial=initial, eps=eps, norm=norm, wave=wave,
        fooling_rate=best / n, queries=queries, rounds=done, seconds=time.perf_counter() - start + given_seconds,
    )
