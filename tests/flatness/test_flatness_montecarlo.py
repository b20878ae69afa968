"""Monte-Carlo GGN diagonal: convergence to the exact diagonal, standard errors, propagation to sharpness."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sturdy.flatness import hessian_diagonal, normalized_sharpness
from sturdy.flatness.curvature import MC_CLASS_THRESHOLD

from .conftest import tiny_data

CLASSES = 20
REPEATS = 8  # independent seeds per sample count
SQRT_RATIO_RANGE = (2.5, 6.5)  # 16x the samples: error shrinks by sqrt(16) = 4 (8 repeats: +-60%)
Z_COVERAGE = (3.5, 0.9)  # at least 90% of entries within 3.5 reported standard errors (t with 7 dof)
NS_Z = 4.0  # exact normalized sharpness within 4 reported standard errors of the Monte-Carlo value
SPREAD_RATIO_RANGE = (0.3, 3.0)  # std over repeats / mean reported standard error
BLOCK_RTOL, BLOCK_ATOL = 1e-10, 1e-14  # float64: blocks and mixed class gradients change rounding only


def _many_class_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, CLASSES)).double()


@pytest.fixture(scope="module")
def problem():
    model = _many_class_mlp()
    x, y = tiny_data((1, 3, 4), n=24, classes=CLASSES)
    return model, (x, y), hessian_diagonal(model, (x, y), method="ggn-exact")


def _rms_relative_error(estimate, exact) -> float:
    num = sum(float(((estimate.diagonal[n] - d) ** 2).sum()) for n, d in exact.diagonal.items())
    den = sum(float((d**2).sum()) for d in exact.diagonal.values())
    return math.sqrt(num / den)


def test_monte_carlo_converges_like_one_over_sqrt_samples(problem):
    model, data, exact = problem
    errors = {}
    for k in (4, 64):
        runs = [hessian_diagonal(model, data, method="ggn-mc", mc_samples=k, seed=s) for s in range(REPEATS)]
        errors[k] = math.sqrt(sum(_rms_relative_error(r, exact) ** 2 for r in runs) / REPEATS)
        assert all(r.method == "ggn-mc" and r.probes == k and r.quantity == "ggn_diagonal" for r in runs)
    ratio = errors[4] / errors[64]
    assert SQRT_RATIO_RANGE[0] <= ratio <= SQRT_RATIO_RANGE[1], errors


def test_reported_standard_errors_cover_the_exact_diagonal(problem):
    model, data, exact = problem
    mc = hessian_diagonal(model, data, method="ggn-mc", mc_samples=64, seed=3)
    z, coverage = Z_COVERAGE
    hits = total = 0
    for name, d in exact.diagonal.items():
        err = mc.stderr[name]
        live = err > 0
        hits += int(((mc.diagonal[name] - d).abs()[live] <= z * err[live]).sum())
        total += int(live.sum())
        # per-parameter sums (the layer's trace) carry their own standard error
        assert mc.sum_stderr[name] > 0
        assert abs(float(mc.diagonal[name].sum() - d.sum())) <= NS_Z * mc.sum_stderr[name]
    assert hits / total >= coverage
    assert mc.replicates is not None and mc.replicates["1.weight"].shape == (8, 10, 12)
    torch.testing.assert_close(mc.replicates["1.weight"].mean(0), mc.diagonal["1.weight"])
    assert mc.trace_stderr() > 0 and mc.is_hessian  # a ReLU net: its expectation is the Hessian diagonal


def test_normalized_sharpness_carries_the_monte_carlo_uncertainty(problem):
    model, data, exact = problem
    reference = normalized_sharpness(model, hessian=exact)
    assert reference.stderr == 0.0
    runs = [normalized_sharpness(model, hessian=hessian_diagonal(model, data, method="ggn-mc", mc_samples=32, seed=s))
            for s in range(REPEATS)]
    for ns in runs:
        assert ns.stderr is not None and ns.stderr > 0 and ns.hessian_method == "ggn-mc"
        low, high = ns.interval
        assert low < ns.value < high
        assert abs(ns.value - reference.value) <= NS_Z * ns.stderr
    spread = float(torch.tensor([ns.value for ns in runs], dtype=torch.float64).std())
    reported = sum(ns.stderr for ns in runs) / REPEATS
    assert SPREAD_RATIO_RANGE[0] <= spread / reported <= SPREAD_RATIO_RANGE[1], (spread, reported)


def test_auto_takes_monte_carlo_above_the_class_threshold():
    torch.manual_seed(1)
    for classes, expected in ((MC_CLASS_THRESHOLD, "ggn-exact"), (MC_CLASS_THRESHOLD + 1, "ggn-mc")):
        model = nn.Linear(3, classes).double()
        x, y = tiny_data((3,), n=4, classes=classes)
        hd = hessian_diagonal(model, (x, y))
        assert hd.method == expected and hd.num_classes == classes
    assert hessian_diagonal(model, (x, y), method="ggn-exact").method == "ggn-exact"  # the user's choice holds


def test_monte_carlo_is_reproducible_and_groups_divide_the_samples(problem):
    model, data, _ = problem
    a = hessian_diagonal(model, data, method="ggn-mc", mc_samples=6, seed=7, chunk_size=5)
    b = hessian_diagonal(model, data, method="ggn-mc", mc_samples=6, seed=7, chunk_size=5)
    torch.testing.assert_close(a.diagonal["1.weight"], b.diagonal["1.weight"], rtol=0, atol=0)
    assert a.replicates["1.weight"].shape[0] == 6  # largest divisor of 6 up to 8 groups
    assert hessian_diagonal(model, data, method="ggn-mc", mc_samples=5).replicates["3.bias"].shape[0] == 5


def test_monte_carlo_chunking_and_blocks_do_not_change_the_estimate(problem):
    """Blocks of one column (one backward pass per draw) and one block of all columns (the draws' output
    gradients mixed from the classes'): the same draws give the same groups."""
    model, data, _ = problem
    whole = hessian_diagonal(model, data, method="ggn-mc", mc_samples=32, seed=2, chunk_size=24)  # 32 > 20 classes
    split = hessian_diagonal(model, data, method="ggn-mc", mc_samples=32, seed=2, chunk_size=24, memory_budget=64)
    for name, d in whole.diagonal.items():
        torch.testing.assert_close(split.diagonal[name], d, rtol=BLOCK_RTOL, atol=0)
        torch.testing.assert_close(split.replicates[name], whole.replicates[name], rtol=BLOCK_RTOL, atol=BLOCK_ATOL)


# ------------------------------------------------- the interval of the Monte-Carlo normalized sharpness
COVERAGE_CLASSES = 60  # 16 samples x 24 inputs: each class drawn ~6 times; the plug-in is 1.8 se low here
LIGHT_SEEDS = 12
LIGHT_MIN_COVERED = 10  # nominal 95%: P(fewer than 10 of 12) = 2%; plug-in: 9 of 12, corrected: 11
LIGHT_BIAS_SE = 1.0  # mean error within 1 mean reported standard error (plug-in: -1.84, corrected: -0.03)
SLOW_SEEDS = 40
SLOW_MIN_COVERAGE = 0.85  # nominal 95% over 40 seeds: binomial sd 0.034
SLOW_BIAS_SE = 0.5


def _coverage_problem(classes: int):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, classes)).double()
    return model, tiny_data((1, 3, 4), n=24, classes=classes)


def _coverage(classes: int, seeds: int, samples: int = 16):
    model, data = _coverage_problem(classes)
    exact = normalized_sharpness(model, hessian=hessian_diagonal(model, data, method="ggn-exact")).value
    covered, errors, stderrs = 0, [], []
    for seed in range(seeds):
        ns = normalized_sharpness(model, hessian=hessian_diagonal(model, data, method="ggn-mc", mc_samples=samples,
                                                                  seed=seed))
        covered += ns.interval[0] <= exact <= ns.interval[1]
        errors.append(ns.value - exact)
        stderrs.append(ns.stderr)
        assert ns.plug_in_value is not None and ns.plug_in_value <= ns.value + 4 * ns.stderr
    return covered, sum(errors) / seeds, sum(stderrs) / seeds


def test_monte_carlo_sharpness_interval_covers_the_exact_value_over_seeds():
    """The minimum is concave in the curvature: the plug-in value is biased low; the jackknife removes it."""
    covered, bias, stderr = _coverage(COVERAGE_CLASSES, LIGHT_SEEDS)
    assert covered >= LIGHT_MIN_COVERED, (covered, bias, stderr)
    assert abs(bias) <= LIGHT_BIAS_SE * stderr, (bias, stderr)


@pytest.mark.slow
@pytest.mark.parametrize("classes", [COVERAGE_CLASSES, 200])
def test_monte_carlo_sharpness_interval_coverage_over_many_seeds(classes):
    covered, bias, stderr = _coverage(classes, SLOW_SEEDS)
    assert covered / SLOW_SEEDS >= SLOW_MIN_COVERAGE, (covered, bias, stderr)
    assert abs(bias) <= SLOW_BIAS_SE * stderr, (bias, stderr)


def test_t_quantile_and_the_reported_interval():
    from sturdy.flatness.jackknife import t_quantile_975

    assert t_quantile_975(7) == pytest.approx(2.365, abs=1e-3)
    assert t_quantile_975(200) == pytest.approx(1.972, abs=1e-3)
    assert t_quantile_975(31) > t_quantile_975(40) > 1.96
    model, data = _coverage_problem(COVERAGE_CLASSES)
    ns = normalized_sharpness(model, hessian=hessian_diagonal(model, data, method="ggn-mc", mc_samples=16))
    low, high = ns.interval
    assert (high - low) / 2 == pytest.approx(t_quantile_975(7) * ns.stderr)
    assert ns.value == pytest.approx(sum(r.value for r in ns.per_layer.values()))
    assert ns.to_dict()["plug_in_value"] == ns.plug_in_value


# ------------------------------------------ calibration of the entry and sum standard errors over seeds
CALIBRATION_LIGHT = dict(classes=5, samples=64, seeds=8)
CALIBRATION_SLOW = dict(classes=20, samples=200, seeds=40)
ENTRY_COVERAGE_LIGHT = (0.88, 0.99)  # nominal 95% t-intervals (7 dof); measured 0.94 over 20 seeds
ENTRY_COVERAGE_SLOW = (0.92, 0.975)  # measured 0.93 over 20 seeds; entries of a seed are correlated
SUM_COVERAGE_MIN = (0.8, 0.88)  # per-parameter sums, light and slow (4 parameters per seed)


def _calibration(classes: int, samples: int, seeds: int):
    from sturdy.flatness.jackknife import t_quantile_975

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, classes)).double()
    data = tiny_data((1, 3, 4), n=samples, classes=classes)
    exact = hessian_diagonal(model, data, method="ggn-exact")
    hits = total = sum_hits = sums = 0
    for seed in range(seeds):
        mc = hessian_diagonal(model, data, method="ggn-mc", mc_samples=16, seed=seed)
        t = t_quantile_975(mc.replicates["1.weight"].shape[0] - 1)
        for name, d in exact.diagonal.items():
            live = mc.stderr[name] > 0  # entries of dead units are exactly 0 in every group
            hits += int(((mc.diagonal[name] - d).abs()[live] <= t * mc.stderr[name][live]).sum())
            total += int(live.sum())
            sum_hits += abs(float(mc.diagonal[name].sum() - d.sum())) <= t * mc.sum_stderr[name]
            sums += 1
    return hits / total, sum_hits / sums


def test_entry_standard_errors_are_calibrated_over_seeds():
    """About 95% of the 95% t-intervals (groups - 1 degrees of freedom) cover the exact diagonal."""
    entries, sums = _calibration(**CALIBRATION_LIGHT)
    assert ENTRY_COVERAGE_LIGHT[0] <= entries <= ENTRY_COVERAGE_LIGHT[1], entries
    assert sums >= SUM_COVERAGE_MIN[0], sums


@pytest.mark.slow
def test_entry_standard_errors_are_calibrated_over_many_seeds():
    entries, sums = _calibration(**CALIBRATION_SLOW)
    assert ENTRY_COVERAGE_SLOW[0] <= entries <= ENTRY_COVERAGE_SLOW[1], entries
    assert sums >= SUM_COVERAGE_MIN[1], sums
