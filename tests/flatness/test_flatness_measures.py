"""Baseline measures against hand-checkable cases (quadratic losses with known Hessians), and the registry."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sturdy.errors import ConfigurationError
from sturdy.flatness import (
    MeasureSet,
    adaptive_average_sharpness,
    available_measures,
    compute_measures,
    log_frobenius_product,
    log_spectral_product,
    pacbayes_flatness,
)

from .conftest import tiny_cnn, tiny_data

NORM_RTOL = 1e-12
MC_RTOL = 0.05  # Monte-Carlo expectations over d = 1000 coordinates: relative sd about 1%
BISECTION_STEPS = 40  # bisection precision far below the Monte-Carlo tolerance

DIM = 1000


def _quadratic(weights: torch.Tensor):
    """Linear least squares whose mean loss has Hessian exactly I: L(w + u) - L(w) = g.u + |u|^2 / 2."""
    model = nn.Linear(DIM, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(weights.reshape(1, DIM))
    x = math.sqrt(DIM / 2) * torch.eye(DIM, dtype=torch.float64)  # N = DIM samples, 2 X^T X / N = I
    y = torch.zeros(DIM, 1, dtype=torch.float64)

    def mse(out, target):
        return F.mse_loss(out, target)

    return model, (x, y), mse


def test_norm_products_hand_checked():
    net = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(2, 1, bias=False)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([3.0, 4.0], dtype=torch.float64).reshape(2, 1, 1, 1))  # ||.||_2 = 5
        net[3].weight.copy_(torch.tensor([[1.0, 2.0]], dtype=torch.float64))  # ||.||_2 = sqrt(5)
    spec = log_spectral_product(net)
    fro = log_frobenius_product(net)
    assert spec.value == pytest.approx(math.log(25.0) + math.log(5.0), rel=NORM_RTOL)
    assert fro.value == pytest.approx(math.log(25.0) + math.log(5.0), rel=NORM_RTOL)  # rank one: equal norms
    diag = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 2, bias=False)).double()
    with torch.no_grad():
        diag[0].weight.copy_(torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64)))
        diag[2].weight.copy_(torch.diag(torch.tensor([2.0, 2.0], dtype=torch.float64)))
    assert log_spectral_product(diag).value == pytest.approx(2 * math.log(3.0) + 2 * math.log(2.0), rel=NORM_RTOL)
    assert log_frobenius_product(diag).value == pytest.approx(math.log(10.0) + math.log(8.0), rel=NORM_RTOL)


def test_pacbayes_flatness_on_quadratic():
    """E[L(w + sigma z)] - L(w) = sigma^2 d / 2, so sigma* = sqrt(2 target / d) and the measure is d / (2 target)."""
    model, data, mse = _quadratic(torch.ones(DIM, dtype=torch.float64))
    m = pacbayes_flatness(model, data, target=0.5, criterion="loss", loss_fn=mse, samples=4, steps=BISECTION_STEPS)
    assert m.value == pytest.approx(DIM / (2 * 0.5), rel=MC_RTOL)
    assert m.details["saturated"] == "" and m.details["increase"] <= 0.5


def test_magnitude_aware_pacbayes_on_quadratic():
    """Noise variance alpha^2 w_i^2 + noise_floor^2: increase = (alpha^2 |w|^2 + noise_floor^2 d) / 2."""
    w = torch.full((DIM,), 2.0, dtype=torch.float64)
    w[::2] = -0.5
    model, data, mse = _quadratic(w)
    target, noise_floor = 0.5, 0.01
    m = pacbayes_flatness(model, data, magnitude_aware=True, target=target, noise_floor=noise_floor,
                          criterion="loss", loss_fn=mse, samples=4, steps=BISECTION_STEPS)
    alpha_sq = (2 * target - noise_floor**2 * DIM) / float((w * w).sum())
    assert m.value == pytest.approx(1 / alpha_sq, rel=MC_RTOL)


def test_pacbayes_saturation_flags():
    model, data, mse = _quadratic(torch.ones(DIM, dtype=torch.float64))
    sigma_range = (1e-3, 1.0)
    high = pacbayes_flatness(model, data, target=1e9, criterion="loss", loss_fn=mse, samples=1,
                             sigma_range=sigma_range)
    assert high.details["saturated"] == "high" and high.value == pytest.approx(1.0)
    low = pacbayes_flatness(model, data, target=1e-12, criterion="loss", loss_fn=mse, samples=1,
                            sigma_range=sigma_range)
    assert low.details["saturated"] == "low" and low.value == pytest.approx(1e6)


def test_adaptive_average_sharpness_on_quadratic():
    """E[L(w + rho |w| z)] - L(w) = rho^2 |w|^2 / 2."""
    w = torch.linspace(-2.0, 3.0, DIM, dtype=torch.float64)
    model, data, mse = _quadratic(w)
    m = adaptive_average_sharpness(model, data, rho=0.1, samples=8, loss_fn=mse)
    expected = 0.5 * 0.01 * float((w * w).sum())
    assert m.value == pytest.approx(expected, rel=MC_RTOL)
    assert abs(m.value - expected) <= 5 * m.details["stderr"]


def test_error_criterion_on_a_classifier():
    model = tiny_cnn(0)
    x, y = tiny_data((2, 4, 4), n=30)
    with torch.no_grad():
        y = model(x).argmax(1)  # zero training error
    m = pacbayes_flatness(model, (x, y), samples=2, steps=12)
    sigma = m.details["sigma"]
    assert m.details["base"] == 0.0 and m.details["increase"] <= 0.1
    assert m.value == pytest.approx(1 / sigma**2)


def test_registry_and_compute_measures():
    names = available_measures()
    for required in ("normalized_sharpness", "normalized_sharpness_icml", "hessian_trace", "hessian_top_eigenvalue",
                     "log_spectral_product", "log_frobenius_product", "pacbayes_flatness", "pacbayes_mag_flatness",
                     "adaptive_average_sharpness", "ggn_trace"):
        assert required in names
    model = tiny_cnn(1)
    x, y = tiny_data((2, 4, 4), n=12)
    out = compute_measures(model, (x, y), names=["ggn_trace", "hessian_trace", "normalized_sharpness"])
    assert list(out) == ["ggn_trace", "hessian_trace", "normalized_sharpness"]
    # exact trace vs 100-probe Hutchinson on a ReLU net: within 4 standard errors
    assert abs(out["ggn_trace"].value - out["hessian_trace"].value) <= 4 * out["hessian_trace"].details["stderr"]
    assert isinstance(out, MeasureSet) and len(out) == 3
    js = out.to_dict()
    assert list(js) == list(out)
    assert js["normalized_sharpness"]["value"] == out["normalized_sharpness"].value
    assert js["ggn_trace"]["details"] == out["ggn_trace"].details
    one = out["hessian_trace"].to_dict()
    assert one["name"] == "hessian_trace" and one["value"] == out["hessian_trace"].value
    json.dumps(js)
    with pytest.raises(ConfigurationError, match="unknown measure 'sharpness'; known measures: normalized_sharpness"):
        compute_measures(model, (x, y), names=["sharpness"])


def test_validation_messages():
    model, data, mse = _quadratic(torch.ones(DIM, dtype=torch.float64))
    with pytest.raises(ConfigurationError, match="criterion must be 'loss' or 'error'"):
        pacbayes_flatness(model, data, criterion="accuracy")
    with pytest.raises(ConfigurationError, match=r"target must be a finite number in \(0, inf\]"):
        pacbayes_flatness(model, data, target=0.0)
    with pytest.raises(ConfigurationError, match="sigma_range must satisfy"):
        pacbayes_flatness(model, data, sigma_range=(1.0, 0.5))
    with pytest.raises(ConfigurationError, match=r"rho must be a finite number in \(0, inf\]"):
        adaptive_average_sharpness(model, data, rho=-1.0)
    with pytest.raises(ConfigurationError, match="samples must be an integer >= 1"):
        adaptive_average_sharpness(model, data, samples=0)
    with pytest.raises(ConfigurationError, match="at least one nn.Linear or nn.Conv2d"):
        log_spectral_product(nn.Sequential(nn.ReLU()))


def test_settings_are_forwarded_and_checked():
    model = tiny_cnn(2)
    x, y = tiny_data((2, 4, 4), n=8)
    out = compute_measures(model, (x, y), names=["hessian_trace"], settings={"hessian_trace": {"probes": 7}})
    assert out["hessian_trace"].details["probes"] == 7
    with pytest.raises(ConfigurationError, match="settings given for measure\\(s\\) not computed: ggn_trace"):
        compute_measures(model, (x, y), names=["hessian_trace"], settings={"ggn_trace": {}})
    refused = "does not accept the settings"
    with pytest.raises(ConfigurationError, match=rf"'hessian_trace' {refused} bogus \(accepted: probes, method\)"):
        compute_measures(model, (x, y), names=["hessian_trace"], settings={"hessian_trace": {"bogus": 1}})
    # checked against the signature before anything is computed, also for measures forwarding their settings
    with pytest.raises(ConfigurationError, match=f"'pacbayes_mag_flatness' {refused} eps, magnitude_aware"):
        compute_measures(model, (x, y), names=["pacbayes_mag_flatness"],
                         settings={"pacbayes_mag_flatness": {"eps": 1e-3, "magnitude_aware": False}})
    with pytest.raises(ConfigurationError, match=rf"'log_spectral_product' {refused} tol \(accepted: none\)"):
        compute_measures(model, (x, y), names=["log_spectral_product"], settings={"log_spectral_product": {"tol": 1}})


def test_a_type_error_inside_a_measure_is_not_reworded():
    """Only unknown settings become a ConfigurationError; a TypeError raised while measuring stays itself."""
    model = tiny_cnn(2)
    x, y = tiny_data((2, 4, 4), n=8)

    def broken_loss(outputs, targets):
        raise TypeError("unexpected keyword inside the loss")

    with pytest.raises(TypeError, match="inside the loss"):
        compute_measures(model, (x, y), names=["adaptive_average_sharpness"],
                         settings={"adaptive_average_sharpness": {"loss_fn": broken_loss, "samples": 1}})
