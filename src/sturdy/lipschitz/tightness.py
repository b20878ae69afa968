"""Tightness diagnostics of certified radii (after Tsuzuku et al. 2018, Eq. 5).

For each point: (A) the certified radius, (B) the first-order radius ``M / (sqrt(2) ||J(x)||_2)``
from the exact local Jacobian (small models; not a certificate), (D) the L2 norm of the smallest
adversarial perturbation found by :func:`pgd_l2` with restarts and bisection on ``eps``.
``A <= D`` must always hold, up to the rounding of the attack's float distances
(:func:`~sturdy.lipschitz.proof.rounding_slack`): a violation is a soundness bug.

Conventions: L2 norms on flattened per-sample inputs; ``eps`` is an L2 perturbation radius (budget);
attacks are unconstrained in input range unless ``bounds=(lo, hi)``, the valid pixel range, is given
(the certificate covers all of R^n, so the tightness chain attacks without it). Every function runs
the model in eval mode and restores its mode.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from sturdy.errors import ConfigurationError, SoundnessError
from sturdy.lipschitz.certify import certify
from sturdy.lipschitz.proof import rounding_slack
from sturdy.lipschitz.results import LipschitzBound
from sturdy.utils import eval_mode, model_device_dtype
from sturdy.validation import check_finite_output, check_model_inputs

__all__ = ["AttackResult", "Tightness", "pgd_l2", "minimal_adversarial_radius", "local_lipschitz", "tightness"]


@dataclass(frozen=True)
class AttackResult:
    """Outcome of an L2 attack.

    Attributes:
        adversarial: perturbed inputs (the original input where the attack failed).
        success: bool ``(N,)``, prediction differs from the label.
        distance: float64 ``(N,)`` L2 norm of the perturbation (``inf`` where the attack failed).
    """

    adversarial: torch.Tensor
    success: torch.Tensor
    distance: torch.Tensor

    def to_dict(self) -> Dict[str, Any]:
        """Success rate and the median distance of successful attacks (JSON-able)."""
        hit = self.distance[self.success]
        return {
            "n": int(self.success.numel()),
            "success_rate": float(self.success.double().mean()) if self.success.numel() else 0.0,
            "median_distance": float(hit.median()) if hit.numel() else None,
        }


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1)


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def _check_bounds(bounds: Optional[Tuple[float, float]]) -> Optional[Tuple[float, float]]:
    if bounds is None:
        return None
    try:
        lo, hi = (float(v) for v in bounds)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"bounds must be the valid pixel range (lo, hi), e.g. (0, 1); got {bounds!r}") from exc
    if not lo < hi:
        raise ConfigurationError(f"bounds must be the valid pixel range (lo, hi) with lo < hi, got {bounds!r}")
    return lo, hi


def pgd_l2(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: Any,
    steps: int = 50,
    restarts: int = 3,
    step_size: Optional[float] = None,
    bounds: Optional[Tuple[float, float]] = None,
    seed: int = 0,
) -> AttackResult:
    """L2 projected gradient attack on the margin loss ``f_t - f_y`` (``t`` the strongest other class,
    or a fixed runner-up class in later restarts), with normalised steps and projection on the ball.

    Args:
        model: the classifier (run in eval mode).
        x: inputs ``(N, ...)``.
        y: labels to move away from ``(N,)``.
        eps: L2 budget, a float or a per-sample tensor ``(N,)``.
        steps: gradient steps per restart.
        restarts: restarts; the first (untargeted) starts at ``x``, restart ``r >= 1`` starts at a random
            point of the ball and targets the ``r``-th most likely other class.
        step_size: step length as a fraction of ``eps`` (default ``2.5 / steps``).
        bounds: the valid pixel range ``(lo, hi)``; adversarial inputs are clamped to it (default: none).
        seed: seed of the random starts.
    """
    if steps < 1 or restarts < 1:
        raise ConfigurationError(f"steps and restarts must be >= 1, got {steps} and {restarts}")
    bounds = _check_bounds(bounds)
    check_model_inputs(model, x, name="x")
    device, dtype = model_device_dtype(model)
    x = x.to(device=device, dtype=dtype)
    y = y.to(device)
    eps_t = torch.as_tensor(eps, dtype=dtype, device=device).expand(x.shape[0]).clone()
    if bool((eps_t < 0).any()):
        raise ConfigurationError("eps must be >= 0")
    alpha = (step_size if step_size is not None else 2.5 / steps) * eps_t
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    best = x.clone()
    success = torch.zeros(x.shape[0], dtype=torch.bool, device=device)
    dist = torch.full((x.shape[0],), math.inf, dtype=torch.float64, device=device)
    e, a = _per_sample(eps_t, x), _per_sample(alpha, x)
    with eval_mode(model):
        with torch.no_grad():
            ranked = check_finite_output(model(x)).argsort(dim=1, descending=True)  # targets of later restarts
        ranked = ranked[ranked != y[:, None]].reshape(x.shape[0], -1)
        for r in range(restarts):
            if r == 0:
                delta = torch.zeros_like(x)
            else:
                d = torch.randn(x.shape, generator=gen, dtype=dtype).to(device)
                u = torch.rand(x.shape[0], generator=gen, dtype=dtype).to(device)
                delta = d / _per_sample(_flat_norm(d).clamp_min(1e-12), x) * e * _per_sample(u, x)
            for _ in range(steps + 1):
                delta.requires_grad_(True)
                adv = x + delta
                if bounds is not None:
                    adv = adv.clamp(*bounds)
                logits = model(adv)
                # record successes at the current iterate (also after the last step)
                with torch.no_grad():
                    hit = logits.argmax(dim=1) != y
                    nrm = _flat_norm(adv - x).double()
                    better = hit & (nrm < dist)
                    best[better] = adv.detach()[better]
                    dist = torch.where(better, nrm, dist)
                    success |= hit
                onehot = torch.nn.functional.one_hot(y, logits.shape[1]).bool()
                if r == 0:  # untargeted: the currently strongest other class
                    other = logits.masked_fill(onehot, float("-inf")).max(dim=1).values
                else:  # targeted at the r-th runner-up (finds a nearer boundary the greedy attack skips)
                    other = logits.gather(1, ranked[:, (r - 1) % ranked.shape[1]][:, None])[:, 0]
                loss = (other - logits[onehot]).sum()
                (g,) = torch.autograd.grad(loss, delta)
                with torch.no_grad():
                    g = g / _per_sample(_flat_norm(g).clamp_min(1e-12), g)
                    delta = delta.detach() + a * g
                    n = _per_sample(_flat_norm(delta), delta)
                    delta = delta * torch.clamp(e / n.clamp_min(1e-12), max=1.0)
    return AttackResult(adversarial=best.detach(), success=success.cpu(), distance=dist.cpu())


def minimal_adversarial_radius(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    start: Any = 1.0,
    max_radius: float = 64.0,
    bisection_steps: int = 8,
    steps: int = 50,
    restarts: int = 3,
    bounds: Optional[Tuple[float, float]] = None,
    seed: int = 0,
) -> torch.Tensor:
    """Smallest adversarial L2 distance found per sample (an upper bound of the true minimum;
    ``inf`` where no adversarial example was found up to ``max_radius``).

    Doubles ``eps`` from ``start`` until :func:`pgd_l2` succeeds, then bisects ``bisection_steps``
    times; the result is the norm of an actual adversarial perturbation. ``bounds`` is the valid pixel
    range, as in :func:`pgd_l2`.
    """
    check_model_inputs(model, x, name="x")
    n = x.shape[0]
    hi = torch.as_tensor(start, dtype=torch.float64).expand(n).clone()
    found = torch.full((n,), math.inf, dtype=torch.float64)
    todo = torch.ones(n, dtype=torch.bool)
    while bool(todo.any()) and float(hi[todo].min()) <= max_radius:
        idx = todo.nonzero().flatten()
        res = pgd_l2(model, x[idx], y[idx], eps=hi[idx], steps=steps, restarts=restarts, bounds=bounds, seed=seed)
        found[idx] = torch.minimum(found[idx], res.distance)
        todo[idx[res.success]] = False
        hi[idx[~res.success]] *= 2.0
        todo &= hi <= max_radius
    hi = torch.where(torch.isfinite(found), found, hi)
    lo = torch.zeros(n, dtype=torch.float64)
    ok = torch.isfinite(found)
    for _ in range(bisection_steps):
        idx = ok.nonzero().flatten()
        if idx.numel() == 0:
            break
        mid = (lo[idx] + hi[idx]) / 2
        res = pgd_l2(model, x[idx], y[idx], eps=mid, steps=steps, restarts=restarts, bounds=bounds, seed=seed)
        found[idx] = torch.minimum(found[idx], res.distance)
        hi[idx] = torch.where(res.success, torch.minimum(mid, found[idx]), hi[idx])
        lo[idx] = torch.where(res.success, lo[idx], mid)
    return found


def local_lipschitz(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Spectral norm ``||J(x_n)||_2`` of the exact input-output Jacobian at each sample (float64).

    The Jacobian is taken on a float64 copy of the model when the copy computes what the model computes, else
    (code that the copy does not follow, e.g. a forward replaced on the instance by a closure over the original
    module) on the model itself in its own dtype.
    """
    check_model_inputs(model, x, name="x")
    device, dtype = model_device_dtype(model)
    x = x.to(device=device)
    with eval_mode(model):  # the float64 copy inherits eval mode; the model's own mode is restored
        net, work = _float64_twin(model, x[:1].to(dtype)), torch.float64
        if net is None:
            net, work = model, dtype
        out = []
        for xi in x.to(work):
            jac = torch.autograd.functional.jacobian(lambda t: net(t.unsqueeze(0))[0], xi)
            jac = check_finite_output(jac.reshape(jac.shape[0], -1), name="the model's Jacobian")
            out.append(torch.linalg.matrix_norm(jac.double(), ord=2))
    return torch.stack(out).cpu() if out else torch.zeros(0, dtype=torch.float64)


def _float64_twin(model: nn.Module, probe: torch.Tensor) -> Optional[nn.Module]:
    """A float64 deep copy of ``model`` (in eval mode), or ``None`` when the copy does not reproduce the model."""
    try:
        twin = copy.deepcopy(model).to(torch.float64)
        with torch.no_grad():
            a, b = model(probe).double(), twin(probe.double())
    except (RuntimeError, TypeError, ValueError, copy.Error):
        return None
    scale = max(float(a.abs().max()) if a.numel() else 0.0, 1.0)
    same = a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-3, atol=1e-4 * scale))
    return twin if same else None


@dataclass(frozen=True)
class Tightness:
    """Tightness chain on a sample of points (see module doc).

    Attributes:
        certified: (A) certified radius ``(N,)``.
        first_order: (B) ``M / (sqrt(2) ||J(x)||_2)`` ``(N,)``.
        adversarial: (D) smallest adversarial distance found ``(N,)`` (``inf`` if none).
        violations: number of points with ``A > D`` (must be 0; :func:`tightness` raises
            :class:`~sturdy.errors.SoundnessError` otherwise unless ``check=False``).
    """

    certified: torch.Tensor
    first_order: torch.Tensor
    adversarial: torch.Tensor
    violations: int

    def to_dict(self) -> Dict[str, Any]:
        """Medians of A, B, D and of the ratios A/B and A/D over the points where they are defined."""
        ok = (self.certified > 0) & (self.first_order > 0)
        ad = ok & torch.isfinite(self.adversarial)

        def med(t: torch.Tensor) -> Optional[float]:
            return float(t.median()) if t.numel() else None

        return {
            "n": int(self.certified.numel()),
            "n_certified": int((self.certified > 0).sum()),
            "median_A": med(self.certified),
            "median_B": med(self.first_order),
            "median_D": med(self.adversarial[torch.isfinite(self.adversarial)]),
            "median_A_over_B": med(self.certified[ok] / self.first_order[ok]),
            "median_A_over_D": med(self.certified[ad] / self.adversarial[ad]),
            "violations": self.violations,
        }


def tightness(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    bound: Optional[LipschitzBound] = None,
    form: str = "pairwise",
    steps: int = 50,
    restarts: int = 3,
    bisection_steps: int = 8,
    progress: bool = False,
    seed: int = 0,
    check: bool = True,
) -> Tightness:
    """Compute (A), (B), (D) for the points ``x`` with labels ``y`` (see module doc).

    (B) and (D) are computed for correctly classified points (others get 0, like A). The model runs
    in eval mode (its mode is restored).

    Args:
        check: raise when a point has ``A > D`` or certify's sampled self-check disproves the bound (set ``False``
            to inspect the violating result).

    Raises:
        SoundnessError: ``check`` and an attack found an adversarial example inside a certified radius, or the
            self-check of :func:`~sturdy.lipschitz.certify` found inputs that disprove the bound.
    """
    with eval_mode(model):
        result = _tightness(model, x, y, bound=bound, form=form, steps=steps, restarts=restarts,
                            bisection_steps=bisection_steps, progress=progress, seed=seed, check=check)
    if check and result.violations:
        raise SoundnessError(
            f"soundness violation: {result.violations} of {int(result.certified.numel())} points have a certified "
            "radius larger than an adversarial perturbation found by the attack; please report this with the model"
        )
    return result


def _tightness(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    bound: Optional[LipschitzBound],
    form: str,
    steps: int,
    restarts: int,
    bisection_steps: int,
    progress: bool,
    seed: int,
    check: bool,
) -> Tightness:
    cert = certify(model, x, y, form=form, bound=bound, self_check=check)
    steps_bar = tqdm(total=3, disable=not progress, desc="tightness")
    device, dtype = model_device_dtype(model)
    with torch.no_grad():
        logits = model(x.to(device=device, dtype=dtype)).double().cpu()
    top2 = logits.topk(2, dim=1).values
    margin = (top2[:, 0] - top2[:, 1]).clamp_min(0.0)
    steps_bar.update(1)
    jac = local_lipschitz(model, x)
    first = torch.where(cert.correct, margin / (math.sqrt(2.0) * jac.clamp_min(1e-300)), torch.zeros_like(margin))
    steps_bar.update(1)
    start = cert.radius.clamp_min(1e-3)
    adv = minimal_adversarial_radius(
        model, x, cert.predicted, start=start, steps=steps, restarts=restarts, bisection_steps=bisection_steps,
        seed=seed,
    )
    adv = torch.where(cert.correct, adv, torch.zeros_like(adv))
    steps_bar.update(1)
    steps_bar.close()
    # the attack's distances are float norms of perturbations evaluated in the model's dtype: a tight certificate
    # (a linear model) meets them up to that rounding, which is no violation
    violations = int((cert.radius > adv * (1 + rounding_slack(dtype))).sum())
    return Tightness(certified=cert.radius, first_order=first, adversarial=adv, violations=violations)

