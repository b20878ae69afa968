"""The Single Fourier Attack (SFA): a black-box, universal, shift-invariant perturbation.

The attack searches the candidates ``(k, l, phi, s)``: every canonical frequency (see
:func:`~sturdy.fourier.half_plane`), ``phases`` phases ``phi = 2 pi j / phases`` and every channel sign
pattern ``s``, for the one perturbation ``d`` (see :mod:`sturdy.fourier.perturbation`) that changes the
model's predicted label on the most images of the attack set. It only reads predicted labels.
Exactly equal candidates are enumerated once: when the phases contain ``phi + pi``, ``(phi, s)`` and
``(phi + pi, -s)`` are the same perturbation, so the first channel sign is fixed to ``+1``; a
self-conjugate frequency keeps one phase per sign of its (one-dimensional) direction.

Searches:

* ``"exhaustive"`` (the reference): every candidate on every image, ``K * N`` queries;
* ``"halving"`` (default): successive halving over a growing, nested random subset of the images:
  every candidate is scored on ``initial_images`` images, the best ``1 / eta`` survive, the subset
  grows by ``eta``, until one candidate is left (then scored on the whole set) or the subset is the
  whole set (then the best survivor wins).

Queries count image evaluations, the ``N`` clean predictions included. Ties go to the candidate
enumerated first (frequency-major order).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sturdy.errors import ConfigurationError, DataError
from sturdy.fourier._common import (
    Model,
    call_model,
    check_batch_size,
    check_labels,
    model_device_dtype,
    predict_labels,
)
from sturdy.fourier.basis import _SELF_CONJUGATE_COS_TOL, fourier_basis_batch, half_plane, is_self_conjugate
from sturdy.fourier.perturbation import (
    Bounds,
    apply_perturbation,
    check_bounds,
    check_eps,
    check_images,
    check_norm,
    shape_directions,
    sign_patterns,
)
from sturdy.fourier.shift import circular_shift, random_shifts

__all__ = [
    "SEARCHES",
    "Candidates",
    "UniversalPerturbation",
    "PerturbationReport",
    "enumerate_candidates",
    "single_fourier_attack",
    "evaluate_perturbation",
    "halving_schedule",
]

SEARCHES = ("halving", "exhaustive")
_MAX_SIGN_CHANNELS = 8


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


def enumerate_candidates(
    channels: int, height: int, width: int, *, phases: int = 8, search_signs: bool = True
) -> Candidates:
    """All distinct SFA candidates for ``(C, H, W)`` images (see the module docstring)."""
    if isinstance(phases, bool) or not isinstance(phases, int) or phases < 1:
        raise ConfigurationError(f"phases must be a positive int (8 searches j*pi/4), got {phases!r}")
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
            if (math.cos(p) >= -_SELF_CONJUGATE_COS_TOL) == want_positive:
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
    nested, so earlier scores are reused).
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


def _plan_queries(plan: List[Tuple[int, int]]) -> int:
    total, seen = 0, 0
    for survivors, images in plan:
        total += survivors * (images - seen)
        seen = images
    return total


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


class _Scorer:
    """Counts, for candidates on an image subset, how many predictions change."""

    def __init__(self, model, x, clean, cands, *, eps, norm, wave, bounds, batch_size, device, dtype):
        self.model, self.x, self.clean, self.cands = model, x, clean, cands
        self.eps, self.norm, self.wave, self.bounds = eps, norm, wave, bounds
        self.batch_size, self.device, self.dtype = batch_size, device, dtype
        _, _, self.height, self.width = x.shape
        self.queries = 0

    def deltas(self, idx: Tensor) -> Tensor:
        u = fourier_basis_batch(
            self.height, self.width, self.cands.frequencies[idx], self.cands.phases[idx],
            dtype=self.dtype, device=self.device,
        )
        signs = self.cands.signs[idx].to(device=self.device, dtype=self.dtype)
        return shape_directions(u, signs, eps=self.eps, norm=self.norm, wave=self.wave)

    def count(self, idx: Tensor, images: Tensor) -> Tensor:
        """Fooled counts of candidates ``idx`` on the images with indices ``images``: ``(len(idx),)``."""
        counts = torch.zeros(len(idx), dtype=torch.long)
        m = len(images)
        if m == 0 or len(idx) == 0:
            return counts
        img_chunk = min(m, self.batch_size)
        cand_chunk = max(1, self.batch_size // img_chunk)
        images = images.to(self.device)
        for c0 in range(0, len(idx), cand_chunk):
            c1 = min(len(idx), c0 + cand_chunk)
            delta = self.deltas(idx[c0:c1])  # (c, C, H, W)
            for i0 in range(0, m, img_chunk):
                sel = images[i0 : i0 + img_chunk]
                xs = self.x[sel]
                batch = (delta[:, None] + xs).view(-1, *xs.shape[1:])
                if self.bounds is not None:
                    batch.clamp_(self.bounds[0], self.bounds[1])
                pred = call_model(self.model, batch).argmax(dim=1).view(c1 - c0, len(sel))
                counts[c0:c1] += (pred != self.clean[sel]).sum(dim=1).cpu()
                self.queries += batch.shape[0]
        return counts


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
        model: classifier on ``(N, C, H, W)`` images (used as given: call ``model.eval()`` first).
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
        while search == "halving" and n + _plan_queries(plan) > max_queries and m0 > 1:
            m0 = max(1, m0 // 2)
            plan = halving_schedule(n_cand, n, initial_images=m0, eta=eta)
        if n + _plan_queries(plan) > max_queries:
            raise ConfigurationError(
                f"max_queries={max_queries} is too small: halving over {n_cand} candidates on {n} images "
                f"needs at least {n + _plan_queries(plan)} queries; raise it or use fewer images"
            )
    clean = predict_labels(model, x, batch_size=batch_size)
    scorer = _Scorer(
        model, x, clean, cands, eps=eps, norm=norm, wave=wave, bounds=bounds, batch_size=batch_size,
        device=device, dtype=dtype,
    )
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen) if search == "halving" else torch.arange(n)
    survivors = torch.arange(n_cand)
    counts = torch.zeros(n_cand, dtype=torch.long)
    seen = 0
    for r, (keep, images) in enumerate(tqdm(plan, desc=f"SFA {search}", disable=not progress, leave=False)):
        if r > 0:
            # Keep the best `keep` survivors by their count on the nested prefix (stable: ties -> first).
            ranking = torch.argsort(counts[survivors], descending=True, stable=True)
            survivors = torch.sort(survivors[ranking[:keep]]).values
        counts[survivors] += scorer.count(survivors, order[seen:images])
        seen = images
    best_pos = torch.argsort(counts[survivors], descending=True, stable=True)[0]
    best = int(survivors[best_pos])
    delta = scorer.deltas(torch.tensor([best]))[0]
    return UniversalPerturbation(
        delta=delta.detach().cpu(),
        frequency=(int(cands.frequencies[best, 0]), int(cands.frequencies[best, 1])),
        phase=float(cands.phases[best]),
        signs=tuple(int(s) for s in cands.signs[best].tolist()),
        eps=eps,
        norm=norm,
        wave=wave,
        fooling_rate=float(counts[best]) / n,
        queries=n + scorer.queries,
        exhaustive_queries=exhaustive_queries,
        candidates=n_cand,
        search=search,
        seconds=time.perf_counter() - start,
    )


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
        return dict(self.__dict__)


@torch.no_grad()
def evaluate_perturbation(
    model: Model,
    delta: Tensor,
    x: Tensor,
    y: Tensor,
    *,
    shifts: int = 0,
    bounds: Bounds = (0.0, 1.0),
    batch_size: int = 2048,
    seed: int = 0,
) -> PerturbationReport:
    """Fooling and error rates of ``clip(x + delta)`` on (held-out) images, optionally under shifts.

    Args:
        model: classifier on ``(N, C, H, W)`` images.
        delta: universal perturbation ``(C, H, W)`` (any attack's).
        x: images ``(N, C, H, W)`` in ``bounds``.
        y: labels ``(N,)``.
        shifts: number of random circular shifts of ``delta`` per image (uniform over all ``H x W``
            shifts, seeded); their mean fooling rate is ``shifted_fooling_rate``.
        bounds: valid pixel range (``None``: no clipping).
        batch_size: images per model call.
        seed: seeds the shifts.
    """
    bounds = check_bounds(bounds)
    batch_size = check_batch_size(batch_size)
    if isinstance(shifts, bool) or not isinstance(shifts, int) or shifts < 0:
        raise ConfigurationError(f"shifts must be an int >= 0, got {shifts!r}")
    check_images(x, bounds)
    device, dtype = model_device_dtype(model, x)
    x = x.to(device=device, dtype=dtype)
    n, channels, height, width = x.shape
    if not isinstance(delta, Tensor) or delta.shape != (channels, height, width):
        shape = tuple(delta.shape) if isinstance(delta, Tensor) else type(delta).__name__
        raise DataError(f"delta must have the image shape ({channels}, {height}, {width}), got {shape}")
    if not bool(torch.isfinite(delta).all()):
        raise DataError("delta contains NaN or infinite values")
    y = check_labels(y, n).to(device)
    delta = delta.to(device=device, dtype=dtype)
    clean = predict_labels(model, x, batch_size=batch_size)
    fooled = errors = 0
    l2 = linf = 0.0
    for i0 in range(0, n, batch_size):
        xs = x[i0 : i0 + batch_size]
        out = apply_perturbation(xs, delta, bounds=bounds)
        pred = call_model(model, out.images).argmax(dim=1)
        fooled += int((pred != clean[i0 : i0 + batch_size]).sum())
        errors += int((pred != y[i0 : i0 + batch_size]).sum())
        l2 += float(out.l2.sum())
        linf += float(out.linf.sum())
    shifted_fooled = shifted_errors = 0
    gen = torch.Generator().manual_seed(seed)
    for _ in range(shifts):
        moves = random_shifts(n, height, width, generator=gen)
        for i0 in range(0, n, batch_size):
            xs = x[i0 : i0 + batch_size]
            rolled = circular_shift(delta, moves[i0 : i0 + batch_size])
            images = apply_perturbation(xs, rolled, bounds=bounds).images
            pred = call_model(model, images).argmax(dim=1)
            shifted_fooled += int((pred != clean[i0 : i0 + batch_size]).sum())
            shifted_errors += int((pred != y[i0 : i0 + batch_size]).sum())
    return PerturbationReport(
        fooling_rate=fooled / n,
        error_rate=errors / n,
        clean_error_rate=float((clean != y).double().mean()),
        shifted_fooling_rate=shifted_fooled / (n * shifts) if shifts else None,
        shifted_error_rate=shifted_errors / (n * shifts) if shifts else None,
        mean_l2=l2 / n,
        mean_linf=linf / n,
        n_images=n,
        shifts=shifts,
    )
