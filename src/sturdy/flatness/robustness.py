"""Robustness view of a measure (Dziugaite et al., NeurIPS 2020) and paired comparisons of measures.

* :func:`sign_errors`: over pairs of models that differ in exactly one hyper-parameter, the sign-error
  of a measure is 1 when it orders the pair against the generalisation gap (0.5 on a tie of the measure
  or of the gap). An *environment* is one hyper-parameter together with the values of all the others;
  the sign-error of an environment is the mean over its pairs. Reported per hyper-parameter and overall:
  the mean over environments and the worst case (the largest environment sign-error). 0 is perfect,
  0.5 is chance.
* :func:`tau_difference`: Kendall tau of one measure minus another's, with a paired percentile-bootstrap
  interval over models (the same resample for both); the first measure *beats* the second when the
  interval lies above 0.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from sturdy.errors import ConfigurationError
from sturdy.flatness.correlation import _as_array, _check_axes, _hp_table, _tau_b

__all__ = ["SignErrors", "sign_errors", "TauDifference", "tau_difference"]


@dataclass(frozen=True)
class SignErrors:
    """Sign-errors of one measure: per hyper-parameter ``{"mean", "worst", "environments", "pairs"}`` and overall."""

    per_hyperparameter: Dict[str, Dict[str, float]]
    mean: float
    worst: float
    environments: int

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON types."""
        return {"per_hyperparameter": self.per_hyperparameter, "mean": self.mean, "worst": self.worst,
                "environments": self.environments}


def sign_errors(measure: Sequence[float], gap: Sequence[float], hyperparams: Sequence[Mapping[str, Any]], *,
                axes: Optional[Sequence[str]] = None) -> SignErrors:
    """Sign-errors of ``measure`` against ``gap`` over pairs differing in one hyper-parameter (module docstring).

    ``axes``: the hyper-parameters whose changes are environments (default: all). A hyper-parameter left
    out (e.g. the seed) still tells environments apart but is never the one that changes within a pair.
    """
    x, y = _as_array("measure", measure), _as_array("gap", gap)
    if x.shape != y.shape:
        raise ConfigurationError(f"measure and gap must have one value per model, got {x.shape[0]} and {y.shape[0]}")
    keys, rows = _hp_table(hyperparams, x.shape[0])
    _check_axes(axes, keys)
    per: Dict[str, Dict[str, float]] = {}
    all_envs: List[float] = []
    for i, key in enumerate(keys):
        if axes is not None and key not in axes:
            continue
        envs: Dict[Tuple[Any, ...], List[int]] = {}  # models sharing every other hyper-parameter
        for m, row in enumerate(rows):
            envs.setdefault(row[:i] + row[i + 1 :], []).append(m)
        values: List[float] = []
        pairs = 0
        for members in envs.values():
            errors = [0.5 if (product := np.sign(x[a] - x[b]) * np.sign(y[a] - y[b])) == 0 else float(product < 0)
                      for a, b in itertools.combinations(members, 2) if rows[a][i] != rows[b][i]]
            if errors:
                values.append(float(np.mean(errors)))
                pairs += len(errors)
        if values:
            per[key] = {"mean": float(np.mean(values)), "worst": float(np.max(values)),
                        "environments": len(values), "pairs": pairs}
            all_envs += values
    if not all_envs:
        raise ConfigurationError("no two models differ in exactly one hyper-parameter: no sign-error to report")
    return SignErrors(per, float(np.mean(all_envs)), float(np.max(all_envs)), len(all_envs))


@dataclass(frozen=True)
class TauDifference:
    """``tau(first) - tau(second)`` with its paired bootstrap interval; ``beats``: the interval is above 0."""

    difference: float
    interval: Tuple[float, float]
    beats: bool
    resamples: int

    @property
    def verdict(self) -> str:
        """``"beats"`` (interval above 0), ``"loses"`` (below 0) or ``"undecided"`` (it holds 0)."""
        if self.beats:
            return "beats"
        return "loses" if self.interval[1] < 0 else "undecided"

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON types."""
        return {"difference": self.difference, "interval": list(self.interval), "beats": self.beats,
                "verdict": self.verdict, "resamples": self.resamples}


def tau_difference(first: Sequence[float], second: Sequence[float], gap: Sequence[float], *,
                   resamples: int = 2000, level: float = 0.95, seed: int = 0) -> TauDifference:
    """Kendall tau of ``first`` minus that of ``second`` against ``gap``, paired bootstrap over models."""
    a, b, y = _as_array("first", first), _as_array("second", second), _as_array("gap", gap)
    if not (a.shape == b.shape == y.shape):
        raise ConfigurationError("first, second and gap must have one value per model")
    if resamples < 1 or not 0 < level < 1:
        raise ConfigurationError(f"resamples must be >= 1 and level in (0, 1), got {resamples} and {level}")
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(resamples):
        idx = rng.integers(0, a.shape[0], a.shape[0])
        d = _tau_b(a[idx], y[idx]) - _tau_b(b[idx], y[idx])
        if np.isfinite(d):
            diffs.append(d)
    low, high = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2]) if diffs else (np.nan, np.nan)
    return TauDifference(_tau_b(a, y) - _tau_b(b, y), (float(low), float(high)), bool(low > 0), resamples)
