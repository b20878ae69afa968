"""Lipschitz rules of further layers, and the operators that are refused with a reason.

* activations: clamp/hardtanh/relu6 (1), PReLU (``max(1, max|a|)``, read when the bound is computed),
  Hardswish (1.5), Hardsigmoid (1/6), Mish (1.09), SELU (1.7581), RReLU in eval mode, ... (max slope, rounded up);
* reductions: ``max``/``amax``/``min``/``amin`` over per-sample dimensions (1: each input entry lies in one
  group and ``|max a - max b| <= max |a - b|``); elementwise ``maximum``/``minimum`` of two terms compose
  like a concatenation;
* linear layers: ``Conv1d`` (as a 2-D convolution of height 1), ``ConvTranspose2d`` (the adjoint of a
  convolution on the output shape: same norm), ``x @ W`` / ``W @ x`` with ``W`` a parameter or computed from
  parameters; the functional forms alike;
* functional dropout and batch norm: identity / a per-channel scale when ``training`` is false;
* :class:`sturdy.normalize.Normalize` (``(x - mean_c) / std_c``): the per-channel scale ``1 / std_c``
  (norm ``max_c 1 / std_c``; the mean is a shift and drops out).

Refused, with the reason: randomness in eval mode (``F.dropout(x, p)`` defaults to ``training=True``:
pass ``training=self.training``; random number generators), batch statistics (``F.batch_norm(training=True)``),
LayerNorm, GroupNorm, InstanceNorm, ``F.normalize``: they divide by a statistic of the input itself, which
is not globally Lipschitz (near-constant inputs make the slope unbounded).
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from sturdy.errors import UnsupportedModuleError
from sturdy.lipschitz.operators import BatchNormOp, Conv1dOp, ConvTranspose2dOp, LinearLayerOp, ScaleOp
from sturdy.lipschitz.registry import CONCAT, Factor, OpCall, includes_batch_dim, register_bound
from sturdy.lipschitz.rules import check_batched, weight_arg
from sturdy.normalize import Normalize

__all__ = ["random_call", "HARDSWISH_MAX_SLOPE", "MISH_MAX_SLOPE", "SELU_MAX_SLOPE", "HARDSIGMOID_MAX_SLOPE"]

HARDSWISH_MAX_SLOPE = 1.5  # d/dx [x relu6(x + 3) / 6] = (2x + 3) / 6 <= 1.5 on (-3, 3)
HARDSIGMOID_MAX_SLOPE = 0.1667  # 1/6, rounded up (PyTorch's constant is float32)
MISH_MAX_SLOPE = 1.09  # max_x d/dx [x tanh(softplus(x))] = 1.0885..., rounded up
SELU_MAX_SLOPE = 1.7581  # scale * alpha = 1.75809934..., rounded up


def _unsupported(call: OpCall, why: str) -> UnsupportedModuleError:
    name = type(call.target).__name__ if isinstance(call.target, nn.Module) else getattr(
        call.target, "__name__", str(call.target))
    return UnsupportedModuleError(f"no Lipschitz bound for {name} at {call.path!r}: {why}", module=call.target,
                                  path=call.path)


# ------------------------------------------------------------------------------------------ randomness

_RANDOM_FUNCTIONS = (
    torch.rand, torch.rand_like, torch.randn, torch.randn_like, torch.randint, torch.randint_like, torch.randperm,
    torch.bernoulli, torch.multinomial, torch.normal, torch.poisson,
)
_RANDOM_METHODS = ("bernoulli", "bernoulli_", "uniform_", "normal_", "random_", "exponential_", "geometric_",
                   "cauchy_", "log_normal_", "multinomial")
# functions with a `training` switch: (position of the flag, its default, what it does when true)
_TRAINING_FLAG: Dict[Any, Tuple[int, bool, str]] = {
    F.dropout: (2, True, "random"), F.dropout1d: (2, True, "random"), F.dropout2d: (2, True, "random"),
    F.dropout3d: (2, True, "random"), F.alpha_dropout: (2, False, "random"),
    F.feature_alpha_dropout: (2, False, "random"), F.rrelu: (3, False, "random"),
    torch.dropout: (2, None, "random"), torch.alpha_dropout: (2, None, "random"),
    torch.feature_dropout: (2, None, "random"), torch.feature_alpha_dropout: (2, None, "random"),
    F.batch_norm: (5, False, "batch"), torch.rrelu: (3, False, "random"),
}


def _flag(target: Any, args: Sequence[Any], kwargs: Dict[str, Any]) -> Optional[bool]:
    pos, default, _ = _TRAINING_FLAG[target]
    if len(args) > pos:
        return bool(args[pos])
    for name in ("training", "train"):
        if name in kwargs:
            return bool(kwargs[name])
    return default


def random_call(target: Any, args: Sequence[Any], kwargs: Dict[str, Any]) -> Optional[str]:
    """Why an operator call is random (or uses batch statistics) in eval mode, or ``None``."""
    if isinstance(target, str):
        return f"Tensor.{target} draws random numbers" if target in _RANDOM_METHODS else None
    if isinstance(target, nn.Module):
        if isinstance(target, nn.RReLU) and target.training:  # pragma: no cover - traced in eval mode
            return "RReLU in training mode draws random slopes"
        return None
    try:
        if target in _RANDOM_FUNCTIONS:
            return f"{target.__name__} draws random numbers"
        if target in _TRAINING_FLAG and _flag(target, args, kwargs):
            name = getattr(target, "__name__", str(target))
            if _TRAINING_FLAG[target][2] == "batch":
                return (f"{name} is called with training=True and normalises with the statistics of the batch; pass "
                        "training=self.training (or use nn.BatchNorm)")
            return (f"{name} is called with training=True, which stays true after model.eval() (F.dropout's default "
                    "is training=True); pass training=self.training (or use the nn.Dropout module)")
    except TypeError:  # unhashable targets
        return None
    return None


@register_bound(*[f for f in _TRAINING_FLAG if f not in (F.batch_norm, F.rrelu, torch.rrelu)])
def _functional_dropout(call: OpCall) -> Factor:
    return Factor(1.0, "reshape")  # random_call refused training=True: the identity


@register_bound(F.batch_norm)
def _functional_batch_norm(call: OpCall) -> BatchNormOp:
    if len(call.dependent_args) != 1 or call.dependent_args[0] != 0:
        raise _unsupported(call, "its statistics or affine parameters depend on the input")
    mean, var = call.arg(1, "running_mean"), call.arg(2, "running_var")
    if var is None or mean is None:
        raise _unsupported(call, "batch norm without running statistics normalises with batch statistics")
    return BatchNormOp.from_live(
        var=call.live_arg(2, "running_var"),
        weight=call.live_arg(3, "weight") if call.arg(3, "weight") is not None else None,
        eps=float(call.arg(7, "eps", 1e-5)),
        in_shape=tuple(call.input_shape[1:]),  # type: ignore[index]
    )


@register_bound(Normalize)
def _normalize(call: OpCall) -> ScaleOp:
    m = call.module
    assert isinstance(m, Normalize)
    x = call.args[0]
    if call.dependent_args != (0,) or call.kwargs or len(call.args) != 1 or not isinstance(x, torch.Tensor):
        raise _unsupported(call, "it is called with other arguments than one input tensor")
    if x.dim() < 2 or not bool(torch.isfinite(m.std).all()) or bool((m.std <= 0).any()):
        raise _unsupported(call, "a standard deviation that is not positive and finite, or an input without channels")
    shape = (1, -1) + (1,) * (x.dim() - 2)
    # (x - mean) / std: the shift drops out of every difference, the division is a per-channel scale
    op = ScaleOp(lambda: m.std.reshape(shape), tuple(x.shape), tuple(call.output.shape), divide=True)
    op.kind = "normalize"
    return op


# ------------------------------------------------------------------------------------------ activations


@register_bound(torch.clamp, torch.clip, torch.clamp_min, torch.clamp_max, "clamp", "clip", "clamp_min", "clamp_max",
                "clamp_", "clip_", "clamp_min_", "clamp_max_", F.hardtanh_, F.relu_, torch.relu_,
                nn.Softshrink, F.softshrink, nn.LogSigmoid, F.logsigmoid, nn.CELU,
                F.celu, "sigmoid_")
def _clamp(call: OpCall) -> Factor:
    # every coordinate is mapped by a function of slope <= 1 (the bounds are constants: the graph refuses
    # input-dependent bounds, which have more than one input-dependent argument)
    if call.target in (F.celu, nn.CELU) or isinstance(call.target, nn.CELU):
        alpha = call.module.alpha if call.module is not None else call.arg(1, "alpha", 1.0)
        if float(alpha) <= 0:
            raise _unsupported(call, f"CELU with alpha={alpha}")
    if call.target in ("sigmoid_",):
        return Factor(0.25, "activation")
    return Factor(1.0, "activation")


@register_bound(nn.PReLU, F.prelu, torch.prelu)
def _prelu(call: OpCall) -> Factor:
    a = call.module.weight if call.module is not None else call.arg(1, "weight")
    slope = float(a.detach().abs().max()) if a.numel() else 0.0
    return Factor(max(1.0, slope), "activation")  # read now: a bound is as current as the program


@register_bound(nn.RReLU, F.rrelu, torch.rrelu)
def _rrelu(call: OpCall) -> Factor:
    if call.module is not None:
        lower, upper = call.module.lower, call.module.upper
    else:
        lower, upper = call.arg(1, "lower", 1.0 / 8), call.arg(2, "upper", 1.0 / 3)
    return Factor(max(1.0, abs(float(lower) + float(upper)) / 2), "activation")  # eval mode: slope (l + u) / 2


def _slope(value: float) -> Callable[[OpCall], Factor]:
    def rule(call: OpCall) -> Factor:
        return Factor(value, "activation")
    return rule


register_bound(nn.Hardswish, F.hardswish)(_slope(HARDSWISH_MAX_SLOPE))
register_bound(nn.Hardsigmoid, F.hardsigmoid)(_slope(HARDSIGMOID_MAX_SLOPE))
register_bound(nn.Mish, F.mish)(_slope(MISH_MAX_SLOPE))
register_bound(nn.SELU, F.selu, torch.selu)(_slope(SELU_MAX_SLOPE))


# ------------------------------------------------------------------------------------------ reductions


def _reduce_dims(call: OpCall, name: str = "dim") -> None:
    x = call.args[0]
    if not isinstance(x, torch.Tensor) or includes_batch_dim(call.arg(1, name, None), x.dim()):
        raise _unsupported(call, "a reduction over the batch dimension (or over everything) mixes samples; "
                                 "reduce per sample (dim >= 1)")


@register_bound(torch.max, torch.min, "max", "min", torch.amax, torch.amin, "amax", "amin", torch.maximum,
                torch.minimum, "maximum", "minimum", torch.fmax, torch.fmin)
def _max(call: OpCall) -> Any:
    two = len(call.args) > 1 and isinstance(call.args[1], torch.Tensor)
    if two or call.target in (torch.maximum, torch.minimum, "maximum", "minimum", torch.fmax, torch.fmin):
        # elementwise max(a, b) is 1-Lipschitz in (a, b) jointly: like a concatenation (a constant term drops out)
        if len(call.dependent_args) > 1 and call.args[0].shape != call.args[1].shape:
            raise _unsupported(call, "elementwise max of two input-dependent terms of different shapes")
        return CONCAT if len(call.dependent_args) > 1 else Factor(1.0, "max")
    _reduce_dims(call)
    return Factor(1.0, "max")


@register_bound(getattr)
def _attribute(call: OpCall) -> Factor:
    name = call.args[1] if len(call.args) > 1 else None
    if name in ("values", "T", "mT") and len(call.dependent_args) == 1:
        return Factor(1.0, "reshape")  # the values of a max/min result; a transpose
    raise _unsupported(call, f"attribute {name!r} of an input-dependent value")


# ------------------------------------------------------------------------------------------ linear layers


@register_bound(nn.Conv1d, computes=("_conv_forward",))
def _conv1d(call: OpCall) -> Conv1dOp:
    m = call.module
    assert m is not None
    check_batched(call, 3)
    if m.padding_mode not in ("zeros", "reflect", "replicate", "circular"):
        raise _unsupported(call, f"padding_mode {m.padding_mode!r}")
    return Conv1dOp(lambda: m.weight, in_shape=tuple(call.input_shape[1:]),  # type: ignore[index]
                    stride=m.stride[0], padding=m.padding if isinstance(m.padding, str) else m.padding[0],
                    dilation=m.dilation[0], groups=m.groups, padding_mode=m.padding_mode)


@register_bound(F.conv1d, torch.conv1d)
def _functional_conv1d(call: OpCall) -> Conv1dOp:
    check_batched(call, 3)
    return Conv1dOp(weight_arg(call, 1, "weight"), in_shape=tuple(call.input_shape[1:]),  # type: ignore[index]
                    stride=_one(call.arg(3, "stride", 1)), padding=_one(call.arg(4, "padding", 0)),
                    dilation=_one(call.arg(5, "dilation", 1)), groups=call.arg(6, "groups", 1))


def _one(v: Any) -> Any:
    return v[0] if isinstance(v, (tuple, list)) else v


@register_bound(nn.ConvTranspose2d, computes=("_output_padding",))
def _conv_transpose2d(call: OpCall) -> ConvTranspose2dOp:
    m = call.module
    assert m is not None
    check_batched(call, 4)
    if call.args[1:] or call.kwargs:
        raise _unsupported(call, "an explicit output_size argument")
    return ConvTranspose2dOp(lambda: m.weight, in_shape=tuple(call.input_shape[1:]),  # type: ignore[index]
                             out_shape=tuple(call.output.shape[1:]), stride=m.stride, padding=m.padding,
                             output_padding=m.output_padding, dilation=m.dilation, groups=m.groups)


@register_bound(F.conv_transpose2d, torch.conv_transpose2d)
def _functional_conv_transpose2d(call: OpCall) -> ConvTranspose2dOp:
    check_batched(call, 4)
    return ConvTranspose2dOp(weight_arg(call, 1, "weight"), in_shape=tuple(call.input_shape[1:]),  # type: ignore
                             out_shape=tuple(call.output.shape[1:]), stride=call.arg(3, "stride", 1),
                             padding=call.arg(4, "padding", 0), output_padding=call.arg(5, "output_padding", 0),
                             groups=call.arg(6, "groups", 1), dilation=call.arg(7, "dilation", 1))


@register_bound(torch.matmul, "matmul", operator.matmul, torch.mm, "mm")
def _matmul(call: OpCall) -> LinearLayerOp:
    if len(call.dependent_args) != 1:
        raise _unsupported(call, "a product of two input-dependent tensors is not Lipschitz")
    right = call.dependent_args[0] == 0  # x @ W
    index = 1 if right else 0
    w = call.args[index]
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise _unsupported(call, "only products with a 2-D weight matrix are supported")
    x = call.args[call.dependent_args[0]]
    if not right and x.dim() < 3:
        raise _unsupported(call, "W @ x must act on dimension -2 of a batched input (batch, n, k)")
    live = weight_arg(call, index, "other")
    # x @ W applies W^T to the last dimension of every row, W @ x applies W to dimension -2: both are block
    # diagonal with the same matrix, so their norm is ||W||
    return LinearLayerOp((lambda: live().T) if right else live)


# ------------------------------------------------------------------------------------------ refused


def _refuse(reason: str) -> Callable[[OpCall], Any]:
    def rule(call: OpCall) -> Any:
        raise _unsupported(call, reason)
    return rule


_NOT_LIPSCHITZ = (
    "it divides by a statistic of its own input (standard deviation or norm), which is not globally Lipschitz: the "
    "slope is unbounded near constant inputs; use BatchNorm (eval mode: a fixed affine map) or no normalisation"
)
register_bound(nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
               nn.LocalResponseNorm, F.layer_norm, F.group_norm, F.instance_norm, F.local_response_norm, F.normalize,
               nn.RMSNorm, F.rms_norm)(_refuse(_NOT_LIPSCHITZ))
