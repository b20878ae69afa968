"""The Lipschitz rule of sturdy.normalize.Normalize (docs/design.md section 1): a per-channel scale 1/std, bounded
exactly, and a certificate of a normalised model on images in [0, 1] that a PGD attack cannot break."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sturdy.errors import UnsupportedModuleError
from sturdy.lipschitz import LipschitzTracker, certify, lipschitz_bound, pgd_l2
from sturdy.normalize import Normalization, normalized

from .lipschitz_reference import adversarial_lipschitz, exact_norm, jacobian_norms

REL_TOL = 1e-6  # a closed-form bound against the dense operator's norm (float64)
SOUND_REL = 1e-6  # bound >= true constant * (1 - SOUND_REL)
ATTACK_FRACTION = 0.999  # attack budget relative to the certified radius
SHAPE = (3, 4, 4)
NORMS = {"per-channel": Normalization((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
         "one-value": Normalization((0.5,), (0.125,))}


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 16), nn.ReLU(),
                         nn.Linear(16, 5)).eval()


@pytest.mark.parametrize("name", list(NORMS))
def test_normalize_bound_is_the_exact_norm(name):
    model = normalized(_net(), NORMS[name]).eval()
    bound = lipschitz_bound(model, input_shape=(1, *SHAPE))
    layer = next(lb for lb in bound.per_layer if lb.path == "normalize")
    exact = exact_norm(model.normalize, SHAPE)
    assert layer.kind == "normalize"
    assert layer.upper == pytest.approx(exact, rel=REL_TOL)
    assert exact == pytest.approx(1 / min(NORMS[name].std), rel=REL_TOL)
    inner = lipschitz_bound(model.model, input_shape=(1, *SHAPE)).upper
    assert bound.upper == pytest.approx(inner * exact, rel=REL_TOL)  # the 1/std factor is in the product


@pytest.mark.parametrize("name", list(NORMS))
def test_normalised_bound_dominates_the_true_constant(name):
    model = normalized(_net(1), NORMS[name]).eval()
    bound = lipschitz_bound(model, input_shape=(1, *SHAPE)).upper
    x = torch.rand(16, *SHAPE, generator=torch.Generator().manual_seed(2))
    assert bound >= float(jacobian_norms(model, x).max()) * (1 - SOUND_REL)
    assert bound >= adversarial_lipschitz(model, SHAPE, starts=4, steps=30) * (1 - SOUND_REL)


@pytest.mark.parametrize("name", list(NORMS))
def test_certificate_of_a_normalised_model_survives_pgd(name):
    model = normalized(_net(3), NORMS[name]).eval()
    x = torch.rand(40, *SHAPE, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        y = model(x).argmax(1)
    cert = certify(model, x, y)
    idx = (cert.radius > 0).nonzero().flatten()
    assert idx.numel() == x.shape[0]
    attack = pgd_l2(model, x[idx], y[idx], eps=cert.radius[idx].float() * ATTACK_FRACTION, steps=60, restarts=3)
    assert int(attack.success.sum()) == 0
    # the radius is in pixel space: without the normalisation's 1/std the same network certifies larger radii
    plain = certify(model.model, (x - model.normalize.mean.view(1, -1, 1, 1)) / model.normalize.std.view(1, -1, 1, 1),
                    y)
    assert bool((cert.radius < plain.radius).all())


def test_a_normalisation_with_a_zero_std_is_refused():
    model = normalized(_net(), NORMS["per-channel"]).eval()
    with torch.no_grad():
        model.normalize.std[1] = 0.0
    with pytest.raises(UnsupportedModuleError) as exc:
        lipschitz_bound(model, input_shape=(1, *SHAPE))
    assert "normalize" in str(exc.value)


def test_training_tracker_includes_the_normalisation():
    model = normalized(_net(5), NORMS["per-channel"]).train()
    tracker = LipschitzTracker(model, input_shape=(1, *SHAPE), warmup_iterations=400)
    estimate = float(tracker().lipschitz.detach())
    norms = tracker.norms()
    assert norms["normalize"] == pytest.approx(1 / min(NORMS["per-channel"].std), rel=REL_TOL)
    bound = lipschitz_bound(model.eval(), input_shape=(1, *SHAPE)).upper
    assert estimate <= bound * (1 + SOUND_REL)
    assert estimate == pytest.approx(bound, rel=1e-3)  # power iteration converged to the bound
