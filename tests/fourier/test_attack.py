"""Single Fourier Attack: exhaustive equals brute force, halving vs exhaustive, shift invariance, errors."""

from __future__ import annotations

import inspect
import itertools
import math

import pytest
import torch
from torch import nn

from sturdy.errors import ConfigurationError, DataError
from sturdy.fourier import circular_shift, evaluate_perturbation, single_fourier_attack

from .conftest import tiny_cnn
from .fourier_reference import direct_direction, direct_perturbation, predict_one

DELTA_TOL = 1e-12  # float64 perturbations from irfft2 vs the direct formula
HALVING_MIN_RATIO = 0.95  # the target: default search reaches >= 95% of exhaustive


def brute_force_sfa(model, x, *, eps, norm, wave, phases=8):
    """Every (k, l) of the full plane, every phase, every sign pattern; one image at a time."""
    n, channels, height, width = x.shape
    clean = torch.tensor([predict_one(model, x[i]) for i in range(n)])
    best = -1
    for k, l in itertools.product(range(height), range(width)):  # noqa: E741
        for j in range(phases):
            u = direct_direction(height, width, k, l, 2 * math.pi * j / phases)
            for signs in itertools.product((1, -1), repeat=channels):
                delta = direct_perturbation(u, signs, eps=eps, norm=norm, wave=wave)
                with torch.no_grad():
                    pred = model((x + delta).clamp(0, 1)).argmax(1)
                best = max(best, int((pred != clean).sum()))
    return best / n


@pytest.mark.parametrize("shape,norm,wave,eps", [((2, 4, 5), "l2", "sine", 1.0), ((1, 5, 4), "linf", "square", 0.2)])
def test_exhaustive_search_equals_brute_force(shape, norm, wave, eps):
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(8, *shape, generator=gen, dtype=torch.float64)
    model = tiny_cnn(shape)
    result = single_fourier_attack(model, x, eps=eps, norm=norm, wave=wave, search="exhaustive")
    expected = brute_force_sfa(model, x, eps=eps, norm=norm, wave=wave)
    assert 0 < expected < 1
    assert result.fooling_rate == expected
    assert result.queries == result.exhaustive_queries == 8 * (result.candidates + 1)
    # The returned delta is the direct-formula perturbation of the reported candidate and achieves the rate.
    k, l = result.frequency  # noqa: E741
    u = direct_direction(shape[1], shape[2], k, l, result.phase)
    ref = direct_perturbation(u, result.signs, eps=eps, norm=norm, wave=wave)
    torch.testing.assert_close(result.delta, ref, atol=DELTA_TOL, rtol=0)
    report = evaluate_perturbation(model, result.delta, x, torch.zeros(8, dtype=torch.long))
    assert report.fooling_rate == expected


@pytest.mark.parametrize("search", ["staged", "halving"])
def test_default_searches_reach_95_percent_of_exhaustive_with_fewer_queries(trained_cnn, digits, search):
    _, test = digits
    x = test.images[:200]
    exhaustive = single_fourier_attack(trained_cnn, x, eps=2.0, search="exhaustive")
    halving = single_fourier_attack(trained_cnn, x, eps=2.0, search=search)
    default = inspect.signature(single_fourier_attack).parameters["search"].default
    assert default == "staged" and exhaustive.fooling_rate > 0.3
    assert halving.fooling_rate >= HALVING_MIN_RATIO * exhaustive.fooling_rate
    assert halving.queries < (0.25 if search == "staged" else 0.5) * exhaustive.queries
    held_out = evaluate_perturbation(trained_cnn, halving.delta, test.images[200:], test.labels[200:], shifts=2)
    assert held_out.fooling_rate > 0.2 and held_out.shifts == 2 and held_out.shifted_fooling_rate is not None


@pytest.mark.slow
@pytest.mark.parametrize("eps,norm,wave", [(2.0, "l2", "sine"), (0.1, "linf", "square"), (1.0, "l2", "square")])
def test_halving_target_holds_over_seeds(trained_cnn, digits, eps, norm, wave):
    """The statistical version of the halving check: 300 attack images, five image orders, three budgets."""
    train, _ = digits
    x = train.images[:300]
    exhaustive = single_fourier_attack(trained_cnn, x, eps=eps, norm=norm, wave=wave, search="exhaustive")
    for seed in range(5):
        halving = single_fourier_attack(trained_cnn, x, eps=eps, norm=norm, wave=wave, seed=seed)
        assert halving.fooling_rate >= HALVING_MIN_RATIO * exhaustive.fooling_rate, seed
        assert halving.queries < 0.25 * exhaustive.queries


def test_attack_reads_only_predicted_labels():
    """Replacing the logits by a one-hot of their argmax changes nothing (black-box, label-only)."""
    shape = (2, 5, 5)
    model = tiny_cnn(shape)

    class LabelsOnly(nn.Module):
        def forward(self, images):
            return nn.functional.one_hot(model(images).argmax(1), 4).double()

    x = torch.rand(12, *shape, dtype=torch.float64)
    a = single_fourier_attack(model, x, eps=1.0, initial_images=4)
    b = single_fourier_attack(LabelsOnly(), x, eps=1.0, initial_images=4)
    assert (a.frequency, a.phase, a.signs, a.fooling_rate, a.queries) == (
        b.frequency, b.phase, b.signs, b.fooling_rate, b.queries
    )


class _QueryCounter(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.images = 0

    def forward(self, x):
        self.images += x.shape[0]
        return self.inner(x)


@pytest.mark.parametrize("search", ["staged", "halving", "random"])
@pytest.mark.parametrize("budget", [700, 3000, 9000])
def test_max_queries_is_never_exceeded_and_reported_exactly(search, budget):
    """The reported queries are the model's image evaluations, and never more than max_queries."""
    x = torch.rand(40, 1, 6, 6, dtype=torch.float64)
    model = _QueryCounter(tiny_cnn((1, 6, 6)))
    result = single_fourier_attack(model, x, eps=1.0, max_queries=budget, search=search)
    assert result.queries == model.images <= budget
    assert result.max_queries == budget and result.to_dict()["max_queries"] == budget
    if search != "halving":  # staged and random fit their sizes to the budget: most of it is used
        assert result.queries >= 0.5 * min(budget, result.exhaustive_queries)


def test_max_queries_errors():
    x = torch.rand(40, 1, 6, 6, dtype=torch.float64)
    model = tiny_cnn((1, 6, 6))
    with pytest.raises(ConfigurationError, match="exhaustive search over .* use search='staged'"):
        single_fourier_attack(model, x, eps=1.0, search="exhaustive", max_queries=3000)
    with pytest.raises(ConfigurationError, match="max_queries=100 is too small"):
        single_fourier_attack(model, x, eps=1.0, max_queries=100, search="halving")
    with pytest.raises(ConfigurationError, match="too small for the staged search"):
        single_fourier_attack(model, x, eps=1.0, max_queries=60)
    with pytest.raises(ConfigurationError, match="does not even cover the 40 clean predictions"):
        single_fourier_attack(model, x, eps=1.0, max_queries=40)


class CircularLinear(nn.Module):
    """logits = spatial mean of a circular convolution: linear and exactly shift-equivariant."""

    def __init__(self, channels: int, classes: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, classes, 3, padding=1, padding_mode="circular")

    def forward(self, x):
        return self.conv(x).mean(dim=(2, 3))


def test_fooling_rate_is_exactly_shift_invariant_for_a_circular_convolution():
    torch.manual_seed(4)
    shape = (2, 6, 5)
    model = CircularLinear(2, 5).double().eval()
    x = 0.35 + 0.3 * torch.rand(50, *shape, dtype=torch.float64)  # in [0.35, 0.65]: no clipping below
    y = model(x).argmax(1)
    # The pure-sum read-out only sees the constant frequency; a large budget makes it flip predictions.
    sfa = single_fourier_attack(model, x, eps=0.6, search="exhaustive")
    assert float(sfa.delta.abs().max()) < 0.35 and 0 < sfa.fooling_rate < 1
    base = evaluate_perturbation(model, sfa.delta, x, y)
    for a, b in itertools.product(range(6), range(5)):
        rolled = circular_shift(sfa.delta, torch.tensor([[a, b]]))[0]
        assert evaluate_perturbation(model, rolled, x, y).fooling_rate == base.fooling_rate
    shifted = evaluate_perturbation(model, sfa.delta, x, y, shifts=3)
    assert shifted.shifted_fooling_rate == shifted.fooling_rate == sfa.fooling_rate


def test_shift_changes_the_fooling_rate_of_a_position_dependent_model():
    """The invariance test above can fail: a zero-padded model with a spatial read-out is not invariant."""
    shape = (1, 6, 6)
    model = tiny_cnn(shape)
    x = torch.rand(60, *shape, dtype=torch.float64)
    sfa = single_fourier_attack(model, x, eps=1.0, search="exhaustive")
    y = model(x).argmax(1)
    rates = {
        evaluate_perturbation(model, circular_shift(sfa.delta, torch.tensor([[a, b]]))[0], x, y).fooling_rate
        for a, b in itertools.product(range(6), range(6))
    }
    assert len(rates) > 1


def test_bad_attack_inputs_give_clear_errors():
    model = tiny_cnn((1, 4, 4))
    x = torch.rand(5, 1, 4, 4, dtype=torch.float64)
    with pytest.raises(ConfigurationError, match=r"eps must be a finite number in \(0, inf\]"):
        single_fourier_attack(model, x, eps=-0.5)
    with pytest.raises(ConfigurationError, match="search must be one of"):
        single_fourier_attack(model, x, eps=1.0, search="greedy")
    with pytest.raises(DataError, match=r"shape \(N, C, H, W\)"):
        single_fourier_attack(model, x.flatten(1), eps=1.0)
    with pytest.raises(DataError, match="NaN"):
        single_fourier_attack(model, x * float("nan"), eps=1.0)
    with pytest.raises(ConfigurationError, match="model failed on an image batch"):
        single_fourier_attack(nn.Linear(16, 3).double(), x, eps=1.0)
    with pytest.raises(ConfigurationError, match=r"phases must be an integer in \[1, "):
        single_fourier_attack(model, x, eps=1.0, phases=0)
