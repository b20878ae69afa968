"""Coverage: rules of the layers a researcher expects, each against a dense or brute-force reference,
clear refusals for the others, and user mistakes surfacing as SturdyErrors that name the problem."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sturdy.errors import ConfigurationError, DataError, SturdyError, UnsupportedModuleError
from sturdy.lipschitz import LipschitzTracker, certify, lipschitz_bound, operator_norm
from sturdy.models import create_model

from .lipschitz_reference import Fn, exact_norm

REL_TOL = 1e-6  # dense path vs. exact SVD
SOUND_REL = 1e-6  # structured bounds >= exact up to rounding of the reference


def _split_sum(x):
    a, b, c = torch.split(x, 2, dim=1)
    return a + b - c


def _bound(model, shape, **kw) -> float:
    return lipschitz_bound(model, input_shape=(1, *shape), **kw).upper


@pytest.mark.parametrize(
    "layer, shape",
    [
        (nn.ZeroPad2d((1, 2, 0, 1)), (2, 3, 4)),
        (nn.ConstantPad2d(1, 3.5), (2, 3, 3)),
        (Fn(lambda x: F.pad(x, (1, 1, 2, 0))), (1, 3, 4)),
        (Fn(lambda x: F.pad(x, (1, 1, 2, 0), mode="constant", value=-2.0)), (1, 3, 4)),
        (Fn(lambda x: F.pad(x, (2, 1, 1, 2), mode="reflect")), (2, 4, 5)),
        (Fn(lambda x: F.pad(x, (2, 2, 2, 2), mode="replicate")), (1, 3, 3)),
        (Fn(lambda x: F.pad(x, (1, 2, 1, 1), mode="circular")), (1, 3, 4)),
        (nn.ReflectionPad2d(1), (2, 3, 3)),
        (nn.ReplicationPad1d((3, 1)), (2, 4)),
        (Fn(lambda x: F.interpolate(x, scale_factor=2, mode="nearest")), (2, 3, 3)),
        (Fn(lambda x: F.interpolate(x, scale_factor=(3, 2), mode="nearest")), (1, 2, 3)),
        (nn.Upsample(scale_factor=2, mode="nearest"), (1, 3, 2)),
        (Fn(lambda x: x.expand(-1, 3, -1, -1)), (1, 2, 2)),
        (Fn(lambda x: x.repeat(1, 2, 3, 1)), (2, 2, 2)),
        (Fn(lambda x: torch.tile(x, (1, 1, 2))), (2, 3)),
        (Fn(lambda x: x.repeat_interleave(3, dim=1)), (2, 3)),
        (Fn(lambda x: torch.cat(x.chunk(3, dim=1), dim=1)), (6, 2)),
        (Fn(lambda x: torch.flip(x, dims=(1,)) + torch.roll(x, 1, dims=1)), (4, 2)),
        (Fn(lambda x: x[:, 1:, ::2]), (3, 5)),
        (Fn(lambda x: F.pixel_shuffle(x, 2)), (4, 2, 2)),
        (Fn(lambda x: F.unfold(x, 2)), (1, 3, 3)),
    ],
)
def test_copy_operators_exact(layer, shape):
    # padding, nearest upsampling, expanding... copy entries: the bound is sqrt(max copies), the exact norm
    exact = exact_norm(layer, shape)
    assert _bound(layer, shape) == pytest.approx(exact, rel=REL_TOL)


def test_pieces_of_a_split_compose_soundly():
    # each piece has the bound of the whole tensor: sums of pieces are sound (not tight), concatenating the
    # whole split result is the identity
    net = Fn(_split_sum)
    assert _bound(net, (6, 2)) >= exact_norm(net, (6, 2))
    assert _bound(Fn(lambda x: torch.cat(x.split(2, dim=1), dim=1)), (6, 2)) == pytest.approx(1.0)


def test_nearest_upsampling_norm_is_sqrt_of_scales():
    up = nn.Upsample(scale_factor=(2, 3), mode="nearest")
    assert _bound(up, (2, 4, 4)) == pytest.approx(math.sqrt(6), rel=1e-12)


@pytest.mark.parametrize("align", [False, True])
def test_bilinear_upsampling(align):
    up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=align)
    shape = (2, 3, 4)
    exact = exact_norm(up, shape)
    dense = operator_norm(up, input_shape=(1, *shape))
    assert dense.method == "dense-svd" and dense.upper == pytest.approx(exact, rel=REL_TOL)
    holder = operator_norm(up, input_shape=(1, *shape), dense_max_entries=0)  # large images: Hoelder (weights >= 0)
    assert holder.method == "holder" and holder.upper >= exact * (1 - SOUND_REL)
    if not align:
        assert holder.upper <= 2.0 + 1e-9  # sqrt(scale_h scale_w): each input feeds a weight of 4 in total


@pytest.mark.parametrize(
    "act, factor",
    [
        (nn.Hardtanh(-2.0, 3.0), 1.0), (nn.ReLU6(), 1.0), (Fn(lambda x: torch.clamp(x, -1, 2)), 1.0),
        (Fn(lambda x: x.clamp(min=0.5)), 1.0), (Fn(F.relu6), 1.0), (nn.Hardswish(), 1.5),
        (nn.Hardsigmoid(), 0.1667), (nn.Mish(), 1.09), (nn.SELU(), 1.7581), (nn.CELU(0.5), 1.0),
    ],
)
def test_more_activation_factors(act, factor):
    assert _bound(act, (3, 2)) == factor
    t = torch.linspace(-8, 8, 40001, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(act.double()(t.reshape(1, 1, -1)).sum(), t)
    assert float(g.abs().max()) <= factor + 1e-9


@pytest.mark.parametrize("a", [0.25, -1.5, 3.0])
def test_prelu_factor(a):
    p = nn.PReLU(num_parameters=3, init=0.1)
    with torch.no_grad():
        p.weight[1] = a
    assert _bound(p, (3, 2, 2)) == max(1.0, abs(a))


def test_max_over_a_dimension():
    net = nn.Sequential(nn.Linear(4, 6), Fn(lambda x: x.view(-1, 2, 3).max(dim=1).values), nn.Linear(3, 2))
    assert _bound(net, (4,)) == pytest.approx(
        operator_norm(net[0], input_shape=(1, 4)).upper * operator_norm(net[2], input_shape=(1, 3)).upper, rel=1e-9)
    assert _bound(Fn(lambda x: torch.amax(x, dim=(2, 3))), (2, 3, 3)) == 1.0
    assert _bound(Fn(lambda x: torch.maximum(x, x.flip(1))), (4,)) == pytest.approx(math.sqrt(2))
    with pytest.raises(UnsupportedModuleError, match="batch dimension"):
        lipschitz_bound(Fn(lambda x: x.max()), input_shape=(1, 3))
    with pytest.raises(UnsupportedModuleError, match="indices|int64"):
        lipschitz_bound(Fn(lambda x: x.max(dim=1).indices.float()), input_shape=(1, 3))


class _FunctionalConv1d(nn.Module):
    def __init__(self, conv: nn.Conv1d):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        c = self.conv
        return F.conv1d(x, c.weight, None, c.stride, c.padding, c.dilation, c.groups)


@pytest.mark.parametrize("kw", [dict(), dict(stride=2, padding=2, dilation=2), dict(groups=2, padding="same"),
                                dict(padding=1, padding_mode="reflect"), dict(padding=2, padding_mode="circular")])
def test_conv1d(kw):
    conv = nn.Conv1d(4, 6, 3, **kw)
    shape = (4, 9)
    exact = exact_norm(conv, shape)
    assert operator_norm(conv, input_shape=(1, *shape)).upper == pytest.approx(exact, rel=REL_TOL)
    structured = operator_norm(conv, input_shape=(1, *shape), dense_max_entries=0)
    assert structured.upper >= exact * (1 - SOUND_REL)
    fn = _FunctionalConv1d(conv)
    if conv.padding_mode == "zeros":
        assert _bound(fn, shape) == pytest.approx(exact, rel=REL_TOL)


@pytest.mark.parametrize("kw", [dict(kernel_size=3), dict(kernel_size=3, stride=2, padding=1, output_padding=1),
                                dict(kernel_size=4, stride=2, padding=1, groups=2), dict(kernel_size=2, stride=2),
                                dict(kernel_size=3, dilation=2, stride=3)])
def test_conv_transpose2d(kw):
    ct = nn.ConvTranspose2d(4, 6, **kw)
    shape = (4, 5, 4)
    exact = exact_norm(ct, shape)
    dense = operator_norm(ct, input_shape=(1, *shape))
    assert dense.method == "dense-svd" and dense.upper == pytest.approx(exact, rel=REL_TOL)
    assert dense.estimate <= dense.upper
    fft = operator_norm(ct, input_shape=(1, *shape), dense_max_entries=0)
    assert fft.method == "fft" and fft.upper >= exact * (1 - SOUND_REL)


def test_conv_layers_train_with_the_tracker():
    net = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(15, 4),
                        Fn(lambda x: x.view(-1, 1, 2, 2)), nn.ConvTranspose2d(1, 2, 2, stride=2), nn.Flatten(),
                        nn.Linear(32, 3))
    tracker = LipschitzTracker(net, input_shape=(1, 2, 5), warmup_iterations=200)
    est = tracker()
    est.lipschitz.backward()
    assert net[5].weight.grad is not None and net[0].weight.grad is not None
    assert float(est.lipschitz.detach()) <= lipschitz_bound(net, input_shape=(1, 2, 5)).upper * (1 + 1e-6)


def test_inplace_arithmetic_and_matmul_with_a_parameter():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(5, 4))

        def forward(self, x):
            h = x @ self.w.T  # (N, 4) -> (N, 5)
            h.mul_(3.0)
            h.add_(1.0)
            return torch.matmul(h, self.w)  # (N, 5) -> (N, 4)

    net = Net()
    exact = exact_norm(net, (4,))
    b = lipschitz_bound(net, input_shape=(1, 4))
    assert b.upper == pytest.approx(3 * float(torch.linalg.matrix_norm(net.w.detach().double(), ord=2)) ** 2, rel=1e-6)
    assert b.upper >= exact * (1 - SOUND_REL)
    assert b.upper_body is not None  # x @ W at the output is the last linear layer of the pairwise certificate


class _LeftMatmul(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4))

    def forward(self, x):
        return self.w @ x


def test_left_matmul_acts_on_rows():
    net = _LeftMatmul()
    exact = exact_norm(net, (4, 2))
    assert _bound(net, (4, 2)) == pytest.approx(exact, rel=1e-6)


@pytest.mark.parametrize("layer", [nn.LayerNorm(3), nn.GroupNorm(2, 4), nn.InstanceNorm1d(4, affine=True),
                                   Fn(lambda x: F.layer_norm(x, (3,))), Fn(lambda x: F.normalize(x, dim=1))])
def test_normalisation_layers_refused_with_reason(layer):
    with pytest.raises(UnsupportedModuleError, match="not globally Lipschitz"):
        lipschitz_bound(layer, input_shape=(1, 4, 3))


# ------------------------------------------------------------------------ mistakes as SturdyErrors


def _cnn():
    torch.manual_seed(0)
    return create_model("cnn", in_shape=(1, 8, 8), num_classes=10, channels=(4, 8), width=16).eval()


def test_three_d_input_shape_is_named():
    with pytest.raises(ConfigurationError, match="batch dimension"):
        lipschitz_bound(_cnn(), input_shape=(1, 8, 8))


def test_images_of_another_size_are_named():
    net = _cnn()
    x = torch.rand(4, 1, 16, 16)
    with pytest.raises(ConfigurationError, match=r"cannot run on inputs of shape \(1, 1, 16, 16\)"):
        certify(net, x, torch.zeros(4, dtype=torch.long))


def test_uint8_images_are_refused():
    x = (torch.rand(4, 1, 8, 8) * 255).to(torch.uint8)
    with pytest.raises(DataError, match=r"uint8.*x.float\(\) / 255"):
        certify(_cnn(), x, torch.zeros(4, dtype=torch.long))


def test_nan_images_are_refused():
    x = torch.rand(4, 1, 8, 8)
    x[1, 0, 2, 2] = float("nan")
    with pytest.raises(DataError, match="1 of 256 values are NaN"):
        certify(_cnn(), x, torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("y, match", [(torch.tensor([0, 1, 10, 2]), r"\[0, 9\]"), (torch.tensor([0, -1, 2, 3]), "9"),
                                      (torch.zeros(4), "integer class labels")])
def test_bad_labels_are_refused(y, match):
    with pytest.raises(ConfigurationError, match=match):
        certify(_cnn(), torch.rand(4, 1, 8, 8), y)


@pytest.mark.parametrize("where", ["weight", "running_var"])
def test_nan_weights_are_named(where):
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(18, 3)).eval()
    with torch.no_grad():
        if where == "weight":
            net[3].weight[0, 0] = float("nan")
        else:
            net[1].running_var[0] = float("nan")
    with pytest.raises(SturdyError, match="NaN") as info:
        lipschitz_bound(net, input_shape=(1, 1, 5, 5))
    assert ("3.weight" if where == "weight" else "0+1") in str(info.value)
