"""Function-preserving node-wise rescaling of ReLU networks (the reparametrisation flatness must survive).

For consecutive weight layers ``l`` and ``l+1`` separated only by positively homogeneous operations
(ReLU, LeakyReLU, max/average pooling, flatten, dropout, identity), multiplying the output units of
layer ``l`` by ``d > 0`` (``W_l <- D W_l``, ``b_l <- D b_l``) and dividing the matching inputs of
layer ``l+1`` (``W_{l+1} <- W_{l+1} D^{-1}``) leaves the network function unchanged. A flatten between
a convolution and a linear layer maps channel ``c`` to the ``H*W`` consecutive inputs of that channel.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, List, Optional, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from sturdy.errors import ConfigurationError, UnsupportedModuleError
from sturdy.validation import check_model

__all__ = ["rescale_nodes"]

_HOMOGENEOUS_MODULES = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Flatten,
    nn.Dropout,
    nn.Identity,
)
_HOMOGENEOUS_FUNCTIONS: Tuple[Callable[..., Any], ...] = (
    F.relu,
    torch.relu,
    F.leaky_relu,
    F.max_pool2d,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    F.dropout,
    torch.flatten,
)
_HOMOGENEOUS_METHODS = ("relu", "flatten", "view", "reshape", "contiguous")


def _describe(node: torch.fx.Node, gm: torch.fx.GraphModule) -> Tuple[str, object]:
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        return f"{type(mod).__name__} at {node.target!r}", mod
    return f"{node.op} {getattr(node.target, '__name__', node.target)!r}", node.target


def _is_meta(node: torch.fx.Node, meta: set) -> bool:
    """Nodes computing shapes (``x.shape``, ``x.size(0)``, arithmetic on them), not tensors on the main path."""
    if node.op == "call_function" and node.target is getattr and node.args[1] in ("shape", "dtype", "device"):
        return True
    if node.op == "call_method" and node.target in ("size", "dim"):
        return True
    inputs = node.all_input_nodes
    return node.op == "call_function" and bool(inputs) and all(i in meta for i in inputs)


def _chain(model: nn.Module) -> Tuple[torch.fx.GraphModule, List[torch.fx.Node]]:
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as exc:  # torch.fx raises many types for untraceable code
        raise UnsupportedModuleError(
            f"rescale_nodes traces the model with torch.fx and failed ({type(exc).__name__}: {exc}); "
            "only traceable ReLU MLPs/CNNs are supported",
            module=model,
        ) from exc
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise UnsupportedModuleError("rescale_nodes needs a model with exactly one input", module=model)
    meta: set = set()
    nodes: List[torch.fx.Node] = []
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        if _is_meta(node, meta):
            meta.add(node)
        else:
            nodes.append(node)
    previous = placeholders[0]
    for node in nodes:
        tensor_args = [a for a in node.all_input_nodes if a not in meta]
        tensor_users = [u for u in previous.users if u not in meta]
        if tensor_args != [previous] or tensor_users != [node]:
            what, obj = _describe(node, gm)
            raise UnsupportedModuleError(
                f"rescale_nodes supports plain chains of layers; {what} has branching inputs or outputs "
                "(residual connections are not handled)",
                module=obj,
                path=str(node.target) if node.op == "call_module" else "",
            )
        previous = node
    return gm, nodes


def _kind(node: torch.fx.Node, gm: torch.fx.GraphModule) -> str:
    """``"weight"``, ``"homogeneous"``; raises for everything else."""
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if isinstance(mod, nn.Linear) or (isinstance(mod, nn.Conv2d) and mod.groups == 1):
            return "weight"
        if isinstance(mod, _HOMOGENEOUS_MODULES):
            return "homogeneous"
        reason = (
            "normalisation layers undo a rescaling of their input (the function is kept but the weights are not "
            "a reparametrisation of the same kind)"
            if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm))
            else "it is not positively homogeneous (f(d x) != d f(x) for d > 0)"
        )
        raise UnsupportedModuleError(
            f"rescale_nodes cannot rescale through {type(mod).__name__} at {node.target!r}: {reason}; "
            "use a ReLU MLP/CNN without BatchNorm",
            module=mod,
            path=str(node.target),
        )
    if node.op == "call_function" and node.target in _HOMOGENEOUS_FUNCTIONS:
        return "homogeneous"
    if node.op == "call_method" and node.target in _HOMOGENEOUS_METHODS:
        return "homogeneous"
    what, obj = _describe(node, gm)
    raise UnsupportedModuleError(
        f"rescale_nodes has no rescaling rule for {what}; supported between weight layers: ReLU, LeakyReLU, "
        "pooling, flatten/view, dropout, identity",
        module=obj,
    )


def rescale_nodes(model: nn.Module, *, seed: int = 0, low: float = 0.25, high: float = 4.0) -> nn.Module:
    """A function-identical deep copy of a ReLU MLP/CNN with random positive node-wise scalings.

    Every output unit (Linear row, Conv2d output channel) of every weight layer except the last gets
    a factor ``d`` drawn log-uniformly from ``[low, high]``; the next weight layer's matching inputs are
    divided by ``d``. The copy computes the same function (up to rounding) while weight norms, the
    Hessian trace and spectral norms change.

    Args:
        model: a ``torch.fx``-traceable chain of ``nn.Linear`` / ``nn.Conv2d`` (groups=1) layers joined by
            ReLU/LeakyReLU, pooling, flatten, dropout or identity. ``model`` itself is not modified.
        seed: seed of the factors (drawn on the CPU, float64).
        low, high: range of the factors, ``0 < low <= high``.

    Raises:
        UnsupportedModuleError: BatchNorm, non-homogeneous activations, residual branches, grouped convs.
        ConfigurationError: invalid ``low``/``high`` or fewer than two weight layers.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double()
        >>> x = torch.randn(5, 4, dtype=torch.float64)
        >>> torch.allclose(rescale_nodes(net, seed=1)(x), net(x))
        True
    """
    check_model(model)
    if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= high):
        raise ConfigurationError(f"need 0 < low <= high (finite), got low={low!r}, high={high!r}")
    gm, nodes = _chain(model)
    kinds = [_kind(n, gm) for n in nodes]
    weights = [i for i, k in enumerate(kinds) if k == "weight"]
    if len(weights) < 2:
        raise ConfigurationError(
            f"rescale_nodes needs at least two weight layers to move scale between, found {len(weights)}"
        )
    copy_model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for first, second in zip(weights[:-1], weights[1:]):
            a = copy_model.get_submodule(str(nodes[first].target))
            b = copy_model.get_submodule(str(nodes[second].target))
            units = a.weight.shape[0]
            log_d = torch.empty(units, dtype=torch.float64).uniform_(math.log(low), math.log(high), generator=gen)
            d = log_d.exp()
            _scale_rows(a, d)
            _scale_inputs(b, d, flattened=_flattens(nodes[first + 1 : second], gm))
    return copy_model


def _flattens(between: List[torch.fx.Node], gm: torch.fx.GraphModule) -> bool:
    for node in between:
        if node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), nn.Flatten):
            return True
        if node.op == "call_function" and node.target is torch.flatten:
            return True
        if node.op == "call_method" and node.target in ("flatten", "view", "reshape"):
            return True
    return False


def _scale_rows(module: nn.Module, d: Tensor) -> None:
    shape = (-1,) + (1,) * (module.weight.dim() - 1)
    module.weight.mul_(d.to(module.weight).reshape(shape))
    if module.bias is not None:
        module.bias.mul_(d.to(module.bias))


def _scale_inputs(module: nn.Module, d: Tensor, *, flattened: bool) -> None:
    fan_in = module.weight.shape[1]
    factors: Optional[Tensor] = None
    if fan_in == d.numel():
        factors = d
    elif flattened and isinstance(module, nn.Linear) and fan_in % d.numel() == 0:
        factors = d.repeat_interleave(fan_in // d.numel())
    if factors is None:
        raise UnsupportedModuleError(
            f"cannot match {d.numel()} rescaled units to the {fan_in} inputs of {type(module).__name__}",
            module=module,
        )
    shape = (1, -1) + (1,) * (module.weight.dim() - 2)
    module.weight.div_(factors.to(module.weight).reshape(shape))
