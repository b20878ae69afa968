"""Module hooks that feed the rules: which modules are tracked, and two ways to see their output gradients.

* :class:`SquaredGradientHooks` computes a module's statistics during the backward pass itself: a
  forward hook keeps the module's input ``a`` (a view, no copy) and registers a gradient hook on its
  output, which receives ``delta`` *before* autograd reaches the module's parameters. One backward
  pass, nothing kept afterwards (what a training step needs).
* :class:`CallRecorder` keeps every call's input and output so that the caller can take gradients
  with respect to the outputs for several output gradients of one forward pass (one backward pass per
  column of a factor, say); it hands a clone of each output to the rest of the network so that
  in-place operations downstream (``ReLU(inplace=True)``) leave the recorded output intact.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import torch
from torch import Tensor, nn

from sturdy.errors import UnsupportedModuleError
from sturdy.persample.batching import batch_followers, first_tensor, follows_batch, output_per_sample_squares
from sturdy.persample.registry import SquaredGradRule, column_rule_for, rule_for

__all__ = [
    "TrackedModule",
    "trainable_modules",
    "squared_gradients",
    "column_squared_gradients",
    "SquaredGradientHooks",
    "CallRecorder",
]


@dataclass(eq=False)
class TrackedModule:
    """A module owning trainable parameters, with its rule.

    Attributes:
        name: qualified name in the model (``""`` for the model itself).
        module: the module.
        params: attribute name -> trainable parameter the module owns directly.
        rule: its squared-gradient rule (:func:`~sturdy.persample.registry.rule_for`).
        nbytes: bytes of ``params``.
        pending: forward calls whose output gradient has not arrived yet (:class:`SquaredGradientHooks`).
    """

    name: str
    module: nn.Module
    params: Dict[str, Tensor]
    rule: SquaredGradRule
    nbytes: int
    pending: int = 0


def parameter_bytes(params: Any) -> int:
    """Bytes of an iterable of tensors."""
    return sum(p.numel() * p.element_size() for p in params)


def trainable_modules(model: nn.Module) -> List[TrackedModule]:
    """Every module of ``model`` that owns trainable parameters directly, in ``named_modules`` order."""
    out = []
    for name, module in model.named_modules():
        own = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
        if own:
            out.append(TrackedModule(name, module, own, rule_for(module), parameter_bytes(own.values())))
    return out


def squared_gradients(tracked: TrackedModule, a: Tensor, delta: Tensor, budget: int) -> Dict[str, Tensor]:
    """``{attribute: sum_x g_x^2}`` of one call of ``tracked`` with input ``a`` and output gradient ``delta``."""
    with torch.no_grad():
        return tracked.rule(tracked.module, a, delta.detach(), budget)


def column_squared_gradients(
    tracked: TrackedModule, a: Tensor, deltas: Tensor, budget: int, groups: Optional[int] = None
) -> Dict[str, Tensor]:
    """:func:`squared_gradients` summed over the leading column dimension of ``deltas`` (``(K, *output.shape)``);
    with ``groups``, summed over each of that many equal consecutive groups of the columns: ``(groups, *shape)``."""
    with torch.no_grad():
        result = column_rule_for(tracked.module)(tracked.module, a, deltas.detach(), budget, groups or 1)
    return result if groups is not None else {name: value[0] for name, value in result.items()}


def _refuse_arguments(tracked: TrackedModule, args: Tuple[Any, ...]) -> None:
    raise UnsupportedModuleError(
        f"module '{tracked.name}' ({type(tracked.module).__name__}) was called with {len(args)} "
        "positional arguments; squared-gradient statistics need modules called as module(x) "
        "with one tensor",
        module=tracked.module,
        path=tracked.name,
    )


class SquaredGradientHooks:
    """Computes ``sum_x g_x^2`` of every trainable module of a model during each backward pass.

    For every call of a tracked module under grad mode, ``on_result(tracked, {attribute: value})`` is
    called as soon as the module's output gradient is known, with ``budget(tracked)`` bytes for one
    chunk of per-sample tensors.

    A call whose input or output does not follow the model's batch (a positional embedding of shared
    indices, a layer applied to a learned query, a reshaped or time-major input; see
    :mod:`~sturdy.persample.batching`) cannot be read per sample from its output gradient, which the
    broadcast has already summed over the samples: its statistics are computed exactly from the model's
    output gradient instead (per-sample vector-Jacobian products through the graph, before any module's
    own), at a cost of about one backward pass per sample for those parameters. This needs the model's
    output to be a tensor with the samples in dimension 0 (the loss a sum or mean of per-sample terms).

    Limitations (checked, never silent): a tracked module must run at most once per forward pass
    (shared weights miss cross terms and raise :class:`~sturdy.errors.UnsupportedModuleError`), be
    called as ``module(x)`` with one tensor, and a grad-enabled forward must be followed by its
    backward (evaluate under ``torch.no_grad()``).
    """

    PROBE_CACHE = 64
    """Input signatures whose probe (:func:`~sturdy.persample.batching.batch_followers`) is remembered."""

    def __init__(
        self,
        model: nn.Module,
        *,
        on_result: Callable[[TrackedModule, Dict[str, Tensor]], None],
        budget: Callable[[TrackedModule], int],
    ) -> None:
        self.tracked = trainable_modules(model)
        self._on_result = on_result
        self._budget = budget
        self._computing = False
        self._model = model
        self._batch: Optional[int] = None  # samples of the current forward pass (None: unknown)
        self._followers: Optional[Set[int]] = None  # modules that follow the batch (probe of this signature)
        self._probes: Dict[Tuple[Any, ...], Set[int]] = {}
        self._shared: List[TrackedModule] = []  # calls of this forward pass that do not follow the batch
        self._output: Optional[Tensor] = None  # the model output whose gradient feeds them
        self._handles = [t.module.register_forward_hook(self._make_forward_hook(t)) for t in self.tracked]
        self._handles.append(model.register_forward_pre_hook(self._root_pre_hook, with_kwargs=True))
        self._handles.append(model.register_forward_hook(self._root_hook))

    def _root_pre_hook(self, model: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        """Note the batch size of a grad-enabled forward pass and which modules follow it (probed once per shape)."""
        if self._computing or not torch.is_grad_enabled():
            return
        x = first_tensor(args, kwargs)
        self._batch = int(x.shape[0]) if x is not None and x.dim() > 0 else None
        self._shared = []
        self._output = None
        if x is None or self._batch is None or self._batch <= 1:
            self._followers = None
            return
        key = tuple((tuple(t.shape), t.dtype, t.device) if isinstance(t, Tensor) else type(t)
                    for t in list(args) + list(kwargs.values())) + tuple(kwargs)
        if key not in self._probes:
            if len(self._probes) >= self.PROBE_CACHE:
                self._probes.clear()
            self._computing = True
            try:
                self._probes[key] = batch_followers(model, [t.module for t in self.tracked], args, kwargs,
                                                    self._batch)
            finally:
                self._computing = False
        self._followers = self._probes[key]

    def _follows(self, module: nn.Module, a: Tensor, output: Tensor) -> bool:
        batch = self._batch
        if batch is None or batch <= 1:
            return True
        return follows_batch(a, output, batch) and self._followers is not None and id(module) in self._followers

    def _root_hook(self, model: nn.Module, args: Tuple[Any, ...], output: Any) -> None:
        """Route the modules that do not follow the batch to the exact path (the model output's gradient)."""
        if not self._shared:
            return
        shared, self._shared = self._shared, []
        if not (isinstance(output, Tensor) and output.requires_grad and output.dim() > 0
                and output.shape[0] == self._batch):
            names = ", ".join(f"'{t.name}' ({type(t.module).__name__})" for t in shared)
            raise UnsupportedModuleError(
                f"module(s) {names} were called with inputs shared across the batch (leading dimension not the "
                f"batch of {self._batch} samples, or broadcast), so their per-sample gradients must be taken "
                "from the model's output; that needs the model to return one tensor with the samples in "
                "dimension 0 that requires grad. Wrap the model so that it does",
                module=shared[0].module,
                path=shared[0].name,
            )
        self._output = output
        output.register_hook(functools.partial(self._exact, shared))

    def _exact(self, shared: List[TrackedModule], delta: Tensor) -> None:
        """Per-sample squared gradients of the parameters of ``shared`` from the model output's gradient."""
        output, self._output = self._output, None
        if output is None or self._computing:
            return
        params = [p for t in shared for p in t.params.values()]
        self._computing = True
        try:
            squares = output_per_sample_squares(output, delta.detach(), params,
                                                max(self._budget(t) for t in shared))
        finally:
            self._computing = False
        it = iter(squares)
        for tracked in shared:
            self._on_result(tracked, {attr: next(it) for attr in tracked.params})

    def _make_forward_hook(self, tracked: TrackedModule) -> Callable:
        def forward_hook(module: nn.Module, args: Tuple, output: object) -> None:
            if self._computing or not torch.is_grad_enabled():
                return  # (_computing: the torch.func fallback calls the module again)
            if not isinstance(output, Tensor) or not output.requires_grad:
                return
            if len(args) != 1 or not isinstance(args[0], Tensor):
                _refuse_arguments(tracked, args)
            saved = [args[0].detach()]  # released after use: autograd frees its own copy progressively
            tracked.pending += 1
            shared = tracked.pending > 1
            per_sample = self._follows(module, args[0], output)
            if not per_sample:
                self._shared.append(tracked)  # computed from the model output's gradient (_exact)

            def grad_hook(delta: Tensor) -> None:
                if self._computing:
                    return  # a backward pass of the exact path (_exact) runs through this module
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
                if not per_sample:
                    saved.clear()
                    return
                self._computing = True
                try:
                    with torch.no_grad():  # (squared_gradients, inlined: this runs for every module and step)
                        a, d = saved[0], delta.detach()
                        if {a.dtype, d.dtype} & {torch.bfloat16, torch.float16}:  # autocast: float32 sums
                            a, d = a.float(), d.float()
                        result = tracked.rule(module, a, d, self._budget(tracked))
                finally:
                    self._computing = False
                    saved.clear()
                self._on_result(tracked, result)

            output.register_hook(grad_hook)

        return forward_hook

    def reset(self) -> None:
        """Forget pending forward passes."""
        for tracked in self.tracked:
            tracked.pending = 0
        self._shared = []
        self._output = None

    def remove(self) -> None:
        """Remove every hook from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


@dataclass(frozen=True, eq=False)
class Call:
    """One recorded call: the tracked module, its positional arguments (detached) and its output."""

    tracked: TrackedModule
    args: Tuple[Any, ...]
    output: Any


class CallRecorder:
    """Records the calls of tracked modules while :attr:`active` (see the module docstring).

    ``calls`` lists the calls of the last recorded forward pass in order; outputs that are tensors
    are the originals (part of the graph), the network continued with clones of them.
    """

    def __init__(self, tracked: List[TrackedModule]) -> None:
        self.calls: List[Call] = []
        self.active = False
        self._handles = [t.module.register_forward_hook(self._make_hook(t)) for t in tracked]

    def _make_hook(self, tracked: TrackedModule) -> Callable:
        def hook(module: nn.Module, args: Tuple[Any, ...], output: Any) -> Optional[Tensor]:
            if not self.active:
                return None
            detached = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
            self.calls.append(Call(tracked, detached, output))
            return output.clone() if isinstance(output, Tensor) else None

        return hook

    def clear(self) -> None:
        """Forget the recorded calls."""
        self.calls.clear()

    def remove(self) -> None:
        """Remove every hook."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
