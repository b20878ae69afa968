"""The registry of per-operator Lipschitz rules, and when a module's rule applies.

Operators are looked up by module class (``nn.Conv2d``), function (``F.relu``, ``operator.add``) or
tensor-method name (``"view"``). A rule returns one of:

* :class:`Factor`: a constant L2 Lipschitz factor with respect to the operator's tensor input;
* a :class:`~sturdy.lipschitz.operators.LinearOp`: a linear operator whose norm is bounded directly;
* :class:`Combine`: a combinator of several inputs (sum, concatenation).

**Applicability is about behaviour, not class names.** A module class's rule models what that class's
own ``forward`` computes. It applies to a module only when

* the module's class is the registered class, or a subclass that overrides none of the methods the
  computation runs through (``forward``, ``__call__``, and what the registration lists in ``computes``,
  e.g. ``_conv_forward``): a reparametrised weight read through the module's ``weight`` attribute
  (``torch.nn.utils.parametrize``) is fine, the rule reads the same attribute;
* the instance itself replaces none of those methods (``module.forward = functools.partial(f, module)``,
  ``types.MethodType``, the pattern of wrapper libraries' hooks): an instance attribute wins over the class;
* the module has no forward hooks or pre-hooks (they change its inputs or outputs).

Otherwise :func:`find_rule` returns ``None`` and the graph tracer traces into the module, so the operations
it really runs (hooks included) are bounded one by one; :func:`rule_refusal` says why the rule did not apply.
"""

from __future__ import annotations

import operator
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = [
    "OpCall",
    "Factor",
    "Combine",
    "SUM",
    "CONCAT",
    "Rule",
    "register_bound",
    "unregister_bound",
    "find_rule",
    "rule_refusal",
    "global_hooks",
    "instance_overrides",
    "includes_batch_dim",
    "is_inplace",
    "tensor_arg",
]

_INPLACE_OPERATORS = frozenset({
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
    operator.ipow, operator.imatmul, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
})
# methods through which every module computes its output; a subclass overriding one runs other code
_CALL_METHODS = ("forward", "__call__", "_call_impl", "_wrapped_call_impl", "__getattr__", "__getattribute__")


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
        live: ``live(index, name)`` returns a function recomputing argument ``index`` (or keyword
            ``name``) from the model's current parameters (for weights computed in ``forward``).
    """

    target: Any
    path: str
    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]
    input_shape: Optional[Tuple[int, ...]]
    output: Any
    dependent_args: Tuple[int, ...] = ()
    live: Optional[Callable[[int, str], Callable[[], Any]]] = field(default=None, compare=False)

    @property
    def module(self) -> Optional[nn.Module]:
        return self.target if isinstance(self.target, nn.Module) else None

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        """Argument by position or keyword (functional forms accept both)."""
        if len(self.args) > index:
            return self.args[index]
        return self.kwargs.get(name, default)

    def live_arg(self, index: int, name: str) -> Callable[[], Any]:
        """A function returning the current value of an input-independent argument (a weight)."""
        if self.live is not None:
            return self.live(index, name)
        value = self.arg(index, name)
        return lambda: value


@dataclass(frozen=True)
class Factor:
    """A constant L2 Lipschitz factor of a single-input operator."""

    value: float
    kind: str = "factor"


@dataclass(frozen=True)
class Combine:
    """Combinator of several inputs: ``"sum"`` (``L = sum w_i L_i``) or ``"concat"`` (``L = sqrt(sum (w_i L_i)^2)``).

    ``weights`` (one per input-dependent argument, in argument order; default 1) scale the inputs,
    e.g. the ``alpha`` of ``torch.add``; broadcasting is accounted for by the graph.
    """

    how: str
    weights: Optional[Tuple[float, ...]] = None


SUM = Combine("sum")
CONCAT = Combine("concat")


Rule = Callable[[OpCall], Union[Factor, Any, Combine]]
_REGISTRY: Dict[Any, Rule] = {}
_COMPUTES: Dict[type, Tuple[str, ...]] = {}


def register_bound(*targets: Any, computes: Sequence[str] = ()) -> Callable[[Rule], Rule]:
    """Register a Lipschitz rule for module classes, functions, or tensor-method names.

    A module class's rule also applies to its subclasses that override neither ``forward`` nor the
    methods named in ``computes`` (e.g. ``("_conv_forward",)``), and only to modules without forward
    hooks; other modules are traced into (see the module docstring).

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
            if isinstance(t, type):
                _COMPUTES[t] = tuple(computes)
        return rule

    return deco


def global_hooks() -> Tuple[str, ...]:
    """Names of the global module hooks registered with ``torch.nn.modules.module.register_module_forward_*``."""
    mod = nn.modules.module
    names = ("_global_forward_hooks", "_global_forward_pre_hooks")
    return tuple(n for n in names if getattr(mod, n, None))


def _registered_base(module: nn.Module) -> Optional[type]:
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            return cls
    return None


def rule_refusal(module: nn.Module) -> Optional[str]:
    """Why the rule registered for a base class of ``module`` does not apply to it (``None`` if it does
    apply or no rule is registered)."""
    base = _registered_base(module)
    if base is None:
        return None
    watched = set(_CALL_METHODS) | set(_COMPUTES.get(base, ()))
    for cls in type(module).__mro__:
        if cls is base:
            break
        overridden = sorted(watched & set(vars(cls)))
        if overridden:
            return (f"{cls.__name__} overrides {', '.join(overridden)} of {base.__name__}, so it may compute something "
                    f"else than the {base.__name__} rule models")
    patched = instance_overrides(module, base)
    if patched:
        return (f"the instance replaces {', '.join(patched)} (e.g. functools.partial, types.MethodType or a wrapper "
                "library's hook), so it may compute something else than the class models")
    if module._forward_hooks or module._forward_pre_hooks:
        return "it has forward hooks or pre-hooks, which change what it computes"
    return None


def instance_overrides(module: nn.Module, base: Optional[type] = None) -> Tuple[str, ...]:
    """Names of the methods a module's computation runs through that are replaced on the instance itself
    (``module.forward = functools.partial(...)``): Python finds them before the class's own methods."""
    watched = set(_CALL_METHODS) | set(_COMPUTES.get(base, ()) if base is not None else ())
    return tuple(sorted(watched & set(vars(module))))


def find_rule(target: Any) -> Optional[Rule]:
    """The registered rule for a module instance, function, or method name, or ``None``.

    For a module, ``None`` also when its class's rule does not apply to it (:func:`rule_refusal`).
    """
    if isinstance(target, nn.Module):
        base = _registered_base(target)
        if base is None or rule_refusal(target) is not None:
            return None
        return _REGISTRY[base]
    if not isinstance(target, Hashable):
        return None
    try:
        return _REGISTRY.get(target)
    except TypeError:  # hashable by type, unhashable by value (e.g. a tuple holding a list)
        return None


def unregister_bound(*targets: Any) -> None:
    """Remove the rules registered for ``targets`` (a no-op for targets without a rule)."""
    for t in targets:
        _REGISTRY.pop(t, None)
        if isinstance(t, type):
            _COMPUTES.pop(t, None)


def includes_batch_dim(dims: Any, ndim: int) -> bool:
    """Whether a ``dim`` argument includes dimension 0 (the batch) of an ``ndim``-dimensional tensor, however it is
    spelled: ``0``, ``-ndim``, ``(1, -4)``, ``None`` or ``()`` (every dimension), a name (refused: unknown)."""
    if dims is None:
        return True
    seq = list(dims) if isinstance(dims, (tuple, list, torch.Size)) else [dims]
    if not seq or ndim < 1:
        return True
    for d in seq:
        if isinstance(d, torch.Tensor) and d.numel() == 1 and not d.is_floating_point():
            d = int(d)
        if not isinstance(d, int) or isinstance(d, bool) or d % ndim == 0:
            return True
    return False


def is_inplace(target: Any, kwargs: Dict[str, Any]) -> bool:
    """Whether an operator call writes into its first argument (``x.mul_(2)``, ``operator.imul``, ``inplace=True``)."""
    if isinstance(target, str):
        return target.endswith("_") and not target.endswith("__")
    if isinstance(target, nn.Module):
        return bool(getattr(target, "inplace", False))
    if target in _INPLACE_OPERATORS:
        return True
    name = getattr(target, "__name__", "")
    return bool(kwargs.get("inplace", False)) or (name.endswith("_") and not name.endswith("__"))


def tensor_arg(call: OpCall) -> torch.Tensor:
    """The first input-dependent tensor argument of ``call`` (its example value)."""
    for i in call.dependent_args:
        if isinstance(call.args[i], torch.Tensor):
            return call.args[i]
    return call.args[0]
