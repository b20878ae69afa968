"""Held-out evaluation of a universal perturbation and the random-noise baseline."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sturdy.errors import ConfigurationError, DataError
from sturdy.fourier import RandomNoiseBaseline, evaluate_perturbation, random_noise_baseline

from .conftest import tiny_cnn


def test_evaluate_perturbation_matches_a_manual_count():
    shape = (3, 4, 4)
    model = tiny_cnn(shape)
    gen = torch.Generator().manual_seed(7)
    x = torch.rand(20, *shape, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (20,), generator=gen)
    delta = 0.4 * torch.randn(shape, generator=gen, dtype=torch.float64)
    report = evaluate_perturbation(model, delta, x, y, batch_size=6)
    clean = model(x).argmax(1)
    perturbed = (x + delta).clamp(0, 1)
    pred = model(perturbed).argmax(1)
    assert report.fooling_rate == float((pred != clean).double().mean())
    assert report.error_rate == float((pred != y).double().mean())
    assert report.clean_error_rate == float((clean != y).double().mean())
    assert math.isclose(report.mean_l2, float((perturbed - x).flatten(1).norm(dim=1).mean()), rel_tol=1e-12)
    assert report.shifted_fooling_rate is None




def test_evaluate_perturbation_errors():
    model = tiny_cnn((1, 4, 4))
    x = torch.rand(5, 1, 4, 4, dtype=torch.float64)
    y = torch.zeros(5, dtype=torch.long)
    with pytest.raises(DataError, match=r"delta must have the image shape \(1, 4, 4\)"):
        evaluate_perturbation(model, torch.zeros(1, 4, 5), x, y)
    with pytest.raises(DataError, match="delta contains NaN"):
        evaluate_perturbation(model, torch.full((1, 4, 4), float("nan")), x, y)
    with pytest.raises(ConfigurationError, match=r"shifts must be an integer in \[0, 16\] \(a 4x4 image has 16"):
        evaluate_perturbation(model, torch.zeros(1, 4, 4), x, y, shifts=-1)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_random_noise_baseline_is_the_mean_over_seeded_gaussian_draws(norm):
    shape = (2, 5, 5)
    model = tiny_cnn(shape)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(30, *shape, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (30,), generator=gen)
    eps = 1.5 if norm == "l2" else 0.3
    base = random_noise_baseline(model, x, y, eps=eps, norm=norm, draws=4, seed=9)
    noise_gen = torch.Generator().manual_seed(9)
    rates = []
    for _ in range(4):
        noise = torch.randn(shape, generator=noise_gen, dtype=torch.float64)
        noise = eps * noise / (noise.norm() if norm == "l2" else noise.abs().max())
        rates.append(evaluate_perturbation(model, noise, x, y).fooling_rate)
    assert base.fooling_rates == tuple(rates)
    assert math.isclose(base.fooling_rate, sum(rates) / 4, rel_tol=1e-12)
    assert base.shifted_fooling_rate is None and (base.draws, base.n_images, base.eps) == (4, 30, eps)
    assert isinstance(base, RandomNoiseBaseline)
    data = json.loads(json.dumps(base.to_dict()))
    assert data["fooling_rates"] == rates and data["norm"] == norm


def test_random_noise_baseline_with_shifts_and_bad_arguments():
    shape = (1, 4, 4)
    model = tiny_cnn(shape)
    x = torch.rand(12, *shape, dtype=torch.float64)
    y = torch.zeros(12, dtype=torch.long)
    base = random_noise_baseline(model, x, y, eps=1.0, draws=2, shifts=2)
    assert base.shifts == 2 and 0.0 <= base.shifted_fooling_rate <= 1.0
    with pytest.raises(ConfigurationError, match=r"eps must be a finite number in \(0, inf\]"):
        random_noise_baseline(model, x, y, eps=0.0)
    with pytest.raises(ConfigurationError, match="norm must be one of"):
        random_noise_baseline(model, x, y, eps=1.0, norm="l1")
    with pytest.raises(ConfigurationError, match="draws must be an integer in \\[1, "):
        random_noise_baseline(model, x, y, eps=1.0, draws=0)
    with pytest.raises(DataError, match=r"shape \(N, C, H, W\)"):
        random_noise_baseline(model, x[:, 0], y, eps=1.0)
