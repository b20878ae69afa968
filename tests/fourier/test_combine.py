"""Fourier combination (beyond the paper): each round equals a brute-force search over pool x weights."""

from __future__ import annotations

import math

import pytest
import torch

from sturdy.errors import ConfigurationError
from sturdy.fourier import (
    enumerate_candidates,
    evaluate_perturbation,
    fourier_combination_attack,
    project_budget,
    single_fourier_attack,
)

from .conftest import tiny_cnn
from .fourier_reference import direct_direction, direct_perturbation

ABS_TOL = 1e-9  # float64 perturbations built by two different code paths
REL_TOL = 1e-12


def brute_force_combination(model, x, *, initial, eps, weights, pool, rounds, scan):
    """Greedy rounds evaluated on every image, atoms from the direct formula, ranked on the scan images."""
    n, channels, height, width = x.shape
    with torch.no_grad():
        clean = model(x).argmax(1)

        def fooled(delta):
            return int((model((x + delta).clamp(0, 1)).argmax(1) != clean).sum())

        def fooled_scan(delta):
            xs = x[scan]
            return int((model((xs + delta).clamp(0, 1)).argmax(1) != clean[scan]).sum())

        cands = enumerate_candidates(channels, height, width)
        atoms = []
        for i in range(len(cands)):
            k, l = cands.frequencies[i].tolist()  # noqa: E741
            u = direct_direction(height, width, k, l, float(cands.phases[i]))
            atoms.append(direct_perturbation(u, cands.signs[i].tolist(), eps=eps, norm="l2", wave="sine"))
        scores = torch.tensor([fooled_scan(a) for a in atoms])
        top = torch.argsort(scores, descending=True, stable=True)[:pool].tolist()
        delta, best = initial.clone(), fooled(initial)
        for _ in range(rounds):
            trials = []
            for a in top:
                for w in weights:
                    mix = delta + w * atoms[a]
                    trials.append((fooled(eps * mix / mix.norm()), eps * mix / mix.norm()))
            count = max(t[0] for t in trials)
            if count <= best:
                break
            best, delta = count, next(t[1] for t in trials if t[0] == count)
    return delta, best / n


def test_rounds_without_halving_equal_brute_force():
    shape = (1, 5, 5)
    model = tiny_cnn(shape)
    x = torch.rand(24, *shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sfa = single_fourier_attack(model, x, eps=0.8, search="exhaustive")
    weights = (0.5, 1.0)
    # initial_images >= N: every round scores every mixture on every image (no halving), patience=1.
    got = fourier_combination_attack(model, x, eps=0.8, initial=sfa, pool=6, weights=weights, rounds=3,
                                     patience=1, scan_images=24, initial_images=24)
    scan = torch.randperm(24, generator=torch.Generator().manual_seed(1))  # the documented scan draw (seed + 1)
    delta, rate = brute_force_combination(model, x, initial=sfa.delta, eps=0.8, weights=weights, pool=6, rounds=3,
                                          scan=scan)
    assert got.fooling_rate == rate and rate > sfa.fooling_rate
    torch.testing.assert_close(got.delta, delta, atol=ABS_TOL, rtol=0)
    assert len(got.steps) >= 1 and math.isclose(float(got.delta.norm()), 0.8, rel_tol=REL_TOL)
    # Queries: initial + clean + scan + one full pass of the initial + every round's pool x weights x N.
    rounds_run = got.rounds
    assert got.queries == sfa.queries + 24 + len(enumerate_candidates(1, 5, 5)) * 24 + 24 + rounds_run * 12 * 24


def test_combination_improves_on_the_trained_cnn(trained_cnn, digits):
    train, test = digits
    x = train.images[:150]
    sfa = single_fourier_attack(trained_cnn, x, eps=2.0)
    combo = fourier_combination_attack(trained_cnn, x, eps=2.0, initial=sfa, rounds=3)
    assert combo.fooling_rate > sfa.fooling_rate
    assert math.isclose(float(combo.delta.norm()), 2.0, rel_tol=1e-5)
    held = evaluate_perturbation(trained_cnn, combo.delta, test.images, test.labels)
    base = evaluate_perturbation(trained_cnn, sfa.delta, test.images, test.labels)
    assert held.fooling_rate > base.fooling_rate - 0.05  # generalises (measured: clearly higher)
    assert combo.to_dict()["steps"][0][0] in range(8)


def test_linf_projection_clips():
    d = torch.tensor([[[[0.3, -0.05], [-0.2, 0.1]]]])
    torch.testing.assert_close(project_budget(d, eps=0.1, norm="linf"), d.clamp(-0.1, 0.1))
    torch.testing.assert_close(project_budget(d, eps=1.0, norm="l2").flatten().norm(), torch.tensor(1.0))
    model = tiny_cnn((1, 4, 4))
    x = torch.rand(10, 1, 4, 4, dtype=torch.float64)
    combo = fourier_combination_attack(model, x, eps=0.2, norm="linf", wave="square", rounds=2)
    assert float(combo.delta.abs().max()) <= 0.2 + 1e-12


def test_bad_combination_arguments():
    model = tiny_cnn((1, 4, 4))
    x = torch.rand(6, 1, 4, 4, dtype=torch.float64)
    with pytest.raises(ConfigurationError, match="weights must be a non-empty sequence of numbers > 0"):
        fourier_combination_attack(model, x, eps=1.0, weights=(0.5, -1.0))
    with pytest.raises(ConfigurationError, match="pool must be an int >= 1"):
        fourier_combination_attack(model, x, eps=1.0, pool=0)
    other = single_fourier_attack(model, x, eps=0.5)
    with pytest.raises(ConfigurationError, match="initial must be a single_fourier_attack result"):
        fourier_combination_attack(model, x, eps=1.0, initial=other)
