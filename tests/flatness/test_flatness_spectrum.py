"""Lanczos top-k eigenvalues and stochastic Lanczos quadrature against eigvalsh of the dense matrices."""

from __future__ import annotations

import pytest
import torch

from sturdy.errors import ConfigurationError
from sturdy.flatness import hessian_eigenvalues, spectral_density
from sturdy.flatness.operator import rademacher_matrix

from .conftest import tiny_data, tiny_mlp
from .flatness_reference import full_ggn, full_hessian, tanh_net

EIG_TOL = 1e-8  # Ritz values of a full Krylov space against eigvalsh (float64 rounding)
QUADRATURE_TOL = 1e-8  # Gauss quadrature is exact for polynomials of degree < 2 m (relative)
DENSITY_MASS_TOL = 1e-3  # the smoothed density integrates to 1 on its grid
MOMENT_Z = 4.0  # SLQ moments over probes within 4 standard errors of tr(A^j) / P


@pytest.fixture(scope="module")
def small():
    model = tanh_net()
    x, y = tiny_data((3,), n=10)
    return model, (x, y)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_full_lanczos_gives_the_top_eigenvalues(small, curvature):
    model, (x, y) = small
    dense = full_hessian(model, x, y) if curvature == "hessian" else full_ggn(model, x, y)
    exact = torch.linalg.eigvalsh(dense).flip(0)
    est = hessian_eigenvalues(model, (x, y), k=4, iterations=dense.shape[0], tol=1e-10, curvature=curvature)
    torch.testing.assert_close(torch.tensor(est.values, dtype=torch.float64), exact[:4], rtol=EIG_TOL, atol=EIG_TOL)
    assert est.converged and est.curvature == curvature and est.to_dict()["values"] == list(est.values)


def test_partial_lanczos_is_within_its_residuals_of_the_spectrum():
    model = tiny_mlp()
    x, y = tiny_data((1, 3, 4), n=12)
    exact = torch.linalg.eigvalsh(full_hessian(model, x, y))
    est = hessian_eigenvalues(model, (x, y), k=3, iterations=40, tol=1e-6)
    assert est.iterations <= 40
    for value, residual in zip(est.values, est.residuals):
        # a Ritz value lies within its residual norm of some eigenvalue (symmetric matrices)
        assert float((exact - value).abs().min()) <= residual + EIG_TOL
    if est.converged:
        torch.testing.assert_close(torch.tensor(est.values, dtype=torch.float64), exact.flip(0)[:3],
                                   rtol=1e-4, atol=1e-6)


def test_quadrature_is_exact_for_low_degree_polynomials(small):
    model, (x, y) = small
    dense = full_hessian(model, x, y)
    m, probes = 5, 3
    sd = spectral_density(model, (x, y), iterations=m, probes=probes, seed=4)
    start = rademacher_matrix(dense.shape[0], probes, seed=4)
    for col, (nodes, weights) in enumerate(zip(sd.nodes, sd.weights)):
        v = start[:, col] / start[:, col].norm()
        for power in range(2 * m):
            exact = float(v @ torch.linalg.matrix_power(dense, power) @ v)
            quad = sum(w * t**power for t, w in zip(nodes, weights))
            assert abs(quad - exact) <= QUADRATURE_TOL * max(1.0, abs(exact)), (col, power)
    assert sd.matvecs == m * probes and sd.size == dense.shape[0]


def test_full_quadrature_places_nodes_on_the_eigenvalues_and_the_density_has_unit_mass(small):
    model, (x, y) = small
    dense = full_ggn(model, x, y)
    exact = torch.linalg.eigvalsh(dense)
    sd = spectral_density(model, (x, y), iterations=dense.shape[0], probes=2, curvature="ggn")
    for nodes, weights in zip(sd.nodes, sd.weights):
        assert sum(weights) == pytest.approx(1.0, abs=1e-12)
        for t, w in zip(nodes, weights):
            if w > 1e-8:  # a node the probe sees is an eigenvalue
                assert float((exact - t).abs().min()) <= 1e-7 * max(1.0, float(exact.abs().max()))
    grid = torch.tensor(sd.grid)
    mass = float(torch.trapezoid(torch.tensor(sd.density), grid))
    assert abs(mass - 1.0) <= DENSITY_MASS_TOL and len(sd.to_dict()["grid"]) == 256


def test_moments_estimate_normalised_traces_of_powers(small):
    model, (x, y) = small
    dense = full_hessian(model, x, y)
    p = dense.shape[0]
    sd = spectral_density(model, (x, y), iterations=4, probes=64, seed=1)
    per_probe = [[sum(w * t**j for t, w in zip(n, ws)) for n, ws in zip(sd.nodes, sd.weights)] for j in (1, 2)]
    for j, values in zip((1, 2), per_probe):
        vals = torch.tensor(values, dtype=torch.float64)
        target = float(torch.linalg.matrix_power(dense, j).trace()) / p
        assert sd.moment(j) == pytest.approx(float(vals.mean()))
        assert abs(float(vals.mean()) - target) <= MOMENT_Z * float(vals.std()) / len(values) ** 0.5


@pytest.mark.parametrize("fn, kwargs, message", [
    (hessian_eigenvalues, {"k": 0}, "k must be an integer in \\[1, 31\\]"),
    (hessian_eigenvalues, {"k": 3, "iterations": 2}, "iterations must be an integer in \\[3, "),
    (hessian_eigenvalues, {"tol": 0.0}, "tol must be a finite number in \\(0, inf\\]"),
    (spectral_density, {"iterations": 40}, "iterations must be an integer in \\[1, 31\\]"),
    (spectral_density, {"sigma": -1.0}, "sigma must be a finite number in \\(0, inf\\]"),
    (spectral_density, {"curvature": "fisher"}, "curvature must be one of hessian, ggn"),
])
def test_settings_are_validated(small, fn, kwargs, message):
    model, data = small
    with pytest.raises(ConfigurationError, match=message):
        fn(model, data, **kwargs)
