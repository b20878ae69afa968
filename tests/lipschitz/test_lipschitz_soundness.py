"""Soundness holes: rules applied by behaviour, repeated indices, broadcasting, in-place writes, randomness.

Each test reproduces a case where an earlier version returned a bound below the true Lipschitz constant
(or bounded a random model); the bound must now be >= the exact norm, or the model refused with the reason.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

from sturdy.errors import UnsupportedModuleError
from sturdy.lipschitz import certify, find_rule, lipschitz_bound
from sturdy.lipschitz.registry import rule_refusal

from .lipschitz_reference import exact_norm

SOUND_REL = 1e-6  # bound >= exact * (1 - SOUND_REL): float32 weights computed in forward vs. float64 reference


def _bound(model: nn.Module, shape) -> float:
    return lipschitz_bound(model, input_shape=(1, *shape)).upper


def _assert_sound(model: nn.Module, shape) -> float:
    exact = exact_norm(model, shape)
    bound = _bound(model, shape)
    assert bound >= exact * (1 - SOUND_REL), (bound, exact)
    return exact


# ------------------------------------------------------------------------ rules apply by behaviour


class WSConv2d(nn.Conv2d):
    """Weight-standardised convolution (NFNets/BiT): the weight used is not ``self.weight``."""

    def forward(self, x):
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        return F.conv2d(x, (w - mean) / torch.sqrt(var + 1e-5), self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


class WSConvFast(nn.Conv2d):
    """Same, through the overridden ``_conv_forward`` (``forward`` inherited)."""

    def _conv_forward(self, x, weight, bias):
        w = (weight - weight.mean(dim=(1, 2, 3), keepdim=True)) / weight.std(dim=(1, 2, 3), keepdim=True)
        return super()._conv_forward(x, w, bias)


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x, self.weight * 10, self.bias)


@pytest.mark.parametrize("cls", [WSConv2d, WSConvFast])
def test_weight_standardised_conv_is_traced(cls):
    torch.manual_seed(0)
    conv = cls(3, 8, 3, padding=1)
    assert find_rule(conv) is None and "overrides" in rule_refusal(conv)
    exact = _assert_sound(conv, (3, 6, 6))
    assert exact > 3.2  # the raw weight's norm (the old bound) is far smaller
    assert _bound(conv, (3, 6, 6)) <= exact * (1 + 1e-5)  # the actual ops are bounded: tight


def test_scaled_linear_certificate_holds():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), ScaledLinear(12, 5)).double()
    exact = _assert_sound(net, (3, 2, 2))
    torch.testing.assert_close(_bound(net, (3, 2, 2)), exact, rtol=1e-6, atol=0.0)
    # the certified radius never exceeds the exact distance to the decision boundary of this linear model
    x = torch.randn(50, 3, 2, 2, dtype=torch.float64)
    with torch.no_grad():
        logits = net(x)
    pred = logits.argmax(1)
    cert = certify(net, x, pred)
    w = 10 * net[1].weight.detach()
    for n in range(x.shape[0]):
        p = int(pred[n])
        exact_r = min(float((logits[n, p] - logits[n, i]) / (w[p] - w[i]).norm()) for i in range(5) if i != p)
        assert float(cert.radius[n]) <= exact_r * (1 + 1e-9)


def test_forward_hook_and_pre_hook_are_traced():
    torch.manual_seed(0)
    lin = nn.Linear(5, 3)
    handle = lin.register_forward_hook(lambda m, i, o: o * 10)
    assert find_rule(lin) is None
    _assert_sound(lin, (5,))
    torch.testing.assert_close(_bound(lin, (5,)), exact_norm(lin, (5,)), rtol=1e-6, atol=0.0)
    handle.remove()
    assert find_rule(lin) is not None
    inner = nn.Linear(5, 3)
    inner.register_forward_pre_hook(lambda m, args: (args[0] * 7,))
    net = nn.Sequential(nn.Linear(4, 5), inner)
    _assert_sound(net, (4,))
    conv = nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect")
    conv.register_forward_hook(lambda m, i, o: 3 * o)
    _assert_sound(conv, (2, 5, 5))


def test_hook_on_the_root_module_counts():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x)

    net = Net()
    net.register_forward_hook(lambda m, i, o: o * 5)
    _assert_sound(net, (4,))


def test_global_module_hooks_are_refused():
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: o)
    try:
        with pytest.raises(UnsupportedModuleError, match="global module hooks"):
            lipschitz_bound(nn.Linear(3, 2), input_shape=(1, 3))
    finally:
        handle.remove()
    lipschitz_bound(nn.Linear(3, 2), input_shape=(1, 3))


def test_untraceable_module_with_inapplicable_rule_is_refused_with_reason():
    bn = nn.BatchNorm2d(3)
    bn.register_forward_hook(lambda m, i, o: o * 2)  # BatchNorm's forward checks the input's rank: untraceable
    with pytest.raises(UnsupportedModuleError, match="forward hooks"):
        lipschitz_bound(nn.Sequential(nn.Conv2d(1, 3, 3), bn), input_shape=(1, 1, 5, 5))


class _Triple(nn.Module):
    def forward(self, w):
        return 3 * w


def test_parametrized_weight_is_read_through_the_module():
    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    parametrize.register_parametrization(lin, "weight", _Triple())
    assert find_rule(lin) is not None  # reads module.weight: the parametrised weight
    exact = _assert_sound(lin, (6,))
    torch.testing.assert_close(_bound(lin, (6,)), exact, rtol=1e-6, atol=0.0)
    conv = nn.Conv2d(2, 3, 3)
    parametrize.register_parametrization(conv, "weight", _Triple())
    _assert_sound(conv, (2, 5, 5))


@pytest.mark.parametrize("wrap", ["spectral", "weight", "old-spectral"])
def test_torch_reparametrisations(wrap):
    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    with torch.no_grad():
        lin.weight.mul_(5)
    if wrap == "spectral":
        lin = spectral_norm(lin)
    elif wrap == "weight":
        lin = weight_norm(lin)
        with torch.no_grad():
            lin.parametrizations.weight.original0.mul_(4)
    else:
        lin = torch.nn.utils.spectral_norm(lin)  # a forward pre-hook sets module.weight
    net = nn.Sequential(lin, nn.ReLU(), nn.Linear(4, 2))
    net.train()
    for _ in range(3):  # power iterations of spectral norm happen in training mode
        net(torch.randn(2, 6))
    net.eval()
    if wrap == "old-spectral":  # the hook's module.weight is stale until the next forward: the bound must not read it
        with torch.no_grad():
            lin.weight_orig.add_(2 * torch.randn(4, 6))
    bound = _bound(nn.Sequential(lin), (6,))
    net(torch.randn(1, 6))  # eval mode: module.weight is now the weight the layer uses
    lin_exact = float(torch.linalg.matrix_norm(lin.weight.detach().double(), ord=2))
    assert bound == pytest.approx(lin_exact, rel=1e-5)
    xs = torch.randn(6, 6, requires_grad=True)
    jac = torch.autograd.functional.jacobian(lambda t: net(t).sum(0), xs)  # (2, 6, 6): rows are independent
    local = max(float(torch.linalg.matrix_norm(jac[:, n, :], ord=2)) for n in range(6))
    assert _bound(net, (6,)) >= local * (1 - 1e-5)


# ------------------------------------------------------------------------ repeated indices


class _Repeat(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.fc = nn.Linear(4, 1, bias=False)
        with torch.no_grad():
            self.fc.weight.fill_(2.0)
        self.register_buffer("idx", torch.zeros(4, dtype=torch.long))

    def forward(self, x):
        if self.how == "list":
            h = x[:, [0, 0, 0, 0]]
        elif self.how == "tensor":
            h = x[:, self.idx]
        elif self.how == "index_select":
            h = torch.index_select(x, 1, self.idx)
        elif self.how == "gather":
            h = torch.gather(x, 1, self.idx[None])  # (a batch-1 index: bounds only)
        else:
            h = x[:, :1].expand(-1, 4)
        return self.fc(h)


@pytest.mark.parametrize("how", ["list", "tensor", "index_select", "gather", "expand"])
def test_repeated_indices_multiply_the_norm(how):
    net = _Repeat(how)
    with torch.no_grad():
        assert float(net(torch.tensor([[1.0, 0.0, 0.0]]))) == 8.0  # y = 2 * 4 * x_0: the exact constant is 8
    bound = _bound(net, (3,))
    assert bound >= 8.0 * (1 - SOUND_REL)  # was 4.0: sqrt(4) copies were ignored
    assert bound == pytest.approx(8.0, rel=1e-6)


def test_input_dependent_indices_are_refused():
    class DataIndex(nn.Module):
        def forward(self, x):
            return torch.gather(x, 1, x.argmax(1, keepdim=True))

    with pytest.raises(UnsupportedModuleError, match="argmax|input-dependent"):
        lipschitz_bound(DataIndex(), input_shape=(1, 4))


def test_indexing_the_batch_dimension_is_refused():
    class First(nn.Module):
        def forward(self, x):
            return x[[0, 0]]

    with pytest.raises(UnsupportedModuleError, match="batch dimension"):
        lipschitz_bound(First(), input_shape=(1, 4))


def test_broadcast_input_counts_its_copies():
    class Broadcast(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("c", torch.arange(15.0).reshape(1, 5, 3))

        def forward(self, x):  # x (1, 1, 3) is copied into 5 rows
            return (x + self.c) - 2 * (x * self.c)

    net = Broadcast()
    exact = _assert_sound(net, (1, 3))
    assert exact > 1.0  # the old bound treated each broadcast as norm-preserving


# ------------------------------------------------------------------------ in-place writes


def test_inplace_scaling_of_a_reused_tensor_counts():
    class Inplace(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            h = self.fc(x)
            h.mul_(10)  # fx records the call, but later uses of h refer to the fc node
            h.add_(1.0)
            return h

    net = Inplace()
    exact = _assert_sound(net, (3,))
    assert _bound(net, (3,)) == pytest.approx(exact, rel=1e-6)


def test_inplace_scaling_through_a_view_is_refused():
    class ViewInplace(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            h = self.fc(x)
            v = h.view(-1, 2, 2)
            h.mul_(10)
            return v.flatten(1)

    with pytest.raises(UnsupportedModuleError, match="in place"):
        lipschitz_bound(ViewInplace(), input_shape=(1, 4))


def test_aliased_inplace_add_is_caught_by_the_reproduction_check():
    class Alias(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            h = self.fc(x)
            y = h
            y += 10 * h  # fx records an out-of-place add; eager code also changes h
            return h + y

    with pytest.raises(UnsupportedModuleError, match="does not reproduce"):
        lipschitz_bound(Alias(), input_shape=(1, 3))


def test_inplace_contractions_and_constants_are_fine():
    class Fine(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            h = self.fc(x)
            h.add_(1.0)
            return torch.relu_(h) * 2

    _assert_sound(Fine(), (3,))


# ------------------------------------------------------------------------ randomness in eval mode


class _Noisy(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        if self.how == "dropout":
            x = F.dropout(x, 0.5)
        elif self.how == "dropout2d":
            x = F.dropout1d(x.unsqueeze(1), p=0.1, training=True).squeeze(1)
        elif self.how == "alpha":
            x = F.alpha_dropout(x, 0.2, True)
        elif self.how == "batch_norm":
            x = F.batch_norm(x, torch.zeros(4), torch.ones(4), training=True)
        elif self.how == "noise":
            x = x + 0.1 * torch.randn_like(x)
        elif self.how == "rand":
            x = x * torch.rand(4)
        return self.fc(x)


@pytest.mark.parametrize("how", ["dropout", "dropout2d", "alpha", "batch_norm", "noise", "rand"])
def test_randomness_in_eval_mode_is_refused(how):
    with pytest.raises(UnsupportedModuleError, match="random|training=self.training") as info:
        lipschitz_bound(_Noisy(how), input_shape=(1, 4))
    if how in ("dropout", "batch_norm"):
        assert "training=self.training" in str(info.value)


def test_dropout_following_the_module_mode_is_the_identity():
    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(F.dropout(x, 0.5, self.training) + F.alpha_dropout(x, 0.1, training=self.training))

    net = Fixed().train()
    b = lipschitz_bound(net, input_shape=(1, 4))
    assert net.training
    torch.testing.assert_close(b.upper, 2 * exact_norm(net.fc, (4,)), rtol=1e-6, atol=0.0)


def test_hidden_randomness_is_caught_by_behaviour():
    class Noise(nn.Module):  # a registered leaf whose rule cannot see the noise
        def forward(self, x):
            return x + torch.randn(x.shape)

    from sturdy.lipschitz import Factor, register_bound
    from sturdy.lipschitz.registry import unregister_bound

    register_bound(Noise)(lambda call: Factor(1.0))
    try:
        with pytest.raises(UnsupportedModuleError, match="random"):
            lipschitz_bound(nn.Sequential(nn.Linear(3, 3), Noise()), input_shape=(1, 3))
    finally:
        unregister_bound(Noise)


def test_dense_reference_of_gather_matches():
    # the copy-count rule is exact for a pure gather: compare with the dense matrix
    idx = torch.tensor([[2, 2, 0, 1, 2]])

    class G(nn.Module):
        def forward(self, x):
            return torch.gather(x, 1, idx)

    g = G()
    dense = torch.stack([g(torch.eye(3)[j : j + 1])[0] for j in range(3)], dim=1)  # columns: images of e_j
    exact = float(torch.linalg.matrix_norm(dense.double(), ord=2))
    assert exact == pytest.approx(math.sqrt(3))
    assert _bound(G(), (3,)) == pytest.approx(exact, rel=1e-9)
