"""Operator norms against dense-matrix SVD, registry and per-operator rules."""

from __future__ import annotations

import math
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sturdy.errors import ConfigurationError, UnsupportedModuleError
from sturdy.lipschitz import (
    Factor,
    conv2d_fft_norm,
    find_rule,
    lipschitz_bound,
    operator_norm,
    register_bound,
)
from sturdy.lipschitz.registry import unregister_bound
from sturdy.lipschitz.rules import GELU_MAX_SLOPE

from .lipschitz_reference import exact_norm, randomize_batchnorm

REL_TOL = 1e-6  # dense path vs. exact SVD (the safety factor is 1e-9)
SOUND_SLACK = 1e-9  # structured bounds must be >= exact norm up to float64 rounding of the reference

CONV_CASES = [
    # (c_in, c_out, k, stride, padding, dilation, groups, H, W)
    (1, 3, 3, 1, 1, 1, 1, 5, 5),
    (2, 4, 3, 2, 1, 1, 2, 7, 6),
    (3, 2, 2, 1, 0, 1, 1, 5, 7),
    (4, 4, 3, 1, 2, 2, 4, 6, 5),
    (2, 3, 5, 3, 2, 1, 1, 9, 8),
    (2, 2, 1, 2, 0, 1, 1, 5, 5),
    (3, 6, 3, 1, "same", 1, 3, 5, 6),
    (2, 2, 4, 1, "same", 1, 1, 6, 5),
    (3, 4, 3, 2, 1, 2, 1, 9, 7),
    (2, 4, 4, 2, 3, 1, 2, 7, 9),
    (1, 2, 3, 3, 0, 1, 1, 10, 8),
]


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_norm_dense_exact_and_fft_sound(case):
    c_in, c_out, k, s, p, d, g, h, w = case
    conv = nn.Conv2d(c_in, c_out, k, stride=s, padding=p, dilation=d, groups=g)
    shape = (1, c_in, h, w)
    exact = exact_norm(conv, shape[1:])
    dense = operator_norm(conv, input_shape=shape)
    assert dense.method == "dense-svd"
    torch.testing.assert_close(dense.upper, exact, rtol=REL_TOL, atol=0.0)
    assert dense.upper >= exact
    assert dense.estimate <= dense.upper
    fft = operator_norm(conv, input_shape=shape, dense_max_entries=0)
    assert fft.method == "fft"
    assert fft.upper >= exact * (1 - SOUND_SLACK)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_conv_non_zero_padding_modes_sound(mode):
    conv = nn.Conv2d(2, 3, 3, padding=1, padding_mode=mode)
    shape = (1, 2, 6, 5)
    exact = exact_norm(conv, shape[1:])
    torch.testing.assert_close(operator_norm(conv, input_shape=shape).upper, exact, rtol=REL_TOL, atol=0.0)
    structured = operator_norm(conv, input_shape=shape, dense_max_entries=0)
    assert structured.method == ("fft-circulant" if mode == "circular" else "fft+pad")
    assert structured.upper >= exact * (1 - SOUND_SLACK)


def test_fft_bound_is_exact_for_stride1_circular_size():
    # for a 1x1 kernel the zero-padded conv is exactly the channel-mixing matrix at every pixel
    conv = nn.Conv2d(3, 4, 1, bias=False)
    w = conv.weight.detach().double()
    exact = float(torch.linalg.matrix_norm(w[:, :, 0, 0], ord=2))
    got = conv2d_fft_norm(w, input_hw=(5, 5), pads=(0, 0, 0, 0))
    torch.testing.assert_close(got, exact, rtol=REL_TOL, atol=0.0)


@pytest.mark.parametrize("stride", [2, 3])
def test_fft_bound_exact_for_non_overlapping_strided_patches(stride):
    # kernel == stride, no padding: each output pixel applies the same matrix to its own input patch, so the
    # norm is that matrix's norm; the polyphase FFT bound must find it exactly
    conv = nn.Conv2d(2, 5, stride, stride=stride, bias=False)
    w = conv.weight.detach().double()
    exact = float(torch.linalg.matrix_norm(w.reshape(5, -1), ord=2))
    got = conv2d_fft_norm(w, input_hw=(2 * stride, 3 * stride), pads=(0, 0, 0, 0), stride=(stride, stride))
    torch.testing.assert_close(got, exact, rtol=REL_TOL, atol=0.0)
    torch.testing.assert_close(exact_norm(conv, (2, 2 * stride, 3 * stride)), exact, rtol=REL_TOL, atol=0.0)


@pytest.mark.parametrize("features", [(5, 3), (17, 11)])
def test_linear_norm(features):
    lin = nn.Linear(*features)
    exact = exact_norm(lin, (features[0],))
    got = operator_norm(lin, input_shape=(1, features[0]))
    torch.testing.assert_close(got.upper, exact, rtol=REL_TOL, atol=0.0)
    assert got.upper >= exact


@pytest.mark.parametrize(
    "pool, shape",
    [
        (nn.AvgPool2d(2), (1, 2, 6, 6)),
        (nn.AvgPool2d(3, stride=2, padding=1), (1, 2, 7, 5)),
        (nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False), (1, 1, 5, 6)),
        (nn.AvgPool2d(2, ceil_mode=True), (1, 1, 5, 5)),
        (nn.AdaptiveAvgPool2d(1), (1, 3, 4, 5)),
        (nn.AdaptiveAvgPool2d((2, 3)), (1, 2, 5, 7)),
    ],
)
def test_avgpool_norm(pool, shape):
    exact = exact_norm(pool, shape[1:])
    dense = operator_norm(pool, input_shape=shape)
    torch.testing.assert_close(dense.upper, exact, rtol=REL_TOL, atol=0.0)
    holder = operator_norm(pool, input_shape=shape, dense_max_entries=0)
    assert holder.method == "holder"
    assert holder.upper >= exact * (1 - SOUND_SLACK)


@pytest.mark.parametrize("stride, padding", [(1, 1), (2, 1), (1, 0)])
def test_conv_bn_folded_is_exact_and_tighter(stride, padding):
    block = randomize_batchnorm(nn.Sequential(nn.Conv2d(2, 3, 3, stride=stride, padding=padding), nn.BatchNorm2d(3)))
    shape = (1, 2, 6, 7)
    exact = exact_norm(block, shape[1:])
    folded = operator_norm(block, input_shape=shape)
    torch.testing.assert_close(folded.upper, exact, rtol=REL_TOL, atol=0.0)
    product = operator_norm(block[0], input_shape=shape).upper * float(
        (block[1].weight.detach().abs() / torch.sqrt(block[1].running_var + block[1].eps)).max()
    )
    assert folded.upper <= product * (1 + REL_TOL)
    fft = operator_norm(block, input_shape=shape, dense_max_entries=0)
    assert fft.upper >= exact * (1 - SOUND_SLACK)


def test_linear_bn1d_folded():
    block = randomize_batchnorm(nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4)))
    exact = exact_norm(block, (6,))
    torch.testing.assert_close(operator_norm(block, input_shape=(1, 6)).upper, exact, rtol=REL_TOL, atol=0.0)


def test_standalone_batchnorm_closed_form():
    bn = randomize_batchnorm(nn.BatchNorm2d(3))
    exact = exact_norm(bn, (3, 2, 2))
    got = operator_norm(bn, input_shape=(1, 3, 2, 2))
    assert got.method == "closed-form"
    torch.testing.assert_close(got.upper, exact, rtol=REL_TOL, atol=0.0)


def test_operator_norm_rejects_non_linear_modules():
    with pytest.raises(ConfigurationError, match="exactly one linear operator"):
        operator_norm(nn.Sequential(nn.Linear(3, 3), nn.ReLU()), input_shape=(1, 3))


@pytest.mark.parametrize(
    "pool, h, w, expected_windows",
    [
        (nn.MaxPool2d(2), 6, 6, 1),
        (nn.MaxPool2d(3, stride=1), 7, 7, 9),
        (nn.MaxPool2d(3, stride=2, padding=1), 7, 7, 4),
        (nn.MaxPool2d(3, stride=1), 3, 5, 3),  # one window along H
        (nn.MaxPool2d(2, stride=1, dilation=2), 6, 6, 4),
    ],
)
def test_maxpool_window_count(pool, h, w, expected_windows):
    b = lipschitz_bound(pool, input_shape=(1, 1, h, w))
    torch.testing.assert_close(b.upper, math.sqrt(expected_windows), rtol=REL_TOL, atol=0.0)
    # brute force: the coverage count is the max over elements of the number of windows using it
    idx = torch.arange(h * w, dtype=torch.float64).reshape(1, 1, h, w)
    _, arg = F.max_pool2d(torch.zeros(1, 1, h, w), pool.kernel_size, pool.stride, pool.padding, pool.dilation,
                          return_indices=True)
    del idx, arg  # indices show only the winners; the count below uses the window geometry instead
    unfold = F.unfold(torch.arange(1.0, h * w + 1).reshape(1, 1, h, w), pool.kernel_size, dilation=pool.dilation,
                      padding=pool.padding, stride=pool.stride)
    counts = torch.bincount(unfold.flatten().long(), minlength=h * w + 1)[1:]
    assert int(counts.max()) == expected_windows


@pytest.mark.parametrize(
    "act, factor",
    [
        (nn.ReLU(), 1.0), (nn.LeakyReLU(0.3), 1.0), (nn.LeakyReLU(2.0), 2.0), (nn.Tanh(), 1.0),
        (nn.Sigmoid(), 0.25), (nn.GELU(), GELU_MAX_SLOPE), (nn.ELU(0.5), 1.0), (nn.ELU(2.0), 2.0),
        (nn.Softplus(beta=3.0), 1.0), (nn.Dropout(0.5), 1.0), (nn.Identity(), 1.0), (nn.Flatten(), 1.0),
    ],
)
def test_activation_factors_bound_max_slope(act, factor):
    b = lipschitz_bound(act, input_shape=(1, 3, 2, 2))
    torch.testing.assert_close(b.upper, factor, rtol=0.0, atol=0.0)
    # the factor is at least the largest slope on a fine grid
    t = torch.linspace(-8, 8, 20001, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(act.double().eval()(t.reshape(1, 1, -1)).sum(), t)
    assert float(g.abs().max()) <= factor + 1e-9


class _Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 2 * 2 + 4, 3)

    def forward(self, x):
        h = F.relu(self.conv(x))
        h = torch.relu(self.conv2(h)) + h
        a = F.avg_pool2d(h, 2)
        m = h.mean((2, 3))
        z = torch.cat([torch.flatten(a, 1), m], dim=1)
        return self.fc(z.view(z.size(0), -1))


class _Modules(nn.Module):
    def __init__(self, src: _Functional) -> None:
        super().__init__()
        self.conv, self.conv2, self.fc = src.conv, src.conv2, src.fc
        self.relu, self.pool, self.gap, self.flat = nn.ReLU(), nn.AvgPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten()

    def forward(self, x):
        h = self.relu(self.conv(x))
        h = self.relu(self.conv2(h)) + h
        z = torch.cat([self.flat(self.pool(h)), self.flat(self.gap(h))], dim=1)
        return self.fc(z)


def test_functional_and_module_forms_agree():
    f = _Functional()
    m = _Modules(f)
    x = torch.rand(3, 1, 4, 4)
    torch.testing.assert_close(f(x), m(x))
    bf = lipschitz_bound(f, input_shape=(1, 1, 4, 4))
    bm = lipschitz_bound(m, input_shape=(1, 1, 4, 4))
    torch.testing.assert_close(bf.upper, bm.upper, rtol=REL_TOL, atol=0.0)
    torch.testing.assert_close(bf.upper_body, bm.upper_body, rtol=REL_TOL, atol=0.0)
    # residual sum and concatenation compose as documented
    c1 = operator_norm(f.conv, input_shape=(1, 1, 4, 4)).upper
    c2 = operator_norm(f.conv2, input_shape=(1, 4, 4, 4)).upper
    h = c1 * (1 + c2)
    pool = operator_norm(nn.AvgPool2d(2), input_shape=(1, 4, 4, 4)).upper
    gap = operator_norm(nn.AdaptiveAvgPool2d(1), input_shape=(1, 4, 4, 4)).upper
    body = math.sqrt((h * pool) ** 2 + (h * gap) ** 2)
    torch.testing.assert_close(bf.upper_body, body, rtol=REL_TOL, atol=0.0)


class _Odd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 4), nn.Softmax(dim=1))
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.body(x))


def test_unsupported_module_names_module_and_path():
    with pytest.raises(UnsupportedModuleError, match=r"Softmax at 'body\.1'") as info:
        lipschitz_bound(_Odd(), input_shape=(1, 4))
    assert info.value.path == "body.1"
    assert isinstance(info.value.module, nn.Softmax)


class _Square(nn.Module):
    def forward(self, x):
        return x * x


def test_products_of_input_dependent_values_are_unsupported():
    with pytest.raises(UnsupportedModuleError, match="more than one|2 arguments"):
        lipschitz_bound(_Square(), input_shape=(1, 3))


def test_untraceable_model_raises():
    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(UnsupportedModuleError, match="cannot trace Branchy"):
        lipschitz_bound(Branchy(), input_shape=(1, 3))


def test_input_shape_validated():
    with pytest.raises(ConfigurationError, match="including the batch dimension"):
        lipschitz_bound(nn.Linear(3, 2), input_shape=(3,))


def test_register_bound_extends_registry():
    class Clip(nn.Module):  # sin has no registered rule: the module needs one
        def forward(self, x):
            return torch.sin(x)

    net = nn.Sequential(nn.Linear(2, 2), Clip())
    try:
        with pytest.raises(UnsupportedModuleError, match="sin"):
            lipschitz_bound(net, input_shape=(1, 2))

        @register_bound(Clip)
        def _clip(call):
            return Factor(1.0)

        assert find_rule(Clip()) is _clip
        b = lipschitz_bound(net, input_shape=(1, 2))
        torch.testing.assert_close(b.upper, operator_norm(net[0], input_shape=(1, 2)).upper, rtol=REL_TOL, atol=0.0)
    finally:
        unregister_bound(Clip)


def test_scalar_multiplication_and_division():
    class Scaled(nn.Module):
        def forward(self, x):
            return operator.truediv(2.5 * x, 0.5)

    torch.testing.assert_close(lipschitz_bound(Scaled(), input_shape=(1, 3)).upper, 5.0)
