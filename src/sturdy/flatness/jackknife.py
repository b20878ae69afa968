"""Jackknife over the independent groups of a Monte-Carlo curvature diagonal: bias correction and interval.

A quantity computed from the mean diagonal of ``G`` independent groups (normalized sharpness, say) is
recomputed without each group in turn; the jackknife gives its standard error (``G - 1`` degrees of
freedom) and removes the bias that falls like 1/samples, which a concave quantity such as a minimum over
scalings of a function linear in the curvature has (Jensen).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Dict, List, Mapping, Tuple

import torch
from torch import Tensor

from sturdy.errors import ConfigurationError

__all__ = ["t_quantile_975", "jackknife_layers"]

_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t_quantile_975(dof: int) -> float:
    """The 97.5% quantile of Student's t with ``dof`` degrees of freedom (two-sided 95% intervals)."""
    if dof < 1:
        raise ConfigurationError(f"degrees of freedom must be >= 1, got {dof}")
    if dof <= len(_T975):
        return _T975[dof - 1]
    return 1.959964 + 2.4 / dof  # within 1e-3 above 30 degrees of freedom


def jackknife_layers(
    replicates: Mapping[str, Tensor], names: List[str], plug_in: Dict[str, Any],
    solve_all: Callable[[Mapping[str, Tensor]], Dict[str, Any]],
) -> Tuple[Dict[str, Any], float, float]:
    """Bias-corrected per-layer results (frozen dataclasses with a ``value``), standard error of their sum, and
    the half-width of their 95% interval (Student's t with ``G - 1`` degrees of freedom).

    ``replicates`` maps parameter name -> ``(G, *shape)`` group diagonals, ``names`` the parameters
    ``solve_all(diagonal) -> {layer: result}`` reads, ``plug_in`` its results at the mean diagonal.

    The minimum is concave in the curvature, so the value at a noisy diagonal is biased low (Jensen;
    the bias falls like 1/samples). With ``G`` groups and ``v_(g)`` the value without group ``g``, each
    layer's value becomes ``G v - (G - 1) mean_g v_(g)``, which removes that term; the standard error
    is the jackknife's, with ``G - 1`` degrees of freedom.
    """
    groups = next(iter(replicates.values())).shape[0]
    totals = {n: replicates[n].sum(0) for n in names}
    loo = {layer: torch.zeros(groups, dtype=torch.float64) for layer in plug_in}
    for g in range(groups):
        leave_out = {n: (totals[n] - replicates[n][g]) / (groups - 1) for n in names}
        for layer, result in solve_all(leave_out).items():
            loo[layer][g] = result.value
    corrected = {
        layer: replace(result, value=groups * result.value - (groups - 1) * float(loo[layer].mean()))
        for layer, result in plug_in.items()
    }
    v = torch.stack(list(loo.values())).sum(0)
    stderr = float(((groups - 1) / groups * ((v - v.mean()) ** 2).sum()).sqrt())
    return corrected, stderr, t_quantile_975(groups - 1) * stderr
