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

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from sturdy.errors import UnsupportedModuleError
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
    tracked: TrackedModule, a: Tensor, deltas: Tensor, budget: int
) -> Dict[str, Tensor]:
    """:func:`squared_gradients` summed over the leading column dimension of ``deltas`` (``(K, *output.shape)``)."""
    with torch.no_grad():
        return column_rule_for(tracked.module)(tracked.module, a, deltas.detach(), budget)


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

    Limitations (checked, never silent): a tracked module must run at most once per forward pass
    (shared weights miss cross terms and raise :class:`~sturdy.errors.UnsupportedModuleError`), be
    called as ``module(x)`` with one tensor, and a grad-enabled forward must be followed by its
    backward (evaluate under ``torch.no_grad()``).
    """

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
        self._handles = [t.module.register_forward_hook(self._make_forward_hook(t)) for t in self.tracked]

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
                    with torch.no_grad():  # (squared_gradients, inlined: this runs for every module and step)
                        result = tracked.rule(module, saved[0], delta.detach(), self._budget(tracked))
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
