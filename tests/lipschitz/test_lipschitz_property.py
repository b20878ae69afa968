"""Property-based soundness: random compositions of every supported operator (hypothesis), and the same
compositions with a defect a user's code brings (a forward replaced on the instance, a batch-dependent forward,
a mismatched input shape, a stale bound): each must be refused or certified soundly.

Linear compositions are checked against the exact dense Jacobian norm, ReLU-family compositions against
local Jacobian norms at random points and a gradient-ascent attack on the difference quotient. A light
run is part of the normal suite; the ``slow`` one draws many more models. Grow the operator lists with
every new rule.
"""

from __future__ import annotations

import functools
import types
from typing import Callable, Dict, List, Tuple

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from sturdy.errors import SturdyError
from sturdy.lipschitz import certify, lipschitz_bound

from .lipschitz_reference import adversarial_lipschitz, exact_norm, jacobian_norms, randomize_batchnorm

SOUND_REL = 1e-6  # bound >= exact * (1 - SOUND_REL) (float64 reference of the same float32 weights)
LOCAL_REL = 1e-6  # local Jacobian norms and attack quotients are lower bounds of L
MAX_SIDE = 8  # spatial size cap, keeps dense references small

Shape = Tuple[int, int, int]


class Composite(nn.Module):
    """A chain of operators given as ``(kind, module or None, extra)`` entries; ``forward`` dispatches on kind."""

    def __init__(self, in_shape: Shape, seed: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList()
        self.kinds: List[str] = []
        self.extra: List[Dict] = []
        self.shape = in_shape
        self.gen = torch.Generator().manual_seed(seed)

    def add(self, kind: str, module: nn.Module = None, **extra) -> None:
        self.layers.append(module if module is not None else nn.Identity())
        self.kinds.append(kind)
        self.extra.append(extra)
        with torch.no_grad():
            self.shape = tuple(self._step(len(self.kinds) - 1, torch.zeros(1, *self.shape)).shape[1:])

    def _step(self, i: int, x: torch.Tensor) -> torch.Tensor:
        kind, m, e = self.kinds[i], self.layers[i], self.extra[i]
        if kind == "module":
            return m(x)
        if kind == "residual":
            return x + m(x)
        if kind == "concat":
            return torch.cat([x, m(x)], dim=1)
        if kind == "maximum":
            return torch.maximum(x, m(x))
        if kind == "pad":
            return F.pad(x, e["pads"], mode=e["mode"], **({"value": e["value"]} if e["mode"] == "constant" else {}))
        if kind == "index":
            return x[:, e["idx"]]
        if kind == "index_select":
            return torch.index_select(x, 2, e["idx_t"])
        if kind == "expand":
            return x[:, :1].expand(-1, e["copies"], -1, -1)
        if kind == "repeat":
            return x.repeat(1, 1, e["copies"], 1)
        if kind == "flip":
            return torch.flip(x, dims=(2, 3))
        if kind == "roll":
            return torch.roll(x, shifts=1, dims=3)
        if kind == "transpose":
            return x.transpose(2, 3)
        if kind == "scale":
            return x * e["c"]
        if kind == "mul_const":
            return 1.7 * x - 0.5
        if kind == "chunk_sum":
            a, b = x.chunk(2, dim=1)
            return a + b
        if kind == "upsample":
            return F.interpolate(x, scale_factor=2, mode=e["mode"], **e.get("kw", {}))
        if kind == "amax":
            return x.amax(dim=1, keepdim=True)
        if kind == "clamp":
            return torch.clamp(x, -0.5, 0.7)
        if kind == "inplace":
            y = x * 1.0
            y.mul_(2.0)
            return y.add_(0.3)
        raise AssertionError(kind)

    def forward(self, x):
        for i in range(len(self.kinds)):
            x = self._step(i, x)
        return x


def _rand_channels(model: Composite, k: int) -> int:
    return int(torch.randint(1, k + 1, (1,), generator=model.gen))


def _conv(model: Composite, c_in: int, c_out: int, **kw) -> nn.Conv2d:
    conv = nn.Conv2d(c_in, c_out, **kw)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=model.gen) / 2)
    return conv


def _linear_op(model: Composite, name: str) -> None:
    c, h, w = model.shape
    g = model.gen
    if name == "conv":
        mode = ["zeros", "reflect", "replicate", "circular"][int(torch.randint(0, 4, (1,), generator=g))]
        stride = 1 + int(torch.randint(0, 2, (1,), generator=g)) if min(h, w) > 3 else 1
        model.add("module", _conv(model, c, _rand_channels(model, 3), kernel_size=3, padding=1, stride=stride,
                                  padding_mode=mode))
    elif name == "conv1x1":
        model.add("module", _conv(model, c, _rand_channels(model, 3), kernel_size=1))
    elif name == "conv_transpose" and max(h, w) <= MAX_SIDE // 2:
        ct = nn.ConvTranspose2d(c, _rand_channels(model, 2), 2 + int(torch.randint(0, 2, (1,), generator=g)),
                                stride=2, padding=0)
        model.add("module", ct)
    elif name == "conv1d":
        model.add("module", nn.Sequential(nn.Flatten(2), nn.Conv1d(c, c, 3, padding=1), nn.Unflatten(2, (h, w))))
    elif name == "avgpool" and min(h, w) >= 2:
        model.add("module", nn.AvgPool2d(2))
    elif name == "pad" and max(h, w) <= MAX_SIDE - 2:
        mode = ["constant", "reflect", "replicate", "circular"][int(torch.randint(0, 4, (1,), generator=g))]
        model.add("pad", pads=(1, 1, 1, 0), mode=mode, value=0.5)
    elif name == "zeropad" and max(h, w) <= MAX_SIDE - 2:
        model.add("module", nn.ZeroPad2d((0, 1, 2, 0)))
    elif name == "upsample" and max(h, w) <= MAX_SIDE // 2:
        mode = ["nearest", "bilinear"][int(torch.randint(0, 2, (1,), generator=g))]
        model.add("upsample", mode=mode, kw={"align_corners": False} if mode == "bilinear" else {})
    elif name == "index":
        idx = torch.randint(0, c, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g).tolist()
        model.add("index", idx=idx)
    elif name == "index_select":
        model.add("index_select", idx_t=torch.randint(0, h, (h,), generator=g))
    elif name == "expand":
        model.add("expand", copies=1 + int(torch.randint(0, 3, (1,), generator=g)))
    elif name == "repeat" and h <= MAX_SIDE // 2:
        model.add("repeat", copies=2)
    elif name in ("flip", "roll", "transpose", "mul_const", "inplace"):
        model.add(name)
    elif name == "scale":
        model.add("scale", c=torch.randn(1, c, 1, 1, generator=g) * 2)
    elif name == "chunk_sum" and c % 2 == 0:
        model.add("chunk_sum")
    elif name == "residual":
        model.add("residual", _conv(model, c, c, kernel_size=3, padding=1))
    elif name == "concat":
        model.add("concat", _conv(model, c, 1, kernel_size=1))
    elif name == "batchnorm":
        model.add("module", randomize_batchnorm(nn.BatchNorm2d(c), seed=int(torch.randint(0, 99, (1,), generator=g))))
    else:
        model.add("module", nn.Identity())


_ACTIVATIONS: Dict[str, Callable[[Composite], None]] = {
    "relu": lambda m: m.add("module", nn.ReLU()),
    "leaky": lambda m: m.add("module", nn.LeakyReLU(0.2)),
    "prelu": lambda m: m.add("module", nn.PReLU(init=-1.5)),
    "hardswish": lambda m: m.add("module", nn.Hardswish()),
    "relu6": lambda m: m.add("module", nn.ReLU6()),
    "clamp": lambda m: m.add("clamp"),
    "tanh": lambda m: m.add("module", nn.Tanh()),
    "maxpool": lambda m: m.add("module", nn.MaxPool2d(2, stride=1)) if min(m.shape[1:]) >= 2 else None,
    "amax": lambda m: m.add("amax"),
    "maximum": lambda m: m.add("maximum", _conv(m, m.shape[0], m.shape[0], kernel_size=1)),
    # parameters over their whole valid range, negative included
    "elu_neg": lambda m: m.add("module", nn.ELU(alpha=-1.6)),
    "elu_big": lambda m: m.add("module", nn.ELU(alpha=2.5)),
    "leaky_neg": lambda m: m.add("module", nn.LeakyReLU(-1.4)),
    "rrelu_neg": lambda m: m.add("module", nn.RReLU(-2.0, -1.0)),
    "softplus_neg": lambda m: m.add("module", nn.Softplus(beta=-1.5)),
    "celu": lambda m: m.add("module", nn.CELU(0.4)),
}
LINEAR_OPS = ["conv", "conv1x1", "conv_transpose", "conv1d", "avgpool", "pad", "zeropad", "upsample", "index",
              "index_select", "expand", "repeat", "flip", "roll", "transpose", "mul_const", "inplace", "scale",
              "chunk_sum", "residual", "concat", "batchnorm"]


def build(in_shape: Shape, names: List[str], seed: int) -> Composite:
    torch.manual_seed(seed)
    model = Composite(in_shape, seed)
    for name in names:
        if name in _ACTIVATIONS:
            _ACTIVATIONS[name](model)
        else:
            _linear_op(model, name)
    model.add("module", nn.Flatten())
    head = nn.Linear(model.shape[0], 3)
    model.add("module", head)
    return model.eval()


_shapes = st.tuples(st.integers(1, 3), st.integers(3, 6), st.integers(3, 6))
_linear_chain = st.lists(st.sampled_from(LINEAR_OPS), min_size=1, max_size=4)
_relu_chain = st.lists(st.sampled_from(LINEAR_OPS + list(_ACTIVATIONS)), min_size=2, max_size=5)
_settings = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def _check_linear(shape: Shape, names: List[str], seed: int) -> None:
    model = build(shape, names, seed)
    bound = lipschitz_bound(model, input_shape=(1, *shape)).upper
    exact = exact_norm(model, shape)
    assert bound >= exact * (1 - SOUND_REL), (names, bound, exact)


def _check_nonlinear(shape: Shape, names: List[str], seed: int, steps: int) -> None:
    model = build(shape, names, seed)
    bound = lipschitz_bound(model, input_shape=(1, *shape)).upper
    xs = torch.randn(4, *shape, generator=torch.Generator().manual_seed(seed))
    local = float(jacobian_norms(model, xs).max())
    attack = adversarial_lipschitz(model, shape, starts=4, steps=steps, seed=seed)
    assert bound >= local * (1 - LOCAL_REL), (names, bound, local)
    assert bound >= attack * (1 - LOCAL_REL), (names, bound, attack)


@settings(max_examples=12, **_settings)
@given(shape=_shapes, names=_linear_chain, seed=st.integers(0, 2**16))
def test_linear_compositions_bounded_by_exact_norm(shape, names, seed):
    _check_linear(shape, names, seed)


@settings(max_examples=6, **_settings)
@given(shape=_shapes, names=_relu_chain, seed=st.integers(0, 2**16))
def test_relu_compositions_dominate_local_and_attack(shape, names, seed):
    _check_nonlinear(shape, names, seed, steps=15)


@pytest.mark.slow
@settings(max_examples=300, **_settings)
@given(shape=_shapes, names=_linear_chain, seed=st.integers(0, 2**16))
def test_linear_compositions_bounded_by_exact_norm_slow(shape, names, seed):
    _check_linear(shape, names, seed)


@pytest.mark.slow
@settings(max_examples=150, **_settings)
@given(shape=_shapes, names=_relu_chain, seed=st.integers(0, 2**16))
def test_relu_compositions_dominate_local_and_attack_slow(shape, names, seed):
    _check_nonlinear(shape, names, seed, steps=60)


@pytest.mark.parametrize("name", LINEAR_OPS)
def test_every_linear_operator_alone(name):
    # each operator at least once in the normal suite, whatever hypothesis draws
    _check_linear((2, 4, 4), [name, name], seed=LINEAR_OPS.index(name))


@pytest.mark.parametrize("name", list(_ACTIVATIONS))
def test_every_activation_alone(name):
    _check_nonlinear((2, 4, 4), ["conv", name, "conv1x1"], seed=3, steps=10)


# ------------------------------------------------------------------------------------ defects of users' code


def _tenfold(self, x, factor):
    return type(self).forward(self, x) * factor


def _patch(model: Composite, seed: int, how: str) -> None:
    g = torch.Generator().manual_seed(seed)
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.ReLU, nn.BatchNorm2d))]
    target = layers[int(torch.randint(0, len(layers), (1,), generator=g))]
    factor = float(torch.empty(1).uniform_(0.2, 10.0, generator=g))
    if how == "partial":
        target.forward = functools.partial(_tenfold, target, factor=factor)
    else:
        target.forward = types.MethodType(lambda self, x: _tenfold(self, x, factor), target)


class _BatchDependent(nn.Module):
    def __init__(self, body: nn.Module, how: str):
        super().__init__()
        self.body, self.how = body, how

    def forward(self, x):
        if self.how == "center":
            return self.body(x - x.mean(dim=-4, keepdim=True))
        return self.body(x) * x.shape[0]


DEFECTS = ["patch_partial", "patch_method", "batch_center", "batch_scale", "shape_mismatch", "stale_weights",
           "stale_model"]


def _check_defect(shape: Shape, names: List[str], seed: int, defect: str) -> None:
    model = build(shape, names, seed)
    x = torch.randn(6, *shape, generator=torch.Generator().manual_seed(seed))
    y = model(x).argmax(1)
    kwargs: Dict = {"form": "global"}
    must_refuse = defect not in ("patch_partial", "patch_method")
    if defect.startswith("patch"):
        _patch(model, seed, defect.split("_")[1])
    elif defect.startswith("batch"):
        model = _BatchDependent(model, defect.split("_")[1]).eval()
    elif defect == "shape_mismatch":
        kwargs["input_shape"] = (1, shape[0], shape[1] + 1, shape[2])
    else:
        other = build(shape, names, seed + 1) if defect == "stale_model" else model
        kwargs["bound"] = lipschitz_bound(other, input_shape=(1, *shape))
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.5)
    try:
        cert = certify(model, x, y, **kwargs)
    except SturdyError:
        return  # refused: sound
    assert not must_refuse, (defect, names)
    bound = cert.bound.upper
    local = float(jacobian_norms(model, x).max())
    attack = adversarial_lipschitz(model, shape, starts=4, steps=15, seed=seed)
    assert bound >= local * (1 - LOCAL_REL), (defect, names, bound, local)
    assert bound >= attack * (1 - LOCAL_REL), (defect, names, bound, attack)


@settings(max_examples=10, **_settings)
@given(shape=_shapes, names=_relu_chain, seed=st.integers(0, 2**16), defect=st.sampled_from(DEFECTS))
def test_defects_of_users_code_are_refused_or_sound(shape, names, seed, defect):
    _check_defect(shape, names, seed, defect)


@pytest.mark.slow
@settings(max_examples=200, **_settings)
@given(shape=_shapes, names=_relu_chain, seed=st.integers(0, 2**16), defect=st.sampled_from(DEFECTS))
def test_defects_of_users_code_are_refused_or_sound_slow(shape, names, seed, defect):
    _check_defect(shape, names, seed, defect)


@pytest.mark.parametrize("defect", DEFECTS)
def test_every_defect_alone(defect):
    _check_defect((2, 4, 4), ["conv", "relu", "conv1x1"], seed=DEFECTS.index(defect), defect=defect)
