"""Compose per-operator bounds over a model's ``torch.fx`` graph.

The model is traced once; every node gets the Lipschitz bound of the map from the model input to
that node's output: sequential composition multiplies, residual addition adds, concatenation
gives ``sqrt(L1^2 + L2^2)``, values that do not depend on the input have bound 0. A convolution or
linear layer followed directly by an eval-mode BatchNorm (and used by nothing else) is folded
into one operator, which is tighter than multiplying the two norms.

Two modes share this composition:

* certification, :func:`lipschitz_bound`: guaranteed float64 upper bounds (see :mod:`.power`);
* training, :class:`LipschitzTracker`: one persistent power iteration per weight operator per call,
  differentiable in the weights (the vectors are buffers, saved in ``state_dict``).

Conventions: L2 norms on flattened per-sample tensors; the bound holds for the model in eval mode
(BatchNorm running statistics, Dropout off); ``input_shape`` is the shape of one input batch, e.g.
``(1, 1, 8, 8)`` (the batch size is ignored).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx
from torch import nn

from sturdy.errors import ConfigurationError, UnsupportedModuleError
from sturdy.lipschitz.bounds import (
    BatchNormOp,
    Combine,
    Conv2dOp,
    Factor,
    LinearLayerOp,
    LinearOp,
    OpCall,
    find_rule,
)
from sturdy.lipschitz.power import DENSE_MAX_ENTRIES, guaranteed_norm, power_iteration
from sturdy.utils import eval_mode

__all__ = [
    "LayerBound",
    "LipschitzBound",
    "OperatorNorm",
    "LipschitzEstimate",
    "lipschitz_bound",
    "operator_norm",
    "LipschitzTracker",
    "eval_mode",
]


@dataclass(frozen=True)
class LayerBound:
    """Bound of one operator: ``estimate <= true norm <= upper``.

    Attributes:
        path: module path in the model (or graph node name for functions).
        kind: ``"conv2d"``, ``"linear"``, ``"batchnorm"``, ``"avgpool"``, ``"activation"``, ``"maxpool"``, ...
        upper: guaranteed upper bound (float64, with safety factor) or the exact constant factor.
        estimate: power-iteration estimate (equal to ``upper`` for constants and closed forms).
        method: ``"dense-svd"``, ``"fft"``, ``"holder"``, ``"closed-form"`` or ``"constant"``.
    """

    path: str
    kind: str
    upper: float
    estimate: float
    method: str

    def to_dict(self) -> Dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "upper": self.upper, "estimate": self.estimate,
                "method": self.method}


@dataclass(frozen=True)
class LipschitzBound:
    """Global L2 Lipschitz bounds of a model in eval mode.

    Attributes:
        upper: guaranteed upper bound ``L`` of the whole map input -> logits.
        upper_body: guaranteed bound ``L_body`` of the map input -> input of the last linear layer
            (``None`` when the output is not produced by a linear layer).
        estimate: the same composition with power-iteration estimates of the operator norms.
        estimate_body: same for the body.
        per_layer: one :class:`LayerBound` per operator with a non-trivial factor.
        last_weight: float64 weight matrix of the last linear layer (``None`` as for ``upper_body``).
        input_shape: the traced input shape.
    """

    upper: float
    upper_body: Optional[float]
    estimate: float
    estimate_body: Optional[float]
    per_layer: Tuple[LayerBound, ...]
    last_weight: Optional[torch.Tensor]
    input_shape: Tuple[int, ...]

    def to_dict(self) -> Dict[str, Any]:
        return {
            "upper": self.upper,
            "upper_body": self.upper_body,
            "estimate": self.estimate,
            "estimate_body": self.estimate_body,
            "input_shape": list(self.input_shape),
            "per_layer": [layer.to_dict() for layer in self.per_layer],
        }


@dataclass(frozen=True)
class OperatorNorm:
    """Norm of one linear operator: ``estimate <= ||A||_2 <= upper``; ``method`` as in :class:`LayerBound`."""

    upper: float
    estimate: float
    method: str


@dataclass(frozen=True)
class LipschitzEstimate:
    """Differentiable training-time estimate (power iteration; NOT a guaranteed bound).

    Attributes:
        lipschitz: estimate of ``L`` (0-dim tensor, differentiable in the weights).
        body: estimate of ``L_body`` (or ``None``).
        last_weight: the live weight of the last linear layer (or ``None``).
    """

    lipschitz: torch.Tensor
    body: Optional[torch.Tensor]
    last_weight: Optional[torch.Tensor]


# ----------------------------------------------------------------------------------- graph program


@dataclass
class _Step:
    name: str
    kind: str  # "input", "const", "factor", "op", "sum", "concat"
    inputs: Tuple[str, ...]
    path: str
    factor: float = 1.0
    op: Optional[LinearOp] = None
    op_kind: str = ""


@dataclass
class _Program:
    steps: List[_Step]
    output: str
    last_linear: Optional[_Step]  # the step producing the output, when it is a linear layer
    input_shape: Tuple[int, ...]


def _check_input_shape(input_shape: Sequence[int]) -> Tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in input_shape)
    except TypeError as exc:
        raise ConfigurationError(f"input_shape must be a sequence of ints, got {input_shape!r}") from exc
    if len(shape) < 2 or min(shape) < 1:
        raise ConfigurationError(
            f"input_shape must be the shape of one input batch including the batch dimension, e.g. (1, 1, 8, 8) "
            f"for 8x8 grey images; got {shape}"
        )
    return (1,) + shape[1:]


def _model_ref(model: nn.Module) -> Tuple[torch.dtype, torch.device]:
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


def _trace(model: nn.Module) -> torch.fx.GraphModule:
    try:
        graph = _Tracer().trace(model)
        return torch.fx.GraphModule(model, graph)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, ...)
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


def _build_program(model: nn.Module, input_shape: Sequence[int]) -> _Program:
    shape = _check_input_shape(input_shape)
    dtype, device = _model_ref(model)
    if find_rule(model) is not None:  # a single registered operator: keep it a leaf instead of tracing inside
        model = nn.Sequential(model)
    gm = _trace(model)
    values: Dict[str, Any] = {}
    dependent: Dict[str, bool] = {}
    steps: List[_Step] = []
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
                steps.append(_Step(node.name, "input", (), node.name))
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
                steps.append(_Step(node.name, "const", (), node.target))
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
                steps.append(_Step(node.name, "const", (), path))
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
                steps.append(_Step(node.name, result.how, names, path))
                continue
            if len(dep_inputs) != 1:
                raise UnsupportedModuleError(
                    f"{_target_name(node, target)} at {path!r} depends on the input through {len(dep_inputs)} "
                    "arguments; only single-input operators, sums and concatenations are supported",
                    module=target,
                    path=path,
                )
            if isinstance(result, Factor):
                steps.append(_Step(node.name, "factor", names, path, factor=float(result.value), op_kind=result.kind))
            elif isinstance(result, LinearOp):
                steps.append(_Step(node.name, "op", names, path, op=result, op_kind=result.kind))
            else:
                raise TypeError(f"rule for {_target_name(node, target)} returned {type(result).__name__}")

    assert output_node is not None
    out_arg = output_node.args[0]
    if not isinstance(out_arg, torch.fx.Node) or not isinstance(values[out_arg.name], torch.Tensor):
        raise UnsupportedModuleError(
            f"{type(model).__name__} must return one logits tensor; it returns {type(out_arg).__name__}", module=model
        )
    _fold_batchnorm(steps, gm)
    by_name = {s.name: s for s in steps}
    out_step = by_name[out_arg.name]
    last = out_step if out_step.kind == "op" and isinstance(out_step.op, LinearLayerOp) else None
    return _Program(steps, out_arg.name, last, shape)


def _has_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(_has_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(_has_tensor(v) for v in value.values())
    return False


def _fold_batchnorm(steps: List[_Step], gm: torch.fx.GraphModule) -> None:
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


def _compose(program: _Program, norms: Dict[str, Any], one: Any) -> Dict[str, Any]:
    """Bounds of every node, with operator norms ``norms[name]`` (floats or tensors)."""
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


def lipschitz_bound(
    model: nn.Module,
    *,
    input_shape: Sequence[int],
    dense_max_entries: int = DENSE_MAX_ENTRIES,
    power_iterations: int = 50,
    seed: int = 0,
) -> LipschitzBound:
    """Guaranteed global L2 Lipschitz bound of ``model`` (in eval mode) on inputs of ``input_shape``.

    Each linear operator gets a float64 upper bound (:func:`sturdy.lipschitz.power.guaranteed_norm`:
    dense SVD when its matrix has at most ``dense_max_entries`` entries, the FFT bound for
    convolutions, Hoelder for pooling otherwise) and a power-iteration estimate.

    Args:
        model: a ``torch.fx``-traceable model returning logits.
        input_shape: shape of one input batch, e.g. ``(1, 1, 8, 8)``.
        dense_max_entries: largest dense matrix given an exact SVD.
        power_iterations: iterations of the reported estimate.
        seed: seed of the power-iteration start vectors.

    Raises:
        UnsupportedModuleError: an operator has no registered rule (the message names it and its path).
        ConfigurationError: malformed ``input_shape``.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> b = lipschitz_bound(net, input_shape=(1, 4))
        >>> b.estimate <= b.upper and b.upper_body <= b.upper / 1e-3
        True
    """
    program = _build_program(model, input_shape)
    gen = torch.Generator().manual_seed(int(seed))
    upper_norms: Dict[str, float] = {}
    est_norms: Dict[str, float] = {}
    layers: List[LayerBound] = []
    with torch.no_grad():
        for s in program.steps:
            if s.kind == "op":
                assert s.op is not None
                upper, method = guaranteed_norm(s.op, dense_max_entries=dense_max_entries)
                est = power_iteration(s.op, iterations=power_iterations, generator=gen)
                upper_norms[s.name], est_norms[s.name] = upper, min(est, upper)
                layers.append(LayerBound(s.path, s.op_kind, upper, est_norms[s.name], method))
            elif s.kind == "factor" and s.factor != 1.0:
                layers.append(LayerBound(s.path, s.op_kind, s.factor, s.factor, "constant"))
    up = _compose(program, upper_norms, 1.0)
    est = _compose(program, est_norms, 1.0)
    last = program.last_linear
    upper_body = estimate_body = None
    last_weight = None
    if last is not None:
        upper_body, estimate_body = up[last.inputs[0]], est[last.inputs[0]]
        assert isinstance(last.op, LinearLayerOp)
        last_weight = last.op.weight().detach().to(torch.float64).clone()
    out = up[program.output]
    if out is None:
        out, upper_body = 0.0, (0.0 if last is not None else None)
    return LipschitzBound(
        upper=float(out),
        upper_body=None if upper_body is None else float(upper_body),
        estimate=float(est[program.output] or 0.0),
        estimate_body=None if estimate_body is None else float(estimate_body),
        per_layer=tuple(layers),
        last_weight=last_weight,
        input_shape=program.input_shape,
    )


def operator_norm(
    module: nn.Module,
    *,
    input_shape: Sequence[int],
    dense_max_entries: int = DENSE_MAX_ENTRIES,
    power_iterations: int = 100,
    seed: int = 0,
) -> OperatorNorm:
    """Norm of one linear operator (``nn.Linear``, ``nn.Conv2d``, pooling, eval BatchNorm, or a
    ``conv -> BatchNorm`` ``nn.Sequential``, folded), bias ignored.

    Args:
        module: the operator.
        input_shape: shape of one input batch, e.g. ``(1, 3, 7, 9)``.

    Raises:
        ConfigurationError: ``module`` is not a single linear operator.

    Example:
        >>> from torch import nn
        >>> n = operator_norm(nn.AvgPool2d(2), input_shape=(1, 1, 4, 4))
        >>> round(n.upper, 6), n.method
        (0.5, 'dense-svd')
    """
    program = _build_program(module, input_shape)
    ops = [s for s in program.steps if s.kind == "op"]
    others = [s for s in program.steps if s.kind == "factor" and s.op_kind != "folded"]
    if len(ops) != 1 or others:
        raise ConfigurationError(
            f"operator_norm needs exactly one linear operator (optionally followed by BatchNorm), got "
            f"{len(ops)} operators and {len(others)} other layers in {type(module).__name__}; use lipschitz_bound"
        )
    op = ops[0].op
    assert op is not None
    upper, method = guaranteed_norm(op, dense_max_entries=dense_max_entries)
    est = power_iteration(op, iterations=power_iterations, generator=torch.Generator().manual_seed(int(seed)))
    return OperatorNorm(upper=upper, estimate=min(est, upper), method=method)


# ---------------------------------------------------------------------------------------- tracker


class LipschitzTracker(nn.Module):
    """Training-time Lipschitz estimate with persistent power iteration.

    Each call does ``iterations`` power iterations per weight operator (conv, linear, folded
    conv+BN) on the true operator (real input shape, padding, stride; ``conv_transpose2d`` as
    adjoint) and returns a :class:`LipschitzEstimate` whose values are differentiable in the
    weights through ``||W u||`` with ``u`` held constant. The vectors ``u`` are buffers (saved in
    ``state_dict``); they start from a seeded random vector followed by ``warmup_iterations``
    iterations, so every DDP rank builds identical vectors; with ``sync`` they are averaged over ranks
    after each update and stay identical. Estimates are lower bounds of the true norms: never use them to certify.

    Args:
        model: the network (its parameters are used live, never copied).
        input_shape: shape of one input batch, e.g. ``(1, 1, 8, 8)``.
        iterations: power iterations per call (1 in training).
        warmup_iterations: iterations run at construction.
        seed: seed of the start vectors.
        sync: under ``torch.distributed``, average the vectors over ranks after each update (one small
            all-reduce per step), so they stay identical even when folded BatchNorm statistics differ per rank.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> tracker = LipschitzTracker(net, input_shape=(1, 4))
        >>> est = tracker()
        >>> est.lipschitz.requires_grad, sorted(tracker.state_dict())
        (True, ['u__1', 'u__3'])
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        input_shape: Sequence[int],
        iterations: int = 1,
        warmup_iterations: int = 30,
        seed: int = 0,
        sync: bool = True,
    ) -> None:
        super().__init__()
        if iterations < 1 or warmup_iterations < 0:
            raise ConfigurationError(
                f"iterations must be >= 1 and warmup_iterations >= 0, got {iterations} and {warmup_iterations}"
            )
        self._program = _build_program(model, input_shape)
        self.iterations = int(iterations)
        self.sync = bool(sync)
        self._fixed: Dict[str, float] = {}
        self._power: Dict[str, Tuple[str, LinearOp]] = {}
        self._closed: Dict[str, LinearOp] = {}
        gen = torch.Generator().manual_seed(int(seed))
        dtype, device = _model_ref(model)
        for s in self._program.steps:
            if s.kind != "op":
                continue
            op = s.op
            assert op is not None
            if not op.parametric:
                self._fixed[s.name] = guaranteed_norm(op)[0]
            elif op.closed_form_norm() is not None:
                self._closed[s.name] = op
            else:
                buf = "u__" + s.path.replace(".", "_").replace("+", "__")
                u = torch.randn((1, *op.in_shape), generator=gen, dtype=torch.float32).to(dtype=dtype, device=device)
                self.register_buffer(buf, u / u.norm())
                self._power[s.name] = (buf, op)
        with torch.no_grad():
            for _ in range(warmup_iterations):
                self._iterate()

    @torch.no_grad()
    def _iterate(self) -> None:
        for buf, op in self._power.values():
            u, w = getattr(self, buf), op.weight()
            w = w.detach() if w is not None else None
            v = op.adjoint(op.apply(u, w), w)
            u.copy_(v / v.norm().clamp_min(1e-30))

    def forward(self) -> LipschitzEstimate:
        """One step: estimates from the current vectors (differentiable), then update the vectors."""
        norms: Dict[str, Any] = dict(self._fixed)
        for name, op in self._closed.items():
            norms[name] = op.closed_form_norm()
        updates: List[Tuple[str, torch.Tensor]] = []
        for name, (buf, op) in self._power.items():
            u = getattr(self, buf)
            weight = op.weight()  # differentiable; computed once for the forward and the adjoint
            with torch.no_grad():
                frozen = weight.detach() if weight is not None else None
                for _ in range(self.iterations - 1):
                    v = op.adjoint(op.apply(u, frozen), frozen)
                    u = v / v.norm().clamp_min(1e-30)
            w = op.apply(u, weight)
            norms[name] = w.norm()
            with torch.no_grad():  # next step's vector: u <- A^T A u (normalised below)
                updates.append((buf, op.adjoint(w.detach(), frozen)))
        if updates:
            with torch.no_grad():
                vs = [v for _, v in updates]
                scale = torch._foreach_norm(vs)
                torch._foreach_clamp_min_(scale, 1e-30)
                torch._foreach_div_(vs, scale)
            for buf, v in updates:  # new tensors: the old vectors stay intact for backward
                self._buffers[buf] = v
        if self.sync:
            self._average_vectors()
        ref = next(iter(self.buffers()), None)
        one = torch.ones((), dtype=ref.dtype if ref is not None else torch.float32,
                         device=ref.device if ref is not None else None)
        bound = _compose(self._program, norms, one)
        last = self._program.last_linear
        body = weight = None
        if last is not None:
            body = bound[last.inputs[0]]
            assert isinstance(last.op, LinearLayerOp)
            weight = last.op.weight()
        total = bound[self._program.output]
        return LipschitzEstimate(lipschitz=total, body=body, last_weight=weight)

    def norms(self) -> Dict[str, float]:
        """Current per-operator estimates ``{path: ||A u||}`` (no update, no gradient)."""
        out: Dict[str, float] = {}
        by_name = {s.name: s for s in self._program.steps}
        with torch.no_grad():
            for name, (buf, op) in self._power.items():
                out[by_name[name].path] = float(op.apply(getattr(self, buf)).norm())
            for name, op in self._closed.items():
                out[by_name[name].path] = float(op.closed_form_norm())
            for name, value in self._fixed.items():
                out[by_name[name].path] = value
        return out

    @torch.no_grad()
    def _average_vectors(self) -> None:
        # Under DDP every rank holds the same weights, but eval-mode BatchNorm statistics (folded into the
        # operators) are updated from each rank's own batch, so the vectors would drift apart: average them.
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        world = torch.distributed.get_world_size()
        bufs = [getattr(self, buf) for buf, _ in self._power.values()]
        if world == 1 or not bufs:
            return
        flat = torch.cat([b.flatten() for b in bufs])
        torch.distributed.all_reduce(flat)
        flat /= world
        offset = 0
        for b in bufs:
            b.copy_(flat[offset : offset + b.numel()].view_as(b))
            offset += b.numel()

    def broadcast_(self, src: int = 0) -> None:
        """Copy the vectors of rank ``src`` to every rank (no-op without ``torch.distributed``)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for b in self.buffers():
                torch.distributed.broadcast(b, src)

