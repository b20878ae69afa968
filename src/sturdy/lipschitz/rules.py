"""Per-operator Lipschitz rules of the common layers (the registry itself is :mod:`.registry`).

Every operator of a traced model is looked up in the registry, keyed by module class (``nn.Conv2d``),
function (``F.relu``, ``torch.flatten``, ``operator.add``) or tensor-method name (``"view"``), and
its rule returns one of:

* :class:`Factor`: a constant L2 Lipschitz factor with respect to the operator's tensor input
  (activations, max pooling, reshapes);
* a :class:`~sturdy.lipschitz.operators.LinearOp`: a linear operator (bias dropped, it does not change the Lipschitz
  constant) whose L2 operator norm is bounded directly (convolutions, linear layers, average
  pooling, eval-mode BatchNorm);
* :data:`SUM` / :data:`CONCAT`: combinators of several inputs (residual addition adds bounds,
  concatenation gives ``sqrt(sum L_i^2)``).

New rules are added with :func:`register_bound`::

    @register_bound(MyLayer)
    def _my_layer(call: OpCall) -> Factor:
        return Factor(2.0)

Conventions: L2 norm on the flattened per-sample tensors; BatchNorm in eval mode (running
statistics); Dropout modules are the identity (eval mode). More rules: :mod:`.rules_copy` (indexing,
padding, expanding: data movement, bounded by the multiplicity of copies) and :mod:`.rules_layers`.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from sturdy.errors import ConfigurationError, UnsupportedModuleError
from sturdy.lipschitz.operators import BatchNormOp, Conv2dOp, FunctionOp, LinearLayerOp, ScaleOp, pair
from sturdy.lipschitz.registry import (
    CONCAT,
    Combine,
    Factor,
    OpCall,
    includes_batch_dim,
    register_bound,
)

__all__ = [
    "GELU_MAX_SLOPE",
    "SILU_MAX_SLOPE",
]

GELU_MAX_SLOPE = 1.13  # max_x d/dx [x Phi(x)] = 1.1289..., rounded up
SILU_MAX_SLOPE = 1.1  # max_x d/dx [x sigmoid(x)] = 1.0998..., rounded up


# ----------------------------------------------------------------------------------------- helpers


def _unsupported(call: OpCall, why: str) -> UnsupportedModuleError:
    name = type(call.target).__name__ if isinstance(call.target, nn.Module) else getattr(
        call.target, "__name__", repr(call.target)
    )
    return UnsupportedModuleError(
        f"no Lipschitz bound for {name} at {call.path!r}: {why}", module=call.target, path=call.path
    )


def _per_sample(shape: Optional[Tuple[int, ...]]) -> Tuple[int, ...]:
    assert shape is not None  # internal: rules only run on input-dependent calls
    return tuple(shape[1:])


def _live_param(module: nn.Module, name: str) -> Callable[[], torch.Tensor]:
    return lambda: getattr(module, name)


# ----------------------------------------------------------------------------------------- rules

_UNIT_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Tanh, nn.Softplus, nn.Hardtanh, nn.Softsign, nn.Tanhshrink)


@register_bound(
    *_UNIT_ACTIVATIONS,
    F.relu, torch.relu, F.relu6, torch.tanh, F.tanh, F.softplus, F.hardtanh, F.softsign,
    "relu", "tanh", "relu_", "tanh_",
)
def _unit_activation(call: OpCall) -> Factor:
    return Factor(1.0, "activation")


@register_bound(nn.Sigmoid, torch.sigmoid, F.sigmoid, "sigmoid")
def _sigmoid(call: OpCall) -> Factor:
    return Factor(0.25, "activation")


@register_bound(nn.GELU, F.gelu)
def _gelu(call: OpCall) -> Factor:
    return Factor(GELU_MAX_SLOPE, "activation")


@register_bound(nn.SiLU, F.silu)
def _silu(call: OpCall) -> Factor:
    return Factor(SILU_MAX_SLOPE, "activation")


@register_bound(nn.LeakyReLU, F.leaky_relu)
def _leaky_relu(call: OpCall) -> Factor:
    slope = call.module.negative_slope if call.module is not None else call.arg(1, "negative_slope", 0.01)
    return Factor(max(1.0, abs(float(slope))), "activation")


@register_bound(nn.ELU, F.elu)
def _elu(call: OpCall) -> Factor:
    # slope 1 for x > 0 and alpha * exp(x) for x <= 0, so |alpha| bounds it whatever alpha's sign
    alpha = call.module.alpha if call.module is not None else call.arg(1, "alpha", 1.0)
    return Factor(max(1.0, abs(float(alpha))), "activation")


@register_bound(
    nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.FeatureAlphaDropout,
    torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.permute, torch.transpose, torch.clone,
    torch.movedim, torch.swapaxes, torch.t, operator.pos,
    "view", "reshape", "flatten", "contiguous", "squeeze", "unsqueeze", "permute", "transpose",
    "clone", "view_as", "reshape_as", "movedim", "swapaxes", "t", "detach",
)
def _isometry(call: OpCall) -> Factor:
    # reshapes and permutations preserve the L2 norm; the Dropout modules are the identity in eval mode
    # (their forward reads self.training); functional dropout is checked in rules_layers
    return Factor(1.0, "reshape")


@register_bound(operator.neg, torch.neg, "neg")
def _neg(call: OpCall) -> Factor:
    return Factor(1.0, "reshape")


@register_bound(
    operator.add, torch.add, "add", operator.sub, torch.sub, "sub", operator.iadd, operator.isub, "add_", "sub_",
)
def _add(call: OpCall) -> Combine:
    # sums add the bounds of their input-dependent terms (the graph multiplies a broadcast term by
    # sqrt(copies)); alpha scales the second term
    alpha = call.kwargs.get("alpha", 1)
    if isinstance(alpha, torch.Tensor) or not math.isfinite(float(alpha)):
        raise _unsupported(call, "alpha must be a finite number")
    weights = tuple(abs(float(alpha)) if i == 1 else 1.0 for i in call.dependent_args)
    if "other" in call.kwargs and isinstance(call.kwargs["other"], torch.Tensor) and len(call.dependent_args) < 2:
        weights = weights + (abs(float(alpha)),)
    return Combine("sum", weights)


@register_bound(torch.cat, torch.concat)
def _cat(call: OpCall) -> Combine:
    return CONCAT


@register_bound(torch.stack)
def _stack(call: OpCall) -> Combine:
    out = call.output
    if not isinstance(out, torch.Tensor) or includes_batch_dim(call.arg(1, "dim", 0), out.dim()):
        raise _unsupported(call, "it stacks along the batch dimension, which mixes samples; stack along dim >= 1")
    return CONCAT  # a concatenation of the inputs, reshaped


@register_bound("float", "double", "half", "bfloat16", "to", "type", "type_as", "cpu", "cuda")
def _cast(call: OpCall) -> Factor:
    # a change of floating-point dtype or device leaves the values (up to rounding, which no bound here counts)
    out = call.output
    if not isinstance(out, torch.Tensor) or not out.is_floating_point():
        raise _unsupported(call, "it converts the input to a non-floating-point type, which is not Lipschitz")
    if call.dependent_args != (0,):
        raise _unsupported(call, "its target dtype depends on the input")
    return Factor(1.0, "reshape")


@register_bound(
    operator.mul, torch.mul, "mul", operator.truediv, torch.div, "div", operator.imul, operator.itruediv, "mul_",
    "div_",
)
def _scale(call: OpCall) -> Any:
    # graph.build_program guarantees exactly one input-dependent argument; the other one is constant
    divide = call.target in (operator.truediv, torch.div, "div", operator.itruediv, "div_")
    if call.dependent_args != (0,) and divide:
        raise _unsupported(call, "division by an input-dependent tensor is not Lipschitz")
    if divide and call.kwargs.get("rounding_mode") is not None:
        raise _unsupported(call, "rounded division is not Lipschitz")
    index = 1 if call.dependent_args == (0,) else 0
    const = call.arg(index, "other")
    x = call.args[call.dependent_args[0]] if call.dependent_args else call.args[0]
    if isinstance(const, torch.Tensor):
        if not bool(torch.isfinite(const).all()):
            raise _unsupported(call, "the constant factor holds NaN or inf values")
        if divide and bool((const == 0).any()):
            raise _unsupported(call, "division by zero")
        return ScaleOp(call.live_arg(index, "other"), tuple(x.shape), tuple(call.output.shape), divide=divide)
    c = abs(float(const))
    if not math.isfinite(c) or (divide and c == 0.0):
        raise _unsupported(call, f"scaling by {const!r}")
    return Factor(1.0 / c if divide else c, "scale")


def _window_cover(n: int, windows: Sequence[Tuple[int, Sequence[int]]]) -> int:
    count = [0] * n
    for _, taps in windows:
        for t in taps:
            if 0 <= t < n:
                count[t] += 1
    return max(count) if count else 0


def _maxpool_cover_1d(n: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    probe = torch.zeros(1, 1, n)
    out = F.max_pool1d(probe, k, s, p, d, ceil_mode).shape[-1]
    windows = [(j, [j * s - p + t * d for t in range(k)]) for j in range(out)]
    return _window_cover(n, windows)


def _adaptive_cover_1d(n: int, out: int) -> int:
    windows = []
    for j in range(out):
        start, end = (j * n) // out, -((-(j + 1) * n) // out)
        windows.append((j, list(range(start, end))))
    return _window_cover(n, windows)


@register_bound(nn.MaxPool2d, F.max_pool2d, torch.max_pool2d)
def _max_pool2d(call: OpCall) -> Factor:
    m = call.module
    if m is not None:
        k, s, p, d, ceil = m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode
    else:
        k = call.arg(1, "kernel_size")
        s = call.arg(2, "stride", None) or k
        p, d, ceil = call.arg(3, "padding", 0), call.arg(4, "dilation", 1), call.arg(5, "ceil_mode", False)
    if getattr(m, "return_indices", False) or call.kwargs.get("return_indices", False):
        raise _unsupported(call, "max pooling with return_indices returns a tuple")
    h, w = _per_sample(call.input_shape)[-2:]
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = pair(k), pair(s if s else k), pair(p), pair(d)
    n = _maxpool_cover_1d(h, kh, sh, ph, dh, ceil) * _maxpool_cover_1d(w, kw, sw, pw, dw, ceil)
    # ||maxpool(x) - maxpool(y)||^2 <= sum_windows max_i |x_i - y_i|^2 <= n ||x - y||^2
    return Factor(math.sqrt(max(n, 1)), "maxpool")


@register_bound(nn.AdaptiveMaxPool2d, F.adaptive_max_pool2d)
def _adaptive_max_pool2d(call: OpCall) -> Factor:
    if call.module is not None and call.module.return_indices:
        raise _unsupported(call, "adaptive max pooling with return_indices returns a tuple")
    h, w = _per_sample(call.input_shape)[-2:]
    oh, ow = call.output.shape[-2:]
    n = _adaptive_cover_1d(h, int(oh)) * _adaptive_cover_1d(w, int(ow))
    return Factor(math.sqrt(max(n, 1)), "maxpool")


def _function_op(
    call: OpCall, fn: Callable[[torch.Tensor], torch.Tensor], *, nonnegative: bool, kind: str
) -> FunctionOp:
    ref = call.args[0] if call.args and isinstance(call.args[0], torch.Tensor) else call.output
    return FunctionOp(fn, _per_sample(call.input_shape), nonnegative=nonnegative, kind=kind,
                      dtype=ref.dtype, device=ref.device)


@register_bound(nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AvgPool1d, nn.AdaptiveAvgPool1d)
def _avg_pool_module(call: OpCall) -> FunctionOp:
    module = call.module
    assert module is not None
    if getattr(module, "divisor_override", None):
        raise _unsupported(call, "divisor_override is not supported")
    return _function_op(call, module, nonnegative=True, kind="avgpool")


@register_bound(F.avg_pool2d, F.adaptive_avg_pool2d, F.avg_pool1d, F.adaptive_avg_pool1d)
def _avg_pool_function(call: OpCall) -> FunctionOp:
    fn, rest, kw = call.target, call.args[1:], dict(call.kwargs)
    if kw.get("divisor_override"):
        raise _unsupported(call, "divisor_override is not supported")
    return _function_op(call, lambda x: fn(x, *rest, **kw), nonnegative=True, kind="avgpool")


@register_bound(torch.mean, "mean", torch.sum, "sum")
def _mean(call: OpCall) -> FunctionOp:
    fn = call.target
    rest, kw = call.args[1:], dict(call.kwargs)
    x = call.args[call.dependent_args[0]] if call.dependent_args else call.args[0]
    if includes_batch_dim(call.arg(1, "dim", None), x.dim() if isinstance(x, torch.Tensor) else 0):
        raise _unsupported(call, "a reduction over the batch dimension mixes samples; reduce per sample (dim >= 1)")
    if isinstance(fn, str):
        return _function_op(call, lambda x: getattr(x, fn)(*rest, **kw), nonnegative=True, kind="mean")
    return _function_op(call, lambda x: fn(x, *rest, **kw), nonnegative=True, kind="mean")


@register_bound(nn.Linear)
def _linear(call: OpCall) -> LinearLayerOp:
    module = call.module
    assert module is not None
    return LinearLayerOp(_live_param(module, "weight"))


def check_batched(call: OpCall, dims: int) -> None:
    """Refuse an input without the batch dimension (PyTorch layers accept unbatched inputs silently)."""
    shape = call.input_shape
    if shape is None or len(shape) != dims:
        target = call.target
        name = type(target).__name__ if isinstance(target, nn.Module) else getattr(target, "__name__", str(target))
        raise ConfigurationError(
            f"{name} at {call.path!r} needs a {dims}-D input (batch, channels, ...) but gets shape {shape}; "
            "input_shape must include the batch dimension, e.g. (1, C, H, W) for images"
        )


@register_bound(nn.Conv2d, computes=("_conv_forward",))
def _conv2d(call: OpCall) -> Conv2dOp:
    m = call.module
    assert m is not None
    check_batched(call, 4)
    if m.padding_mode not in ("zeros", "reflect", "replicate", "circular"):
        raise _unsupported(call, f"padding_mode {m.padding_mode!r}")
    in_shape = _per_sample(call.input_shape)
    padding = m.padding if isinstance(m.padding, str) else m.padding
    return Conv2dOp(
        _live_param(m, "weight"),
        in_shape=in_shape,
        stride=m.stride,
        padding=padding,
        dilation=m.dilation,
        groups=m.groups,
        padding_mode=m.padding_mode,
    )


@register_bound(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def _batchnorm(call: OpCall) -> BatchNormOp:
    m = call.module
    assert isinstance(m, nn.modules.batchnorm._BatchNorm)
    if not m.track_running_stats or m.running_var is None:
        raise _unsupported(
            call, "BatchNorm without running statistics normalises with batch statistics, which is not a "
            "per-sample function; use track_running_stats=True"
        )
    return BatchNormOp(m, _per_sample(call.input_shape))


def weight_arg(call: OpCall, index: int, name: str) -> Callable[[], torch.Tensor]:
    """Live value of a weight argument (a parameter, or a tensor computed from parameters in ``forward``)."""
    if index in call.dependent_args:
        raise _unsupported(call, f"the {name} depends on the input")
    w = call.arg(index, name)
    if not isinstance(w, torch.Tensor):
        raise _unsupported(call, f"the {name} must be a tensor, got {type(w).__name__}")
    if not bool(torch.isfinite(w).all()):
        raise ConfigurationError(f"the {name} of {call.path!r} holds NaN or inf values; a bound needs finite weights")
    return call.live_arg(index, name)


@register_bound(F.linear, torch._C._nn.linear)
def _functional_linear(call: OpCall) -> LinearLayerOp:
    return LinearLayerOp(weight_arg(call, 1, "weight"))


@register_bound(F.conv2d, torch.conv2d)
def _functional_conv2d(call: OpCall) -> Conv2dOp:
    check_batched(call, 4)
    return Conv2dOp(
        weight_arg(call, 1, "weight"),
        in_shape=_per_sample(call.input_shape),
        stride=call.arg(3, "stride", 1),
        padding=call.arg(4, "padding", 0),
        dilation=call.arg(5, "dilation", 1),
        groups=call.arg(6, "groups", 1),
    )
