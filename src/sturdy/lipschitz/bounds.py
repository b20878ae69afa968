"""Per-operator Lipschitz rules and the registry that maps operators to them.

Every operator of a traced model is looked up in a registry keyed by module class (``nn.Conv2d``),
function (``F.relu``, ``torch.flatten``, ``operator.add``) or tensor-method name (``"view"``), and
its rule returns one of:

* :class:`Factor`: a constant L2 Lipschitz factor with respect to the operator's tensor input
  (activations, max pooling, reshapes);
* a :class:`LinearOp`: a linear operator (bias dropped, it does not change the Lipschitz
  constant) whose L2 operator norm is bounded directly (convolutions, linear layers, average
  pooling, eval-mode BatchNorm);
* :data:`SUM` / :data:`CONCAT`: combinators of several inputs (residual addition adds bounds,
  concatenation gives ``sqrt(sum L_i^2)``).

New rules are added with :func:`register_bound`::

    @register_bound(MyLayer)
    def _my_layer(call: OpCall) -> Factor:
        return Factor(2.0)

Conventions: L2 norm on the flattened per-sample tensors; BatchNorm in eval mode (running
statistics); Dropout is the identity (eval mode).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from sturdy.errors import UnsupportedModuleError

__all__ = [
    "OpCall",
    "Factor",
    "Combine",
    "SUM",
    "CONCAT",
    "LinearOp",
    "LinearLayerOp",
    "Conv2dOp",
    "BatchNormOp",
    "FunctionOp",
    "register_bound",
    "find_rule",
    "GELU_MAX_SLOPE",
    "SILU_MAX_SLOPE",
]

GELU_MAX_SLOPE = 1.13  # max_x d/dx [x Phi(x)] = 1.1289..., rounded up
SILU_MAX_SLOPE = 1.1  # max_x d/dx [x sigmoid(x)] = 1.0998..., rounded up


@dataclass(frozen=True)
class OpCall:
    """One call of an operator in a traced model, as seen by a rule.

    Attributes:
        target: the module instance (``call_module``), function, or method name.
        path: qualified module name inside the model (e.g. ``"features.3"``) or the graph node name.
        args: positional arguments with graph values replaced by example values (tensors of the
            traced input shape, batch size 1).
        kwargs: keyword arguments, same convention.
        input_shape: shape of the operator's input tensor that depends on the model input, or ``None``.
        output: example output value.
        dependent_args: positions in ``args`` whose value depends on the model input.
    """

    target: Any
    path: str
    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]
    input_shape: Optional[Tuple[int, ...]]
    output: Any
    dependent_args: Tuple[int, ...] = ()

    @property
    def module(self) -> Optional[nn.Module]:
        return self.target if isinstance(self.target, nn.Module) else None

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        """Argument by position or keyword (functional forms accept both)."""
        if len(self.args) > index:
            return self.args[index]
        return self.kwargs.get(name, default)


@dataclass(frozen=True)
class Factor:
    """A constant L2 Lipschitz factor of a single-input operator."""

    value: float
    kind: str = "factor"


@dataclass(frozen=True)
class Combine:
    """Combinator of several inputs: ``"sum"`` (L = sum L_i) or ``"concat"`` (L = sqrt(sum L_i^2))."""

    how: str


SUM = Combine("sum")
CONCAT = Combine("concat")


class LinearOp:
    """A linear operator on per-sample tensors of shape ``in_shape`` (bias dropped).

    Subclasses implement :meth:`apply` (batched, differentiable in the layer's parameters, computed
    in the dtype of ``x``); the default adjoint uses autograd. ``parametric`` operators depend on
    trainable weights (power iteration during training); others have a fixed norm.
    """

    kind: str = "linear"
    parametric: bool = False
    nonnegative: bool = False  # all matrix entries >= 0 (pooling): enables the Hoelder bound

    def __init__(self, in_shape: Sequence[int]) -> None:
        self.in_shape: Tuple[int, ...] = tuple(int(s) for s in in_shape)

    def weight(self) -> Optional[torch.Tensor]:
        """The (differentiable) weight the operator applies, or ``None`` for weight-free operators.

        Passing it to :meth:`apply` and :meth:`adjoint` avoids recomputing it (e.g. a folded BatchNorm).
        """
        return None

    def apply(self, x: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``A x`` for a batch ``x`` of inputs ``(B, *in_shape)``."""
        raise NotImplementedError

    def adjoint(self, y: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``A^T y`` for a batch ``y`` of outputs (default: autograd vector-Jacobian product)."""
        with torch.enable_grad():
            x = torch.zeros((y.shape[0], *self.in_shape), dtype=y.dtype, device=y.device, requires_grad=True)
            (g,) = torch.autograd.grad(self.apply(x, weight), x, grad_outputs=y)
        return g

    def dense_matrix(self, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The operator as a dense ``(out_dim, in_dim)`` matrix, by applying it to the identity basis."""
        n = math.prod(self.in_shape)
        eye = torch.eye(n, dtype=dtype, device=device).reshape(n, *self.in_shape)
        with torch.no_grad():
            out = self.apply(eye)
        return out.reshape(n, -1).T

    def dense_size(self) -> int:
        """Number of entries of the dense matrix (decides dense SVD vs. structured bound)."""
        n = math.prod(self.in_shape)
        with torch.no_grad():
            out = self.apply(torch.zeros((1, *self.in_shape), dtype=self.param_dtype(), device=self.param_device()))
        return n * out[0].numel()

    def closed_form_norm(self) -> Optional[torch.Tensor]:
        """Exact differentiable norm when one exists (diagonal maps), else ``None``."""
        return None

    def structured_upper(self) -> Optional[Tuple[float, str]]:
        """A guaranteed float64 upper bound that avoids the dense matrix, and its method name."""
        return None

    def param_dtype(self) -> torch.dtype:
        """dtype of the operator's parameters (of its example input for weight-free operators)."""
        return torch.float64

    def param_device(self) -> torch.device:
        """device of the operator's parameters (of its example input for weight-free operators)."""
        return torch.device("cpu")


class LinearLayerOp(LinearOp):
    """``x -> W x`` of an ``nn.Linear`` (optionally followed by a folded BatchNorm1d: ``diag(s) W``)."""

    kind = "linear"
    parametric = True

    def __init__(self, weight: Callable[[], torch.Tensor], out_scale: Optional[Callable[[], torch.Tensor]] = None):
        w = weight()
        super().__init__((w.shape[1],))
        self._weight = weight
        self.out_scale = out_scale

    def weight(self) -> torch.Tensor:
        w = self._weight()
        if self.out_scale is not None:
            w = w * self.out_scale()[:, None]
        return w

    def apply(self, x: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        return F.linear(x, (self.weight() if weight is None else weight).to(x.dtype))

    def adjoint(self, y: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        return y @ (self.weight() if weight is None else weight).to(y.dtype)

    def dense_matrix(self, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return self.weight().detach().to(dtype=dtype, device=device)

    def dense_size(self) -> int:
        return self._weight().numel()

    def structured_upper(self) -> Optional[Tuple[float, str]]:
        from sturdy.lipschitz.power import DENSE_SAFETY, dense_spectral_norm

        matrix = self.dense_matrix(dtype=torch.float64, device=self.param_device())
        return dense_spectral_norm(matrix) * DENSE_SAFETY, "dense-svd"

    def param_dtype(self) -> torch.dtype:
        return self._weight().dtype

    def param_device(self) -> torch.device:
        return self._weight().device


class Conv2dOp(LinearOp):
    """A 2-D convolution (any padding, stride, dilation, groups) on inputs ``(C, H, W)``,
    optionally followed by a folded per-channel scale (eval-mode BatchNorm2d)."""

    kind = "conv2d"
    parametric = True

    def __init__(
        self,
        weight: Callable[[], torch.Tensor],
        *,
        in_shape: Sequence[int],
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        out_scale: Optional[Callable[[], torch.Tensor]] = None,
    ) -> None:
        super().__init__(in_shape)
        self._weight = weight
        self.stride = _pair(stride)
        self.dilation = _pair(dilation)
        self.groups = int(groups)
        self.padding_mode = padding_mode
        kh, kw = weight().shape[-2:]
        self.kernel = (int(kh), int(kw))
        self.pads = _conv_pads(padding, self.kernel, self.dilation)  # (left_h, right_h, left_w, right_w)
        self.out_scale = out_scale

    def weight(self) -> torch.Tensor:
        w = self._weight()
        if self.out_scale is not None:
            w = w * self.out_scale()[:, None, None, None]
        return w

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        lh, rh, lw, rw = self.pads
        if lh == rh == lw == rw == 0:
            return x
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        return F.pad(x, (lw, rw, lh, rh), mode=mode)

    def apply(self, x: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        w = (self.weight() if weight is None else weight).to(x.dtype)
        lh, rh, lw, rw = self.pads
        if self.padding_mode == "zeros" and lh == rh and lw == rw:
            return F.conv2d(x, w, None, self.stride, (lh, lw), self.dilation, self.groups)
        return F.conv2d(self._padded(x), w, None, self.stride, 0, self.dilation, self.groups)

    def adjoint(self, y: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        lh, rh, lw, rw = self.pads
        if not (self.padding_mode == "zeros" and lh == rh and lw == rw):
            return super().adjoint(y, weight)
        h, w_ = self.in_shape[-2:]
        out_pad = []
        for size, out, s, p, d, k in zip(
            (h, w_), y.shape[-2:], self.stride, (lh, lw), self.dilation, self.kernel
        ):
            out_pad.append(size - ((out - 1) * s - 2 * p + d * (k - 1) + 1))
        w = (self.weight() if weight is None else weight).to(y.dtype)
        return F.conv_transpose2d(y, w, None, self.stride, (lh, lw), tuple(out_pad), self.groups, self.dilation)

    def structured_upper(self) -> Optional[Tuple[float, str]]:
        from sturdy.lipschitz.power import conv2d_fft_norm, padding_multiplicity

        w = self.weight().detach().to(torch.float64)
        h, w_ = self.in_shape[-2:]
        lh, rh, lw, rw = self.pads
        if self.padding_mode == "zeros":
            norm = conv2d_fft_norm(w, input_hw=(h, w_), pads=self.pads, dilation=self.dilation, groups=self.groups,
                                   stride=self.stride)
            return norm, "fft"
        # reflect/replicate/circular: conv(pad(x)) with pad(.) a 0/1 copy map of norm sqrt(max multiplicity)
        mult = padding_multiplicity((h, w_), pads=self.pads, mode=self.padding_mode)
        base = conv2d_fft_norm(
            w, input_hw=(h + lh + rh, w_ + lw + rw), pads=(0, 0, 0, 0), dilation=self.dilation, groups=self.groups,
            stride=self.stride,
        )
        return base * math.sqrt(mult), "fft+pad"

    def param_dtype(self) -> torch.dtype:
        return self._weight().dtype

    def param_device(self) -> torch.device:
        return self._weight().device


class BatchNormOp(LinearOp):
    """Eval-mode BatchNorm as the diagonal map ``x_c -> x_c * gamma_c / sqrt(var_c + eps)``."""

    kind = "batchnorm"
    parametric = True

    def __init__(self, module: nn.modules.batchnorm._BatchNorm, in_shape: Sequence[int]) -> None:
        super().__init__(in_shape)
        self.module = module

    def scale(self) -> torch.Tensor:
        m = self.module
        s = torch.rsqrt(m.running_var + m.eps)
        if m.weight is not None:
            s = m.weight * s
        return s

    def apply(self, x: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        s = self.scale().to(x.dtype)
        return x * s.reshape(1, -1, *([1] * (x.dim() - 2)))

    def adjoint(self, y: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.apply(y)

    def closed_form_norm(self) -> Optional[torch.Tensor]:
        return self.scale().abs().max()

    def param_dtype(self) -> torch.dtype:
        return self.module.running_var.dtype

    def param_device(self) -> torch.device:
        return self.module.running_var.device


class FunctionOp(LinearOp):
    """A fixed (weight-free) linear function, e.g. average pooling or a mean over dimensions."""

    kind = "pool"

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], in_shape: Sequence[int], *, nonnegative: bool,
                 kind: str = "pool", dtype: torch.dtype = torch.float32, device: Any = "cpu") -> None:
        super().__init__(in_shape)
        self.fn = fn
        self.nonnegative = nonnegative
        self.kind = kind
        self._dt = dtype
        self._dev = torch.device(device)

    def apply(self, x: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.fn(x)

    def structured_upper(self) -> Optional[Tuple[float, str]]:
        if not self.nonnegative:
            return None
        # Hoelder/Schur: ||A||_2 <= sqrt(||A||_1 ||A||_inf); for A >= 0 row sums are A 1, column sums A^T 1.
        ones = torch.ones((1, *self.in_shape), dtype=torch.float64, device=self._dev)
        with torch.no_grad():
            rows = self.apply(ones)
        cols = self.adjoint(torch.ones_like(rows))
        return math.sqrt(float(rows.max()) * float(cols.max())), "holder"

    def param_dtype(self) -> torch.dtype:
        return self._dt

    def param_device(self) -> torch.device:
        return self._dev


Rule = Callable[[OpCall], Union[Factor, LinearOp, Combine]]
_REGISTRY: Dict[Any, Rule] = {}


def register_bound(*targets: Any) -> Callable[[Rule], Rule]:
    """Register a Lipschitz rule for module classes, functions, or tensor-method names.

    Module classes match their subclasses too (the most derived registration wins).

    Example:
        >>> from torch import nn
        >>> class Doubler(nn.Module):
        ...     def forward(self, x):
        ...         return 2 * x
        >>> @register_bound(Doubler)
        ... def _doubler(call):
        ...     return Factor(2.0)
        >>> find_rule(Doubler()) is _doubler
        True
    """
    if not targets:
        raise TypeError("register_bound needs at least one module class, function or method name")

    def deco(rule: Rule) -> Rule:
        for t in targets:
            _REGISTRY[t] = rule
        return rule

    return deco


def find_rule(target: Any) -> Optional[Rule]:
    """The registered rule for a module instance, function, or method name, or ``None``."""
    if isinstance(target, nn.Module):
        for cls in type(target).__mro__:
            if cls in _REGISTRY:
                return _REGISTRY[cls]
        return None
    try:
        return _REGISTRY.get(target)
    except TypeError:  # unhashable target
        return None


# ----------------------------------------------------------------------------------------- helpers


def _pair(v: Any) -> Tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return int(v[0]), int(v[1])
    return int(v), int(v)


def _conv_pads(padding: Any, kernel: Tuple[int, int], dilation: Tuple[int, int]) -> Tuple[int, int, int, int]:
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            out = []
            for k, d in zip(kernel, dilation):
                total = d * (k - 1)
                out += [total // 2, total - total // 2]
            return tuple(out)  # type: ignore[return-value]
        raise UnsupportedModuleError(f"unknown convolution padding {padding!r}")
    ph, pw = _pair(padding)
    return (ph, ph, pw, pw)


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
    alpha = call.module.alpha if call.module is not None else call.arg(1, "alpha", 1.0)
    return Factor(max(1.0, float(alpha)), "activation")


@register_bound(
    nn.Identity, nn.Flatten, nn.Dropout, nn.Dropout2d, nn.Unflatten,
    torch.flatten, F.dropout, F.dropout2d, torch.reshape, torch.squeeze, torch.unsqueeze,
    torch.permute, torch.transpose, torch.clone, operator.getitem, operator.pos,
    "view", "reshape", "flatten", "contiguous", "squeeze", "unsqueeze", "permute", "transpose",
    "clone", "view_as", "reshape_as",
)
def _isometry(call: OpCall) -> Factor:
    # reshapes and permutations preserve the L2 norm; getitem/crop is a projection; dropout is eval-mode identity
    return Factor(1.0, "reshape")


@register_bound(operator.neg, torch.neg, "neg")
def _neg(call: OpCall) -> Factor:
    return Factor(1.0, "reshape")


@register_bound(operator.add, torch.add, "add", operator.sub, torch.sub, "sub", operator.iadd)
def _add(call: OpCall) -> Combine:
    if call.kwargs.get("alpha", 1) != 1:
        raise _unsupported(call, "add/sub with alpha != 1; write a + alpha * b instead")
    return SUM


@register_bound(torch.cat, torch.concat)
def _cat(call: OpCall) -> Combine:
    return CONCAT


@register_bound(operator.mul, torch.mul, "mul", operator.truediv, torch.div, "div")
def _scale(call: OpCall) -> Factor:
    # the network composer guarantees exactly one input-dependent argument; the other one is constant
    divide = call.target in (operator.truediv, torch.div, "div")
    if call.dependent_args != (0,) and divide:
        raise _unsupported(call, "division by an input-dependent tensor is not Lipschitz")
    const = call.args[1] if call.dependent_args == (0,) else call.args[0]
    c = const.detach().abs() if isinstance(const, torch.Tensor) else torch.tensor(abs(float(const)))
    if divide:
        if float(c.min()) == 0.0:
            raise _unsupported(call, "division by zero")
        return Factor(float((1.0 / c).max()), "scale")
    return Factor(float(c.max()), "scale")


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
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = _pair(k), _pair(s if s else k), _pair(p), _pair(d)
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
    dims = call.arg(1, "dim", None)
    if dims is None or (isinstance(dims, (tuple, list)) and 0 in dims) or dims == 0:
        raise _unsupported(call, "a reduction over the batch dimension mixes samples; reduce per sample (dim >= 1)")
    if isinstance(fn, str):
        return _function_op(call, lambda x: getattr(x, fn)(*rest, **kw), nonnegative=True, kind="mean")
    return _function_op(call, lambda x: fn(x, *rest, **kw), nonnegative=True, kind="mean")


@register_bound(nn.Linear)
def _linear(call: OpCall) -> LinearLayerOp:
    module = call.module
    assert module is not None
    return LinearLayerOp(_live_param(module, "weight"))


@register_bound(nn.Conv2d)
def _conv2d(call: OpCall) -> Conv2dOp:
    m = call.module
    assert m is not None
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


def _parameter_arg(call: OpCall, index: int, name: str) -> Callable[[], torch.Tensor]:
    w = call.arg(index, name)
    if not isinstance(w, nn.Parameter):
        raise _unsupported(call, f"the {name} must be a parameter of the model (a computed {name} has no live bound)")
    return lambda: w


@register_bound(F.linear)
def _functional_linear(call: OpCall) -> LinearLayerOp:
    return LinearLayerOp(_parameter_arg(call, 1, "weight"))


@register_bound(F.conv2d, torch.conv2d)
def _functional_conv2d(call: OpCall) -> Conv2dOp:
    return Conv2dOp(
        _parameter_arg(call, 1, "weight"),
        in_shape=_per_sample(call.input_shape),
        stride=call.arg(3, "stride", 1),
        padding=call.arg(4, "padding", 0),
        dilation=call.arg(5, "dilation", 1),
        groups=call.arg(6, "groups", 1),
    )
