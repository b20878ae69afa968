"""Behaviour checks of a traced model: what a per-operator rule cannot see.

* :func:`check_model`: global module hooks (refused) and non-finite parameters;
* :func:`functionalize_inplace`: an in-place operation overwrites a tensor that later graph nodes still
  name by its old node: those uses are rewired to the operation's result; views of the overwritten tensor
  used afterwards are refused (unless the operation is a contraction, e.g. ``relu_``);
* :func:`positional_inputs`: a call naming its input-dependent tensor by keyword (``torch.mul(input=x, other=2)``)
  passes it by position, where the rules look for it;
* :func:`check_reproduces`: the traced graph must compute the model's output on random inputs, and two runs of
  the model must agree (randomness hidden in custom code, in-place writes through aliases); the bound is traced
  at batch size 1, and :func:`~sturdy.lipschitz.certify` checks every batch it certifies against samples
  computed alone (:mod:`.proof`);
* :class:`Live`: recomputes weights computed in ``forward`` from the current parameters.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.fx
from torch import nn
from torch.fx.operator_schemas import get_signature_for_torch_op

from sturdy.errors import ConfigurationError, UnsupportedModuleError
from sturdy.lipschitz.operators import BatchNormOp, LinearOp
from sturdy.lipschitz.registry import global_hooks
from sturdy.utils import eval_mode
from sturdy.validation import check_finite_output

__all__ = ["Live", "check_model", "check_op_finite", "functionalize_inplace", "kwarg_nodes", "positional_inputs",
           "check_reproduces", "target_name"]


def target_name(node: torch.fx.Node, target: Any) -> str:
    if isinstance(target, nn.Module):
        return type(target).__name__
    if isinstance(target, str):
        return f"Tensor.{target}"
    return getattr(target, "__qualname__", getattr(target, "__name__", repr(target)))


class Live:
    """Recomputes input-independent graph values (weights computed in ``forward``) from the model's
    current parameters, so that bounds and the training-time estimate follow the weights."""

    def __init__(self, gm: torch.fx.GraphModule, model: nn.Module) -> None:
        self.gm, self.model = gm, model

    def value(self, node: torch.fx.Node) -> Any:
        return self._eval(node, {})

    def _eval(self, node: torch.fx.Node, memo: Dict[str, Any]) -> Any:
        if node.name in memo:
            return memo[node.name]
        load = lambda a: torch.fx.node.map_arg(a, lambda n: self._eval(n, memo))  # noqa: E731
        if node.op == "get_attr":
            out: Any = self.model
            for part in node.target.split("."):
                out = getattr(out, part)
        elif node.op == "call_module":
            out = self.model.get_submodule(node.target)(*load(node.args), **load(node.kwargs))
        elif node.op == "call_function":
            out = node.target(*load(node.args), **load(node.kwargs))
        elif node.op == "call_method":
            args = load(node.args)
            out = getattr(args[0], node.target)(*args[1:], **load(node.kwargs))
        else:  # pragma: no cover - the input is never input-independent
            raise AssertionError(node.op)
        memo[node.name] = out
        return out

    def thunk(self, value: Any) -> Callable[[], Any]:
        if isinstance(value, torch.fx.Node):
            return lambda: self.value(value)
        return lambda: value


def check_model(model: nn.Module) -> None:
    hooks = global_hooks()
    if hooks:
        raise UnsupportedModuleError(
            f"global module hooks are registered ({', '.join(hooks)}): they change what every module computes and "
            "are not part of the traced graph; remove them before bounding or certifying",
            module=model,
        )
    for name, p in model.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p.detach()).all()):
            raise ConfigurationError(
                f"parameter {name!r} of {type(model).__name__} holds NaN or inf values; a Lipschitz bound needs "
                "finite weights (did training diverge?)"
            )


def check_op_finite(op: LinearOp, path: str) -> None:
    """Refuse an operator whose weights (or BatchNorm statistics) hold NaN or inf, naming its path."""
    values = [op.weight()]
    if isinstance(op, BatchNormOp):
        values.append(op.scale())
    for v in values:
        if v is not None and not bool(torch.isfinite(v.detach()).all()):
            raise ConfigurationError(
                f"the weights (or BatchNorm statistics) of {path!r} hold NaN or inf values; a Lipschitz bound needs "
                "finite weights (did training diverge?)"
            )


def _storage(t: Any) -> Optional[int]:
    if not isinstance(t, torch.Tensor):
        return None
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # pragma: no cover - tensors without storage
        return None


def functionalize_inplace(node: torch.fx.Node, target: Any, path: str, values: Dict[str, Any],
                           dependent: Dict[str, bool], order: Dict[str, int], contraction: bool) -> None:
    """Make an in-place operation explicit in the graph: later uses of the tensor it overwrites are rewired to
    its result. Other tensors sharing that storage (views) and used afterwards would change unseen: refused,
    unless the operation is a contraction (e.g. ``relu_``), which keeps every bound valid."""
    first = node.args[0] if node.args else None
    if not isinstance(first, torch.fx.Node):
        return
    ptr = _storage(values.get(first.name))
    here = order[node.name]
    nodes = {n.name: n for n in node.graph.nodes}
    later = [u for u in first.users if u is not node and order[u.name] > here]
    for name, v in values.items():
        if contraction or name in (node.name, first.name) or not dependent.get(name) or ptr is None:
            continue
        if _storage(v) != ptr:
            continue
        users = [u for u in nodes[name].users if u is not node and order[u.name] > here]
        if users:
            raise UnsupportedModuleError(
                f"{target_name(node, target)} at {path!r} modifies {first.name!r} in place, and {users[0].name!r} "
                f"uses a view of that tensor ({name!r}) afterwards, which the traced graph does not show; use the "
                "out-of-place form",
                module=target,
                path=path,
            )
    for u in later:
        u.replace_input_with(first, node)


def kwarg_nodes(node: torch.fx.Node) -> List[torch.fx.Node]:
    found: List[torch.fx.Node] = []
    torch.fx.node.map_arg(node.kwargs, found.append)
    return found


def positional_inputs(node: torch.fx.Node) -> None:
    """Pass by position the leading arguments a call names by keyword (``torch.mul(input=x, other=2)``), so that
    rules see the input-dependent tensor where the operator's signature puts it."""
    target = node.target
    try:
        signatures = get_signature_for_torch_op(target) or [inspect.signature(target)]  # type: ignore[arg-type]
    except (TypeError, ValueError):  # builtins without a signature: left as they are
        return
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    for sig in signatures:
        try:
            given = sig.bind(*node.args, **node.kwargs).arguments
        except TypeError:
            continue
        args, kwargs = [], dict(node.kwargs)
        for p in sig.parameters.values():
            if p.kind not in positional or p.name not in given:
                break
            args.append(given[p.name])
            kwargs.pop(p.name, None)
        node.args, node.kwargs = tuple(args), kwargs
        return


def check_reproduces(gm: torch.fx.GraphModule, model: nn.Module, shape: Tuple[int, ...], dtype: torch.dtype,
                     device: torch.device, *, trials: int = 2) -> None:
    """Refuse models whose traced graph does not compute what the model computes, or whose output is random.

    Runs the model twice and the graph once on random inputs (the global random state is left untouched).
    Catches what tracing cannot see: in-place writes through aliases, randomness hidden in custom code.
    """
    if not (dtype.is_floating_point):
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad(), eval_mode(model):
        gen = torch.Generator(device="cpu").manual_seed(1234)
        for _ in range(trials):
            x = torch.rand(shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
            torch.manual_seed(1)
            first = model(x.clone())
            torch.manual_seed(2)
            second = model(x.clone())
            traced = gm(x.clone())
            if not isinstance(first, torch.Tensor):
                return
            check_finite_output(first, name=f"the logits of {type(model).__name__} on random inputs in [0, 1)")
            scale = float(first.detach().abs().max()) if first.numel() else 0.0
            tol = dict(rtol=1e-4, atol=1e-5 * max(scale, 1.0))
            if not _close(first, second, tol):
                raise UnsupportedModuleError(
                    f"{type(model).__name__} gives different outputs for the same input in eval mode: it is random "
                    "(e.g. noise, or dropout called with training=True), so its predictions cannot be certified",
                    module=model,
                )
            if not _close(first, traced, tol):
                raise UnsupportedModuleError(
                    f"the torch.fx graph of {type(model).__name__} does not reproduce its output (in-place writes "
                    "through aliases or views, or Python side effects the trace cannot see); rewrite those parts "
                    "out of place",
                    module=model,
                )


def _close(a: Any, b: Any, tol: Dict[str, float]) -> bool:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape:
        return False
    a64, b64 = a.detach().double(), b.detach().double()
    if not bool(torch.isfinite(a64).all()):
        return bool(torch.equal(a64.nan_to_num(), b64.nan_to_num()))
    return bool(torch.allclose(a64, b64, **tol))
