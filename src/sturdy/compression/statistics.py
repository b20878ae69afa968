"""Per-parameter sums of squared per-sample gradients, computed during the normal backward pass.

Convention: for a loss ``L`` that is backpropagated (usually the *mean* over a local mini-batch of
size ``b``), the statistic of a parameter element ``i`` is ``sum_x (dL/dtheta_i restricted to sample
x)^2``. With the mean reduction this is ``(1/b^2) sum_x g_{x,i}^2`` (``g_x`` the gradient of sample
``x``'s own loss), i.e. exactly ``s_i`` of DESIGN section 4: the second moment of the mean gradient,
an over-estimate of its variance *(choice)*. With a sum reduction it is ``sum_x g_{x,i}^2``.

How: a forward hook on every module that owns parameters keeps its input ``a`` (a view, no copy)
and registers a gradient hook on the module's output. That hook receives the output gradient
``delta`` *before* autograd reaches the module's parameters, so the statistics are complete before
the parameter's gradient is accumulated and before DDP's bucket for it fires. Per-layer rules live in a
registry (:func:`register_squared_grad`):

* ``nn.Linear``: ``(delta^2)^T (a^2)`` for 2-D inputs; per-sample products over extra dimensions
  (chunked like Conv2d).
* ``nn.Conv2d`` (any padding / padding mode / stride / dilation / groups): per-sample gradients from
  the input unfolded per chunk of samples (through a channels-last copy, see
  :func:`_unfold_channels_last`), one batched product per chunk into a reused buffer, whose squares
  are summed by a matrix-vector product.
* BatchNorm (``_BatchNorm``): per-sample terms ``sum_hw delta * xhat`` and ``sum_hw delta`` with the
  normalisation statistics the forward used (batch statistics in training mode, running ones in eval).
* anything else: ``torch.func.vmap(grad(...))`` over samples, chunked (the module must treat samples
  independently).

Memory: stored statistics take one gradient's size; *routed* ones (:meth:`SquaredGradientStatistics.route`,
what the compression state does) are added into their target as soon as a module's are computed, so
only that module's share lives at a time. On top of that, the per-sample tensors of one chunk
(per-sample gradients, and for Conv2d the unfolded input of the chunk) stay below a budget: ``chunk_bytes``
if given, else 7/8 of the model's parameter bytes when stored and 15/8 minus the module's own share when
routed. Either way the peak extra memory of the statistics stays below twice the gradient size (the rest
of the eighth is left to small activation-sized temporaries). A larger budget is faster (fewer, larger
batched products).

Limitations (checked, never silent): a parameterised module must run at most once per forward pass
(shared weights miss cross terms and raise :class:`~sturdy.errors.UnsupportedModuleError`), and
a grad-enabled forward must be followed by its backward (evaluate under ``torch.no_grad()``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sturdy.errors import ConfigurationError, DistributedError, UnsupportedModuleError

__all__ = [
    "SquaredGradientStatistics",
    "attach_squared_gradient_statistics",
    "register_squared_grad",
    "squared_grad_rules",
    "samples_per_chunk",
    "per_sample_squared_gradients",
]

SquaredGradRule = Callable[[nn.Module, Tensor, Tensor, int], Dict[str, Tensor]]
_RULES: Dict[type, SquaredGradRule] = {}


def register_squared_grad(*module_types: type) -> Callable[[SquaredGradRule], SquaredGradRule]:
    """Register ``rule(module, a, delta, budget) -> {param_name: sum_x g_x^2}`` for module types.

    ``a`` is the module's input, ``delta`` the gradient of the loss with respect to its output, both
    with the batch in dimension 0; ``budget`` is the memory budget in bytes of one chunk of per-sample
    tensors (see :func:`samples_per_chunk`).
    """

    def decorator(rule: SquaredGradRule) -> SquaredGradRule:
        for module_type in module_types:
            _RULES[module_type] = rule
        return rule

    return decorator


def squared_grad_rules() -> Dict[type, SquaredGradRule]:
    """A copy of the registry: module type -> rule."""
    return dict(_RULES)


def samples_per_chunk(budget: int, per_sample_elements: int, element_size: int = 4) -> int:
    """How many samples fit ``budget`` bytes when each needs ``per_sample_elements`` (at least one)."""
    return max(1, budget // max(1, per_sample_elements * element_size))


def _chunks(n: int, chunk: int) -> Iterator[slice]:
    for start in range(0, n, chunk):
        yield slice(start, min(n, start + chunk))


@register_squared_grad(nn.Linear)
def _linear_rule(module: nn.Module, a: Tensor, delta: Tensor, budget: int) -> Dict[str, Tensor]:
    out: Dict[str, Tensor] = {}
    want_bias = module.bias is not None and module.bias.requires_grad
    if a.dim() == 2:
        d2 = delta.square()
        if module.weight.requires_grad:
            out["weight"] = d2.t().mm(a.square())
        if want_bias:
            out["bias"] = d2.sum(0)
        return out
    n = a.shape[0]
    a3 = a.reshape(n, -1, a.shape[-1])
    d3 = delta.reshape(n, -1, delta.shape[-1])
    if module.weight.requires_grad:
        d3t = d3.transpose(1, 2)  # (n, out, t)

        def pairs(chunk: int) -> Iterator[Tuple[Tensor, Tensor]]:
            return zip(d3t.split(chunk), a3.split(chunk))

        out["weight"] = _sum_of_squared_products(pairs, n, (d3.shape[-1], a3.shape[-1]), budget, a).view_as(
            module.weight
        )
    if want_bias:
        out["bias"] = d3.sum(1).square_().sum(0)
    return out


def _sum_of_squared_products(
    pairs: Callable[[int], Iterator[Tuple[Tensor, Tensor]]],
    n: int,
    shape: Tuple[int, int],
    budget: int,
    like: Tensor,
    *,
    groups: int = 1,
    extra_per_sample: int = 0,
) -> Tensor:
    """``sum_x (left_x right_x)^2`` (elementwise square of each sample's matrix product), flat.

    ``pairs(chunk)`` yields, for consecutive chunks of ``chunk`` samples (the last one may be
    shorter), ``left`` ``(c * groups, o, t)`` and ``right`` ``(c * groups, t, i)``; the result has
    ``groups * o * i`` elements (sample ``x``'s products of its groups, concatenated). The products of
    a chunk go to one buffer that every chunk reuses, and their squares are added to the result by a
    matrix-vector product (no temporary per chunk). ``budget`` bounds the bytes of that buffer plus
    ``extra_per_sample`` elements per sample that ``pairs`` allocates (e.g. an unfolded input).
    """
    o, i = shape
    per_sample = groups * o * i
    chunk = min(n, samples_per_chunk(budget, per_sample + extra_per_sample, like.element_size()))
    buf = torch.empty(chunk * groups, o, i, dtype=like.dtype, device=like.device)
    ones = torch.ones(chunk, dtype=like.dtype, device=like.device)
    total = torch.zeros(per_sample, dtype=like.dtype, device=like.device)
    for left, right in pairs(chunk):
        rows = left.shape[0]
        products = buf if rows == buf.shape[0] else buf[:rows]
        torch.bmm(left, right, out=products)
        del left, right  # free this chunk's inputs before the next chunk is built
        c = rows // groups
        if c == 1:
            flat = products.view(per_sample)
            total.addcmul_(flat, flat)
        else:
            total.addmv_(products.square_().view(c, per_sample).t(), ones if c == chunk else ones[:c])
    return total


def _conv2d_padded_input(module: nn.Conv2d, a: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
    """Return the input padded as the convolution sees it, and the padding left for unfold."""
    if module.padding_mode != "zeros":
        return F.pad(a, module._reversed_padding_repeated_twice, mode=module.padding_mode), (0, 0)
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return a, (0, 0)
        pads: List[int] = []  # 'same' (stride 1): total dilation*(k-1), extra on the right/bottom
        for k, d in zip(reversed(module.kernel_size), reversed(module.dilation)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return F.pad(a, pads), (0, 0)
    return a, tuple(module.padding)  # type: ignore[return-value]


def _unfold_channels_last(
    inputs: Tensor, module: nn.Module, padding: Tuple[int, int], out_hw: Tuple[int, int]
) -> Tensor:
    """Unfolded ``inputs`` as ``(c * groups, L, kh * kw * C/groups)`` with the columns ordered (kh, kw, channel).

    The chunk is copied once into a zero-padded channels-last buffer; the patches are then a strided
    view of it whose innermost run (``kw`` neighbouring pixels of all channels of a group) is
    contiguous, so the one copy that ``reshape`` makes is several times faster than ``F.unfold``.
    """
    c, channels, h, w = inputs.shape
    (ph, pw), (oh, ow) = padding, out_hw
    kh, kw = module.kernel_size
    (sh, sw), (dh, dw) = module.stride, module.dilation
    groups = module.groups
    cg = channels // groups
    buf = inputs.new_zeros(c, h + 2 * ph, w + 2 * pw, channels)
    buf[:, ph : ph + h, pw : pw + w, :] = inputs.permute(0, 2, 3, 1)
    s0, s1, s2, _ = buf.stride()
    patches = buf.as_strided((c, groups, oh, ow, kh, kw, cg), (s0, cg, sh * s1, sw * s2, dh * s1, dw * s2, 1))
    return patches.reshape(c * groups, oh * ow, kh * kw * cg)


@register_squared_grad(nn.Conv2d)
def _conv2d_rule(module: nn.Module, a: Tensor, delta: Tensor, budget: int) -> Dict[str, Tensor]:
    out: Dict[str, Tensor] = {}
    n = a.shape[0]
    groups = module.groups
    c_out = module.out_channels
    if module.bias is not None and module.bias.requires_grad:
        out["bias"] = delta.sum((2, 3)).square_().sum(0)
    if not module.weight.requires_grad:
        return out
    padded, padding = _conv2d_padded_input(module, a)
    out_hw = (delta.shape[2], delta.shape[3])
    positions = out_hw[0] * out_hw[1]
    k = module.weight.numel() // c_out  # Cin/G * kh * kw (from the shape: no tensor op on the parameter)
    d_flat = delta.reshape(n * groups, c_out // groups, positions)  # per sample and group: (Cout/G, L)
    padded_pixels = (padded.shape[2] + 2 * padding[0]) * (padded.shape[3] + 2 * padding[1]) * padded.shape[1]

    def pairs(chunk: int) -> Iterator[Tuple[Tensor, Tensor]]:
        for left, inputs in zip(d_flat.split(chunk * groups), padded.split(chunk)):
            # built in the yield so that no reference outlives the chunk
            yield left, _unfold_channels_last(inputs, module, padding, out_hw)

    weight = _sum_of_squared_products(pairs, n, (c_out // groups, k), budget, a, groups=groups,
                                      extra_per_sample=groups * k * positions + padded_pixels)
    # columns are ordered (kh, kw, Cin/G); the weight is (Cout, Cin/G, kh, kw)
    kh, kw = module.kernel_size
    out["weight"] = weight.view(c_out, kh, kw, k // (kh * kw)).permute(0, 3, 1, 2).contiguous()
    return out


@register_squared_grad(nn.modules.batchnorm._BatchNorm)
def _batchnorm_rule(module: nn.Module, a: Tensor, delta: Tensor, budget: int) -> Dict[str, Tensor]:
    out: Dict[str, Tensor] = {}
    reduce_dims = [0] + list(range(2, a.dim()))
    shape = [1, -1] + [1] * (a.dim() - 2)
    if module.training or not module.track_running_stats or module.running_mean is None:
        mean = a.mean(reduce_dims)
        var = a.var(reduce_dims, unbiased=False)
    else:
        mean, var = module.running_mean, module.running_var
    spatial = list(range(2, a.dim()))
    if module.weight is not None and module.weight.requires_grad:
        xhat = (a - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + module.eps)
        per_sample = (delta * xhat).sum(spatial) if spatial else delta * xhat
        out["weight"] = (per_sample * per_sample).sum(0)
    if module.bias is not None and module.bias.requires_grad:
        per_sample = delta.sum(spatial) if spatial else delta
        out["bias"] = (per_sample * per_sample).sum(0)
    return out


def _generic_rule(module: nn.Module, a: Tensor, delta: Tensor, budget: int) -> Dict[str, Tensor]:
    """Per-sample gradients through ``torch.func`` (samples must be independent)."""
    from torch.func import functional_call, grad, vmap

    params = {name: p.detach() for name, p in module.named_parameters(recurse=False) if p.requires_grad}

    def sample_objective(p: Dict[str, Tensor], a_x: Tensor, d_x: Tensor) -> Tensor:
        y = functional_call(module, p, (a_x.unsqueeze(0),))
        return (y * d_x.unsqueeze(0)).sum()

    per_sample_grad = vmap(grad(sample_objective), in_dims=(None, 0, 0))
    out = {name: torch.zeros_like(p) for name, p in params.items()}
    chunk = samples_per_chunk(budget, sum(p.numel() for p in params.values()), a.element_size())
    for sl in _chunks(a.shape[0], chunk):
        with torch.enable_grad():  # torch.func needs grad mode, which is off inside a backward pass
            grads = per_sample_grad(params, a[sl], delta[sl])
        for name, g in grads.items():
            out[name] += g.square_().sum(0)
    return out


def _nbytes(params: Iterable[Tensor]) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def _rule_for(module: nn.Module) -> SquaredGradRule:
    for klass in type(module).__mro__:
        if klass in _RULES:
            return _RULES[klass]
    return _generic_rule


@dataclass
class _Tracked:
    name: str
    module: nn.Module
    params: Dict[str, Tensor]  # attribute name -> parameter
    rule: SquaredGradRule
    nbytes: int  # bytes of the module's own trainable parameters
    pending: int = 0


class SquaredGradientStatistics:
    """Accumulates ``sum_x g_{x,i}^2`` for every trainable parameter of a model (see module doc).

    Create it with :func:`attach_squared_gradient_statistics`. After a backward pass,
    :meth:`get` / :meth:`pop_flat` return the accumulated statistics; ``pop_flat`` also resets
    them (that is what the compression hook calls per bucket). Call :meth:`remove` to detach.
    """

    def __init__(self, model: nn.Module, *, chunk_bytes: Optional[int] = None) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigurationError(
                f"attach_squared_gradient_statistics expects an nn.Module, got {type(model).__name__}"
            )
        if chunk_bytes is not None and chunk_bytes <= 0:
            raise ConfigurationError(f"chunk_bytes must be a positive number of bytes, got {chunk_bytes}")
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ConfigurationError("the model has no trainable parameters: nothing to compute statistics for")
        model_bytes = _nbytes(params)
        self.chunk_bytes = None if chunk_bytes is None else int(chunk_bytes)
        self._model_bytes = model_bytes
        self.parameter_names: Dict[int, str] = {}
        self._sq: Dict[int, Tensor] = {}
        self._routes: Dict[int, Tensor] = {}
        self._owner: Dict[int, _Tracked] = {}
        self._handles: List[torch.utils.hooks.RemovableHandle] = []
        self._tracked: List[_Tracked] = []
        self._computing = False
        for module_name, module in model.named_modules():
            own = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
            if not own:
                continue
            tracked = _Tracked(module_name, module, own, _rule_for(module), _nbytes(own.values()))
            self._tracked.append(tracked)
            for attr, p in own.items():
                full = f"{module_name}.{attr}" if module_name else attr
                self.parameter_names[id(p)] = full
                self._owner[id(p)] = tracked
            self._handles.append(module.register_forward_hook(self._make_forward_hook(tracked)))

    def _make_forward_hook(self, tracked: _Tracked) -> Callable:
        def forward_hook(module: nn.Module, args: Tuple, output: object) -> None:
            if self._computing or not torch.is_grad_enabled():
                return  # (_computing: the torch.func fallback calls the module again)
            if not isinstance(output, Tensor) or not output.requires_grad:
                return
            if len(args) != 1 or not isinstance(args[0], Tensor):
                raise UnsupportedModuleError(
                    f"module '{tracked.name}' ({type(module).__name__}) was called with {len(args)} "
                    "positional arguments; squared-gradient statistics need modules called as module(x) "
                    "with one tensor",
                    module=module,
                    path=tracked.name,
                )
            saved = [args[0].detach()]  # released after use: autograd frees its own copy progressively
            tracked.pending += 1
            shared = tracked.pending > 1

            def grad_hook(delta: Tensor) -> None:
                tracked.pending -= 1
                if shared:
                    raise UnsupportedModuleError(
                        f"module '{tracked.name}' ({type(module).__name__}) ran more than once before "
                        "backward (shared weights, or a grad-enabled forward without backward): per-sample "
                        "squared gradients would miss cross terms. Use one module instance per call, and "
                        "run evaluation under torch.no_grad()",
                        module=module,
                        path=tracked.name,
                    )
                self._computing = True
                try:
                    with torch.no_grad():
                        result = tracked.rule(module, saved[0], delta.detach(), self._budget(tracked))
                finally:
                    self._computing = False
                    saved.clear()
                for attr, value in result.items():
                    key = id(tracked.params[attr])
                    route = self._routes.get(key)
                    if route is not None:
                        _add_flat_(route, value)
                    elif key in self._sq:
                        self._sq[key] += value
                    else:
                        self._sq[key] = value

            output.register_hook(grad_hook)

        return forward_hook

    def _budget(self, tracked: _Tracked) -> int:
        """Bytes for one chunk of ``tracked``'s per-sample tensors (see the module docstring)."""
        if self.chunk_bytes is not None:
            return self.chunk_bytes
        if all(id(p) in self._routes for p in tracked.params.values()):
            return max(self._model_bytes * 7 // 8, self._model_bytes * 15 // 8 - tracked.nbytes)
        return self._model_bytes * 7 // 8

    def route(self, param: Tensor, target: Optional[Tensor]) -> None:
        """Add the statistics of ``param`` into the flat ``target`` as soon as they are computed.

        A routed statistic is never stored here (:meth:`get` and :meth:`pop_flat` do not see it), so
        the statistics need no gradient-sized storage of their own: the compression state routes them
        straight into its accumulated variance. ``target=None`` removes the route.
        """
        key = id(param)
        if key not in self._owner:
            raise ConfigurationError(f"parameter of shape {tuple(param.shape)} is not tracked by these statistics")
        if target is None:
            self._routes.pop(key, None)
            return
        if target.numel() != param.numel() or target.dim() != 1:
            raise ConfigurationError(
                f"route target must be a flat tensor of {param.numel()} elements, got shape {tuple(target.shape)}"
            )
        self._routes[key] = target

    def clear_routes(self) -> None:
        """Remove every route set by :meth:`route`."""
        self._routes.clear()

    def get(self, param: Tensor) -> Optional[Tensor]:
        """The accumulated statistic of ``param`` (same shape), or ``None`` if no sample reached it."""
        return self._sq.get(id(param))

    def pop_flat(self, params: Sequence[Tensor]) -> Tensor:
        """Concatenate the flattened statistics of ``params`` (zeros where none) and reset them.

        Raises:
            DistributedError: the backward of a parameter's module has not run yet (the statistics
                would be incomplete), or a parameter is not tracked.
        """
        pieces = []
        for p in params:
            owner = self._owner.get(id(p))
            if owner is None:
                raise DistributedError(
                    f"parameter of shape {tuple(p.shape)} is not tracked by these statistics: attach "
                    "them to the same model that DDP wraps, after freezing parameters"
                )
            if owner.pending:
                raise DistributedError(
                    f"statistics of '{self.parameter_names[id(p)]}' are not ready when its gradient "
                    "bucket fired; this happens when a module's output gradient is not computed before "
                    "its parameters' gradients"
                )
            value = self._sq.pop(id(p), None)
            pieces.append(value.reshape(-1) if value is not None else torch.zeros_like(p).reshape(-1))
        if not pieces:
            return torch.zeros(0)
        return torch.cat(pieces)

    def pop_add_(self, params: Sequence[Tensor], out: Tensor) -> Tensor:
        """Add the flattened statistics of ``params`` into the flat ``out`` in place and reset them.

        Equal to ``out.add_(self.pop_flat(params))`` without the concatenated copy; same errors.
        """
        offset = 0
        for p in params:
            owner = self._owner.get(id(p))
            if owner is None or owner.pending:
                self.pop_flat([p])  # raises the error that explains it
            value = self._sq.pop(id(p), None)
            n = p.numel()
            if value is not None:
                _add_flat_(out[offset : offset + n], value)
            offset += n
        return out

    def reset(self) -> None:
        """Drop accumulated statistics and pending forward passes."""
        self._sq.clear()
        for tracked in self._tracked:
            tracked.pending = 0

    def remove(self) -> None:
        """Remove every hook from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._routes.clear()


def _add_flat_(target: Tensor, value: Tensor) -> None:
    """``target += value`` for a flat ``target`` and a ``value`` of any shape with as many elements."""
    target.add_(value.reshape(-1).to(target))


def attach_squared_gradient_statistics(
    model: nn.Module, *, chunk_bytes: Optional[int] = None
) -> SquaredGradientStatistics:
    """Attach hooks to ``model`` that compute ``sum_x g_{x,i}^2`` during every backward pass.

    Call it before wrapping the model in DDP. See the module docstring for the convention
    (the statistic of the loss actually backpropagated, so ``(1/b^2) sum_x g_x^2`` for a mean loss).

    Args:
        model: the model; every module owning trainable parameters gets a forward hook.
        chunk_bytes: memory budget of the per-sample tensors of one chunk (default: 7/8 of the
            model's trainable parameter bytes, more for routed statistics; see the module docstring).

    Example:
        >>> model = nn.Linear(3, 2)
        >>> stats = attach_squared_gradient_statistics(model)
        >>> model(torch.ones(4, 3)).sum().backward()
        >>> stats.get(model.bias).tolist()  # four samples, each with gradient 1
        [4.0, 4.0]
    """
    return SquaredGradientStatistics(model, chunk_bytes=chunk_bytes)


def per_sample_squared_gradients(
    model: nn.Module, inputs: Tensor, targets: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor]
) -> Dict[str, Tensor]:
    """Brute-force reference: one backward per sample, ``{name: sum_x (grad of loss_x / b)^2}``.

    ``loss_fn(logits, targets)`` must return the per-sample mean loss of its batch; the result uses the
    mean convention of the module docstring (each sample's gradient scaled by ``1/b``). Only valid
    for models whose samples do not interact (no training-mode BatchNorm).
    """
    b = inputs.shape[0]
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    out = {n: torch.zeros_like(p) for n, p in params.items()}
    for x in range(b):
        loss = loss_fn(model(inputs[x : x + 1]), targets[x : x + 1]) / b
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (n, _), g in zip(params.items(), grads):
            if g is not None:
                out[n] += g * g
    return out
