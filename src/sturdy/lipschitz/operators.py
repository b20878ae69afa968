"""Linear operators on per-sample tensors, as the Lipschitz rules describe them (a single idea: one
class per kind of operator the rules produce).

A :class:`LinearOp` is the linear part of a layer (bias dropped: it does not change the Lipschitz
constant) on per-sample tensors of a fixed shape. It applies itself and its adjoint (batched,
differentiable in the layer's weights: the training-time power iteration), turns itself into a dense
matrix (exact SVD of small operators), and offers a guaranteed structured upper bound of its L2 norm
when one exists (the FFT bound of convolutions, the Hoelder bound of non-negative maps, the closed form
of diagonal maps). The norm algorithms themselves live in :mod:`sturdy.lipschitz.norms`.

Conventions: L2 norm on flattened per-sample tensors; ``in_shape`` excludes the batch dimension.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from sturdy.errors import UnsupportedModuleError
from sturdy.lipschitz.norms import DENSE_SAFETY, conv2d_fft_norm, dense_spectral_norm, padding_multiplicity

__all__ = [
    "LinearOp",
    "LinearLayerOp",
    "Conv2dOp",
    "BatchNormOp",
    "FunctionOp",
    "ScaleOp",
    "Conv1dOp",
    "ConvTranspose2dOp",
    "pair",
    "conv_pads",
]


def pair(v: Any) -> Tuple[int, int]:
    """``(v, v)`` for an int, ``(v[0], v[1])`` for a sequence (PyTorch's 2-D size arguments)."""
    if isinstance(v, (tuple, list)):
        return int(v[0]), int(v[1])
    return int(v), int(v)


def conv_pads(padding: Any, kernel: Tuple[int, int], dilation: Tuple[int, int]) -> Tuple[int, int, int, int]:
    """Zero padding ``(top, bottom, left, right)`` of a convolution's ``padding`` argument (ints or a string)."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            out = []
            for k, d in zip(kernel, dilation):
                total = d * (k - 1)
                out += [total // 2, total - total // 2]
            return (out[0], out[1], out[2], out[3])
        raise UnsupportedModuleError(f"unknown convolution padding {padding!r}")
    ph, pw = pair(padding)
    return (ph, ph, pw, pw)


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
        self._hw: Tuple[int, int] = (int(self.in_shape[-2]), int(self.in_shape[-1]))
        self._weight = weight
        self.stride = pair(stride)
        self.dilation = pair(dilation)
        self.groups = int(groups)
        self.padding_mode = padding_mode
        kh, kw = weight().shape[-2:]
        self.kernel = (int(kh), int(kw))
        self.pads = conv_pads(padding, self.kernel, self.dilation)  # (left_h, right_h, left_w, right_w)
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
        h, w_ = self._hw
        out_pad = []
        for size, out, s, p, d, k in zip(
            (h, w_), y.shape[-2:], self.stride, (lh, lw), self.dilation, self.kernel
        ):
            out_pad.append(size - ((out - 1) * s - 2 * p + d * (k - 1) + 1))
        w = (self.weight() if weight is None else weight).to(y.dtype)
        return F.conv_transpose2d(y, w, None, self.stride, (lh, lw), tuple(out_pad), self.groups, self.dilation)

    def structured_upper(self) -> Optional[Tuple[float, str]]:
        w = self.weight().detach().to(torch.float64)
        h, w_ = self._hw
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

    def __init__(self, module: Any, in_shape: Sequence[int]) -> None:
        super().__init__(in_shape)
        self.module = module

    @classmethod
    def from_live(cls, *, var: Callable[[], torch.Tensor], weight: Optional[Callable[[], torch.Tensor]], eps: float,
                  in_shape: Sequence[int]) -> BatchNormOp:
        """The functional form (``F.batch_norm``): running variance and weight read live."""
        return cls(_LiveBatchNorm(var, weight, eps), in_shape)

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


class _LiveBatchNorm:
    """The attributes of a BatchNorm module that :class:`BatchNormOp` reads, from live functions."""

    def __init__(self, var: Callable[[], torch.Tensor], weight: Optional[Callable[[], torch.Tensor]], eps: float):
        self._var, self._weight, self.eps = var, weight, eps

    @property
    def running_var(self) -> torch.Tensor:
        return self._var()

    @property
    def weight(self) -> Optional[torch.Tensor]:
        return None if self._weight is None else self._weight()


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


class ScaleOp(LinearOp):
    """Elementwise scaling ``x -> x * c`` (or ``x / c``) by a constant tensor ``c`` that may broadcast ``x``.

    Exact norm (closed form, differentiable in ``c``): with ``x_j`` copied to the output entries ``k``
    of its broadcast, ``||A||_2 = sqrt(max_j sum_{k -> j} c_k^2)``.
    """

    kind = "scale"
    parametric = True

    def __init__(self, scale: Callable[[], torch.Tensor], in_shape: Sequence[int], out_shape: Sequence[int], *,
                 divide: bool = False) -> None:
        # shapes include the batch dimension (1) so that broadcasting against c is exact
        super().__init__(tuple(in_shape)[1:])
        self._scale = scale
        self.full_in = tuple(int(v) for v in in_shape)
        self.full_out = tuple(int(v) for v in out_shape)
        self.divide = divide

    def factor(self) -> torch.Tensor:
        c = self._scale()
        return 1.0 / c if self.divide else c

    def apply(self, x: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        c = self.factor().to(x.dtype)
        out = x * c
        return out if out.shape[0] == x.shape[0] else out.expand(x.shape[0], *out.shape[1:])

    def closed_form_norm(self) -> Optional[torch.Tensor]:
        c = self.factor()
        sq = (c * c).expand(self.full_out).sum_to_size(self.full_in)
        return sq.max().sqrt()

    def param_dtype(self) -> torch.dtype:
        return self._scale().dtype

    def param_device(self) -> torch.device:
        return self._scale().device


class Conv1dOp(Conv2dOp):
    """A 1-D convolution on inputs ``(C, L)``: the 2-D convolution of height 1 (same bounds, same folding)."""

    kind = "conv1d"

    def __init__(self, weight: Callable[[], torch.Tensor], *, in_shape: Sequence[int], stride: Any = 1,
                 padding: Any = 0, dilation: Any = 1, groups: int = 1, padding_mode: str = "zeros") -> None:
        c, length = (int(v) for v in in_shape)
        if isinstance(padding, str):
            pad2d: Any = padding
        else:
            pad2d = (0, int(padding))
        super().__init__(lambda: weight().unsqueeze(2), in_shape=(c, 1, length), stride=(1, int(stride)),
                         padding=pad2d, dilation=(1, int(dilation)), groups=groups, padding_mode=padding_mode)
        self.in_shape = (c, length)

    def apply(self, x: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        return super().apply(x.unsqueeze(-2), weight).squeeze(-2)

    def adjoint(self, y: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        lh, rh, lw, rw = self.pads
        if not (self.padding_mode == "zeros" and lw == rw):
            return LinearOp.adjoint(self, y, weight)
        return super().adjoint(y.unsqueeze(-2), weight).squeeze(-2)


class ConvTranspose2dOp(LinearOp):
    """A transposed 2-D convolution on inputs ``(C_in, H, W)`` with outputs ``(C_out, H', W')``.

    It is the adjoint of the convolution with the same weight, stride, padding, dilation and groups on
    inputs of the output shape (``output_padding`` only adds output rows/columns the convolution does not
    read), so both have the same norm: the structured bound is that convolution's FFT bound.
    """

    kind = "conv_transpose2d"
    parametric = True

    def __init__(self, weight: Callable[[], torch.Tensor], *, in_shape: Sequence[int], out_shape: Sequence[int],
                 stride: Any = 1, padding: Any = 0, output_padding: Any = 0, dilation: Any = 1, groups: int = 1):
        super().__init__(in_shape)
        self._weight = weight
        self.out_shape = tuple(int(v) for v in out_shape)
        self.stride, self.padding, self.dilation = pair(stride), pair(padding), pair(dilation)
        self.output_padding, self.groups = pair(output_padding), int(groups)

    def weight(self) -> torch.Tensor:
        return self._weight()

    def apply(self, x: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        w = (self.weight() if weight is None else weight).to(x.dtype)
        return F.conv_transpose2d(x, w, None, self.stride, self.padding, self.output_padding, self.groups,
                                  self.dilation)

    def adjoint(self, y: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        w = (self.weight() if weight is None else weight).to(y.dtype)
        x = F.conv2d(y, w, None, self.stride, self.padding, self.dilation, self.groups)
        return x[..., : self.in_shape[-2], : self.in_shape[-1]]

    def structured_upper(self) -> Optional[Tuple[float, str]]:
        w = self.weight().detach().to(torch.float64)
        ph, pw = self.padding
        norm = conv2d_fft_norm(w, input_hw=(self.out_shape[-2], self.out_shape[-1]), pads=(ph, ph, pw, pw),
                               dilation=self.dilation, groups=self.groups, stride=self.stride)
        return norm, "fft"

    def param_dtype(self) -> torch.dtype:
        return self._weight().dtype

    def param_device(self) -> torch.device:
        return self._weight().device
