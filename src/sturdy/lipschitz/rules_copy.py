"""Lipschitz rules of data-movement operators: indexing, gathers, expanding, padding, nearest upsampling.

Each of these maps ``x`` to a tensor whose entries are copies of entries of ``x`` or constants
(``y = P x + c`` with one 1 per row of ``P`` at most), so its L2 Lipschitz constant is exactly
``sqrt(m)``, ``m`` the largest number of copies of one input entry. The rule measures ``m`` by
behaviour: it runs the operator, with its actual (constant) arguments, on two integer encodings of the
input, checks that every output entry is a copy of one input entry or a constant, and counts the copies.
Index arguments must not depend on the input (a data-dependent gather is not Lipschitz-bounded this way).

Operators must act on each sample separately: indexing, gathering or splitting along the batch
dimension (dim 0) is refused.
"""

from __future__ import annotations

import math
import operator
from typing import Any, List

import torch
import torch.nn.functional as F
from torch import nn

from sturdy.errors import UnsupportedModuleError
from sturdy.lipschitz.operators import FunctionOp
from sturdy.lipschitz.registry import Factor, OpCall, includes_batch_dim, register_bound

__all__ = ["copy_factor", "COPY_METHODS"]

_PAD_MODULES = (
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
    nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d, nn.ReplicationPad2d,
    nn.ReplicationPad3d, nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d,
)
COPY_METHODS = (
    "index_select", "gather", "take_along_dim", "expand", "expand_as", "repeat", "tile", "repeat_interleave",
    "narrow", "select", "roll", "flip", "fliplr", "flipud", "rot90", "chunk", "split", "tensor_split", "unbind",
    "unfold", "broadcast_to",
)
_COPY_FUNCTIONS = (
    torch.index_select, torch.gather, torch.take_along_dim, torch.tile, torch.repeat_interleave, torch.narrow,
    torch.select, torch.roll, torch.flip, torch.fliplr, torch.flipud, torch.rot90, torch.chunk, torch.split,
    torch.tensor_split, torch.unbind, torch.broadcast_to, F.pad, torch.constant_pad_nd, F.pixel_shuffle,
    F.pixel_unshuffle, F.unfold, torch.pixel_shuffle, torch.pixel_unshuffle, F.channel_shuffle,
)


def _unsupported(call: OpCall, why: str) -> UnsupportedModuleError:
    name = type(call.target).__name__ if isinstance(call.target, nn.Module) else getattr(
        call.target, "__name__", str(call.target))
    return UnsupportedModuleError(f"no Lipschitz bound for {name} at {call.path!r}: {why}", module=call.target,
                                  path=call.path)


def _flat(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.reshape(-1)
    if isinstance(value, (tuple, list)):
        parts = [_flat(v) for v in value if isinstance(v, (torch.Tensor, tuple, list))]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
    raise TypeError(type(value).__name__)


def _outputs(value: Any) -> List[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _outputs(v)]
    return []


def _run(call: OpCall, t: torch.Tensor) -> Any:
    index = call.dependent_args[0]
    args = list(call.args)
    args[index] = t
    if isinstance(call.target, nn.Module):
        return call.target(*args, **call.kwargs)
    if isinstance(call.target, str):
        return getattr(args[0], call.target)(*args[1:], **call.kwargs)
    return call.target(*args, **call.kwargs)


def copy_factor(call: OpCall, kind: str = "copy") -> Factor:
    """``sqrt(max copies of one input entry)`` of a data-movement operator, measured on integer encodings."""
    if len(call.dependent_args) != 1:
        raise _unsupported(call, "its indices (or other arguments) depend on the input; only constant indices are "
                                 "supported")
    x = call.args[call.dependent_args[0]]
    for out in _outputs(call.output):
        if x.dim() >= 1 and out.dim() >= 1 and out.shape[0] != x.shape[0]:
            raise _unsupported(call, "it changes the batch dimension; operate on each sample (dims >= 1)")
    n = x.numel()
    enc = torch.arange(1, n + 1, dtype=torch.float64, device=x.device).reshape(x.shape)
    gen = torch.Generator().manual_seed(n)
    other = (torch.randperm(n, generator=gen).to(torch.float64) + (n + 1)).to(x.device)
    with torch.no_grad():
        a = _flat(_run(call, enc))
        b = _flat(_run(call, other.reshape(x.shape)))
    const = a == b  # the encodings never agree on a copied entry (a <= n < b)
    copied = ~const
    idx = a[copied]
    ok = bool(((idx >= 1) & (idx <= n) & (idx == idx.round())).all())
    if ok and idx.numel():
        src = idx.long() - 1
        ok = bool(torch.equal(b[copied], other[src]))
    if not ok:
        raise _unsupported(call, "its output is not a copy of input entries (not a data-movement operator here)")
    m = int(torch.bincount(idx.long() - 1, minlength=n).max()) if idx.numel() else 0
    return Factor(math.sqrt(m), kind)


# position of the dim argument (same for the function and the method form) and its default (None: flattened)
_DIM_ARG = {
    "index_select": (1, None), "gather": (1, None), "narrow": (1, None), "select": (1, None), "unfold": (1, None),
    "take_along_dim": (2, None), "roll": (2, None), "flip": (1, None), "repeat_interleave": (2, None),
    "chunk": (2, 0), "split": (2, 0), "tensor_split": (2, 0), "unbind": (1, 0), "rot90": (2, (0, 1)),
}


@register_bound(operator.getitem)
def _getitem(call: OpCall) -> Factor:
    container = call.args[0]
    if not isinstance(container, torch.Tensor):  # a piece of a split/chunk/max result: a projection
        return Factor(1.0, "reshape")
    index = call.args[1]
    parts = index if isinstance(index, tuple) else (index,)
    first = parts[0] if parts else slice(None)
    if not (first is Ellipsis or first == slice(None)) and container.dim() > 1:
        raise _unsupported(call, f"the index {index!r} selects along the batch dimension; index each sample "
                                 "(x[:, ...])")
    if all(isinstance(p, (int, slice)) or p is Ellipsis or p is None for p in parts):
        return Factor(1.0, "crop")  # basic slicing and integer indexing: a projection
    return copy_factor(call, "index")


@register_bound(*_COPY_FUNCTIONS, *COPY_METHODS, *_PAD_MODULES, nn.PixelShuffle, nn.PixelUnshuffle, nn.Unfold,
                nn.ChannelShuffle)
def _copy(call: OpCall) -> Factor:
    target = call.target
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    if name == "flipud":
        raise _unsupported(call, "it flips the batch dimension; use flip(x, dims) with dims >= 1")
    if name in _DIM_ARG and target is not F.unfold:
        pos, default = _DIM_ARG[name]
        dim = call.kwargs.get("dims", call.kwargs.get("dim", call.args[pos] if len(call.args) > pos else default))
        x = call.args[call.dependent_args[0]] if call.dependent_args else None
        if isinstance(x, torch.Tensor) and includes_batch_dim(dim, x.dim()):
            raise _unsupported(call, "it acts along the batch dimension (dim 0, or all dimensions flattened); "
                                     "operate on each sample (dims >= 1)")
    return copy_factor(call, "pad" if "pad" in name.lower() or isinstance(target, _PAD_MODULES) else "copy")


_COPY_MODES = ("nearest", "nearest-exact")
_NONNEGATIVE_MODES = ("linear", "bilinear", "trilinear", "area")


def _upsample(call: OpCall, mode: str, fn: Any) -> Any:
    if mode in _COPY_MODES:
        return copy_factor(call, "upsample")
    x = call.args[call.dependent_args[0]]
    if mode not in _NONNEGATIVE_MODES + ("bicubic",):
        raise _unsupported(call, f"interpolation mode {mode!r}")
    # a fixed linear map: exact SVD when small; for the linear modes all weights are >= 0 (Hoelder bound)
    return FunctionOp(fn, tuple(x.shape[1:]), nonnegative=mode in _NONNEGATIVE_MODES, kind="upsample",
                      dtype=x.dtype, device=x.device)


@register_bound(F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear)
def _interpolate(call: OpCall) -> Any:
    if call.target is F.upsample_nearest:
        mode = "nearest"
    elif call.target is F.upsample_bilinear:
        mode = "bilinear"
    else:
        mode = call.arg(3, "mode", "nearest")
    target, rest, kw = call.target, call.args[1:], dict(call.kwargs)
    return _upsample(call, mode, lambda t: target(t, *rest, **kw))


@register_bound(nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)
def _upsample_module(call: OpCall) -> Any:
    module = call.module
    assert module is not None
    return _upsample(call, module.mode, module)
