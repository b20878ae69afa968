"""Tiered certificates (docs/design.md section 1): never below the global radius, larger where ReLUs stay
inactive on the ball, and sound: a strong PGD attack below a tiered radius finds nothing, on random networks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from sturdy.lipschitz import certify, pgd_l2

ATTACK_SLACK = 0.999  # attack at this fraction of each certified radius


def _mlp(seed: int, width: int = 32, depth: int = 2, inplace: bool = False) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list = [nn.Flatten()]
    d = 16
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU(inplace=inplace)]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, 4)).eval()


def _cnn(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), bn, nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(64, 3)).eval()


class _Residual(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.a, self.b, self.head = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x):
        h = x + self.b(torch.relu(self.a(x)))
        return self.head(torch.relu(h))


def _points(model: nn.Module, shape, n: int, seed: int):
    x = torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed)) * 1.5
    with torch.no_grad():
        y = model(x).argmax(1)
    return x, y


def _assert_sound(model, x, y, cert) -> None:
    assert bool((cert.radius >= cert.global_radius).all())
    idx = (cert.radius > 0).nonzero().flatten()
    if idx.numel() == 0:
        return
    attack = pgd_l2(model, x[idx], y[idx], eps=cert.radius[idx].float() * ATTACK_SLACK, steps=60, restarts=3)
    assert int(attack.success.sum()) == 0, (cert.radius[idx][attack.success], cert.global_radius[idx][attack.success])


@pytest.mark.parametrize("form", ["pairwise", "global"])
def test_tiered_radii_are_never_below_the_global_ones_and_larger_on_relu_networks(form):
    model = _mlp(0)
    x, y = _points(model, (16,), 80, 1)
    cert = certify(model, x, y, form=form, tiered=True)
    assert cert.global_radius is not None and set(cert.seconds) == {"global", "tiered"}
    assert bool((cert.radius >= cert.global_radius).all())
    assert int((cert.radius > cert.global_radius * 1.05).sum()) > 20  # the local bound pays off
    plain = certify(model, x, y, form=form)
    torch.testing.assert_close(plain.radius, cert.global_radius)
    summary = cert.to_dict()
    assert summary["certified_accuracy"]["0.1"] >= summary["global_certified_accuracy"]["0.1"]


@pytest.mark.parametrize("make, shape", [(lambda: _mlp(2, depth=3), (16,)), (lambda: _mlp(3, inplace=True), (16,)),
                                         (lambda: _cnn(4), (1, 4, 4)), (lambda: _Residual(5), (16,))],
                         ids=["mlp3", "inplace-relu", "cnn-bn", "residual"])
def test_tiered_certificates_hold_under_attack(make, shape):
    model = make()
    x, y = _points(model, shape, 40, 7)
    cert = certify(model, x, y, tiered=True)
    _assert_sound(model, x, y, cert)


def test_tiered_equals_global_without_relus():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    x, y = _points(model, (16,), 20, 2)
    cert = certify(model, x, y, tiered=True)
    torch.testing.assert_close(cert.radius, cert.global_radius)


def test_the_tiered_cli_keeps_the_global_figures(tmp_path):
    import json

    from sturdy.cli import main

    run = tmp_path / "run"
    assert main(["train", "--model", "mlp", "--epochs", "1", "--out", str(run), "--no-progress"]) == 0
    assert main(["lipschitz", "certify", "--checkpoint", str(run / "model.pt"), "--tiered", "--limit", "40",
                 "--out", str(run), "--no-progress"]) == 0
    summary = json.loads((run / "certify.json").read_text())
    for eps, value in summary["certified_accuracy"].items():
        assert value >= summary["global_certified_accuracy"][eps]
    assert set(summary["seconds_per_point"]) == {"global", "tiered"}


@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), width=st.integers(4, 24), depth=st.integers(1, 3), scale=st.floats(0.5, 3.0))
def test_random_relu_networks_keep_tiered_certificates(seed, width, depth, scale):
    model = _mlp(seed, width=width, depth=depth)
    x, y = _points(model, (16,), 16, seed + 1)
    x = x * scale
    with torch.no_grad():
        y = model(x).argmax(1)
    _assert_sound(model, x, y, certify(model, x, y, tiered=True))


MASKED_NORM_TOL = 1e-5  # relative: the Cholesky certificate tests the power estimate raised by 1e-6
MASKED_NORM_ABS = 1e-5  # times the operator's norm: the rounding slack is added under the square root


@pytest.mark.parametrize("shape, inactive", [((12, 40), 0.3), ((40, 12), 0.1), ((40, 12), 0.7), ((30, 30), 1.0)],
                         ids=["row-side", "column-downdate", "column-direct", "all-inactive"])
@pytest.mark.parametrize("chunk", [None, 100], ids=["one-chunk", "many-chunks"])
def test_masked_operator_norms_bound_the_dense_svd_of_the_kept_rows(shape, inactive, chunk, monkeypatch):
    from sturdy.lipschitz import tiered
    from sturdy.lipschitz.tiered import _MaskedNorm

    if chunk is not None:  # small chunks: the masked rows' products point by point, no outer products
        monkeypatch.setattr(tiered, "_CHUNK_ENTRIES", chunk)

    gen = torch.Generator().manual_seed(3)
    dense = torch.randn(*shape, generator=gen, dtype=torch.float64)
    norm = float(torch.linalg.matrix_norm(dense, ord=2)) * (1 + 1e-9)
    active = torch.rand(16, shape[0], generator=gen) >= inactive
    active[0] = True  # one point keeps every row: the operator's own norm
    got = _MaskedNorm(dense, norm)(active)
    exact = torch.tensor([float(torch.linalg.matrix_norm(dense[a], ord=2)) if a.any() else 0.0 for a in active],
                         dtype=torch.float64)
    assert bool((got >= exact).all()), (got - exact).min()
    assert bool((got <= exact * (1 + MASKED_NORM_TOL) + MASKED_NORM_ABS * norm).all()), (got - exact).max()
