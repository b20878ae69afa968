"""Sharded data parallelism: PyTorch FSDP2 (``fully_shard``) in the training core (docs/design.md, "Sharded
training").

:func:`shard_model` shards the model's blocks (:func:`shard_blocks`) and then the model itself; each FSDP2 unit
that holds parameters is a :class:`ShardGroup`, listing the parameters *as they were before sharding* (the
objects a compression state and its per-sample statistics were built on) in the order of the unit's
reduce-scatter. A :class:`Sharding` passed to :func:`sturdy.training.train` says that a run in several
processes shards instead of using DDP, and may install something on the groups (e.g. a custom reduce-scatter:
:mod:`sturdy.compression.sharded`).

Checkpoints stay one file written by rank 0 (:mod:`.state`): :func:`model_state_dict` and
:func:`optimizer_state_dict` gather the full state (``torch.distributed.checkpoint.state_dict``, a collective),
and the ``load_*`` functions give every rank its shard of it again: copies, so a resumed run continues bit for
bit, and ``model.pt`` loads like any other (``sturdy evaluate``,
:func:`~sturdy.experiments.train_job.load_trained_model`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from sturdy.errors import ConfigurationError

__all__ = ["Sharding", "ShardGroup", "shard_blocks", "shard_model", "is_sharded", "model_state_dict",
           "load_model_state_dict", "optimizer_state_dict", "load_optimizer_state_dict", "local_tensor",
           "check_shardable"]


@dataclass(frozen=True)
class ShardGroup:
    """One FSDP2 unit that holds parameters.

    Attributes:
        index: position among the run's groups (in ``model.modules()`` order).
        module: the sharded module (an ``FSDPModule``).
        names: qualified names of its parameters, in reduce-scatter order.
        params: those parameters as they were before sharding (FSDP2 replaces them by ``DTensor`` shards).
        shapes: their unsharded shapes.
    """

    index: int
    module: nn.Module
    names: Tuple[str, ...]
    params: Tuple[Tensor, ...]
    shapes: Tuple[torch.Size, ...]


@dataclass(frozen=True)
class Sharding:
    """How a run in several processes shards (``sturdy train --shard``).

    Attributes:
        install: called once with the :class:`ShardGroup` s right after sharding, before the optimizer is built
            (a method's custom reduce-scatter, e.g. gradient compression).
        blocks: the modules sharded before the whole model (default :func:`shard_blocks`).
        mixed_precision: FSDP2's ``MixedPrecisionPolicy`` (e.g. bf16 parameters in forward and backward, or a
            bf16 reduce-scatter); ``None``: everything in the parameters' dtype.
    """

    install: Optional[Callable[[Sequence[ShardGroup]], None]] = None
    blocks: Optional[Callable[[nn.Module], Sequence[nn.Module]]] = None
    mixed_precision: Optional[Any] = None


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def shard_blocks(model: nn.Module) -> List[nn.Module]:
    """The model's blocks: the children holding parameters, below any chain of single wrappers (a
    normalisation in front of a network shards the network's layers, not the network as one block)."""
    module = model
    while True:
        children = [c for c in module.children() if _has_params(c)]
        own = any(True for _ in module.parameters(recurse=False))
        if len(children) == 1 and not own:
            module = children[0]
            continue
        return children


def shard_model(model: nn.Module, *, blocks: Optional[Sequence[nn.Module]] = None,
                mixed_precision: Optional[Any] = None) -> Tuple[ShardGroup, ...]:
    """``fully_shard`` every block (default :func:`shard_blocks`), then ``model``; its groups.

    Needs an initialised process group (every rank calls it), over which the parameters are sharded along their
    first dimension, on the model's device; ``mixed_precision`` is FSDP2's ``MixedPrecisionPolicy``.
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    originals = {(id(m), n): p for m in model.modules() for n, p in m.named_parameters(recurse=False)}
    names = {id(p): n for n, p in model.named_parameters()}
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    # on the model's device: FSDP2's default mesh is the GPU whenever there is one
    kw: Dict[str, Any] = {"mesh": init_device_mesh(device.type, (dist.get_world_size(),))}
    if mixed_precision is not None:
        kw["mp_policy"] = mixed_precision
    for block in _untied(model, shard_blocks(model) if blocks is None else blocks):
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    groups: List[ShardGroup] = []
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        for param_group in _param_groups(module):
            params = tuple(originals[(id(fp._module_info.module), fp._module_info.param_name)]
                           for fp in param_group.fsdp_params)
            groups.append(ShardGroup(len(groups), module, tuple(names[id(p)] for p in params), params,
                                     tuple(p.shape for p in params)))
    return tuple(groups)


def _untied(model: nn.Module, blocks: Sequence[nn.Module]) -> List[nn.Module]:
    """``blocks`` less those sharing a parameter with another block or with ``model`` itself (tied weights):
    FSDP2 manages a parameter in one unit only, so those stay in the whole model's unit."""
    counts: Dict[int, int] = {}
    owners = [list(b.parameters()) for b in blocks] + [list(model.parameters(recurse=False))]
    for params in owners:
        for p in {id(p) for p in params}:
            counts[p] = counts.get(p, 0) + 1
    return [b for b, params in zip(blocks, owners) if all(counts[id(p)] == 1 for p in params)]


def _param_groups(module: nn.Module) -> List[Any]:
    """An FSDP2 module's parameter groups (a list since torch 2.12, one group or none before)."""
    state = module._get_fsdp_state()  # type: ignore[operator]
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:
        one = getattr(state, "_fsdp_param_group", None)
        groups = [] if one is None else [one]
    return list(groups)


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` was sharded by :func:`shard_model`."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _full_options(**kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def model_state_dict(model: nn.Module) -> Dict[str, Any]:
    """``model.state_dict()``; for a sharded model the full one, gathered on the CPU of rank 0 (a collective:
    the other ranks get ``{}``)."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options(cpu_offload=True))


def load_model_state_dict(model: nn.Module, state: Dict[str, Any]) -> None:
    """``model.load_state_dict(state)``; a sharded model takes its shard of the full ``state`` (every rank
    passes it)."""
    if not is_sharded(model):
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_full_options())


def optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    """``optimizer.state_dict()``; for a sharded model the full one, keyed by parameter name, on rank 0 (a
    collective)."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_full_options(cpu_offload=True))


def load_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: Dict[str, Any]) -> None:
    """``optimizer.load_state_dict(state)``; for a sharded model from the full state (every rank passes it)."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=_full_options())


def local_tensor(t: Tensor) -> Tensor:
    """This rank's part of ``t``: the local shard of a ``DTensor``, ``t`` itself otherwise."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def check_shardable(world: int) -> None:
    """Refuse sharding in a single process."""
    if world < 2:
        raise ConfigurationError("sharded training (--shard) needs at least 2 processes; add --nproc 2 (or more), "
                                 "or launch with torchrun")
