"""Trace a model with ``torch.fx`` and compose per-operator bounds over its graph.

:func:`build_program` traces the model once (modules with a registered rule stay leaves), runs it on
zeros of the input shape, and asks every input-dependent operator's rule (:mod:`.rules`) for a
factor, a linear operator or a combinator. :func:`fold_batchnorm` folds a convolution or linear layer
followed directly by an eval-mode BatchNorm (and used by nothing else) into one operator, which is
tighter than multiplying the two norms. :func:`compose` then gives every node the bound of the map from
the model input to that node's output: sequential composition multiplies, residual addition adds,
concatenation gives ``sqrt(L1^2 + L2^2)``, values that do not depend on the input have none. The same
composition serves the guaranteed bound (float norms) and the training-time estimate (tensor norms).

Conventions: L2 norms on flattened per-sample tensors; the model is traced in eval mode (BatchNorm
running statistics, Dropout off); ``input_shape`` is the shape of one input batch including the batch
dimension, e.g. ``(1, 1, 8, 8)`` (its batch size is ignored).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx
from torch import nn

from sturdy.errors import ConfigurationError, UnsupportedModuleError
from sturdy.lipschitz.operators import BatchNormOp, Conv2dOp, LinearLayerOp, LinearOp
from sturdy.lipschitz.rules import Combine, Factor, OpCall, find_rule
from sturdy.utils import eval_mode

__all__ = [
    "Step",
    "Program",
    "check_input_shape",
    "model_dtype_device",
    "trace",
    "build_program",
    "fold_batchnorm",
    "compose",
]


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


@dataclass
class Program:
    """A traced model: its steps in graph order, the output step and the final linear layer (if any)."""

    steps: List[Step]
    output: str
    last_linear: Optional[Step]  # the step producing the output, when it is a linear layer
    input_shape: Tuple[int, ...]


def check_input_shape(input_shape: Sequence[int]) -> Tuple[int, ...]:
    """``input_shape`` (including the batch dimension) with the batch dimension set to 1."""
    try:
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"input_shape must be a sequence of ints, got {input_shape!r}") from exc
    if len(shape) < 2 or min(shape) < 1:
        raise ConfigurationError(
            f"input_shape must be the shape of one input batch including the batch dimension, e.g. (1, 1, 8, 8) "
            f"for 8x8 grey images; got {shape}"
        )
    return (1,) + shape[1:]


def model_dtype_device(model: nn.Module) -> Tuple[torch.dtype, torch.device]:
    """dtype and device of the first parameter (else first floating buffer; else float32 on the CPU)."""
    for p in model.parameters():
        return p.dtype, p.device
    for b in model.buffers():
        if b.is_floating_point():
            return b.dtype, b.device
    return torch.float32, torch.device("cpu")


class _Tracer(torch.fx.Tracer):
    """Treats every module with a registered rule as a leaf (custom layers included)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return find_rule(m) is not None or super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module) -> torch.fx.GraphModule:
    """``torch.fx`` graph of ``model``, every module with a registered rule kept as a leaf."""
    try:
        graph = _Tracer().trace(model)
        return torch.fx.GraphModule(model, graph)
    except (MemoryError, torch.cuda.OutOfMemoryError):
        raise
    except Exception as exc:  # symbolic tracing reports untraceable code as TraceError, TypeError, RuntimeError, ...
        raise UnsupportedModuleError(
            f"cannot trace {type(model).__name__} with torch.fx ({type(exc).__name__}: {exc}); Lipschitz bounds "
            "need a traceable model without data-dependent control flow",
            module=model,
        ) from exc


def _target_name(node: torch.fx.Node, target: Any) -> str:
    if isinstance(target, nn.Module):
        return type(target).__name__
    if isinstance(target, str):
        return f"Tensor.{target}"
    return getattr(target, "__qualname__", getattr(target, "__name__", repr(target)))


def build_program(model: nn.Module, input_shape: Sequence[int]) -> Program:
    """Trace ``model`` (in eval mode, restored after) on zeros of ``input_shape`` and apply every operator's rule.

    Raises:
        UnsupportedModuleError: untraceable model, or an operator without a rule (named with its path).
        ConfigurationError: malformed ``input_shape``.
    """
    shape = check_input_shape(input_shape)
    dtype, device = model_dtype_device(model)
    if find_rule(model) is not None:  # a single registered operator: keep it a leaf instead of tracing inside
        model = nn.Sequential(model)
    gm = trace(model)
    values: Dict[str, Any] = {}
    dependent: Dict[str, bool] = {}
    steps: List[Step] = []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise UnsupportedModuleError(
            f"{type(model).__name__}.forward takes {len(placeholders)} inputs; Lipschitz bounds need exactly one",
            module=model,
        )
    output_node: Optional[torch.fx.Node] = None

    def load(a: Any) -> Any:
        return torch.fx.node.map_arg(a, lambda n: values[n.name])

    with eval_mode(model), torch.no_grad():
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                values[node.name] = torch.zeros(shape, dtype=dtype, device=device)
                dependent[node.name] = True
                steps.append(Step(node.name, "input", (), node.name))
                continue
            if node.op == "output":
                output_node = node
                continue
            if node.op == "get_attr":
                obj: Any = model
                for part in node.target.split("."):
                    obj = getattr(obj, part)
                values[node.name] = obj
                dependent[node.name] = False
                steps.append(Step(node.name, "const", (), node.target))
                continue
            args, kwargs = load(node.args), load(node.kwargs)
            if node.op == "call_module":
                target: Any = model.get_submodule(node.target)
                values[node.name] = target(*args, **kwargs)
                path = node.target
            elif node.op == "call_function":
                target = node.target
                values[node.name] = target(*args, **kwargs)
                path = node.name
            else:  # call_method
                target = node.target
                values[node.name] = getattr(args[0], target)(*args[1:], **kwargs)
                path = node.name
            dep_inputs = [n for n in node.all_input_nodes if dependent[n.name]]
            if not dep_inputs or not _has_tensor(values[node.name]):  # constants, sizes, shapes
                dependent[node.name] = False
                steps.append(Step(node.name, "const", (), path))
                continue
            dependent[node.name] = True
            occurrences: List[torch.fx.Node] = []  # every use, so that x + x counts twice
            torch.fx.node.map_arg((node.args, node.kwargs), occurrences.append)
            dep_inputs = [n for n in occurrences if dependent[n.name]]
            dep_positions = tuple(
                i for i, a in enumerate(node.args)
                if isinstance(a, torch.fx.Node) and dependent[a.name]
            )
            rule = find_rule(target)
            if rule is None:
                raise UnsupportedModuleError(
                    f"no Lipschitz bound registered for {_target_name(node, target)} at {path!r}; register one with "
                    "@sturdy.lipschitz.register_bound or replace the operator",
                    module=target,
                    path=path,
                )
            main = dep_inputs[0]
            main_val = values[main.name]
            call = OpCall(
                target=target,
                path=path,
                args=tuple(args),
                kwargs=dict(kwargs),
                input_shape=tuple(main_val.shape) if isinstance(main_val, torch.Tensor) else None,
                output=values[node.name],
                dependent_args=dep_positions,
            )
            result = rule(call)
            names = tuple(n.name for n in dep_inputs)
            if isinstance(result, Combine):
                steps.append(Step(node.name, result.how, names, path))
                continue
            if len(dep_inputs) != 1:
                raise UnsupportedModuleError(
                    f"{_target_name(node, target)} at {path!r} depends on the input through {len(dep_inputs)} "
                    "arguments; only single-input operators, sums and concatenations are supported",
                    module=target,
                    path=path,
                )
            if isinstance(result, Factor):
                steps.append(Step(node.name, "factor", names, path, factor=float(result.value), op_kind=result.kind))
            elif isinstance(result, LinearOp):
                steps.append(Step(node.name, "op", names, path, op=result, op_kind=result.kind))
            else:
                raise TypeError(f"rule for {_target_name(node, target)} returned {type(result).__name__}")

    assert output_node is not None
    out_arg = output_node.args[0]
    if not isinstance(out_arg, torch.fx.Node) or not isinstance(values[out_arg.name], torch.Tensor):
        raise UnsupportedModuleError(
            f"{type(model).__name__} must return one logits tensor; it returns {type(out_arg).__name__}", module=model
        )
    fold_batchnorm(steps, gm)
    by_name = {s.name: s for s in steps}
    out_step = by_name[out_arg.name]
    last = out_step if out_step.kind == "op" and isinstance(out_step.op, LinearLayerOp) else None
    return Program(steps, out_arg.name, last, shape)


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
            parts = [bound[i] for i in s.inputs if bound[i] is not None]
            total = parts[0]
            for p in parts[1:]:
                total = total + p
            bound[s.name] = total
        elif s.kind == "concat":
            parts = [bound[i] for i in s.inputs if bound[i] is not None]
            sq = parts[0] * parts[0]
            for p in parts[1:]:
                sq = sq + p * p
            bound[s.name] = sq ** 0.5
        else:  # pragma: no cover - internal
            raise AssertionError(s.kind)
    return bound
