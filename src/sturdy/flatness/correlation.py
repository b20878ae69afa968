"""Rank correlation of generalisation measures with the generalisation gap (Jiang et al., ICLR 2020).

* Kendall's tau-b between a measure and the gap over all models (ties handled as in tau-b).
* Granulated tau: for each hyper-parameter ``i``, models are grouped by the values of every *other*
  hyper-parameter (so a group differs only in ``i``); tau is averaged over groups of at least two
  models, giving ``psi_i``; the granulated tau ``Psi`` is the mean of ``psi_i`` over hyper-parameters
  that vary. Seeds may be given as a hyper-parameter and then define groups like any other.
* Confidence intervals: percentile bootstrap over models (resampled with replacement, seeded).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from sturdy.errors import ConfigurationError, DataError

__all__ = ["kendall_tau", "granulated_tau", "MeasureCorrelation", "correlate_measures"]


def _as_array(name: str, values: Sequence[float]) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise DataError(f"{name} must be a 1-D sequence of numbers, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise DataError(f"{name} holds NaN or infinite values; remove those models or fix the measure")
    return arr


def _tau_b(x: np.ndarray, y: np.ndarray) -> float:
    if x.shape[0] < 2:
        return math.nan
    sx = np.sign(x[:, None] - x[None, :])
    sy = np.sign(y[:, None] - y[None, :])
    iu = np.triu_indices(x.shape[0], k=1)
    sx, sy = sx[iu], sy[iu]
    denom = math.sqrt(float(np.count_nonzero(sx)) * float(np.count_nonzero(sy)))
    return float((sx * sy).sum() / denom) if denom > 0 else math.nan


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b of two equally long sequences (NaN when either is constant or shorter than 2).

    Example:
        >>> kendall_tau([1, 2, 3, 4], [10, 20, 40, 30])
        0.6666666666666666
    """
    xa, ya = _as_array("x", x), _as_array("y", y)
    if xa.shape != ya.shape:
        raise DataError(f"x and y must have the same length, got {xa.shape[0]} and {ya.shape[0]}")
    return _tau_b(xa, ya)


def _hp_table(hyperparams: Sequence[Mapping[str, Any]], n: int) -> Tuple[List[str], List[Tuple[Any, ...]]]:
    if len(hyperparams) != n:
        raise DataError(f"need one hyper-parameter record per model: {len(hyperparams)} records for {n} models")
    keys = sorted({k for h in hyperparams for k in h})
    for h in hyperparams:
        missing = [k for k in keys if k not in h]
        if missing:
            raise DataError(f"every model needs the same hyper-parameters; one lacks {', '.join(missing)}")
    return keys, [tuple(repr(h[k]) for k in keys) for h in hyperparams]


def _groups(keys: List[str], rows: List[Tuple[Any, ...]], index: np.ndarray,
            axes: Optional[Sequence[str]]) -> Dict[str, List[np.ndarray]]:
    """Per varying hyper-parameter in ``axes``: positions (into ``index``) of models sharing all the others."""
    out: Dict[str, List[np.ndarray]] = {}
    for i, key in enumerate(keys):
        if (axes is not None and key not in axes) or len({rows[j][i] for j in index}) < 2:
            continue
        groups: Dict[Tuple[Any, ...], List[int]] = {}
        for pos, j in enumerate(index):
            groups.setdefault(rows[j][:i] + rows[j][i + 1 :], []).append(pos)
        out[key] = [np.asarray(g) for g in groups.values() if len(g) >= 2]
    return out


def _granulated_from_groups(x: np.ndarray, y: np.ndarray,
                            groups: Mapping[str, List[np.ndarray]]) -> Tuple[float, Dict[str, float]]:
    per: Dict[str, float] = {}
    for key, members in groups.items():
        taus = [t for t in (_tau_b(x[g], y[g]) for g in members) if not math.isnan(t)]
        per[key] = float(np.mean(taus)) if taus else math.nan
    valid = [v for v in per.values() if not math.isnan(v)]
    return (float(np.mean(valid)) if valid else math.nan), per


def _granulated(x: np.ndarray, y: np.ndarray, keys: List[str], rows: List[Tuple[Any, ...]],
                index: np.ndarray, axes: Optional[Sequence[str]] = None) -> Tuple[float, Dict[str, float]]:
    return _granulated_from_groups(x, y, _groups(keys, rows, index, axes))


def _check_axes(axes: Optional[Sequence[str]], keys: List[str]) -> None:
    unknown = sorted(set(axes or ()) - set(keys))
    if unknown:
        raise ConfigurationError(f"axes {', '.join(unknown)} are not hyper-parameters of the models")


def granulated_tau(
    measure: Sequence[float], gap: Sequence[float], hyperparams: Sequence[Mapping[str, Any]], *,
    axes: Optional[Sequence[str]] = None,
) -> Tuple[float, Dict[str, float]]:
    """Granulated Kendall tau ``Psi`` and its per-hyper-parameter terms ``psi_i`` (Jiang et al. 2020, Eq. 4).

    Args:
        measure: one value per model; gap: the generalisation gap per model.
        hyperparams: one mapping ``name -> value`` per model (the same names for every model).
        axes: the hyper-parameters averaged over (default: all); one left out (e.g. the seed) still
            separates groups but gets no ``psi`` of its own.

    Returns:
        ``(Psi, {name: psi_name})``; hyper-parameters that never vary are left out.
    """
    x, y = _as_array("measure", measure), _as_array("gap", gap)
    if x.shape != y.shape:
        raise DataError(f"measure and gap must have the same length, got {x.shape[0]} and {y.shape[0]}")
    keys, rows = _hp_table(hyperparams, x.shape[0])
    _check_axes(axes, keys)
    return _granulated(x, y, keys, rows, np.arange(x.shape[0]), axes)


@dataclass(frozen=True)
class MeasureCorrelation:
    """Correlation of one measure with the generalisation gap.

    Attributes:
        tau: Kendall tau-b over all models; tau_ci: its bootstrap percentile interval.
        granulated: granulated tau ``Psi``; granulated_ci: its bootstrap interval.
        per_hyperparameter: ``psi_i`` per varying hyper-parameter.
        models: number of models.
    """

    tau: float
    tau_ci: Tuple[float, float]
    granulated: float
    granulated_ci: Tuple[float, float]
    per_hyperparameter: Dict[str, float]
    models: int

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON types (NaN kept as ``None``)."""

        def clean(v: float) -> Optional[float]:
            return None if math.isnan(v) else v

        return {
            "tau": clean(self.tau), "tau_ci": [clean(v) for v in self.tau_ci],
            "granulated_tau": clean(self.granulated), "granulated_ci": [clean(v) for v in self.granulated_ci],
            "per_hyperparameter": {k: clean(v) for k, v in self.per_hyperparameter.items()},
            "models": self.models,
        }


def correlate_measures(
    measures: Mapping[str, Sequence[float]],
    gap: Sequence[float],
    hyperparams: Sequence[Mapping[str, Any]],
    *,
    bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    axes: Optional[Sequence[str]] = None,
) -> Dict[str, MeasureCorrelation]:
    """Kendall tau and granulated tau of every measure against the gap, with bootstrap intervals.

    Args:
        measures: measure name -> one value per model.
        gap: generalisation gap per model (e.g. train accuracy - test accuracy).
        hyperparams: per-model hyper-parameters (for the granulated tau).
        bootstrap: resamples (0 disables the intervals, which are then NaN).
        confidence: coverage of the percentile interval.
        seed: seed of the resampling (the same resamples serve every measure).
        axes: hyper-parameters of the granulated tau (see :func:`granulated_tau`; default: all).
    """
    if not 0 < confidence < 1:
        raise ConfigurationError(f"confidence must lie in (0, 1), got {confidence!r}")
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 0:
        raise ConfigurationError(f"bootstrap must be an integer >= 0, got {bootstrap!r}")
    y = _as_array("gap", gap)
    n = y.shape[0]
    keys, rows = _hp_table(hyperparams, n)
    _check_axes(axes, keys)
    rng = np.random.default_rng(seed)
    resamples = [np.sort(rng.integers(0, n, size=n)) for _ in range(bootstrap)]
    full_groups = _groups(keys, rows, np.arange(n), axes)
    boot_groups = [_groups(keys, rows, idx, axes) for idx in resamples]  # shared by every measure
    q = ((1 - confidence) / 2, 1 - (1 - confidence) / 2)

    def interval(values: List[float]) -> Tuple[float, float]:
        v = np.asarray([t for t in values if not math.isnan(t)])
        if v.size == 0:
            return (math.nan, math.nan)
        lo, hi = np.quantile(v, q)
        return (float(lo), float(hi))

    out: Dict[str, MeasureCorrelation] = {}
    for name, values in measures.items():
        x = _as_array(f"measure {name!r}", values)
        if x.shape[0] != n:
            raise DataError(f"measure {name!r} has {x.shape[0]} values for {n} models")
        tau = _tau_b(x, y)
        psi, per = _granulated_from_groups(x, y, full_groups)
        boot_tau = [_tau_b(x[idx], y[idx]) for idx in resamples]
        boot_psi = [_granulated_from_groups(x[idx], y[idx], g)[0] for idx, g in zip(resamples, boot_groups)]
        out[name] = MeasureCorrelation(tau, interval(boot_tau), psi, interval(boot_psi), per, n)
    return out
