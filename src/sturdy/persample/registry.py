"""The registry of per-layer squared-gradient rules.

A rule ``rule(module, a, delta, budget) -> {param_name: sum_x g_x^2}`` receives the module's input
``a`` and the gradient ``delta`` of a scalar with respect to the module's output (batch in dimension
0 of both) and returns, for every trainable parameter the module owns directly, the sum over samples
``x`` of the elementwise squares of the per-sample gradients ``g_x`` (the part of the parameter's
gradient that flows through sample ``x``). ``budget`` bounds the bytes of one chunk of per-sample
tensors the rule may allocate (see :func:`~sturdy.persample.chunking.samples_per_chunk`).
"""

from __future__ import annotations

from typing import Callable, Dict

from torch import Tensor, nn

from sturdy.persample.generic import generic_rule

__all__ = [
    "SquaredGradRule",
    "register_squared_grad",
    "squared_grad_rules",
    "rule_for",
]

SquaredGradRule = Callable[[nn.Module, Tensor, Tensor, int], Dict[str, Tensor]]
_RULES: Dict[type, SquaredGradRule] = {}


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
