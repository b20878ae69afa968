"""A certificate is a proof: what certify checks by behaviour (docs/design.md section 1, "Soundness checks").

Each case here was a way to get a certificate that a PGD attack broke below the certified radius: a forward
replaced on the instance, an ``input_shape`` that is not ``x``'s, logits that depend on the batch, ELU with a
negative ``alpha``, a bound from other weights. Each must now be refused or give a bound above the true constant.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sturdy.errors import ConfigurationError, SoundnessError, SturdyError, UnsupportedModuleError
from sturdy.lipschitz import Factor, certify, lipschitz_bound, register_bound, tightness
from sturdy.lipschitz.registry import includes_batch_dim, unregister_bound

from .lipschitz_reference import Fn, exact_norm, jacobian_norms

SOUND_REL = 1e-6  # bound >= true constant * (1 - SOUND_REL)


def _mlp(seed: int = 0, d: int = 16) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 12), nn.ReLU(), nn.Linear(12, 4)).eval()


def _data(n: int = 24, d: int = 16, seed: int = 1):
    x = torch.rand(n, d, generator=torch.Generator().manual_seed(seed))
    return x


def _true_constant(model: nn.Module, x: torch.Tensor) -> float:
    return float(jacobian_norms(model, x).max())


def _tenfold(self, x):
    return F.linear(x, self.weight * 10, self.bias)


def _accelerate_style(module: nn.Module) -> None:
    # the pattern of a wrapper library's hooks: keep the old bound forward, install a partial of a new one
    module._old_forward = module.forward

    def new_forward(mod, *args, **kwargs):
        return mod._old_forward(*args, **kwargs) * 10

    module.forward = functools.partial(new_forward, module)


PATCHES = {
    "partial": lambda m: setattr(m[1], "forward", functools.partial(_tenfold, m[1])),
    "method_type": lambda m: setattr(m[3], "forward", types.MethodType(_tenfold, m[3])),
    "accelerate": lambda m: _accelerate_style(m[1]),
    "call_impl": lambda m: setattr(m[1], "_call_impl", types.MethodType(
        lambda self, x: F.linear(x, self.weight * 10, self.bias), m[1])),
}


@pytest.mark.parametrize("how", list(PATCHES))
def test_forward_replaced_on_the_instance_is_bounded_as_it_runs(how):
    net = _mlp()
    PATCHES[how](net)
    x = _data()
    bound = lipschitz_bound(net, input_shape=(1, 16)).upper
    true = _true_constant(net, x)
    assert bound >= true * (1 - SOUND_REL), (bound, true)  # was 10x below: the class forward was bounded


def test_forward_replaced_on_the_root_instance():
    torch.manual_seed(0)
    net = nn.Linear(16, 4)
    net.forward = functools.partial(_tenfold, net)
    bound = lipschitz_bound(net, input_shape=(1, 16)).upper
    exact = 10 * float(torch.linalg.matrix_norm(net.weight.detach().double(), ord=2))
    assert bound == pytest.approx(exact, rel=1e-6)  # was the class forward's constant, 10x smaller


def test_conv_forward_replaced_on_the_instance():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(32, 3)).eval()
    conv = net[0]
    conv._conv_forward = types.MethodType(lambda self, x, w, b: F.conv2d(x, 5 * w, b, padding=1), conv)
    x = torch.rand(6, 1, 4, 4)
    assert lipschitz_bound(net, input_shape=(1, 1, 4, 4)).upper >= _true_constant(net, x) * (1 - SOUND_REL)


def test_patched_model_certificates_survive_tightness():
    # tightness (and its float64 copy) on a model whose forward closes over the original module
    net = _mlp()
    original, scale = net[1], torch.tensor(10.0)
    net[1].forward = functools.partial(lambda self, x: F.linear(x, original.weight * scale, original.bias), net[1])
    x = _data(6)
    y = net(x).argmax(1)
    t = tightness(net, x, y, steps=5, restarts=1, bisection_steps=2)
    assert t.violations == 0


# ------------------------------------------------------------------------------------------------ input shape


class _Pooled(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.pool = nn.AdaptiveMaxPool2d(2)
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))


@pytest.mark.parametrize("given", [(1, 1, 8, 8), (5, 1, 2, 2), (1, 1, 4)])
def test_input_shape_other_than_x_is_refused(given):
    x = torch.rand(4, 1, 4, 4)
    with pytest.raises(ConfigurationError, match="input_shape"):
        certify(_Pooled().eval(), x, torch.zeros(4, dtype=torch.long), input_shape=given)


def test_input_shape_with_another_batch_size_is_accepted():
    x = torch.rand(4, 1, 4, 4)
    a = certify(_Pooled().eval(), x, torch.zeros(4, dtype=torch.long), input_shape=(7, 1, 4, 4))
    b = certify(_Pooled().eval(), x, torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(a.radius, b.radius)


# --------------------------------------------------------------------------------------------- batch dependence


class _BatchScaled(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.body = _mlp()

    def forward(self, x):
        z = self.body(x)
        if self.how == "shape":
            return z * x.shape[0]
        if self.how == "size":
            return z / x.size(0)
        if self.how == "negative_index":
            return z * x.shape[-2]
        return z * x.numel() / 16


@pytest.mark.parametrize("how", ["shape", "size", "negative_index", "numel"])
def test_logits_scaled_by_the_batch_size_are_refused(how):
    x = _data(12)
    with pytest.raises(UnsupportedModuleError, match="mixes the samples of a batch"):
        certify(_BatchScaled(how), x, torch.zeros(12, dtype=torch.long))


class _Centered(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.body = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3))

    def forward(self, x):
        spell = {
            "dim-4": lambda: x.mean(dim=-4, keepdim=True),
            "dim0": lambda: x.mean(0, keepdim=True),
            "tuple": lambda: x.sum(dim=(-4, 1), keepdim=True),
            "list": lambda: torch.mean(x, dim=[-4], keepdim=True),
            "torch.sum": lambda: torch.sum(x, -4, keepdim=True),
            "amax": lambda: x.amax(dim=-4, keepdim=True),
            "max": lambda: x.max(dim=-4, keepdim=True).values,
        }[self.how]
        return self.body(x - spell())


@pytest.mark.parametrize("how", ["dim-4", "dim0", "tuple", "list", "torch.sum", "amax", "max"])
def test_reductions_over_the_batch_are_refused_however_spelled(how):
    with pytest.raises(UnsupportedModuleError, match="batch dimension"):
        lipschitz_bound(_Centered(how), input_shape=(1, 1, 4, 4))


class _BatchCenter(nn.Module):
    """A custom layer whose user-registered rule ignores that it centres over the batch."""

    def forward(self, x):
        return x - x.mean(0, keepdim=True)


@contextlib.contextmanager
def _lying_rule(cls: type, factor: float):
    """A user-registered rule for ``cls`` claiming ``factor``, removed afterwards."""
    register_bound(cls)(lambda call: Factor(factor, "custom"))
    try:
        yield
    finally:
        unregister_bound(cls)


def test_a_batch_mixing_layer_behind_a_registered_rule_is_caught_by_behaviour():
    with _lying_rule(_BatchCenter, 1.0):
        net = nn.Sequential(_BatchCenter(), _mlp())
        x = _data(10)
        with pytest.raises(UnsupportedModuleError, match="mixes the samples of a batch"):
            certify(net, x, torch.zeros(10, dtype=torch.long))
        certify(net, x[:1], torch.zeros(1, dtype=torch.long))  # alone, the sample is what the bound describes


@pytest.mark.parametrize("dims,ndim,expected", [
    (0, 4, True), (-4, 4, True), ((1, -4), 4, True), ([-4], 4, True), (None, 4, True), ((), 4, True),
    ("N", 4, True), (torch.tensor(-4), 4, True), (1, 4, False), ((1, 2, -1), 4, False), (-1, 2, False),
])
def test_includes_batch_dim(dims, ndim, expected):
    assert includes_batch_dim(dims, ndim) is expected


# --------------------------------------------------------------------------------------------- activations


def _brute_slope(fn, lo: float = -30.0, hi: float = 30.0, n: int = 600001) -> float:
    t = torch.linspace(lo, hi, n, dtype=torch.float64)
    with torch.no_grad():
        v = fn(t[None])[0]
    return float(((v[1:] - v[:-1]).abs() / (t[1:] - t[:-1])).max())


_PARAMS = [-3.0, -1.7, -1.0, -0.5, -0.01, 0.0, 0.3, 1.0, 2.5]
ACTIVATIONS = {
    **{f"ELU({a})": (lambda a=a: nn.ELU(alpha=a)) for a in _PARAMS},
    **{f"F.elu({a})": (lambda a=a: Fn(lambda x, a=a: F.elu(x, a))) for a in _PARAMS},
    **{f"F.elu(alpha={a})": (lambda a=a: Fn(lambda x, a=a: F.elu(x, alpha=a))) for a in _PARAMS},
    **{f"LeakyReLU({a})": (lambda a=a: nn.LeakyReLU(a)) for a in _PARAMS},
    **{f"F.leaky_relu({a})": (lambda a=a: Fn(lambda x, a=a: F.leaky_relu(x, a))) for a in _PARAMS},
    **{f"CELU({a})": (lambda a=a: nn.CELU(a)) for a in _PARAMS if a > 0},
    **{f"RReLU({lo},{lo + 0.5})": (lambda lo=lo: nn.RReLU(lo, lo + 0.5)) for lo in _PARAMS},
    **{f"PReLU({a})": (lambda a=a: nn.PReLU(init=a)) for a in _PARAMS},
    **{f"Softplus({b})": (lambda b=b: nn.Softplus(beta=b)) for b in _PARAMS if b != 0},
    **{f"Hardtanh({lo})": (lambda lo=lo: nn.Hardtanh(lo, lo + 2)) for lo in _PARAMS},
    **{f"Softshrink({a})": (lambda a=a: nn.Softshrink(a)) for a in _PARAMS if a >= 0},
    **{f"clamp({lo})": (lambda lo=lo: Fn(lambda x, lo=lo: x.clamp(lo, lo + 1))) for lo in _PARAMS},
    "GELU": nn.GELU, "GELU(tanh)": lambda: nn.GELU(approximate="tanh"), "SiLU": nn.SiLU, "Mish": nn.Mish,
    "SELU": nn.SELU, "Hardswish": nn.Hardswish, "Hardsigmoid": nn.Hardsigmoid, "Sigmoid": nn.Sigmoid,
    "Tanh": nn.Tanh, "Softsign": nn.Softsign, "Tanhshrink": nn.Tanhshrink, "LogSigmoid": nn.LogSigmoid,
    "ReLU6": nn.ReLU6,
}


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activation_factor_dominates_its_slope_over_the_parameter_range(name):
    act = ACTIVATIONS[name]().double().eval()
    try:
        bound = lipschitz_bound(act, input_shape=(1, 1)).upper
    except SturdyError:
        return  # refused: sound
    slope = _brute_slope(act)
    assert bound >= slope * (1 - 1e-4), (name, bound, slope)  # was max(1, alpha) for ELU: below |alpha|


def test_elu_with_negative_alpha_certificate_holds():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16), nn.ELU(alpha=-2.0), nn.Linear(16, 3)).eval()
    x = _data(30) * 4 - 2
    bound = lipschitz_bound(net, input_shape=(1, 16)).upper
    assert bound >= _true_constant(net, x) * (1 - SOUND_REL)


# ------------------------------------------------------------------------------------------------ stale bounds


def _step(net: nn.Module) -> None:
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3.0)


def _buffer(net: nn.Module) -> None:
    with torch.no_grad():
        net[1].running_var.mul_(0.01)


STALE = {
    "weights_changed": (lambda: _mlp(), _step),
    "another_model": (lambda: _mlp(), None),
    "buffer_changed": (lambda: nn.Sequential(nn.Linear(16, 12), nn.BatchNorm1d(12), nn.ReLU(),
                                             nn.Linear(12, 4)).eval(), _buffer),
    "hook_added": (lambda: _mlp(), lambda net: net[1].register_forward_hook(lambda m, i, o: o * 10)),
    "forward_patched": (lambda: _mlp(), PATCHES["partial"]),
}


@pytest.mark.parametrize("case", list(STALE))
def test_a_bound_for_other_weights_is_refused(case):
    make, change = STALE[case]
    net = make()
    x = _data(20)
    y = net(x).argmax(1)
    bound = lipschitz_bound(net if change is not None else _mlp(seed=7), input_shape=(1, 16))
    if change is not None:
        change(net)
    with pytest.raises(ConfigurationError, match="fingerprint"):
        certify(net, x, y, bound=bound)


def test_the_own_bound_is_accepted():
    net = _mlp()
    x = _data(20)
    y = net(x).argmax(1)
    bound = lipschitz_bound(net, input_shape=(1, 16))
    torch.testing.assert_close(certify(net, x, y, bound=bound).radius, certify(net, x, y).radius)


# ------------------------------------------------------------------------------------------------- self-check


class _Amplifier(nn.Module):
    def forward(self, x):
        return 10 * x


def test_a_lying_rule_is_caught_by_the_self_check():
    with _lying_rule(_Amplifier, 0.1):
        net = nn.Sequential(_mlp(), _Amplifier())
        x = _data(8)
        with pytest.raises(SoundnessError, match="disproved"):
            certify(net, x, net(x).argmax(1), form="global")
        certify(net, x, net(x).argmax(1), form="global", self_check=False)  # the check is what refuses


def test_a_tampered_bound_with_its_fingerprint_is_caught_by_the_self_check():
    net = _mlp()
    x = _data(8)
    bound = lipschitz_bound(net, input_shape=(1, 16))
    small = dataclasses.replace(bound, upper=bound.upper / 3, upper_body=bound.upper_body / 3)
    with pytest.raises(SoundnessError, match="disproved"):
        certify(net, x, net(x).argmax(1), bound=small)


def test_the_self_check_passes_on_tight_linear_models():
    # a single linear layer: the bound is the exact constant, the check must not refuse it for rounding
    for seed in range(5):
        torch.manual_seed(seed)
        net = nn.Linear(16, 4).eval()
        x = _data(8, seed=seed)
        certify(net, x, net(x).argmax(1), form="global")
        certify(net, x, net(x).argmax(1))


# --------------------------------------------------------------------------------------- patterns now supported


class _Patterns(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        torch.manual_seed(0)
        self.how = how
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(16, 3)

    def forward(self, x):
        h = self.a(x)
        if self.how == "float":
            h = h.float().type_as(self.b.weight)
        elif self.how == "to":
            h = h.to(torch.float64).to(dtype=self.b.weight.dtype)
        elif self.how == "type":
            h = h.type(self.b.weight.dtype)
        elif self.how == "stack":
            return self.b(torch.stack([h, 2 * h], dim=1).flatten(1))
        elif self.how == "mul_kw":
            h = torch.mul(input=h, other=3.0)
        elif self.how == "add_kw":
            h = torch.add(input=h, other=h, alpha=2.0)
        return self.b(torch.cat([h, h], dim=1))


@pytest.mark.parametrize("how", ["float", "to", "type", "stack", "mul_kw", "add_kw"])
def test_common_patterns_are_bounded(how):
    net = _Patterns(how).eval()
    bound = lipschitz_bound(net, input_shape=(1, 8)).upper
    assert bound >= exact_norm(net, (8,)) * (1 - SOUND_REL)


def test_stacking_along_the_batch_and_casting_to_integers_are_refused():
    class Stack0(nn.Module):
        def forward(self, x):
            return torch.stack([x, x]).sum(0)

    class ToInt(nn.Module):
        def forward(self, x):
            return x.to(torch.int64).float()

    for net in (Stack0(), ToInt()):
        with pytest.raises(UnsupportedModuleError):
            lipschitz_bound(net, input_shape=(1, 4))


def test_tightness_of_an_exactly_tight_linear_certificate_is_no_violation():
    # for a linear model the pairwise radius is exact: the attack meets it up to float32 rounding
    torch.manual_seed(3)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 10)).eval()
    x = _data(60)
    y = net(x).argmax(1)
    t = tightness(net, x, y, steps=20, restarts=1, bisection_steps=12)
    assert t.violations == 0
    ok = t.certified > 0
    assert float((t.certified[ok] / t.adversarial[ok]).median()) > 0.999  # the attack reaches the exact radius
