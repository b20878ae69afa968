"""The registry of per-layer squared-gradient rules.

A rule ``rule(module, a, delta, budget) -> {param_name: sum_x g_x^2}`` receives the module's input
``a`` and the gradient ``delta`` of a scalar with respect to the module's output (batch in dimension
0 of both) and returns, for every trainable parameter the module owns directly, the sum over samples
``x`` of the elementwise squares of the per-sample gradients ``g_x`` (the part of the parameter's
gradient that flows through sample ``x``). ``budget`` bounds the bytes of one chunk of per-sample
tensors the rule may allocate (see :func:`~sturdy.persample.chunking.samples_per_chunk`).

A *column rule* ``column_rule(module, a, deltas, budget, groups)`` takes ``K`` output gradients of the
same input at once (``deltas`` has a leading column dimension, ``(K, *output.shape)``), splits them into
``groups`` equal consecutive groups and returns, per parameter, the ``(groups, *shape)`` sums of the
rules' results over each group's columns; a layer registers one when sharing work between columns pays
(the Conv rule unfolds its input once for all columns; the Linear rule squares the output gradients of a
group before one product with the squared input). Layers without one loop over the columns.
"""

from __future__ import annotations

from typing import Callable, Dict

from torch import Tensor, nn

from sturdy.errors import ConfigurationError
from sturdy.persample.generic import generic_rule

__all__ = [
    "SquaredGradRule",
    "ColumnRule",
    "register_squared_grad",
    "register_column_rule",
    "squared_grad_rules",
    "rule_for",
    "column_rule_for",
    "looped_columns",
    "check_groups",
]

SquaredGradRule = Callable[[nn.Module, Tensor, Tensor, int], Dict[str, Tensor]]
ColumnRule = Callable[[nn.Module, Tensor, Tensor, int, int], Dict[str, Tensor]]
"""``column_rule(module, a, deltas, budget, groups) -> {param_name: (groups, *shape)}`` (module docstring)."""
_RULES: Dict[type, SquaredGradRule] = {}
_COLUMN_RULES: Dict[type, ColumnRule] = {}


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


def register_column_rule(*module_types: type) -> Callable[[ColumnRule], ColumnRule]:
    """Register the column rule of module types that already have a rule (see the module docstring)."""

    def decorator(rule: ColumnRule) -> ColumnRule:
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


def check_groups(columns: int, groups: int) -> int:
    """Columns per group; ``groups`` must divide ``columns``."""
    if groups < 1 or columns % groups:
        raise ConfigurationError(f"{columns} columns cannot be split into {groups} equal groups")
    return columns // groups


def looped_columns(rule: SquaredGradRule) -> ColumnRule:
    """The column rule that applies ``rule`` to each column in turn and adds the results per group."""

    def column_rule(module: nn.Module, a: Tensor, deltas: Tensor, budget: int, groups: int = 1) -> Dict[str, Tensor]:
        per_group = check_groups(deltas.shape[0], groups)
        total: Dict[str, Tensor] = {}
        for k, delta in enumerate(deltas.unbind(0)):
            for name, value in rule(module, a, delta, budget).items():
                if name not in total:
                    total[name] = value.new_zeros((groups, *value.shape))
                total[name][k // per_group].add_(value)
        return total

    return column_rule


def column_rule_for(module: nn.Module) -> ColumnRule:
    """The column rule of the class whose rule :func:`rule_for` picks (a loop over columns when it has none)."""
    for klass in type(module).__mro__:
        rule = _RULES.get(klass)
        if rule is not None:
            return _COLUMN_RULES.get(klass) or looped_columns(rule)
    return looped_columns(generic_rule)
