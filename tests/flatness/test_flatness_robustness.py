"""Sign-errors over one-hyper-parameter pairs and paired tau differences, on hand-checked examples."""

from __future__ import annotations

import pytest

from sturdy.errors import ConfigurationError
from sturdy.flatness.robustness import sign_errors, tau_difference

HPS = [{"lr": lr, "width": w} for lr in (0.1, 0.2) for w in (8, 16)]  # 4 models, 4 one-hp pairs


def test_sign_errors_by_hand():
    gap = [1.0, 2.0, 3.0, 4.0]  # grows with lr and with width
    perfect = sign_errors([10, 20, 30, 40], gap, HPS)
    assert perfect.mean == 0.0 and perfect.worst == 0.0 and perfect.environments == 4
    # right about width, wrong about lr in the width-8 environment only, tied in the width-16 one
    mixed = sign_errors([30, 40, 10, 40], gap, HPS)
    assert mixed.per_hyperparameter["lr"] == {"mean": 0.75, "worst": 1.0, "environments": 2, "pairs": 2}
    assert mixed.per_hyperparameter["width"]["mean"] == 0.0
    assert mixed.worst == 1.0 and mixed.mean == pytest.approx((1.0 + 0.5 + 0 + 0) / 4)
    assert mixed.to_dict()["environments"] == 4


def test_sign_errors_need_pairs_differing_in_one_hyperparameter():
    with pytest.raises(ConfigurationError, match="differ in exactly one"):
        sign_errors([1, 2], [1, 2], [{"lr": 1, "w": 1}, {"lr": 2, "w": 2}])


def test_tau_difference_interval_and_verdict():
    gap = list(range(12))
    good = [g + 0.1 * (i % 2) for i, g in enumerate(gap)]  # tau 1
    noise = [5, 1, 9, 3, 11, 0, 7, 2, 10, 4, 8, 6]
    res = tau_difference(good, noise, gap, resamples=500, seed=1)
    assert res.difference > 0.5 and res.beats and res.interval[0] > 0
    same = tau_difference(good, good, gap, resamples=50)
    assert same.difference == 0.0 and same.interval == (0.0, 0.0) and not same.beats
