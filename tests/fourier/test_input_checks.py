"""Every public Fourier entry point refuses bad labels, budgets and phases before any work."""

from __future__ import annotations

import math

import pytest
import torch

from sturdy.errors import ConfigurationError, DataError
from sturdy.fourier import (
    evaluate_perturbation,
    fourier_basis,
    fourier_combination_attack,
    fourier_heatmap,
    fourier_perturbation,
    gradient_spectrum,
    plot_examples,
    random_noise_baseline,
    single_fourier_attack,
)
from sturdy.fourier.perturbation import largest_eps

from .conftest import tiny_cnn

SHAPE = (2, 6, 6)
X = torch.rand(8, *SHAPE, dtype=torch.float64)
Y = torch.arange(8) % 4
L2_MAX = math.sqrt(2 * 6 * 6)  # sqrt(C*H*W) * (1 - 0)


def _model():
    return tiny_cnn(SHAPE)


def test_largest_eps_is_the_farthest_two_images_can_be():
    assert largest_eps("l2", (0.0, 1.0), SHAPE) == pytest.approx(L2_MAX)
    assert largest_eps("linf", (-1.0, 1.0), SHAPE) == 2.0
    assert largest_eps("l2", (0.0, 2.0), (1, 2, 2)) == pytest.approx(4.0)


@pytest.mark.parametrize("call", [
    lambda eps, norm: fourier_heatmap(_model(), X, Y, eps=eps, norm=norm, frequencies=[(0, 1)]),
    lambda eps, norm: single_fourier_attack(_model(), X, eps=eps, norm=norm, max_queries=50),
    lambda eps, norm: random_noise_baseline(_model(), X, Y, eps=eps, norm=norm, draws=1),
    lambda eps, norm: fourier_combination_attack(_model(), X, eps=eps, norm=norm, rounds=0),
], ids=["heatmap", "attack", "noise-baseline", "combination"])
@pytest.mark.parametrize("norm, limit", [("l2", L2_MAX), ("linf", 1.0)])
def test_eps_beyond_the_pixel_range_is_refused_with_the_largest_meaningful_value(call, norm, limit):
    for eps in (1e308, limit * 1.01):
        with pytest.raises(ConfigurationError, match=f"largest meaningful {norm} budget {limit:.6g}") as info:
            call(eps, norm)
        assert "\n" not in str(info.value) and len(str(info.value)) < 300


def test_eps_at_the_largest_meaningful_value_runs_and_stays_finite():
    hm = fourier_heatmap(_model(), X, Y, eps=L2_MAX, frequencies=[(0, 1), (1, 1)])
    assert bool(torch.isfinite(hm.applied[hm.measured]).all())
    assert float(hm.applied[hm.measured].max()) <= L2_MAX
    sfa = single_fourier_attack(_model(), X, eps=1.0, norm="linf", max_queries=200)
    assert bool(torch.isfinite(sfa.delta).all())


def test_without_bounds_eps_is_capped_before_float32_overflows():
    with pytest.raises(ConfigurationError, match="overflow"):
        fourier_heatmap(_model(), X, Y, eps=1e300, bounds=None, frequencies=[(0, 1)])
    with pytest.raises(ConfigurationError, match="overflow"):
        fourier_perturbation((1, 4, 4), 1, 1, eps=1e300)


@pytest.mark.parametrize("phase", [float("nan"), float("inf"), -float("inf"), "x", True])
def test_non_finite_phases_are_refused(phase):
    with pytest.raises(ConfigurationError, match="phase must be a finite number"):
        fourier_heatmap(_model(), X, Y, eps=1.0, phase=phase, frequencies=[(0, 1)])
    with pytest.raises(ConfigurationError, match="phase must be a finite number"):
        fourier_basis(4, 4, 1, 1, phase=phase)
    with pytest.raises(ConfigurationError, match="phase must be a finite number"):
        fourier_perturbation((1, 4, 4), 1, 1, eps=1.0, phase=phase)


def test_random_phase_stays_allowed():
    assert fourier_heatmap(_model(), X, Y, eps=1.0, phase=None, frequencies=[(0, 1)]).phase is None


BAD_LABELS = [
    ("out-of-range", torch.full((8,), 4), DataError, r"must lie in \[0, 3\] for 4 classes"),
    ("negative", torch.full((8,), -1), DataError, r"must lie in \[0, 3\]"),
    ("float", Y.float(), DataError, "integer class indices"),
    ("bool", Y > 1, DataError, "integer class indices"),
    ("length", Y[:3], DataError, "one label per sample"),
    ("one-hot", torch.nn.functional.one_hot(Y, 4), DataError, r"shape \(N,\)"),
]
ENTRY_POINTS = {
    "heatmap": lambda y: fourier_heatmap(_model(), X, y, eps=1.0, frequencies=[(0, 1)]),
    "gradient": lambda y: gradient_spectrum(_model(), X, y),
    "evaluate": lambda y: evaluate_perturbation(_model(), torch.zeros(SHAPE, dtype=torch.float64), X, y),
    "noise-baseline": lambda y: random_noise_baseline(_model(), X, y, eps=1.0, draws=1),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("case, y, error, match", BAD_LABELS, ids=[c[0] for c in BAD_LABELS])
def test_every_entry_point_checks_the_labels(entry, case, y, error, match):
    with pytest.raises(error, match=match) as info:
        ENTRY_POINTS[entry](y)
    assert "\n" not in str(info.value)


def test_labels_out_of_range_are_refused_before_the_map_is_measured(monkeypatch):
    from sturdy.fourier import heatmap_measure

    calls = []
    monkeypatch.setattr(heatmap_measure, "measure_rows", lambda *a, **k: calls.append(1))
    with pytest.raises(DataError, match="for 4 classes"):
        fourier_heatmap(_model(), X, torch.full((8,), 7), eps=1.0)
    assert calls == []


@pytest.mark.parametrize("entry", ["heatmap", "attack", "gradient", "evaluate", "combination", "examples"])
@pytest.mark.parametrize("images, match", [
    (X.float() * 255, "outside the valid pixel range"),
    ((X * 255).to(torch.uint8), "floating-point pixels"),
    (X[:0], "no images"),
], ids=["range", "uint8", "empty"])
def test_every_entry_point_checks_the_images(entry, images, match):
    delta = torch.zeros(SHAPE, dtype=torch.float64)
    calls = {
        "heatmap": lambda: fourier_heatmap(_model(), images, Y[: len(images)], eps=1.0),
        "attack": lambda: single_fourier_attack(_model(), images, eps=1.0),
        "gradient": lambda: gradient_spectrum(_model(), images, Y[: len(images)]),
        "evaluate": lambda: evaluate_perturbation(_model(), delta, images, Y[: len(images)]),
        "combination": lambda: fourier_combination_attack(_model(), images, eps=1.0),
        "examples": lambda: plot_examples(_model(), delta, images),
    }
    with pytest.raises(DataError, match=match):
        calls[entry]()


@pytest.mark.parametrize("scale, match", [(1e308, "beyond the largest meaningful"), (1e6, "beyond the largest")])
def test_evaluate_perturbation_refuses_a_delta_beyond_the_pixel_range(scale, match):
    delta = torch.ones(SHAPE, dtype=torch.float64) * scale
    with pytest.raises(DataError, match=match):
        evaluate_perturbation(_model(), delta, X, Y)


def test_evaluate_perturbation_refuses_a_delta_that_overflows_the_model_dtype():
    model = tiny_cnn(SHAPE, dtype=torch.float32)
    delta = torch.zeros(SHAPE, dtype=torch.float64)
    delta[0, 0, 0] = 1e39  # finite in float64, inf in float32; no pixel bounds
    with pytest.raises(DataError, match="range of torch.float32"):
        evaluate_perturbation(model, delta, X.float(), Y, bounds=None)


def test_a_delta_of_the_largest_meaningful_norm_is_accepted():
    delta = torch.ones(SHAPE, dtype=torch.float64)  # L2 norm sqrt(C*H*W): every pixel moved by hi - lo
    report = evaluate_perturbation(_model(), delta, X, Y)
    assert math.isfinite(report.mean_l2) and report.mean_l2 <= L2_MAX
