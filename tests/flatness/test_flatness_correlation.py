"""Kendall tau, granulated tau and bootstrap intervals against brute-force pair counts."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from sturdy.errors import ConfigurationError, DataError
from sturdy.flatness import correlate_measures, granulated_tau, kendall_tau

TAU_ATOL = 1e-12


def _tau_b_bruteforce(x, y):
    conc = disc = tx = ty = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
        if dx == 0 and dy == 0:
            continue
        if dx == 0:
            tx += 1
        elif dy == 0:
            ty += 1
        elif dx == dy:
            conc += 1
        else:
            disc += 1
    return (conc - disc) / math.sqrt((conc + disc + tx) * (conc + disc + ty))


def test_kendall_tau_matches_bruteforce_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(5):
        x = rng.integers(0, 4, size=15).astype(float)
        y = x + rng.integers(0, 3, size=15)
        assert kendall_tau(x, y) == pytest.approx(_tau_b_bruteforce(x, y), abs=TAU_ATOL)
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == -1.0
    assert math.isnan(kendall_tau([1, 1, 1], [1, 2, 3]))


def test_granulated_tau_by_hand():
    # two hyper-parameters; the measure follows the gap along "lr" but reverses it along "width"
    hps = [{"lr": lr, "width": w} for lr in (0.1, 0.01) for w in (32, 128)]
    gap = [1.0, 2.0, 3.0, 4.0]  # gap grows with width and with smaller lr
    measure = [2.0, 1.0, 4.0, 3.0]
    psi, per = granulated_tau(measure, gap, hps)
    # lr groups: width=32: (1,3) vs (2,4) -> +1 ; width=128: (2,4) vs (1,3) -> +1 => psi_lr = 1
    # width groups: lr=0.1: gap 1<2, measure 2>1 -> -1 ; lr=0.01: -1 => psi_width = -1
    assert per == {"lr": 1.0, "width": -1.0}
    assert psi == 0.0


def test_correlate_measures_bootstrap():
    rng = np.random.default_rng(1)
    hps = [{"bs": b, "lr": lr, "seed": s} for b in (16, 64) for lr in (0.1, 0.01) for s in (0, 1, 2)]
    gap = rng.normal(size=len(hps))
    good = gap + 0.1 * rng.normal(size=len(hps))
    noise = rng.normal(size=len(hps))
    out = correlate_measures({"good": good, "noise": noise}, gap, hps, bootstrap=200, seed=0)
    g, n = out["good"], out["noise"]
    assert g.tau == pytest.approx(kendall_tau(good, gap), abs=TAU_ATOL)
    assert g.tau_ci[0] <= g.tau <= g.tau_ci[1] and g.tau_ci[0] > 0.5
    assert n.tau_ci[0] < n.tau_ci[1]
    assert set(g.per_hyperparameter) == {"bs", "lr", "seed"}
    assert g.to_dict()["models"] == len(hps)
    again = correlate_measures({"good": good}, gap, hps, bootstrap=200, seed=0)
    assert again["good"].tau_ci == g.tau_ci  # seeded


def test_validation_messages():
    with pytest.raises(DataError, match="same length"):
        kendall_tau([1, 2], [1, 2, 3])
    with pytest.raises(DataError, match="NaN or infinite"):
        kendall_tau([1, float("nan")], [1, 2])
    with pytest.raises(DataError, match="one hyper-parameter record per model"):
        granulated_tau([1, 2], [1, 2], [{"a": 1}])
    with pytest.raises(DataError, match="one lacks b"):
        granulated_tau([1, 2], [1, 2], [{"a": 1, "b": 2}, {"a": 2}])
    with pytest.raises(ConfigurationError, match="confidence must lie in"):
        correlate_measures({"m": [1, 2]}, [1, 2], [{"a": 1}, {"a": 2}], confidence=1.5)
    with pytest.raises(DataError, match="has 1 values for 2 models"):
        correlate_measures({"m": [1]}, [1, 2], [{"a": 1}, {"a": 2}])
