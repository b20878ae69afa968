"""Perturbations: budgets (L2, L-inf sine and square), channel signs, clipping with applied budget."""

from __future__ import annotations

import math

import pytest
import torch

from sturdy.errors import ConfigurationError
from sturdy.fourier import (
    apply_perturbation,
    circular_shift,
    fourier_basis,
    fourier_perturbation,
    random_shifts,
    shape_directions,
    sign_patterns,
)

REL_TOL = 1e-12  # float64 norms
ABS_TOL = 1e-12


def test_l2_budget_with_channel_signs():
    signs = (1, -1, 1)
    d = fourier_perturbation((3, 7, 6), 2, 1, eps=1.5, signs=signs, dtype=torch.float64)
    assert math.isclose(float(d.norm()), 1.5, rel_tol=REL_TOL)
    u = fourier_basis(7, 6, 2, 1, dtype=torch.float64)
    for c, s in enumerate(signs):
        torch.testing.assert_close(d[c], s * 1.5 * u / math.sqrt(3), atol=ABS_TOL, rtol=0)


def test_linf_sine_has_amplitude_eps():
    d = fourier_perturbation((2, 8, 8), 1, 3, eps=0.1, norm="linf", phase=0.3, dtype=torch.float64)
    assert math.isclose(float(d.abs().max()), 0.1, rel_tol=REL_TOL)
    u = fourier_basis(8, 8, 1, 3, phase=0.3, dtype=torch.float64)
    torch.testing.assert_close(d[0], 0.1 * u / u.abs().max(), atol=ABS_TOL, rtol=0)


def test_square_wave_is_eps_times_sign():
    d = fourier_perturbation((1, 8, 8), 1, 1, eps=0.05, norm="linf", wave="square", dtype=torch.float64)
    u = fourier_basis(8, 8, 1, 1, dtype=torch.float64)
    # cos(theta - pi/4) vanishes (up to round-off) where p + q = 3 or 7 mod 8: those pixels stay 0.
    expected = torch.where(u.abs() < 1e-6 * u.abs().max(), 0.0, 0.05 * torch.sign(u))
    assert int((expected == 0).sum()) == 16
    torch.testing.assert_close(d[0], expected, atol=ABS_TOL, rtol=0)
    d2 = fourier_perturbation((1, 8, 8), 1, 1, eps=2.0, norm="l2", wave="square", dtype=torch.float64)
    assert math.isclose(float(d2.norm()), 2.0, rel_tol=REL_TOL)


def test_square_wave_zero_pixels_stay_zero():
    """cos(theta + pi/2) has exact zeros (up to round-off) where theta = 0 or pi: they are not perturbed."""
    d = fourier_perturbation((1, 4, 4), 0, 1, eps=1.0, norm="linf", wave="square", phase=math.pi / 2)
    assert set(d.flatten().tolist()) == {-1.0, 0.0, 1.0}
    assert int((d == 0).sum()) == 8


def test_shape_directions_batches():
    u = torch.stack([fourier_basis(5, 5, k, 1, dtype=torch.float64) for k in range(3)])
    signs = sign_patterns(2)[:3]
    out = shape_directions(u, signs, eps=0.7)
    assert out.shape == (3, 2, 5, 5)
    for i in range(3):
        ref = fourier_perturbation((2, 5, 5), i, 1, eps=0.7, signs=signs[i].tolist(), dtype=torch.float64)
        torch.testing.assert_close(out[i], ref, atol=ABS_TOL, rtol=0)


def test_sign_patterns_are_all_distinct():
    full = sign_patterns(3)
    assert full.shape == (8, 3) and len({tuple(r) for r in full.tolist()}) == 8
    half = sign_patterns(3, fix_first=True)
    assert half.shape == (4, 3) and bool((half[:, 0] == 1).all())
    both = {tuple(r) for r in half.tolist()} | {tuple(r) for r in (-half).tolist()}
    assert both == {tuple(r) for r in full.tolist()}


def test_clipping_reports_the_applied_budget():
    x = torch.tensor([[[[0.0, 0.5], [1.0, 0.9]]]], dtype=torch.float64)
    delta = torch.tensor([[[-0.2, 0.3], [0.1, 0.2]]], dtype=torch.float64)
    out = apply_perturbation(x, delta)
    expected = torch.tensor([[[[0.0, 0.8], [1.0, 1.0]]]], dtype=torch.float64)
    torch.testing.assert_close(out.images, expected)
    torch.testing.assert_close(out.l2, torch.tensor([math.sqrt(0.3**2 + 0.1**2)], dtype=torch.float64))
    torch.testing.assert_close(out.linf, torch.tensor([0.3], dtype=torch.float64))
    free = apply_perturbation(x, delta, bounds=None)
    torch.testing.assert_close(free.l2, delta.flatten().norm().reshape(1))


def test_circular_shift_equals_roll():
    delta = torch.randn(2, 5, 7)
    shifts = random_shifts(6, 5, 7, generator=torch.Generator().manual_seed(3))
    out = circular_shift(delta, shifts)
    for i, (a, b) in enumerate(shifts.tolist()):
        assert torch.equal(out[i], torch.roll(delta, (a, b), dims=(1, 2)))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(eps=0.0), ConfigurationError, r"eps must be a finite number in \(0, inf\]"),
        (dict(eps=-1.0), ConfigurationError, r"eps must be a finite number in \(0, inf\]"),
        (dict(eps=float("nan")), ConfigurationError, r"eps must be a finite number in \(0, inf\]"),
        (dict(eps=1.0, norm="l1"), ConfigurationError, "norm must be one of"),
        (dict(eps=1.0, wave="triangle"), ConfigurationError, "wave must be one of"),
        (dict(eps=1.0, signs=(1, 0)), ConfigurationError, r"signs must be 2 values in \{-1, \+1\}"),
    ],
)
def test_bad_perturbation_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        fourier_perturbation((2, 4, 4), 1, 1, **kwargs)


def test_bad_bounds_and_shapes():
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ConfigurationError, match="lo < hi"):
        apply_perturbation(x, torch.zeros(1, 2, 2), bounds=(1.0, 0.0))
    with pytest.raises(ConfigurationError, match=r"shape must be \(C, H, W\)"):
        fourier_perturbation((4, 4), 1, 1, eps=1.0)
    with pytest.raises(ConfigurationError, match=r"delta must have shape \(C, H, W\)"):
        circular_shift(torch.zeros(4, 4), torch.zeros(1, 2))
