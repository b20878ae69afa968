"""Squared-gradient statistics: storing, routing and popping (the per-layer rules are tested in tests/core)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sturdy.compression.statistics import attach_squared_gradient_statistics
from sturdy.errors import ConfigurationError, DistributedError, UnsupportedModuleError
from sturdy.persample import per_sample_squared_gradients

REL_TOL = 1e-9
ABS_TOL = 1e-12
BF16_REL_NORM = 0.05  # bf16 keeps 8 bits of mantissa: the sums' relative error (norm) through the network


def _ce(logits, targets):
    return F.cross_entropy(logits, targets)


def _fast(model, x, y, **kw):
    stats = attach_squared_gradient_statistics(model, **kw)
    _ce(model(x), y).backward()
    out = {n: stats.get(p) for n, p in model.named_parameters()}
    stats.remove()
    return out


def _check(model, x, y, **kw):
    model = model.double()
    x = x.double()
    reference = per_sample_squared_gradients(model, x, y, _ce)
    fast = _fast(model, x, y, **kw)
    assert set(fast) == set(reference)
    for name in reference:
        assert fast[name] is not None, name
        torch.testing.assert_close(fast[name], reference[name], rtol=REL_TOL, atol=ABS_TOL, msg=name)


@pytest.mark.parametrize("chunk_bytes", [None, 1])
def test_conv_batchnorm_net_matches_per_sample_loop(chunk_bytes):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 2),
                          nn.BatchNorm1d(2))
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 2, 6, 6) * 2 + 1)  # non-trivial running statistics
    model.eval()
    _check(model, torch.randn(5, 2, 6, 6), torch.randint(0, 2, (5,)), chunk_bytes=chunk_bytes)


def test_statistics_accumulate_and_pop_resets():
    model = nn.Linear(3, 2)
    stats = attach_squared_gradient_statistics(model)
    x = torch.ones(4, 3)
    model(x).sum().backward()
    model(x).sum().backward()
    torch.testing.assert_close(stats.get(model.bias), torch.full((2,), 8.0))
    flat = stats.pop_flat([model.weight, model.bias])
    assert flat.shape == (8,)
    torch.testing.assert_close(flat[-2:], torch.full((2,), 8.0))
    assert stats.get(model.bias) is None
    torch.testing.assert_close(stats.pop_flat([model.bias]), torch.zeros(2))


def test_no_statistics_under_no_grad_and_frozen_parameters_skipped():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    model[0].weight.requires_grad_(False)
    stats = attach_squared_gradient_statistics(model)
    with torch.no_grad():
        model(torch.ones(2, 3))
    model(torch.ones(2, 3)).sum().backward()
    assert stats.get(model[0].weight) is None
    assert stats.get(model[0].bias) is not None
    assert "0.weight" not in stats.parameter_names.values()


def test_shared_module_is_refused():
    layer = nn.Linear(3, 3)
    model = nn.Sequential(layer, nn.ReLU(), layer)
    attach_squared_gradient_statistics(model)
    with pytest.raises(UnsupportedModuleError, match="ran more than once before backward"):
        model(torch.ones(2, 3)).sum().backward()


def test_pop_before_backward_finished_is_an_error():
    model = nn.Linear(3, 2)
    stats = attach_squared_gradient_statistics(model)
    model(torch.ones(2, 3))
    with pytest.raises(DistributedError, match="not ready"):
        stats.pop_flat([model.weight])
    stats.reset()
    assert stats.pop_flat([model.weight]).shape == (6,)


def test_validation_messages():
    with pytest.raises(ConfigurationError, match="expects an nn.Module"):
        attach_squared_gradient_statistics("model")
    with pytest.raises(ConfigurationError, match="chunk_bytes must be a positive"):
        attach_squared_gradient_statistics(nn.Linear(2, 2), chunk_bytes=0)
    with pytest.raises(ConfigurationError, match="no trainable parameters"):
        attach_squared_gradient_statistics(nn.ReLU())
    stats = attach_squared_gradient_statistics(nn.Linear(2, 2))
    with pytest.raises(DistributedError, match="not tracked"):
        stats.pop_flat([torch.zeros(3)])


def test_pop_add_equals_adding_pop_flat():
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    stats = attach_squared_gradient_statistics(model)
    params = list(model.parameters())
    x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
    _ce(model(x), y).backward()
    base = torch.rand(sum(p.numel() for p in params))
    expected = base.clone().add_(stats.pop_flat(params))
    _ce(model(x), y).backward()
    assert torch.equal(stats.pop_add_(params, base), expected)
    assert stats.get(params[0]) is None  # reset
    with pytest.raises(DistributedError, match="not tracked"):
        stats.pop_add_([torch.zeros(3)], torch.zeros(3))


def test_routed_statistics_go_straight_into_the_target_and_are_not_stored():
    torch.manual_seed(10)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 5 * 5, 2))
    stats = attach_squared_gradient_statistics(model)
    params = list(model.parameters())
    x, y = torch.randn(4, 2, 5, 5), torch.randint(0, 2, (4,))
    _ce(model(x), y).backward()
    expected = stats.pop_flat(params)
    base = torch.rand(expected.numel())
    target = base.clone()
    offset = 0
    for p in params:
        stats.route(p, target[offset : offset + p.numel()])
        offset += p.numel()
    _ce(model(x), y).backward()
    assert all(stats.get(p) is None for p in params)
    torch.testing.assert_close(target, base + expected, rtol=0, atol=1e-6)
    stats.clear_routes()
    _ce(model(x), y).backward()
    torch.testing.assert_close(stats.pop_flat(params), expected, rtol=0, atol=0)
    with pytest.raises(ConfigurationError, match="flat tensor of 54 elements"):
        stats.route(params[0], torch.zeros(3))
    with pytest.raises(ConfigurationError, match="not tracked"):
        stats.route(torch.zeros(2), torch.zeros(2))


def test_statistics_under_bf16_autocast_are_close_to_float32():
    """Under autocast a layer's input is float32 and its output gradient bf16: the rules see both in float32."""
    import copy

    from sturdy.compression import attach_squared_gradient_statistics
    from sturdy.models import create_model

    torch.manual_seed(0)
    model = create_model("cnn", in_shape=(1, 8, 8), num_classes=10)
    plain = copy.deepcopy(model)
    stats, plain_stats = attach_squared_gradient_statistics(model), attach_squared_gradient_statistics(plain)
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 10, (6,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.nn.functional.cross_entropy(model(x), y).backward()
    torch.nn.functional.cross_entropy(plain(x), y).backward()
    for p, q in zip(model.parameters(), plain.parameters()):
        got, want = stats.get(p), plain_stats.get(q)
        assert float((got.float() - want).norm() / want.norm()) < BF16_REL_NORM
