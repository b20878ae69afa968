"""The registry of per-layer squared-gradient rules.

A rule ``rule(module, a, delta, budget) -> {param_name: sum_x g_x^2}`` receives the module's input
``a`` and the gradient ``delta`` of a scalar with respect to the module's output (batch in dimension
0 of both) and returns, for every trainable parameter the module owns directly, the sum over samples
``x`` of the elementwise squares of the per-sample gradients ``g_x`` (the part of the parameter's
gradient that flows through sample ``x``). ``budget`` bounds the bytes of one chunk of per-sample
tensors the rule may allocate (see :func:`~sturdy.persample.chunking.samples_per_chunk`).

A *column rule* ``column_rule(module, a, deltas, budget)`` takes ``K`` output gradients of the same
input at once (``deltas`` has a leading column dimension, ``(K, *output.shape)``) and returns the sum of
the ``K`` rules' results; a layer registers one when sharing work between columns pays (the Conv rule
unfolds its input once for all columns). Layers without one loop over the columns.
"""

from __future__ import annotations

from typing import Callable, Dict

from torch import Tensor, nn

from sturdy.persample.generic import generic_rule

__all__ = [
    "SquaredGradRule",
    "register_squared_grad",
    "register_column_rule",
    "squared_grad_rules",
    "rule_for",
    "column_rule_for",
    "looped_columns",
]

SquaredGradRule = Callable[[nn.Module, Tensor, Tensor, int], Dict[str, Tensor]]
_RULES: Dict[type, SquaredGradRule] = {}
_COLUMN_RULES: Dict[type, SquaredGradRule] = {}


def register_squared_grad(*module_types: type) -> Callable[[SquaredGradRule], SquaredGradRule]:
    """Register ``rule(module, a, delta, budget) -> {param_name: sum_x g_x^2}`` for module types.

    ``a`` is the module's input, ``delta`` the gradient of the loss with respect to its output, both
    with the batch in dimension 0; ``budget`` is the memory budget in bytes of one chunk of per-sample
    tensors (see :func:`~sturdy.persample.chunking.samples_per_chunk`). A rule applies to subclasses
    too (the first class along the MRO with a rule wins).
    """

    def decorator(rule: SquaredGradRule) -> SquaredGradRule:
        for module_type in module_types:
            _RULES[module_type] = rule
        return rule

    return decorator


def register_column_rule(*module_types: type) -> Callable[[SquaredGradRule], SquaredGradRule]:
    """Register the column rule of module types that already have a rule (see the module docstring)."""

    def decorator(rule: SquaredGradRule) -> SquaredGradRule:
        for module_type in module_types:
            _COLUMN_RULES[module_type] = rule
        return rule

    return decorator


def squared_grad_rules() -> Dict[type, SquaredGradRule]:
    """A copy of the registry: module type -> rule."""
    return dict(_RULES)


def rule_for(module: nn.Module) -> SquaredGradRule:
    """The rule of the first class of ``type(module).__mro__`` that has one.

    Modules without one get :func:`~sturdy.persample.generic.generic_rule` (``torch.func``).
    """
    for klass in type(module).__mro__:
        rule = _RULES.get(klass)
        if rule is not None:
            return rule
    return generic_rule


def looped_columns(rule: SquaredGradRule) -> SquaredGradRule:
    """The column rule that applies ``rule`` to each column in turn and adds the results."""

    def column_rule(module: nn.Module, a: Tensor, deltas: Tensor, budget: int) -> Dict[str, Tensor]:
        total: Dict[str, Tensor] = {}
        for delta in deltas.unbind(0):
            for name, value in rule(module, a, delta, budget).items():
                total[name] = total[name].add_(value) if name in total else value
        return total

    return column_rule


def column_rule_for(module: nn.Module) -> SquaredGradRule:
    """The column rule of the class whose rule :func:`rule_for` picks (a loop over columns when it has none)."""
    for klass in type(module).__mro__:
        rule = _RULES.get(klass)
        if rule is not None:
            return _COLUMN_RULES.get(klass) or looped_columns(rule)
    return looped_columns(generic_rule)
