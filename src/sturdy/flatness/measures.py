"""Generalisation measures of a trained network, all in one registry, and :func:`compute_measures`.

Every measure is a keyword-only function ``f(model, data, *, ...) -> Measure`` where larger values
predict a *larger* generalisation gap (a complexity, not a quality). Conventions: the training loss
is the mean cross-entropy over ``data`` (or ``loss_fn``), the model is evaluated in eval mode and
never modified (perturbations go through ``torch.func.functional_call``), every random draw is
seeded and made on the CPU.

Registered measures (see :func:`available_measures`), in this order:

===============================  ==============================================================
``normalized_sharpness``         normalized sharpness, arXiv variant, GGN diagonal (exact up to 100 classes)
``normalized_sharpness_icml``    normalized sharpness, ICML-2020 variant, GGN diagonal
``ggn_trace``                    trace of the GGN (= Hessian trace when ``is_hessian``), all parameters
``hessian_trace``                Hutchinson trace of the Hessian (100 Rademacher probes)
``hessian_top_eigenvalue``       largest Hessian eigenvalue (power iteration on HVPs)
``log_spectral_product``         ``sum_l log ||W_l||_2^2`` (Jiang et al.'s log_prod_of_spec)
``log_frobenius_product``        ``sum_l log ||W_l||_F^2`` (Jiang et al.'s log_prod_of_fro)
``pacbayes_flatness``            ``1 / sigma^2``, largest ``sigma`` with ``E[L(w + sigma z)] - L(w) <= target``
``pacbayes_mag_flatness``        ``1 / alpha^2``, noise variance ``alpha^2 w_i^2 + noise_floor^2`` (magnitude-aware)
``adaptive_average_sharpness``   ``E[L(w + rho |w| * z)] - L(w)``, ``z ~ N(0, I)``
===============================  ==============================================================

and ``balanced_normalized_sharpness``: normalized sharpness of the attention-balanced model, invariant under
the query-key and value-output symmetries of attention (:mod:`sturdy.flatness.symmetry`; on a network
without attention it equals ``normalized_sharpness``).

Curvature measures name their curvature in their details (``curvature``/``quantity``, ``is_hessian``
decided from the traced operators, :mod:`sturdy.flatness.exactness`): the GGN diagonal is the
Hessian's only for piecewise-linear networks. ``normalized_sharpness`` accepts ``require_hessian=True``
(in ``settings``) to refuse otherwise, and ``strict=True`` to refuse uncovered weight matrices.

The functions themselves live in :mod:`sturdy.flatness.normalized`, :mod:`sturdy.flatness.curvature`,
:mod:`sturdy.flatness.norms`, :mod:`sturdy.flatness.perturbation` and :mod:`sturdy.flatness.symmetry`; this
module only registers them.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence

from torch import nn
from tqdm.auto import tqdm

from sturdy.errors import ConfigurationError
from sturdy.flatness._data import loss_batches
from sturdy.flatness.curvature import HessianDiagonal, hessian_diagonal, hutchinson_trace, top_hessian_eigenvalue
from sturdy.flatness.normalized import normalized_sharpness
from sturdy.flatness.norms import log_frobenius_product, log_spectral_product
from sturdy.flatness.perturbation import adaptive_average_sharpness, pacbayes_flatness
from sturdy.flatness.registry import (
    Measure,
    MeasureSet,
    available_measures,
    check_settings,
    measure_spec,
    register_measure,
)
from sturdy.flatness.sketching import hutchpp_trace
from sturdy.flatness.symmetry import balanced_normalized_sharpness
from sturdy.utils import model_device_dtype
from sturdy.validation import check_model

__all__ = ["compute_measures"]


def compute_measures(
    model: nn.Module,
    data: Any,
    *,
    names: Optional[Sequence[str]] = None,
    seed: int = 0,
    batch_size: int = 1024,
    settings: Optional[Mapping[str, Mapping[str, Any]]] = None,
    progress: bool = False,
) -> MeasureSet:
    """Compute registered measures of ``model`` on its training ``data``.

    The exact GGN diagonal of all parameters is computed once and shared by the measures that use it.

    Args:
        model: the trained network (evaluated in eval mode, its mode restored; not modified).
        data: training data (``(inputs, targets)``, ``ImageDataset``, Dataset or iterable of batches).
        names: measures to compute (default: all of :func:`available_measures`).
        seed: seed of every stochastic measure.
        batch_size: samples per forward pass (memory only).
        settings: per-measure keyword overrides, e.g. ``{"hessian_trace": {"probes": 30},
            "pacbayes_flatness": {"samples": 4, "steps": 14}}`` (passed to the measure's function and
            checked against its signature before anything is computed).
        progress: show a tqdm bar over measures.

    Returns:
        A :class:`MeasureSet` (mapping name -> :class:`Measure`, in the order of ``names``).
    """
    check_model(model)
    chosen = list(available_measures() if names is None else names)
    specs = [measure_spec(n) for n in chosen]
    settings = dict(settings or {})
    unknown = sorted(set(settings) - set(chosen))
    if unknown:
        raise ConfigurationError(f"settings given for measure(s) not computed: {', '.join(unknown)}")
    for spec in specs:
        check_settings(spec, settings.get(spec.name, {}))
    if not any("loss_fn" in options for options in settings.values()):
        device, dtype = model_device_dtype(model)  # refuse bad data before anything is computed
        loss_batches(model, data, batch_size=batch_size, device=device, dtype=dtype, loss_fn=None)
    hessian: Optional[HessianDiagonal] = None
    if any(s.uses_hessian for s in specs):
        hessian = hessian_diagonal(model, data, batch_size=batch_size)
    out: Dict[str, Measure] = {}
    for spec in tqdm(specs, desc="measures", unit="measure", disable=not progress):
        options = dict(settings.get(spec.name, {}))
        out[spec.name] = spec.fn(model, data, seed=seed, progress=False, batch_size=batch_size, hessian=hessian,
                                 **options)
    return MeasureSet(out)


# ----------------------------------------------------------------------------- curvature measures


@register_measure("normalized_sharpness", description="normalized sharpness (arXiv variant, exact GGN diagonal)",
                  uses_hessian=True, settings_of=normalized_sharpness, fixed=("variant",))
def _ns_arxiv(model: nn.Module, data: Any, *, seed: int, progress: bool, batch_size: int,
              hessian: Optional[HessianDiagonal], **options: Any) -> Measure:
    return _ns(model, data, "arxiv", hessian, batch_size, progress, **options)


@register_measure("normalized_sharpness_icml", description="normalized sharpness (ICML-2020 variant)",
                  uses_hessian=True, settings_of=normalized_sharpness, fixed=("variant",))
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
        "curvature": ns.quantity, "curvature_method": ns.hessian_method, "is_hessian": ns.is_hessian,
        "skipped": list(ns.skipped), "stderr": ns.stderr,
    })


@register_measure("ggn_trace", description="exact GGN trace (= Hessian trace for ReLU networks)", uses_hessian=True,
                  settings_of=hessian_diagonal)
def _ggn_trace(model: nn.Module, data: Any, *, seed: int, progress: bool, batch_size: int,
               hessian: Optional[HessianDiagonal], **options: Any) -> Measure:
    hd = hessian if hessian is not None else hessian_diagonal(model, data, batch_size=batch_size, progress=progress,
                                                              **options)
    return Measure("ggn_trace", hd.trace(), {"method": hd.method, "quantity": hd.quantity,
                                            "is_hessian": hd.is_hessian, "reasons": list(hd.reasons)})


@register_measure("hessian_trace", description="Hessian trace, Hutchinson with 100 Rademacher probes")
def _hessian_trace(model: nn.Module, data: Any, *, seed: int, progress: bool, batch_size: int,
                   hessian: Optional[HessianDiagonal], probes: int = 100, method: str = "hutchinson") -> Measure:
    """``method``: ``"hutchinson"`` (default), or ``"hutch++"``/``"xtrace"`` at ``probes`` products."""
    if method == "hutchinson":
        est = hutchinson_trace(model, data, probes=probes, seed=seed, batch_size=batch_size, progress=progress)
        return Measure("hessian_trace", est.value, {"stderr": est.stderr, "probes": est.probes, "method": method})
    sketch = hutchpp_trace(model, data, method=method, matvecs=probes, seed=seed, batch_size=batch_size)
    return Measure("hessian_trace", sketch.value, {"stderr": sketch.stderr, "probes": sketch.matvecs,
                                                  "method": method})


@register_measure("hessian_top_eigenvalue", description="top Hessian eigenvalue (power iteration on HVPs)",
                  settings_of=top_hessian_eigenvalue)
def _top_eig(model: nn.Module, data: Any, *, seed: int, progress: bool, batch_size: int,
             hessian: Optional[HessianDiagonal], **options: Any) -> Measure:
    est = top_hessian_eigenvalue(model, data, seed=seed, batch_size=batch_size, progress=progress, **options)
    return Measure("hessian_top_eigenvalue", est.value,
                   {"iterations": est.iterations, "residual": est.residual, "converged": est.converged})


# ----------------------------------------------------------------------------- norm products


@register_measure("log_spectral_product", description="sum of log squared spectral norms")
def _spec(model: nn.Module, data: Any, *, seed: int, progress: bool, batch_size: int, hessian: Any = None) -> Measure:
    return log_spectral_product(model)


@register_measure("log_frobenius_product", description="sum of log squared Frobenius norms")
def _fro(model: nn.Module, data: Any, *, seed: int, progress: bool, batch_size: int, hessian: Any = None) -> Measure:
    return log_frobenius_product(model)


# ----------------------------------------------------------------------------- perturbation measures


@register_measure("pacbayes_flatness", description="PAC-Bayes flatness 1/sigma^2 (Jiang et al. 2020)",
                  settings_of=pacbayes_flatness, fixed=("magnitude_aware",))
def _pb(model: nn.Module, data: Any, *, seed: int, progress: bool, batch_size: int, hessian: Any = None,
        **options: Any) -> Measure:
    return pacbayes_flatness(model, data, seed=seed, batch_size=batch_size, progress=progress, **options)


@register_measure("pacbayes_mag_flatness", description="magnitude-aware PAC-Bayes flatness 1/alpha^2",
                  settings_of=pacbayes_flatness, fixed=("magnitude_aware",))
def _pb_mag(model: nn.Module, data: Any, *, seed: int, progress: bool, batch_size: int, hessian: Any = None,
            **options: Any) -> Measure:
    return pacbayes_flatness(model, data, magnitude_aware=True, seed=seed, batch_size=batch_size, progress=progress,
                             **options)


@register_measure("adaptive_average_sharpness", description="adaptive average sharpness, rho = 0.1",
                  settings_of=adaptive_average_sharpness)
def _aas(model: nn.Module, data: Any, *, seed: int, progress: bool, batch_size: int, hessian: Any = None,
         **options: Any) -> Measure:
    return adaptive_average_sharpness(model, data, seed=seed, batch_size=batch_size, **options)


# ----------------------------------------------------------------------------- attention symmetries


@register_measure("balanced_normalized_sharpness",
                  description="normalized sharpness of the attention-balanced model (attention-symmetry invariant)",
                  uses_hessian=True, settings_of=balanced_normalized_sharpness)
def _balanced(model: nn.Module, data: Any, *, seed: int, progress: bool, batch_size: int,
              hessian: Optional[HessianDiagonal], **options: Any) -> Measure:
    bs = balanced_normalized_sharpness(model, data, hessian=hessian, batch_size=batch_size, progress=progress,
                                       **options)
    return Measure("balanced_normalized_sharpness", bs.value, {
        "per_layer": dict(bs.per_layer), "heads": bs.heads, "balanced": bs.balanced, "variant": bs.variant,
        "curvature": bs.quantity, "curvature_method": bs.hessian_method, "is_hessian": bs.is_hessian,
        "skipped": list(bs.skipped), "stderr": bs.stderr,
    })
