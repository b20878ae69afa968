"""Generalisation measures of a trained network, all in one registry.

Every measure is a keyword-only function ``f(model, data, *, ...) -> Measure`` where larger values
predict a *larger* generalisation gap (a complexity, not a quality). Conventions: the training loss
is the mean cross-entropy over ``data`` (or ``loss_fn``), the model is evaluated in eval mode and
never modified (perturbations go through ``torch.func.functional_call``), every random draw is
seeded and made on the CPU.

Registered measures (see :func:`available_measures`):

===============================  ==============================================================
``normalized_sharpness``         normalized sharpness, arXiv variant, exact GGN diagonal
``normalized_sharpness_icml``    normalized sharpness, ICML-2020 variant, exact GGN diagonal
``ggn_trace``                    exact trace of the GGN (= Hessian trace for ReLU nets), all parameters
``hessian_trace``                Hutchinson trace of the Hessian (100 Rademacher probes)
``hessian_top_eigenvalue``       largest Hessian eigenvalue (power iteration on HVPs)
``log_spectral_product``         ``sum_l log ||W_l||_2^2`` (Jiang et al.'s log_prod_of_spec)
``log_frobenius_product``        ``sum_l log ||W_l||_F^2`` (Jiang et al.'s log_prod_of_fro)
``pacbayes_flatness``            ``1 / sigma^2``, largest ``sigma`` with ``E[L(w + sigma z)] - L(w) <= target``
``pacbayes_mag_flatness``        ``1 / alpha^2``, noise variance ``alpha^2 w_i^2 + eps^2`` (magnitude-aware)
``adaptive_average_sharpness``   ``E[L(w + rho |w| * z)] - L(w)``, ``z ~ N(0, I)``
===============================  ==============================================================

Conv weights enter the norm products reshaped to ``(out, in * kh * kw)``. Monte-Carlo expectations
use antithetic pairs ``(z, -z)`` (the first-order term cancels exactly).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from sturdy.errors import ConfigurationError
from sturdy.flatness._data import (
    LossFn,
    check_positive_int,
    collect_batches,
    default_loss,
    eval_mode,
    model_device_dtype,
    trainable_parameters,
    weight_layers,
)
from sturdy.flatness.curvature import HessianDiagonal, hessian_diagonal, hutchinson_trace, top_hessian_eigenvalue
from sturdy.flatness.normalized import normalized_sharpness

__all__ = [
    "Measure",
    "MeasureSpec",
    "register_measure",
    "available_measures",
    "compute_measures",
    "log_spectral_product",
    "log_frobenius_product",
    "pacbayes_flatness",
    "adaptive_average_sharpness",
    "measure_spec",
    "measures_to_json",
]


@dataclass(frozen=True)
class Measure:
    """One measure's value with JSON-able details (solver iterations, standard errors, ...)."""

    name: str
    value: float
    details: Dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MeasureSpec:
    """A registered measure.

    Attributes:
        name: registry key.
        fn: ``fn(model, data, *, seed, progress, batch_size, hessian) -> Measure``.
        description: one line for reports.
        uses_hessian: whether ``fn`` uses the exact GGN diagonal of all parameters (shared by
            :func:`compute_measures` so it is computed once).
    """

    name: str
    fn: Callable[..., Measure]
    description: str
    uses_hessian: bool = False


_MEASURES: Dict[str, MeasureSpec] = {}


def register_measure(
    name: str, *, description: str, uses_hessian: bool = False
) -> Callable[[Callable[..., Measure]], Callable[..., Measure]]:
    """Decorator adding ``fn(model, data, *, seed, progress, batch_size, hessian) -> Measure`` to the registry."""

    def deco(fn: Callable[..., Measure]) -> Callable[..., Measure]:
        if name in _MEASURES:
            raise ConfigurationError(f"a measure named {name!r} is already registered")
        _MEASURES[name] = MeasureSpec(name, fn, description, uses_hessian)
        return fn

    return deco


def available_measures() -> Tuple[str, ...]:
    """Registered measure names, in registration order."""
    return tuple(_MEASURES)


def measure_spec(name: str) -> MeasureSpec:
    """The :class:`MeasureSpec` registered under ``name``."""
    if name not in _MEASURES:
        raise ConfigurationError(f"unknown measure {name!r}; known measures: {', '.join(_MEASURES)}")
    return _MEASURES[name]


def compute_measures(
    model: nn.Module,
    data: Any,
    *,
    names: Optional[Sequence[str]] = None,
    seed: int = 0,
    batch_size: int = 1024,
    settings: Optional[Mapping[str, Mapping[str, Any]]] = None,
    progress: bool = False,
) -> Dict[str, Measure]:
    """Compute registered measures of ``model`` on its training ``data``.

    The exact GGN diagonal of all parameters is computed once and shared by the measures that use it.

    Args:
        model: the trained network (eval mode; not modified).
        data: training data (``(inputs, targets)``, ``ImageDataset``, Dataset or iterable of batches).
        names: measures to compute (default: all of :func:`available_measures`).
        seed: seed of every stochastic measure.
        batch_size: samples per forward pass (memory only).
        settings: per-measure keyword overrides, e.g. ``{"hessian_trace": {"probes": 30},
            "pacbayes_flatness": {"samples": 4, "steps": 14}}`` (passed to the measure's function).
        progress: show a tqdm bar over measures.

    Returns:
        name -> :class:`Measure`, in the order of ``names``.
    """
    chosen = list(available_measures() if names is None else names)
    specs = [measure_spec(n) for n in chosen]
    settings = dict(settings or {})
    unknown = sorted(set(settings) - set(chosen))
    if unknown:
        raise ConfigurationError(f"settings given for measure(s) not computed: {', '.join(unknown)}")
    hessian: Optional[HessianDiagonal] = None
    if any(s.uses_hessian for s in specs):
        hessian = hessian_diagonal(model, data, batch_size=batch_size)
    out: Dict[str, Measure] = {}
    for spec in tqdm(specs, desc="measures", unit="measure", disable=not progress):
        options = dict(settings.get(spec.name, {}))
        try:
            out[spec.name] = spec.fn(model, data, seed=seed, progress=False, batch_size=batch_size, hessian=hessian,
                                     **options)
        except TypeError as exc:
            if options and "unexpected keyword" in str(exc):
                raise ConfigurationError(
                    f"measure {spec.name!r} does not accept the settings {options}: {exc}"
                ) from exc
            raise
    return out


# ----------------------------------------------------------------------------- curvature measures


@register_measure("normalized_sharpness", description="normalized sharpness (arXiv variant, exact GGN diagonal)",
                  uses_hessian=True)
def _ns_arxiv(model: nn.Module, data: Any, *, seed: int, progress: bool, batch_size: int,
              hessian: Optional[HessianDiagonal], **options: Any) -> Measure:
    return _ns(model, data, "arxiv", hessian, batch_size, progress, **options)


@register_measure("normalized_sharpness_icml", description="normalized sharpness (ICML-2020 variant)",
                  uses_hessian=True)
def _ns_icml(model: nn.Module, data: Any, *, seed: int, progress: bool, batch_size: int,
             hessian: Optional[HessianDiagonal], **options: Any) -> Measure:
    return _ns(model, data, "icml", hessian, batch_size, progress, **options)


def _ns(model: nn.Module, data: Any, variant: str, hessian: Optional[HessianDiagonal], batch_size: int,
        progress: bool, **options: Any) -> Measure:
    ns = normalized_sharpness(model, data, variant=variant, hessian=hessian, batch_size=batch_size,
                              progress=progress, **options)
    removed = sum(r.removed_rows + r.removed_cols for r in ns.per_layer.values())
    name = "normalized_sharpness" if variant == "arxiv" else "normalized_sharpness_icml"
    return Measure(name, ns.value, {
        "iterations": ns.iterations, "grad_norm": ns.grad_norm, "clamped_entries": ns.clamped_entries,
        "removed_units": removed, "per_layer": {k: v.value for k, v in ns.per_layer.items()},
    })


@register_measure("ggn_trace", description="exact GGN trace (= Hessian trace for ReLU networks)", uses_hessian=True)
def _ggn_trace(model: nn.Module, data: Any, *, seed: int, progress: bool, batch_size: int,
               hessian: Optional[HessianDiagonal], **options: Any) -> Measure:
    hd = hessian if hessian is not None else hessian_diagonal(model, data, batch_size=batch_size, progress=progress,
                                                              **options)
    return Measure("ggn_trace", hd.trace(), {"method": hd.method})


@register_measure("hessian_trace", description="Hessian trace, Hutchinson with 100 Rademacher probes")
def _hessian_trace(model: nn.Module, data: Any, *, seed: int, progress: bool, batch_size: int,
                   hessian: Optional[HessianDiagonal], probes: int = 100) -> Measure:
    est = hutchinson_trace(model, data, probes=probes, seed=seed, batch_size=batch_size, progress=progress)
    return Measure("hessian_trace", est.value, {"stderr": est.stderr, "probes": est.probes})


@register_measure("hessian_top_eigenvalue", description="top Hessian eigenvalue (power iteration on HVPs)")
def _top_eig(model: nn.Module, data: Any, *, seed: int, progress: bool, batch_size: int,
             hessian: Optional[HessianDiagonal], **options: Any) -> Measure:
    est = top_hessian_eigenvalue(model, data, seed=seed, batch_size=batch_size, progress=progress, **options)
    return Measure("hessian_top_eigenvalue", est.value,
                   {"iterations": est.iterations, "residual": est.residual, "converged": est.converged})


# ----------------------------------------------------------------------------- norm products


def _matrices(model: nn.Module) -> List[Tuple[str, Tensor]]:
    layers = weight_layers(model)
    if not layers:
        raise ConfigurationError("norm-product measures need at least one nn.Linear or nn.Conv2d layer")
    return [(n, m.weight.detach().to(torch.float64).reshape(m.weight.shape[0], -1)) for n, m in layers]


def log_spectral_product(model: nn.Module) -> Measure:
    """``sum_l log ||W_l||_2^2`` over Linear/Conv2d weights (conv reshaped to ``(out, in*kh*kw)``), float64.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False))
        >>> with torch.no_grad():
        ...     _ = net[0].weight.copy_(torch.diag(torch.tensor([3.0, 1.0])))
        ...     _ = net[2].weight.fill_(1.0)
        >>> round(log_spectral_product(net).value, 6) == round(2 * math.log(3.0) + math.log(2.0), 6)
        True
    """
    norms = {n: float(torch.linalg.matrix_norm(w, ord=2)) for n, w in _matrices(model)}
    return Measure("log_spectral_product", float(sum(2 * math.log(v) for v in norms.values())), {"per_layer": norms})


def log_frobenius_product(model: nn.Module) -> Measure:
    """``sum_l log ||W_l||_F^2`` over Linear/Conv2d weights, float64."""
    norms = {n: float(torch.linalg.matrix_norm(w, ord="fro")) for n, w in _matrices(model)}
    return Measure("log_frobenius_product", float(sum(2 * math.log(v) for v in norms.values())), {"per_layer": norms})


@register_measure("log_spectral_product", description="sum of log squared spectral norms")
def _spec(model: nn.Module, data: Any, *, seed: int, progress: bool, batch_size: int, hessian: Any = None) -> Measure:
    return log_spectral_product(model)


@register_measure("log_frobenius_product", description="sum of log squared Frobenius norms")
def _fro(model: nn.Module, data: Any, *, seed: int, progress: bool, batch_size: int, hessian: Any = None) -> Measure:
    return log_frobenius_product(model)


# ----------------------------------------------------------------------------- perturbation measures


class _Perturber:
    """Evaluates the training loss or error of ``model`` with weights ``w + scale * z_s`` (functional, no mutation)."""

    def __init__(self, model: nn.Module, data: Any, *, batch_size: int, loss_fn: LossFn, criterion: str,
                 samples: int, seed: int) -> None:
        if criterion not in ("loss", "error"):
            raise ConfigurationError(f"criterion must be 'loss' or 'error', got {criterion!r}")
        check_positive_int("samples", samples)
        self.model = model
        self.device, self.dtype = model_device_dtype(model)
        self.params = trainable_parameters(model)
        self.buffers = dict(model.named_buffers())
        self.batches = collect_batches(data, batch_size=batch_size, device=self.device, dtype=self.dtype)
        self.n = sum(int(x.shape[0]) for x, _ in self.batches)
        self.loss_fn = loss_fn
        self.criterion = criterion
        self.samples = samples
        self.seed = seed
        self.base = self.evaluate(None)

    def noise(self, s: int) -> List[Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + s)
        return [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(self.device, self.dtype)
                for _, p in self.params]

    @torch.no_grad()
    def evaluate(self, delta: Optional[List[Tensor]]) -> float:
        from torch.func import functional_call

        state = {n: p.detach() if delta is None else p.detach() + d for (n, p), d in
                 zip(self.params, delta if delta is not None else [None] * len(self.params))}
        state.update(self.buffers)
        total = 0.0
        with eval_mode(self.model):
            for x, y in self.batches:
                out = functional_call(self.model, state, (x,))
                if self.criterion == "loss":
                    total += float(self.loss_fn(out, y)) * x.shape[0]
                else:
                    total += float((out.argmax(1) != y).sum())
        return total / self.n

    def increase(self, scales: Sequence[Tensor], sigma: float) -> Tuple[float, float]:
        """Mean and standard error of ``L(w + sigma * scale * z) - L(w)`` over antithetic pairs."""
        values = []
        for s in range(self.samples):
            z = self.noise(s)
            plus = self.evaluate([sigma * c * zi for c, zi in zip(scales, z)])
            minus = self.evaluate([-sigma * c * zi for c, zi in zip(scales, z)])
            values.append(0.5 * (plus + minus) - self.base)
        t = torch.tensor(values, dtype=torch.float64)
        err = float(t.std() / math.sqrt(len(values))) if len(values) > 1 else float("nan")
        return float(t.mean()), err


def pacbayes_flatness(
    model: nn.Module,
    data: Any,
    *,
    magnitude_aware: bool = False,
    target: float = 0.1,
    criterion: str = "error",
    eps: float = 1e-3,
    samples: int = 8,
    steps: int = 24,
    bounds: Tuple[float, float] = (1e-6, 1e2),
    seed: int = 0,
    batch_size: int = 1024,
    loss_fn: Optional[LossFn] = None,
    progress: bool = False,
) -> Measure:
    """PAC-Bayes flatness of Jiang et al. (2020): ``1 / sigma^2`` for the largest admissible ``sigma``.

    ``sigma`` is found by bisection in log space so that the Monte-Carlo estimate of
    ``E_z[L(w + u)] - L(w)`` stays at most ``target``, with ``u = sigma * z`` (plain) or
    ``u_i = sqrt(sigma^2 w_i^2 + eps^2) z_i`` (``magnitude_aware``, *choice* ``eps = 1e-3``), ``z ~ N(0, I)``
    over every trainable parameter. The same seeded draws are used at every bisection step.

    Args:
        model: network (eval mode, not modified); data: its training data.
        magnitude_aware: use the magnitude-aware noise.
        target: admissible increase of the criterion (Jiang et al.: 0.1 of training error).
        criterion: ``"error"`` (0-1 training error, as in Jiang et al.) or ``"loss"`` (``loss_fn``).
        eps: additive noise scale of the magnitude-aware variant.
        samples: antithetic pairs per evaluation; steps: bisection steps; bounds: search range of sigma.
        seed: seed of the draws; batch_size: samples per forward; loss_fn: ``(outputs, targets) -> mean``.
        progress: show a tqdm bar over bisection steps.

    Returns:
        :class:`Measure` with value ``1 / sigma^2`` and details ``sigma``, ``increase``, ``saturated``
        (``"low"``/``"high"`` when the answer sits at a search bound, else ``""``).
    """
    if not (math.isfinite(target) and target > 0):
        raise ConfigurationError(f"target must be a finite number > 0, got {target!r}")
    lo, hi = bounds
    if not (0 < lo < hi and math.isfinite(hi)):
        raise ConfigurationError(f"bounds must satisfy 0 < low < high < inf, got {bounds!r}")
    check_positive_int("steps", steps)
    pert = _Perturber(model, data, batch_size=batch_size, loss_fn=loss_fn or default_loss, criterion=criterion,
                      samples=samples, seed=seed)
    weights = [p.detach() for _, p in pert.params]
    name = "pacbayes_mag_flatness" if magnitude_aware else "pacbayes_flatness"

    def increase(sigma: float) -> float:
        if magnitude_aware:
            scales = [(w * w + (eps / sigma) ** 2).sqrt() for w in weights]
        else:
            scales = [torch.ones((), dtype=w.dtype, device=w.device) for w in weights]
        return pert.increase(scales, sigma)[0]

    saturated = ""
    inc_hi = increase(hi)
    if inc_hi <= target:
        sigma, inc, saturated = hi, inc_hi, "high"
    else:
        inc_lo = increase(lo)
        if inc_lo > target:
            sigma, inc, saturated = lo, inc_lo, "low"
        else:
            log_lo, log_hi, inc = math.log(lo), math.log(hi), inc_lo
            for _ in tqdm(range(steps), desc=name, unit="step", disable=not progress):
                mid = 0.5 * (log_lo + log_hi)
                value = increase(math.exp(mid))
                if value <= target:
                    log_lo, inc = mid, value
                else:
                    log_hi = mid
            sigma = math.exp(log_lo)
    return Measure(name, 1.0 / sigma**2, {
        "sigma": sigma, "increase": inc, "target": target, "criterion": criterion, "saturated": saturated,
        "base": pert.base,
    })


@register_measure("pacbayes_flatness", description="PAC-Bayes flatness 1/sigma^2 (Jiang et al. 2020)")
def _pb(model: nn.Module, data: Any, *, seed: int, progress: bool, batch_size: int, hessian: Any = None,
        **options: Any) -> Measure:
    return pacbayes_flatness(model, data, seed=seed, batch_size=batch_size, progress=progress, **options)


@register_measure("pacbayes_mag_flatness", description="magnitude-aware PAC-Bayes flatness 1/alpha^2")
def _pb_mag(model: nn.Module, data: Any, *, seed: int, progress: bool, batch_size: int, hessian: Any = None,
            **options: Any) -> Measure:
    return pacbayes_flatness(model, data, magnitude_aware=True, seed=seed, batch_size=batch_size, progress=progress,
                             **options)


def adaptive_average_sharpness(
    model: nn.Module,
    data: Any,
    *,
    rho: float = 0.1,
    samples: int = 16,
    seed: int = 0,
    batch_size: int = 1024,
    loss_fn: Optional[LossFn] = None,
) -> Measure:
    """Adaptive average sharpness ``E_z[L(w + rho |w| * z)] - L(w)``, ``z ~ N(0, I)`` (element-wise ``|w|``).

    Invariant to node-wise rescaling only in the first-order sense; it uses the training loss
    (``loss_fn``, default cross-entropy) and ``samples`` antithetic pairs; details hold the standard error.
    """
    if not (math.isfinite(rho) and rho > 0):
        raise ConfigurationError(f"rho must be a finite number > 0, got {rho!r}")
    pert = _Perturber(model, data, batch_size=batch_size, loss_fn=loss_fn or default_loss, criterion="loss",
                      samples=samples, seed=seed)
    scales = [p.detach().abs() for _, p in pert.params]
    value, err = pert.increase(scales, rho)
    return Measure("adaptive_average_sharpness", value, {"stderr": err, "rho": rho, "samples": samples,
                                                         "base": pert.base})


@register_measure("adaptive_average_sharpness", description="adaptive average sharpness, rho = 0.1")
def _aas(model: nn.Module, data: Any, *, seed: int, progress: bool, batch_size: int, hessian: Any = None,
         **options: Any) -> Measure:
    return adaptive_average_sharpness(model, data, seed=seed, batch_size=batch_size, **options)


def measures_to_json(measures: Mapping[str, Measure]) -> Dict[str, Any]:
    """``{name: {"value": ..., "details": {...}}}`` (plain JSON types)."""
    return {n: {"value": m.value, "details": m.details} for n, m in measures.items()}
