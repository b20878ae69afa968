"""Certified radii: closed forms, soundness against attacks, tightness chain."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from sturdy.errors import ConfigurationError, SoundnessError, SturdyError
from sturdy.lipschitz import (
    certify,
    lipschitz_bound,
    local_lipschitz,
    minimal_adversarial_radius,
    operator_norm,
    pgd_l2,
    tightness,
)
from sturdy.models import create_model

REL_TOL = 1e-6  # closed-form radius of a linear model (float32 logits)
ATTACK_FRACTION = 0.999  # attack budget relative to the certified radius
ATTACK_REL_TOL = 0.02  # bisection + PGD recover the exact boundary distance of a linear model to 2%
FLIP_FRACTION = 1.001  # just beyond the exact radius of a linear model the prediction must flip


def _linear_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 5)).double()


def test_linear_model_radius_matches_closed_form():
    net = _linear_model()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, 3, 2, 2, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        logits = net(x)
    y = logits.argmax(1)
    y[:5] = (y[:5] + 1) % 5  # a few wrong labels
    cert = certify(net, x, y)
    w = net[1].weight.detach()
    for n in range(x.shape[0]):
        p = int(logits[n].argmax())
        expected = min(
            float((logits[n, p] - logits[n, i]) / torch.linalg.vector_norm(w[p] - w[i])) for i in range(5) if i != p
        )
        if p != int(y[n]):
            expected = 0.0
        torch.testing.assert_close(float(cert.radius[n]), expected, rtol=REL_TOL, atol=1e-12)
    assert not bool(cert.correct[:5].any()) and bool((cert.radius[:5] == 0).all())
    # global form: M / (sqrt(2) ||W||)
    glob = certify(net, x, y, form="global")
    top2 = logits.topk(2, dim=1).values
    expected_global = (top2[:, 0] - top2[:, 1]) / (math.sqrt(2) * torch.linalg.matrix_norm(w, ord=2))
    expected_global[:5] = 0.0
    torch.testing.assert_close(glob.radius, expected_global, rtol=REL_TOL, atol=1e-12)
    assert bool((cert.radius >= glob.radius * (1 - REL_TOL)).all())


def test_linear_model_radius_is_tight():
    net = _linear_model(2)
    x = torch.randn(20, 3, 2, 2, dtype=torch.float64)
    with torch.no_grad():
        pred = net(x).argmax(1)
    cert = certify(net, x, pred)
    w = net[1].weight.detach()
    with torch.no_grad():
        logits = net(x)
    for n in range(x.shape[0]):
        p = int(pred[n])
        # the closest competing class along its own direction
        ratios = [(float((logits[n, p] - logits[n, i]) / torch.linalg.vector_norm(w[p] - w[i])), i)
                  for i in range(5) if i != p]
        _, i = min(ratios)
        direction = (w[i] - w[p]) / torch.linalg.vector_norm(w[i] - w[p])
        r = float(cert.radius[n])
        inside = x[n] + ATTACK_FRACTION * r * direction.reshape(3, 2, 2)
        outside = x[n] + FLIP_FRACTION * r * direction.reshape(3, 2, 2)
        assert int(net(inside[None]).argmax()) == p
        assert int(net(outside[None]).argmax()) != p


def test_certified_accuracy_and_summary():
    net = _linear_model()
    x = torch.randn(30, 3, 2, 2, dtype=torch.float64)
    y = torch.randint(0, 5, (30,))
    cert = certify(net, x, y)
    accs = [cert.certified_accuracy(e) for e in (0.0, 0.01, 0.1, 1.0, 10.0)]
    assert accs == sorted(accs, reverse=True)
    assert accs[0] <= cert.clean_accuracy
    expected = float(((cert.radius > 0.1) & cert.correct).double().mean())
    assert cert.certified_accuracy(0.1) == expected
    d = cert.to_dict()
    assert set(d["certified_accuracy"]) == {"0.1", "0.25", "0.5", "1.0"}
    with pytest.raises(ConfigurationError, match="eps must be"):
        cert.certified_accuracy(-1.0)


def test_certify_validation_messages():
    net = _linear_model()
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    with pytest.raises(ConfigurationError, match="labels"):
        certify(net, x, torch.zeros(3, dtype=torch.long))
    bound = lipschitz_bound(net, input_shape=(1, 3, 2, 2))
    with pytest.raises(ConfigurationError, match="recompute it"):
        certify(net, torch.randn(4, 12, dtype=torch.float64), torch.zeros(4, dtype=torch.long), bound=bound)
    tanh_net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3), nn.Tanh()).double()
    with pytest.raises(ConfigurationError, match="form='global'"):
        certify(tanh_net, x, torch.zeros(4, dtype=torch.long))
    assert certify(tanh_net, x, torch.zeros(4, dtype=torch.long), form="global").radius.shape == (4,)


def test_pairwise_at_least_global_on_cnn():
    torch.manual_seed(0)
    net = create_model("cnn", in_shape=(1, 8, 8), num_classes=10, channels=(4, 8), width=16).eval()
    x = torch.rand(50, 1, 8, 8)
    with torch.no_grad():
        y = net(x).argmax(1)
    bound = lipschitz_bound(net, input_shape=(1, 1, 8, 8))
    pair = certify(net, x, y, bound=bound)
    glob = certify(net, x, y, bound=bound, form="global")
    assert bool((pair.radius >= glob.radius * (1 - REL_TOL)).all())
    assert bool((pair.radius > 0).any())


def test_pgd_finds_linear_boundary():
    net = _linear_model(3)
    x = torch.randn(10, 3, 2, 2, dtype=torch.float64)
    with torch.no_grad():
        pred = net(x).argmax(1)
    cert = certify(net, x, pred)
    # for a linear model the smallest adversarial distance equals the certified radius
    found = minimal_adversarial_radius(net, x, pred, start=cert.radius * 2, bisection_steps=12, steps=40, restarts=4)
    torch.testing.assert_close(found, cert.radius, rtol=ATTACK_REL_TOL, atol=1e-6)
    res = pgd_l2(net, x, pred, eps=cert.radius * ATTACK_FRACTION, steps=40, restarts=2)
    assert not bool(res.success.any())


def _attack_at_certified_radius(model, x, y, *, steps, restarts):
    cert = certify(model, x, y)
    idx = (cert.radius > 0).nonzero().flatten()
    res = pgd_l2(model, x[idx], cert.predicted[idx], eps=cert.radius[idx] * ATTACK_FRACTION, steps=steps,
                 restarts=restarts)
    # the attack stays inside the budget
    assert bool((res.distance[res.success] <= cert.radius[idx][res.success] * ATTACK_FRACTION * (1 + 1e-5)).all())
    return idx.numel(), int(res.success.sum())


def test_soundness_pgd_at_certified_radius(lmt_digits):
    model, test = lmt_digits
    # 300 test digits and their mirror images (labelled by the model's own prediction)
    x = torch.cat([test.images[:300], test.images[:300].flip(-1)])
    with torch.no_grad():
        y = torch.cat([test.labels[:300], model(test.images[:300].flip(-1)).argmax(1)])
    n, broken = _attack_at_certified_radius(model, x, y, steps=50, restarts=3)
    assert n >= 200, f"only {n} certified points; the fixture model is too weak for this test"
    assert broken == 0


@pytest.mark.slow
def test_soundness_pgd_at_certified_radius_strong(lmt_digits):
    model, test = lmt_digits
    gen = torch.Generator().manual_seed(5)
    noisy = (test.images + 0.05 * torch.randn(test.images.shape, generator=gen)).clamp(0, 1)
    x = torch.cat([test.images, noisy, test.images.flip(-1), test.images.flip(-2)])
    with torch.no_grad():
        y = model(x).argmax(1)
    n, broken = _attack_at_certified_radius(model, x, y, steps=200, restarts=10)
    assert n >= 600 and broken == 0


def test_tightness_chain_on_lmt_model(lmt_digits):
    model, test = lmt_digits
    t = tightness(model, test.images[:12], test.labels[:12], steps=30, restarts=2, bisection_steps=5)
    assert t.violations == 0
    ok = t.certified > 0
    assert bool(ok.any())
    assert bool((t.certified[ok] <= t.adversarial[ok]).all())
    s = t.to_dict()
    assert 0 < s["median_A_over_D"] <= 1
    assert s["median_A_over_B"] > 0


def test_tightness_raises_on_soundness_violation():
    net = _linear_model()
    x = torch.randn(6, 3, 2, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        y = net(x).argmax(1)
    honest = lipschitz_bound(net, input_shape=(1, 3, 2, 2))
    # a bound 100x too small certifies radii 100x too large: the attack must beat them
    wrong = dataclasses.replace(honest, upper=honest.upper / 100, upper_body=honest.upper_body / 100)
    with pytest.raises(SoundnessError, match="disproved by a pair of inputs") as info:  # certify's self-check
        tightness(net, x, y, bound=wrong, steps=10, restarts=1, bisection_steps=2)
    assert isinstance(info.value, SturdyError)
    with pytest.raises(SoundnessError, match="disproved by a pair of inputs"):
        certify(net, x, y, bound=wrong)
    t = tightness(net, x, y, bound=wrong, steps=10, restarts=1, bisection_steps=2, check=False)
    assert t.violations == 6 and t.to_dict()["violations"] == 6


def test_analyses_restore_training_mode():
    torch.manual_seed(0)
    net = create_model("cnn", in_shape=(1, 6, 6), num_classes=3, channels=(2,), width=4, batchnorm=True,
                       pool="none").double()
    net.train()
    next(m for m in net.modules() if isinstance(m, nn.BatchNorm2d)).eval()  # a mixed state comes back as it was
    modes = [m.training for m in net.modules()]
    x = torch.rand(3, 1, 6, 6, dtype=torch.float64)
    y = torch.zeros(3, dtype=torch.long)
    lipschitz_bound(net, input_shape=(1, 1, 6, 6))
    assert [m.training for m in net.modules()] == modes
    certify(net, x, y)
    assert [m.training for m in net.modules()] == modes
    tightness(net, x, y, steps=2, restarts=1, bisection_steps=1, check=False)
    assert [m.training for m in net.modules()] == modes
    local_lipschitz(net, x[:1])
    pgd_l2(net, x, y, eps=0.1, steps=2, restarts=1)
    assert [m.training for m in net.modules()] == modes
    conv = next(m for m in net.modules() if isinstance(m, nn.Conv2d)).train()
    operator_norm(conv, input_shape=(1, 1, 6, 6))
    assert conv.training


def test_pgd_bounds_is_the_valid_pixel_range():
    net = _linear_model()
    x = torch.rand(8, 3, 2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        y = net(x).argmax(1)
    res = pgd_l2(net, x, y, eps=5.0, steps=20, restarts=1, bounds=(0.0, 1.0))
    assert bool(res.success.any())
    assert float(res.adversarial.min()) >= 0.0 and float(res.adversarial.max()) <= 1.0
    assert set(res.to_dict()) == {"n", "success_rate", "median_distance"}
    with pytest.raises(ConfigurationError, match="valid pixel range"):
        pgd_l2(net, x, y, eps=1.0, bounds=(1.0, 0.0))
    with pytest.raises(ConfigurationError, match="valid pixel range"):
        minimal_adversarial_radius(net, x, y, bounds=(0.0,))
