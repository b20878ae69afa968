"""Trace a model with ``torch.fx`` and compose per-operator bounds over its graph.

:func:`build_program` traces the model once (modules whose registered rule applies stay leaves; every
other module, hooks included, is traced into: see :mod:`.registry`), runs it on zeros of the input shape,
and asks every input-dependent operator's rule (:mod:`.rules`, :mod:`.rules_copy`, :mod:`.rules_layers`)
for a factor, a linear operator or a combinator. Weights computed in ``forward`` (standardised,
scaled, reparametrised) are recomputed live from the parameters. :func:`fold_batchnorm` folds a
convolution or linear layer followed directly by an eval-mode BatchNorm (and used by nothing else) into
one operator, which is tighter than multiplying the two norms. :func:`compose` then gives every node the
bound of the map from the model input to that node's output: sequential composition multiplies, residual
addition adds (a broadcast term counts ``sqrt(copies)``), concatenation gives ``sqrt(L1^2 + L2^2)``,
values that do not depend on the input have none. The same composition serves the guaranteed bound
(float norms) and the training-time estimate (tensor norms).

Soundness checks beyond the rules: random operators (and functional dropout/batch norm called with
``training=True``) are refused; in-place operations are made explicit in the graph (refused when a view
of the overwritten tensor is used afterwards); the traced graph must reproduce the model's output on
random inputs, and two runs of the model must agree (randomness hidden in custom code); input-dependent
integer tensors (indices) are not Lipschitz; global module hooks are refused.

Conventions: L2 norms on flattened per-sample tensors; the model is traced in eval mode (BatchNorm
running statistics, Dropout off); ``input_shape`` is the shape of one input batch including the batch
dimension, e.g. ``(1, 1, 8, 8)`` (its batch size is ignored).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from sturdy.errors import ConfigurationError, SturdyError, UnsupportedModuleError
from sturdy.lipschitz import rules, rules_copy, rules_layers  # noqa: F401  (the rules register themselves)
from sturdy.lipschitz.checks import (
    Live,
    check_model,
    check_op_finite,
    check_reproduces,
    functionalize_inplace,
    kwarg_nodes,
    positional_inputs,
    target_name,
)
from sturdy.lipschitz.operators import BatchNormOp, Conv2dOp, LinearLayerOp, LinearOp
from sturdy.lipschitz.registry import (
    Combine,
    Factor,
    OpCall,
    find_rule,
    instance_overrides,
    is_inplace,
    rule_refusal,
)
from sturdy.lipschitz.rules_layers import random_call
from sturdy.utils import eval_mode, model_device_dtype

__all__ = [
    "Step",
    "Program",
    "check_input_shape",
    "trace",
    "build_program",
    "fold_batchnorm",
    "compose",
]

MAX_INPUT_ELEMENTS = 2**28
"""Most values per input a bound is built for (the cap of :func:`sturdy.validation.check_input_shape`)."""


@dataclass
class Step:
    """One node of the traced graph as the composition sees it (``op`` set when ``kind == "op"``)."""

    name: str
    kind: str  # "input", "const", "factor", "op", "sum", "concat"
    inputs: Tuple[str, ...]
    path: str
    factor: float = 1.0
    op: Optional[LinearOp] = None
    op_kind: str = ""
    weights: Tuple[float, ...] = ()  # per input of a sum/concat (scales, broadcast copies)
    relu: bool = False  # an elementwise ReLU (a unit is constant where its input stays negative)


@dataclass
class Program:
    """A traced model: its steps in graph order, the output step and the final linear layer (if any)."""

    steps: List[Step]
    output: str
    last_linear: Optional[Step]  # the step producing the output, when it is a linear layer
    input_shape: Tuple[int, ...]
    graph_module: Optional[torch.fx.GraphModule] = None  # the traced graph (its node names are the steps')


def check_input_shape(input_shape: Sequence[int]) -> Tuple[int, ...]:
    """``input_shape`` (including the batch dimension) with the batch dimension set to 1.

    Raises:
        ConfigurationError: not at least two positive ints, or more than :data:`MAX_INPUT_ELEMENTS` values per
            input (refused before anything is allocated).
    """
    try:
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ConfigurationError(f"input_shape must be a sequence of ints, got {input_shape!r}") from exc
    if len(shape) < 2 or min(shape) < 1:
        raise ConfigurationError(
            f"input_shape must be the shape of one input batch including the batch dimension, e.g. (1, 1, 8, 8) "
            f"for 8x8 grey images; got {shape}"
        )
    size = math.prod(shape[1:])
    if size > MAX_INPUT_ELEMENTS:
        raise ConfigurationError(
            f"input_shape {(1,) + shape[1:]} has {size} values per input, more than {MAX_INPUT_ELEMENTS}; the bound "
            "traces the model on an input of this size, so check the shape (it includes the batch dimension)"
        )
    return (1,) + shape[1:]


class _Tracer(torch.fx.Tracer):
    """Keeps every module whose registered rule applies as a leaf (custom layers included) and traces into
    every other module, including ``torch.nn`` layers whose rule does not apply (hooks, overridden forward)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if find_rule(m) is not None:
            return True
        if rule_refusal(m) is not None or m._forward_hooks or m._forward_pre_hooks:
            return False
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except SturdyError:
            raise
        except Exception as exc:
            why = rule_refusal(m)
            if why is None:
                raise
            path = self.path_of_module(m)
            raise UnsupportedModuleError(
                f"no Lipschitz bound for {type(m).__name__} at {path!r}: {why}; tracing into it failed "
                f"({type(exc).__name__}: {exc})",
                module=m,
                path=path,
            ) from exc


def trace(model: nn.Module) -> torch.fx.GraphModule:
    """``torch.fx`` graph of ``model``, every module with an applicable registered rule kept as a leaf."""
    try:
        graph = _Tracer().trace(model)
        return torch.fx.GraphModule(model, graph)
    except (MemoryError, torch.cuda.OutOfMemoryError, SturdyError):
        raise
    except Exception as exc:  # symbolic tracing reports untraceable code as TraceError, TypeError, RuntimeError, ...
        raise UnsupportedModuleError(
            f"cannot trace {type(model).__name__} with torch.fx ({type(exc).__name__}: {exc}); Lipschitz bounds "
            "need a traceable model without data-dependent control flow",
            module=model,
        ) from exc


def build_program(model: nn.Module, input_shape: Sequence[int]) -> Program:
    """Trace ``model`` (in eval mode, restored after) on zeros of ``input_shape`` and apply every operator's rule.

    Raises:
        UnsupportedModuleError: untraceable model, an operator without a rule (named with its path), random
            operators, a traced graph that does not reproduce the model.
        ConfigurationError: malformed ``input_shape``, a model that cannot run on it, non-finite weights.
    """
    shape = check_input_shape(input_shape)
    device, dtype = model_device_dtype(model)
    check_model(model)
    root = model
    if find_rule(model) is not None or model._forward_hooks or model._forward_pre_hooks or instance_overrides(model):
        # keep a single registered operator a leaf; run the root's own hooks and its instance-level forward
        # (torch.fx traces a root through its class's forward)
        root = nn.Sequential(model)
    with eval_mode(model):
        gm = trace(root)
        with torch.no_grad():
            program = _build(gm, root, model, shape, dtype, device)
        for step in program.steps:  # named before the model's logits are checked on random inputs
            if step.op is not None:
                check_op_finite(step.op, step.path)
        check_reproduces(gm, model, shape, dtype, device)
    program.graph_module = gm
    return program


def _build(gm: torch.fx.GraphModule, root: nn.Module, model: nn.Module, shape: Tuple[int, ...], dtype: torch.dtype,
           device: torch.device) -> Program:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise UnsupportedModuleError(
            f"{type(model).__name__}.forward takes {len(placeholders)} inputs; Lipschitz bounds need exactly one",
            module=model,
        )
    builder = _Builder(gm, root, shape)
    output_node: Optional[torch.fx.Node] = None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            builder.source(node, torch.zeros(shape, dtype=dtype, device=device), "input", node.name)
        elif node.op == "output":
            output_node = node
        elif node.op == "get_attr":
            builder.source(node, builder.live.value(node), "const", node.target)
        else:
            builder.call(node)
    values, steps = builder.values, builder.steps
    assert output_node is not None
    out_arg = output_node.args[0]
    out_val = values.get(out_arg.name) if isinstance(out_arg, torch.fx.Node) else None
    if not isinstance(out_val, torch.Tensor) or not out_val.is_floating_point():
        raise UnsupportedModuleError(
            f"{type(model).__name__} must return one floating-point logits tensor; it returns "
            f"{type(out_val).__name__ if out_val is not None else type(out_arg).__name__}",
            module=model,
        )
    fold_batchnorm(steps, gm)
    by_name = {s.name: s for s in steps}
    out_step = by_name[out_arg.name]
    last = None
    if out_step.kind == "op" and isinstance(out_step.op, LinearLayerOp) and out_val.dim() == 2:
        feeds = values[out_step.inputs[0]]
        last = out_step if isinstance(feeds, torch.Tensor) and feeds.dim() == 2 else None
    return Program(steps, out_arg.name, last, shape)




class _Builder:
    """Walks the traced graph once: runs every node on the example input, tracks which values depend on the
    input, and turns every input-dependent call into a :class:`Step` through its operator's rule."""

    def __init__(self, gm: torch.fx.GraphModule, root: nn.Module, shape: Tuple[int, ...]) -> None:
        self.root, self.shape = root, shape
        self.values: Dict[str, Any] = {}
        self.dependent: Dict[str, bool] = {}
        self.steps: List[Step] = []
        self.live = Live(gm, root)
        self.order = {n.name: i for i, n in enumerate(gm.graph.nodes)}

    def source(self, node: torch.fx.Node, value: Any, kind: str, path: str) -> None:
        self.values[node.name] = value
        self.dependent[node.name] = kind == "input"
        self.steps.append(Step(node.name, kind, (), path))

    def load(self, a: Any) -> Any:
        return torch.fx.node.map_arg(a, lambda n: self.values[n.name])

    def call(self, node: torch.fx.Node) -> None:
        if node.op == "call_function" and any(self.dependent[n.name] for n in kwarg_nodes(node)):
            positional_inputs(node)
        args, kwargs = self.load(node.args), self.load(node.kwargs)
        target: Any = self.root.get_submodule(node.target) if node.op == "call_module" else node.target
        path = node.target if node.op == "call_module" else node.name
        reason = random_call(target, args, kwargs)
        if reason is not None:
            raise _refusal(node, target, path, f"is random in eval mode ({reason}), so the model's predictions are "
                                               "random and cannot be certified")
        inplace = any(self.dependent[n.name] for n in node.all_input_nodes) and is_inplace(target, kwargs)
        value = self.values[node.name] = _run(node, target, path, args, kwargs, self.shape)
        occurrences: List[torch.fx.Node] = []  # every use, so that x + x counts twice
        torch.fx.node.map_arg((node.args, node.kwargs), occurrences.append)
        dep_inputs = [n for n in occurrences if self.dependent[n.name]]
        self.dependent[node.name] = bool(dep_inputs) and _has_tensor(value)
        if not self.dependent[node.name]:  # constants, sizes, shapes
            self.steps.append(Step(node.name, "const", (), path))
            return
        self._check_values(node, target, path, dep_inputs)
        result = self._apply_rule(node, target, path, args, kwargs, dep_inputs)
        if inplace:
            contraction = (isinstance(result, Factor) and result.value <= 1.0) or (isinstance(result, Combine) and len(
                dep_inputs) == 1 and all(w <= 1.0 for w in result.weights or (1.0,)))
            functionalize_inplace(node, target, path, self.values, self.dependent, self.order, contraction)
        self.steps.append(self._step(node, target, path, result, dep_inputs))

    def _check_values(self, node: torch.fx.Node, target: Any, path: str, dep_inputs: List[torch.fx.Node]) -> None:
        for n in dep_inputs:
            v = self.values[n.name]
            if isinstance(v, torch.Tensor) and not (v.is_floating_point() or v.is_complex()):
                why = f"uses {n.name!r}, an input-dependent {v.dtype} tensor (e.g. indices of a max, a comparison)"
                raise _refusal(node, target, path, why + ": not Lipschitz; use only the values")

    def _apply_rule(self, node: torch.fx.Node, target: Any, path: str, args: Any, kwargs: Any,
                    dep_inputs: List[torch.fx.Node]) -> Any:
        rule = find_rule(target)
        if rule is None:
            raise UnsupportedModuleError(
                f"no Lipschitz bound registered for {target_name(node, target)} at {path!r}; register one with "
                "@sturdy.lipschitz.register_bound or replace the operator",
                module=target,
                path=path,
            )
        main_val = self.values[dep_inputs[0].name]

        def live_arg(index: int, name: str) -> Callable[[], Any]:
            a = node.args[index] if index < len(node.args) else node.kwargs.get(name)
            return self.live.thunk(a)

        return rule(OpCall(
            target=target,
            path=path,
            args=tuple(args),
            kwargs=dict(kwargs),
            input_shape=tuple(main_val.shape) if isinstance(main_val, torch.Tensor) else None,
            output=self.values[node.name],
            dependent_args=tuple(i for i, a in enumerate(node.args)
                                 if isinstance(a, torch.fx.Node) and self.dependent[a.name]),
            live=live_arg,
        ))

    def _step(self, node: torch.fx.Node, target: Any, path: str, result: Any, dep_inputs: List[torch.fx.Node]) -> Step:
        names = tuple(n.name for n in dep_inputs)
        if isinstance(result, Combine):
            weights = [1.0] * len(names) if result.weights is None else list(result.weights)
            if len(weights) != len(names):
                raise _refusal(node, target, path, "cannot match its input-dependent arguments")
            out = self.values[node.name]
            for i, n in enumerate(dep_inputs):  # a broadcast input is copied numel(out) / numel(input) times
                v = self.values[n.name]
                if isinstance(out, torch.Tensor) and isinstance(v, torch.Tensor) and v.numel() and result.how == "sum":
                    weights[i] *= math.sqrt(out.numel() / v.numel())
            return Step(node.name, result.how, names, path, weights=tuple(weights))
        if len(dep_inputs) != 1:
            raise _refusal(node, target, path, f"depends on the input through {len(dep_inputs)} arguments; only "
                                               "single-input operators, sums and concatenations are supported")
        if isinstance(result, Factor):
            relu = isinstance(target, nn.ReLU) or target in _RELUS
            return Step(node.name, "factor", names, path, factor=float(result.value), op_kind=result.kind, relu=relu)
        if isinstance(result, LinearOp):
            return Step(node.name, "op", names, path, op=result, op_kind=result.kind)
        raise TypeError(f"rule for {target_name(node, target)} returned {type(result).__name__}")


_RELUS = (F.relu, torch.relu, F.relu_, torch.relu_, "relu", "relu_")


def _refusal(node: torch.fx.Node, target: Any, path: str, why: str) -> UnsupportedModuleError:
    return UnsupportedModuleError(f"{target_name(node, target)} at {path!r} {why}", module=target, path=path)


def _run(node: torch.fx.Node, target: Any, path: str, args: Any, kwargs: Any, shape: Tuple[int, ...]) -> Any:
    try:
        if node.op == "call_module":
            return target(*args, **kwargs)
        if node.op == "call_function":
            return target(*args, **kwargs)
        return getattr(args[0], target)(*args[1:], **kwargs)
    except (MemoryError, torch.cuda.OutOfMemoryError, SturdyError):
        raise
    except Exception as exc:  # the model itself fails on this shape: say where, keep PyTorch's words
        raise ConfigurationError(
            f"the model cannot run on inputs of shape {shape} (input_shape includes the batch dimension): "
            f"{target_name(node, target)} at {path!r} raised {type(exc).__name__}: {exc}"
        ) from exc


def _has_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(_has_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(_has_tensor(v) for v in value.values())
    return False


def fold_batchnorm(steps: List[Step], gm: torch.fx.GraphModule) -> None:
    """Fold ``conv/linear -> BatchNorm`` pairs (the conv output used only by the BatchNorm)."""
    users = {n.name: len(n.users) for n in gm.graph.nodes}
    by_name = {s.name: s for s in steps}
    for step in steps:
        if step.kind != "op" or not isinstance(step.op, BatchNormOp):
            continue
        prev = by_name[step.inputs[0]]
        if prev.kind != "op" or users.get(prev.name, 0) != 1:
            continue
        if not isinstance(prev.op, (Conv2dOp, LinearLayerOp)) or prev.op.out_scale is not None:
            continue
        if isinstance(prev.op, LinearLayerOp) and len(step.op.in_shape) != 1:
            continue
        prev.op.out_scale = step.op.scale
        prev.op_kind = f"{prev.op_kind}+bn"
        prev.path = f"{prev.path}+{step.path}"
        step.kind, step.op, step.factor, step.op_kind = "factor", None, 1.0, "folded"


def compose(program: Program, norms: Dict[str, Any], one: Any) -> Dict[str, Optional[Any]]:
    """Bounds of every node (``None`` where it does not depend on the input) from the operator norms
    ``norms[name]`` (floats or tensors; ``one`` is the bound of the input, of the same type)."""
    bound: Dict[str, Any] = {}
    for s in program.steps:
        if s.kind == "input":
            bound[s.name] = one
        elif s.kind == "const":
            bound[s.name] = None  # does not depend on the input
        elif s.kind == "factor":
            bound[s.name] = bound[s.inputs[0]] * s.factor
        elif s.kind == "op":
            bound[s.name] = bound[s.inputs[0]] * norms[s.name]
        elif s.kind == "sum":
            parts = _weighted(s, bound)
            total = parts[0]
            for p in parts[1:]:
                total = total + p
            bound[s.name] = total
        elif s.kind == "concat":
            parts = _weighted(s, bound)
            sq = parts[0] * parts[0]
            for p in parts[1:]:
                sq = sq + p * p
            bound[s.name] = sq ** 0.5
        else:  # pragma: no cover - internal
            raise AssertionError(s.kind)
    return bound


def _weighted(step: Step, bound: Dict[str, Any]) -> List[Any]:
    weights = step.weights or (1.0,) * len(step.inputs)
    return [bound[i] * w if w != 1.0 else bound[i] for i, w in zip(step.inputs, weights) if bound[i] is not None]
