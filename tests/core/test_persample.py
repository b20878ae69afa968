"""Per-sample squared-gradient rules against brute-force per-sample loops (float64)."""

from __future__ import annotations

from typing import Dict

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sturdy.errors import ConfigurationError, UnsupportedModuleError
from sturdy.persample import (
    CallRecorder,
    SquaredGradientHooks,
    column_rule_for,
    column_squared_gradients,
    func_squared_gradients,
    generic_rule,
    per_sample_squared_gradients,
    register_squared_grad,
    rule_for,
    squared_grad_rules,
    squared_gradients,
    trainable_modules,
    uses_batch_statistics,
)
from sturdy.persample.chunking import samples_per_chunk
from sturdy.persample.registry import _RULES

REL_TOL = 1e-9  # rules vs per-sample loops, float64
ABS_TOL = 1e-12
BIG_BUDGET = 2**40  # one chunk of per-sample tensors


def _ce(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits, targets)


def _hooked(model: nn.Module, x: Tensor, y: Tensor, chunk_bytes: int = BIG_BUDGET) -> Dict[str, Tensor]:
    """``{name: sum_x g_x^2}`` of the mean loss, from the hooks during one backward pass."""
    names = {id(p): n for n, p in model.named_parameters()}
    out: Dict[str, Tensor] = {}

    def store(tracked, result):
        for attr, value in result.items():
            name = names[id(tracked.params[attr])]
            out[name] = out[name] + value if name in out else value

    hooks = SquaredGradientHooks(model, on_result=store, budget=lambda tracked: chunk_bytes)
    _ce(model(x), y).backward()
    hooks.remove()
    return out


def _check(model: nn.Module, x: Tensor, y: Tensor, **kw) -> None:
    model = model.double()
    x = x.double()
    reference = per_sample_squared_gradients(model, x, y, _ce)
    fast = _hooked(model, x, y, **kw)
    assert set(fast) == set(reference)
    for name in reference:
        torch.testing.assert_close(fast[name], reference[name], rtol=REL_TOL, atol=ABS_TOL, msg=name)


def _rule_reference(module: nn.Module, a: Tensor, delta: Tensor) -> Dict[str, Tensor]:
    """``sum_x (d <module(a_x), delta_x> / d p)^2`` by one backward pass per sample."""
    params = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
    out = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(a.shape[0]):
        grads = torch.autograd.grad((module(a[i : i + 1]) * delta[i : i + 1]).sum(), list(params.values()))
        for n, g in zip(params, grads):
            out[n] += g * g
    return out


RULE_CASES = {
    "linear": (lambda: nn.Linear(5, 4), (5,)),
    "linear-3d": (lambda: nn.Linear(5, 4), (3, 5)),
    "conv": (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (4, 5, 6)),
    "conv-stride-dilation": (
        lambda: nn.Conv2d(3, 2, (2, 3), stride=(2, 1), dilation=(1, 2), padding=(1, 2)), (3, 7, 6)
    ),
    "conv-reflect": (lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect", bias=False), (2, 5, 5)),
    "batchnorm-eval": (lambda: nn.BatchNorm2d(3).eval(), (3, 4, 4)),
    "layernorm-generic": (lambda: nn.LayerNorm(6), (2, 6)),
    "conv1d": (lambda: nn.Conv1d(2, 3, 3, padding=1), (2, 5)),
    "conv1d-grouped-dilated-strided": (lambda: nn.Conv1d(4, 6, 3, stride=2, dilation=2, padding=2, groups=2), (4, 11)),
    "conv1d-same-circular": (lambda: nn.Conv1d(3, 2, 4, padding="same", padding_mode="circular"), (3, 7)),
    "conv1d-same-zeros-dilated": (lambda: nn.Conv1d(3, 2, 3, padding="same", dilation=2, bias=False), (3, 8)),
    "conv-depthwise": (lambda: nn.Conv2d(3, 6, 3, padding=1, groups=3), (3, 4, 5)),
    "conv-same-dilated": (lambda: nn.Conv2d(2, 4, (3, 2), padding="same", dilation=(2, 1)), (2, 6, 5)),
    "batchnorm1d-sequence": (lambda: nn.BatchNorm1d(3).eval(), (3, 4)),
}


@pytest.mark.parametrize("case", sorted(RULE_CASES))
@pytest.mark.parametrize("budget", [1, BIG_BUDGET])
def test_each_rule_matches_a_per_sample_loop_for_a_given_output_gradient(case, budget):
    make, shape = RULE_CASES[case]
    torch.manual_seed(11)
    module = make().double()
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        with torch.no_grad():
            module.weight.uniform_(0.5, 1.5)
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    a = torch.randn(5, *shape, dtype=torch.float64)
    with torch.no_grad():
        delta = torch.randn_like(module(a))
    tracked = next(t for t in trainable_modules(module) if t.module is module)
    result = squared_gradients(tracked, a, delta, budget)
    reference = _rule_reference(module, a, delta)
    assert set(result) == set(reference)
    for name, ref in reference.items():
        torch.testing.assert_close(result[name], ref, rtol=REL_TOL, atol=ABS_TOL, msg=name)


def test_registry_and_fallback():
    rules = squared_grad_rules()
    assert nn.LayerNorm not in rules and nn.Conv3d not in rules
    assert rules[nn.Conv1d] is rules[nn.Conv2d] and nn.Embedding in rules
    assert rule_for(nn.LayerNorm(3)) is generic_rule
    assert rule_for(nn.BatchNorm1d(3)) is rules[nn.modules.batchnorm._BatchNorm]

    class MyLinear(nn.Linear):
        pass

    assert rule_for(MyLinear(2, 2)) is rules[nn.Linear]
    try:
        @register_squared_grad(nn.LayerNorm)
        def layernorm_rule(module, a, delta, budget):
            return generic_rule(module, a, delta, budget)

        assert rule_for(nn.LayerNorm(3)) is layernorm_rule
    finally:
        _RULES.pop(nn.LayerNorm, None)
    assert samples_per_chunk(100, 5, 4) == 5 and samples_per_chunk(1, 5) == 1


def _embedding_net() -> nn.Module:
    return nn.Embedding(7, 4, padding_idx=0)


EMBEDDING_CASES = {
    "embedding": (lambda: nn.Embedding(7, 4), (5,)),
    "embedding-padding-idx": (_embedding_net, (3, 2)),
    "embedding-scale-by-freq": (lambda: nn.Embedding(7, 4, scale_grad_by_freq=True), (5,)),
}


@pytest.mark.parametrize("case", sorted(EMBEDDING_CASES))
def test_embedding_rule_matches_a_per_sample_loop(case):
    """Indices repeat within a sample (their gradients add before squaring) and across samples."""
    make, shape = EMBEDDING_CASES[case]
    torch.manual_seed(5)
    module = make().double()
    a = torch.randint(0, 7, (6, *shape))
    a[0] = 3  # one sample that uses one row everywhere
    with torch.no_grad():
        delta = torch.randn_like(module(a))
    tracked = trainable_modules(module)[0]
    reference = _rule_reference(module, a, delta)
    torch.testing.assert_close(squared_gradients(tracked, a, delta, BIG_BUDGET)["weight"], reference["weight"],
                               rtol=REL_TOL, atol=ABS_TOL)
    deltas = torch.stack([delta, 2 * delta.flip(0)])
    twice = column_squared_gradients(tracked, a, deltas, BIG_BUDGET)["weight"]
    torch.testing.assert_close(twice, reference["weight"] + 4 * _rule_reference(module, a, delta.flip(0))["weight"],
                               rtol=REL_TOL, atol=ABS_TOL)


@pytest.mark.parametrize("case", sorted(RULE_CASES))
@pytest.mark.parametrize("budget", [1, BIG_BUDGET])
def test_each_column_rule_equals_the_sum_of_its_columns(case, budget):
    """Column rules (K output gradients of one input at once) against a per-sample loop per column."""
    make, shape = RULE_CASES[case]
    torch.manual_seed(12)
    module = make().double()
    a = torch.randn(4, *shape, dtype=torch.float64)
    with torch.no_grad():
        deltas = torch.randn(3, *module(a).shape, dtype=torch.float64)
    tracked = next(t for t in trainable_modules(module) if t.module is module)
    result = column_squared_gradients(tracked, a, deltas, budget)
    references = [_rule_reference(module, a, d) for d in deltas]
    assert set(result) == set(references[0])
    for name in result:
        torch.testing.assert_close(result[name], sum(r[name] for r in references), rtol=REL_TOL, atol=ABS_TOL,
                                   msg=name)


@pytest.mark.parametrize("case", sorted(RULE_CASES))
def test_each_column_rule_keeps_groups_of_columns_apart(case):
    """``groups=2`` of 4 columns: each group's result is the sum of its two columns' (per-sample loop)."""
    make, shape = RULE_CASES[case]
    torch.manual_seed(13)
    module = make().double()
    a = torch.randn(4, *shape, dtype=torch.float64)
    with torch.no_grad():
        deltas = torch.randn(4, *module(a).shape, dtype=torch.float64)
    tracked = next(t for t in trainable_modules(module) if t.module is module)
    result = column_squared_gradients(tracked, a, deltas, BIG_BUDGET, groups=2)
    references = [_rule_reference(module, a, d) for d in deltas]
    for name in result:
        expected = torch.stack([references[0][name] + references[1][name], references[2][name] + references[3][name]])
        torch.testing.assert_close(result[name], expected, rtol=REL_TOL, atol=ABS_TOL, msg=name)
    with pytest.raises(ConfigurationError, match="cannot be split into 3 equal groups"):
        column_squared_gradients(tracked, a, deltas, BIG_BUDGET, groups=3)


def test_column_rules_are_registered_for_the_rules_that_share_work():
    assert column_rule_for(nn.Conv1d(1, 1, 1)) is column_rule_for(nn.Conv2d(1, 1, 1))
    assert column_rule_for(nn.Linear(1, 1)).__name__ == "linear_column_rule"
    assert column_rule_for(nn.LayerNorm(3)).__name__ == "column_rule"  # loops over columns (torch.func)


def test_linear_mlp_matches_per_sample_loop():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    _check(model, torch.randn(6, 5), torch.randint(0, 3, (6,)))


def test_linear_on_sequences_matches_per_sample_loop():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Flatten(), nn.Linear(15, 3))
    _check(model, torch.randn(5, 3, 4), torch.randint(0, 3, (5,)))


@pytest.mark.parametrize(
    "conv_kwargs",
    [
        dict(kernel_size=3, padding=1),
        dict(kernel_size=3, padding=0, stride=2),
        dict(kernel_size=(2, 3), padding=(1, 2), stride=(2, 1), dilation=(1, 2)),
        dict(kernel_size=3, padding=1, groups=2),
        dict(kernel_size=3, padding="same", dilation=2),
        dict(kernel_size=3, padding=1, padding_mode="reflect"),
        dict(kernel_size=3, padding=1, padding_mode="circular", bias=False),
    ],
)
def test_conv2d_matches_per_sample_loop(conv_kwargs):
    torch.manual_seed(3)
    conv = nn.Conv2d(4, 6, **conv_kwargs)
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten())
    with torch.no_grad():
        features = model(torch.zeros(1, 4, 7, 6)).shape[1]
    model.append(nn.Linear(features, 3))
    _check(model, torch.randn(5, 4, 7, 6), torch.randint(0, 3, (5,)))


def test_tiny_chunks_give_the_same_result():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    _check(model, torch.randn(7, 2, 6, 6), torch.randint(0, 2, (7,)), chunk_bytes=1)


@pytest.mark.parametrize("chunk_bytes", [1, 5000, 25000])
def test_chunked_products_of_grouped_conv_and_sequences_match_per_sample_loop(chunk_bytes):
    """Chunks of one sample and of several samples with a shorter last chunk (7 samples)."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.ReLU(), nn.Flatten(start_dim=2),
                          nn.Linear(36, 5), nn.Tanh(), nn.Flatten(), nn.Linear(30, 3))
    _check(model, torch.randn(7, 4, 6, 6), torch.randint(0, 3, (7,)), chunk_bytes=chunk_bytes)


def test_batchnorm_eval_mode_matches_per_sample_loop():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 2),
                          nn.BatchNorm1d(2))
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 2, 6, 6) * 2 + 1)  # non-trivial running statistics
    model.eval()
    assert not any(uses_batch_statistics(m) for m in model.modules())
    _check(model, torch.randn(5, 2, 6, 6), torch.randint(0, 2, (5,)))


def test_batchnorm_training_mode_matches_per_sample_parameter_copies():
    """In training mode samples interact; the reference gives every sample its own copy of gamma, beta."""
    torch.manual_seed(6)
    bn = nn.BatchNorm2d(3).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    head = nn.Linear(3 * 4 * 4, 2).double()
    model = nn.Sequential(bn, nn.Flatten(), head)
    assert uses_batch_statistics(bn)
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 2, (5,))
    fast = _hooked(model, x, y)

    n = x.shape[0]
    gamma = bn.weight.detach().expand(n, 3).clone().requires_grad_(True)
    beta = bn.bias.detach().expand(n, 3).clone().requires_grad_(True)
    mean = x.mean((0, 2, 3), keepdim=True)
    var = x.var((0, 2, 3), unbiased=False, keepdim=True)
    xhat = (x - mean) / torch.sqrt(var + bn.eps)
    out = xhat * gamma[:, :, None, None] + beta[:, :, None, None]
    loss = F.cross_entropy(head(out.flatten(1)), y)
    g_gamma, g_beta = torch.autograd.grad(loss, [gamma, beta])
    torch.testing.assert_close(fast["0.weight"], (g_gamma**2).sum(0), rtol=REL_TOL, atol=ABS_TOL)
    torch.testing.assert_close(fast["0.bias"], (g_beta**2).sum(0), rtol=REL_TOL, atol=ABS_TOL)


def test_generic_fallback_for_unregistered_layers():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Flatten(), nn.LayerNorm(15), nn.Linear(15, 3))
    _check(model, torch.randn(4, 2, 5), torch.randint(0, 3, (4,)))


def test_func_squared_gradients_of_a_whole_network_with_dotted_names_and_constants():
    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    reference = per_sample_squared_gradients(model, x, y, _ce)
    logits = model(x)
    delta = torch.autograd.grad(_ce(logits, y), logits)[0]  # the mean loss' output gradient
    free = {"0.weight": model[0].weight.detach(), "2.bias": model[2].bias.detach()}
    constants = {n: t.detach() for n, t in model.named_parameters() if n not in free}
    for kw in ({}, {"constants": constants}):
        result = func_squared_gradients(model, free, x, delta, budget=1, **kw)
        assert set(result) == set(free)
        for name in free:
            torch.testing.assert_close(result[name], reference[name], rtol=REL_TOL, atol=ABS_TOL, msg=name)


def test_shared_module_is_refused():
    layer = nn.Linear(3, 3)
    model = nn.Sequential(layer, nn.ReLU(), layer)
    SquaredGradientHooks(model, on_result=lambda t, r: None, budget=lambda t: BIG_BUDGET)
    with pytest.raises(UnsupportedModuleError, match="ran more than once before backward"):
        model(torch.ones(2, 3)).sum().backward()


def test_module_called_with_two_arguments_is_refused():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, a: Tensor, b: Tensor) -> Tensor:
            return a * self.w + b

    two = Two()
    SquaredGradientHooks(two, on_result=lambda t, r: None, budget=lambda t: BIG_BUDGET)
    with pytest.raises(UnsupportedModuleError, match="called with 2 positional arguments"):
        two(torch.ones(2, 3), torch.ones(2, 3))


def test_hooks_are_silent_under_no_grad_and_removed():
    model = nn.Linear(3, 2)
    seen = []
    hooks = SquaredGradientHooks(model, on_result=lambda t, r: seen.append(r), budget=lambda t: BIG_BUDGET)
    with torch.no_grad():
        model(torch.ones(2, 3))
    assert hooks.tracked[0].pending == 0 and not seen
    model(torch.ones(2, 3)).sum().backward()
    assert len(seen) == 1 and set(seen[0]) == {"weight", "bias"}
    hooks.remove()
    model(torch.ones(2, 3)).sum().backward()
    assert len(seen) == 1


def test_call_recorder_keeps_outputs_intact_under_inplace_ops():
    lin = nn.Linear(3, 3)
    model = nn.Sequential(lin, nn.ReLU(inplace=True))
    recorder = CallRecorder(trainable_modules(model))
    x = torch.tensor([[1.0, -2.0, 3.0]])
    recorder.active = True
    out = model(x)
    recorder.active = False
    (call,) = recorder.calls
    assert call.tracked.module is lin and torch.equal(call.args[0], x)
    torch.testing.assert_close(call.output, lin(x), rtol=0, atol=0)  # not clamped by the in-place ReLU
    delta = torch.autograd.grad(out.sum(), call.output)[0]
    torch.testing.assert_close(delta, (lin(x) > 0).to(delta), rtol=0, atol=0)
    model(x)
    assert len(recorder.calls) == 1  # inactive: nothing recorded
    recorder.remove()
