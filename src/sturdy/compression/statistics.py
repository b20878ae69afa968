"""Per-parameter sums of squared per-sample gradients, routed into the compression state's buckets.

Convention: for a loss ``L`` that is backpropagated (usually the *mean* over a local mini-batch of
size ``b``), the statistic of a parameter element ``i`` is ``sum_x (dL/dtheta_i restricted to sample
x)^2``. With the mean reduction this is ``(1/b^2) sum_x g_{x,i}^2`` (``g_x`` the gradient of sample
``x``'s own loss), i.e. exactly ``s_i`` of docs/design.md section 4: the second moment of the mean gradient,
an over-estimate of its variance *(choice)*. With a sum reduction it is ``sum_x g_{x,i}^2``.

How: :class:`sturdy.persample.SquaredGradientHooks` computes each module's statistics from its input and
its output gradient during the backward pass, *before* autograd reaches the module's parameters, so the
statistics are complete before the parameter's gradient is accumulated and before DDP's bucket for it
fires. The per-layer rules (Linear, Conv2d, BatchNorm, ``torch.func`` for anything else) live in
:mod:`sturdy.persample` (:func:`sturdy.persample.register_squared_grad` adds one); this module
stores or routes the results.

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

from typing import Dict, Optional, Sequence

import torch
from torch import Tensor, nn

from sturdy.errors import ConfigurationError, DistributedError
from sturdy.persample import (
    SquaredGradientHooks,
    TrackedModule,
)
from sturdy.persample.recorder import parameter_bytes
from sturdy.validation import check_model

__all__ = [
    "SquaredGradientStatistics",
    "attach_squared_gradient_statistics",
]


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
        check_model(model)
        if chunk_bytes is not None and chunk_bytes <= 0:
            raise ConfigurationError(f"chunk_bytes must be a positive number of bytes, got {chunk_bytes}")
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ConfigurationError("the model has no trainable parameters: nothing to compute statistics for")
        model_bytes = parameter_bytes(params)
        self.chunk_bytes = None if chunk_bytes is None else int(chunk_bytes)
        self._model_bytes = model_bytes
        self.parameter_names: Dict[int, str] = {}
        self._sq: Dict[int, Tensor] = {}
        self._routes: Dict[int, Tensor] = {}
        self._owner: Dict[int, TrackedModule] = {}
        self._hooks = SquaredGradientHooks(model, on_result=self._add, budget=self._budget)
        for tracked in self._hooks.tracked:
            for attr, p in tracked.params.items():
                self.parameter_names[id(p)] = f"{tracked.name}.{attr}" if tracked.name else attr
                self._owner[id(p)] = tracked

    def _add(self, tracked: TrackedModule, result: Dict[str, Tensor]) -> None:
        """Route or store one module's statistics (called by the hooks during the backward pass)."""
        for attr, value in result.items():
            key = id(tracked.params[attr])
            route = self._routes.get(key)
            if route is not None:
                _add_flat_(route, value)
            elif key in self._sq:
                self._sq[key] += value
            else:
                self._sq[key] = value

    def _budget(self, tracked: TrackedModule) -> int:
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
        self._hooks.reset()

    def remove(self) -> None:
        """Remove every hook from the model."""
        self._hooks.remove()
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
