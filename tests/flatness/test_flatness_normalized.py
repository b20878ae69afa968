"""Normalized sharpness: solver vs brute force, closed forms, zero/negative curvature, invariance."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sturdy.errors import ConfigurationError
from sturdy.flatness import (
    hessian_diagonal,
    log_spectral_product,
    normalized_sharpness,
    rescale_nodes,
    solve_layer,
)
from sturdy.flatness.normalized import aggregate_layer

from .conftest import tiny_cnn, tiny_data
from .flatness_reference import brute_force_layer

SOLVER_RTOL = 1e-9  # alternating closed forms / Newton vs LBFGS in log space, float64
INVARIANCE_RTOL = 1e-6  # the bound for rescaled networks, float64
OUTPUT_ATOL = 1e-12  # rescaled network outputs, float64
LARGE_FACTOR = 1.5  # "changes by a large factor": ratio outside [1/1.5, 1.5]


def _random_layer(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    h = torch.rand(shape, generator=gen, dtype=torch.float64) ** 3
    s = torch.rand(shape, generator=gen, dtype=torch.float64) ** 2
    return h, s


@pytest.mark.parametrize("variant", ["arxiv", "icml"])
@pytest.mark.parametrize("shape,seed", [((3, 4), 0), ((9, 6), 1), ((20, 13), 2)])
def test_solver_matches_brute_force(variant, shape, seed):
    h, s = _random_layer(shape, seed)
    result = solve_layer(h, s, variant=variant)
    assert result.converged
    assert result.value == pytest.approx(brute_force_layer(h, s, variant), rel=SOLVER_RTOL)
    assert result.grad_norm < 1e-4
    assert result.shape == shape and result.clamped_entries == 0


def test_one_by_one_closed_forms():
    h, s = torch.tensor([[0.3]], dtype=torch.float64), torch.tensor([[2.7]], dtype=torch.float64)
    assert solve_layer(h, s).value == pytest.approx(2 * math.sqrt(0.3 * 2.7), rel=1e-12)
    assert solve_layer(h, s, variant="icml").value == pytest.approx(math.sqrt(0.3 * 2.7), rel=1e-12)


@pytest.mark.parametrize("variant", ["arxiv", "icml"])
def test_zero_rows_and_columns_removed_analytically(variant):
    h, s = _random_layer((6, 5), 3)
    h_dead = h.clone()
    h_dead[2] = 0.0  # a dead output unit (no curvature)
    h_dead[:, 4] = 0.0  # an input that never moves the loss
    result = solve_layer(h_dead, s, variant=variant)
    keep_r = [0, 1, 3, 4, 5] if variant == "arxiv" else list(range(6))
    sub = solve_layer(h_dead[keep_r][:, :4], s[keep_r][:, :4], variant=variant)
    assert result.value == pytest.approx(sub.value, rel=SOLVER_RTOL)
    assert result.removed_cols >= 1
    if variant == "arxiv":
        assert result.removed_rows == 1
    # brute force drives the removed scales to 0/infinity and approaches the same infimum from above
    brute = brute_force_layer(h_dead, s, variant)
    assert brute >= result.value * (1 - 1e-9) and brute == pytest.approx(result.value, rel=1e-4)


@pytest.mark.parametrize("variant", ["arxiv", "icml"])
def test_negative_curvature_is_clamped_and_counted(variant):
    h, s = _random_layer((5, 4), 4)
    signed = h.clone()
    signed[0, 0], signed[3, 2], signed[4, 1] = -0.5, -1e-3, -2.0
    clamped = signed.clamp_min(0.0)
    result = solve_layer(signed, s, variant=variant)
    assert result.clamped_entries == 3
    assert result.value == pytest.approx(solve_layer(clamped, s, variant=variant).value, rel=1e-14)


def test_all_zero_curvature_gives_zero():
    result = solve_layer(torch.zeros(3, 2), torch.ones(3, 2))
    assert result.value == 0.0 and result.removed_rows == 3 and result.removed_cols == 2


def test_conv_aggregation_over_kernel_positions():
    w = torch.arange(24, dtype=torch.float64).reshape(2, 3, 2, 2)
    h = torch.ones_like(w) * 0.5
    hh, ss = aggregate_layer(w, h)
    torch.testing.assert_close(hh, torch.full((2, 3), 2.0, dtype=torch.float64))
    torch.testing.assert_close(ss, (w**2).sum((2, 3)))


def _mlp(seed):
    torch.manual_seed(seed)
    layers = [nn.Flatten(), nn.Linear(8, 10), nn.ReLU(), nn.Linear(10, 7), nn.ReLU(), nn.Linear(7, 3)]
    return nn.Sequential(*layers).double()


@pytest.mark.parametrize("make,shape", [(_mlp, (2, 2, 2)), (tiny_cnn, (2, 4, 4))], ids=["mlp", "cnn"])
def test_rescaling_invariance(make, shape):
    model = make(5)
    x, y = tiny_data(shape, n=20)
    scaled = rescale_nodes(model, seed=11, low=0.05, high=20.0)
    torch.testing.assert_close(scaled(x), model(x), atol=OUTPUT_ATOL, rtol=0)
    for variant in ("arxiv", "icml"):
        a = normalized_sharpness(model, (x, y), variant=variant)
        b = normalized_sharpness(scaled, (x, y), variant=variant)
        assert a.value > 0
        assert b.value == pytest.approx(a.value, rel=INVARIANCE_RTOL), variant
    trace_ratio = hessian_diagonal(scaled, (x, y)).trace() / hessian_diagonal(model, (x, y)).trace()
    spec_diff = log_spectral_product(scaled).value - log_spectral_product(model).value
    assert not (1 / LARGE_FACTOR < trace_ratio < LARGE_FACTOR), trace_ratio
    assert abs(spec_diff) > math.log(LARGE_FACTOR), spec_diff


def test_given_hessian_mapping_and_layer_subset():
    model = tiny_cnn(6)
    x, y = tiny_data((2, 4, 4), n=6)
    hd = hessian_diagonal(model, (x, y))
    full = normalized_sharpness(model, (x, y))
    given = normalized_sharpness(model, hessian=dict(hd.diagonal))
    assert given.value == pytest.approx(full.value, rel=1e-12) and given.hessian_method == "given"
    assert set(full.per_layer) == {"0", "3", "7"}
    part = normalized_sharpness(model, hessian=hd, layers=["7"])
    assert part.value == pytest.approx(full.per_layer["7"].value, rel=1e-12)


def test_validation_messages():
    model = tiny_cnn(0)
    with pytest.raises(ConfigurationError, match="variant must be one of arxiv, icml"):
        solve_layer(torch.ones(2, 2), torch.ones(2, 2), variant="jiang")
    with pytest.raises(ConfigurationError, match="2-D matrices of one shape"):
        solve_layer(torch.ones(2, 2), torch.ones(2, 3))
    with pytest.raises(ConfigurationError, match="must be >= 0"):
        solve_layer(torch.ones(2, 2), -torch.ones(2, 2))
    with pytest.raises(ConfigurationError, match="finite"):
        solve_layer(torch.full((2, 2), float("nan")), torch.ones(2, 2))
    with pytest.raises(ConfigurationError, match="pass the training data"):
        normalized_sharpness(model)
    with pytest.raises(ConfigurationError, match="no covered layer named 'fc'"):
        normalized_sharpness(model, hessian={}, layers=["fc"])
    with pytest.raises(ConfigurationError, match="lacks parameter"):
        normalized_sharpness(model, hessian={})
    with pytest.raises(ConfigurationError, match="at least one Linear, Conv1d/2d/3d or Embedding layer"):
        normalized_sharpness(nn.Sequential(nn.ReLU()), hessian={})


def test_invariance_on_a_trained_digits_mlp_with_dead_units():
    """Trained ReLU nets have many dead units; their analytic removal keeps the invariance at 1e-6."""
    from sturdy.data import load_dataset

    data = load_dataset("digits", split="train").subset(torch.arange(400))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(40):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(data.images), data.labels).backward()
        opt.step()
    model = model.double().eval()
    x, y = data.images.double(), data.labels
    scaled = rescale_nodes(model, seed=2, low=0.05, high=20.0)
    for variant in ("arxiv", "icml"):
        a = normalized_sharpness(model, (x, y), variant=variant)
        b = normalized_sharpness(scaled, (x, y), variant=variant)
        assert b.value == pytest.approx(a.value, rel=INVARIANCE_RTOL), variant
        assert a.grad_norm < 1e-4
    removed = sum(r.removed_rows + r.removed_cols for r in normalized_sharpness(model, (x, y)).per_layer.values())
    assert removed > 0  # the case exercises dead units
