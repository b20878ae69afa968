"""The error-feedback methods (vgc, strom, topk) inside FSDP2: a custom reduce-scatter per sharded group
(docs/design.md, "Sharded training").

FSDP2 (``torch.distributed.fsdp.fully_shard``) reduces each group's gradients with one reduce-scatter whose
input holds this rank's whole local (unsharded) gradient: parameter by parameter, each padded along its first
dimension to a multiple of the world size and cut into one chunk per rank, the chunks of rank ``r`` side by side
in row ``r`` (``torch.ops.fsdp.chunk_cat``). :class:`ShardedReduceScatter` (installed with
``FSDPModule.set_custom_reduce_scatter``) reads that gradient back in parameter order, hands it to the method's
DDP hook as one gradient bucket (:class:`ShardBucket`: the group's parameters as they were before sharding, the
flat gradient), and keeps only this rank's shard of the averaged result. So the DDP hook's own code selects
(variance criterion with the per-sample statistics, error feedback, 4-bit values), exchanges the sparse coded
elements, counts the traffic and checkpoints its state, identically in both layouts: the group plays the role
of DDP's bucket.

The per-sample statistics are computed by hooks on the modules from their inputs and output gradients while
FSDP2 has the parameters unsharded; they are keyed by the parameters before sharding, which the buckets name.
Memory: the residual (and for vgc the accumulated variance) has the size of the whole model on every rank, in
float32 whatever the parameters' dtype; what the compressor adds per step is one flat copy of a group's
gradient and its average.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter

from sturdy.errors import DistributedError

__all__ = ["ShardBucket", "ShardedReduceScatter", "ShardLayout", "shard_layout", "install_sharded_compression"]


@dataclass(frozen=True)
class ShardLayout:
    """Where a group's gradient lies in FSDP2's reduce-scatter input, for one world size and rank.

    Attributes:
        gather: for each element of the flat gradient in parameter order, its position in the input.
        own_positions: positions in this rank's output (one row of the input) that hold real elements.
        own_sources: the elements of the flat gradient that go there.
        input_numel: the input's length (``world * row``).
    """

    gather: Tensor
    own_positions: Tensor
    own_sources: Tensor
    input_numel: int


def shard_layout(shapes: Sequence[torch.Size], *, world: int, rank: int) -> ShardLayout:
    """The :class:`ShardLayout` of parameters of ``shapes`` sharded on dimension 0 over ``world`` ranks."""
    dims = [(int(s[0]) if len(s) else 1, math.prod(s[1:]) if len(s) else 1) for s in shapes]
    chunk_rows = [-(-d0 // world) for d0, _ in dims]
    row = sum(c * inner for c, (_, inner) in zip(chunk_rows, dims))
    gather, positions, sources = [], [], []
    offset = flat = 0
    for c, (d0, inner) in zip(chunk_rows, dims):
        i = torch.arange(d0, dtype=torch.int64)
        local = offset + (i % c) * inner  # where row i starts inside its rank's row of the input
        cols = torch.arange(inner, dtype=torch.int64)
        gather.append(((i // c) * row + local)[:, None] + cols)
        mine = (i // c) == rank
        positions.append(local[mine][:, None] + cols)
        sources.append((flat + i[mine] * inner)[:, None] + cols)
        offset += c * inner
        flat += d0 * inner

    def cat(parts: List[Tensor]) -> Tensor:
        return torch.cat([p.reshape(-1) for p in parts]) if parts else torch.zeros(0, dtype=torch.int64)

    return ShardLayout(cat(gather), cat(positions), cat(sources), world * row)


class ShardBucket:
    """One sharded group's gradient seen as a DDP gradient bucket (what a compression hook reads of one)."""

    def __init__(self, index: int, params: Sequence[Tensor], buffer: Tensor, last: bool) -> None:
        self._index, self._params, self._buffer, self._last = index, list(params), buffer, last

    def index(self) -> int:
        return self._index

    def parameters(self) -> List[Tensor]:
        return self._params

    def buffer(self) -> Tensor:
        return self._buffer

    def gradients(self) -> List[Tensor]:
        views, offset = [], 0
        for p in self._params:
            views.append(self._buffer[offset: offset + p.numel()].view(p.shape))
            offset += p.numel()
        return views

    def is_last(self) -> bool:
        return self._last

    def set_buffer(self, tensor: Tensor) -> None:
        self._buffer.copy_(tensor)


class _Steps:
    """Counts the groups reduced in the current step (the last one closes the step, as DDP's last bucket)."""

    def __init__(self, groups: int) -> None:
        self.groups, self.seen = groups, 0

    def next_is_last(self) -> bool:
        self.seen += 1
        if self.seen == self.groups:
            self.seen = 0
            return True
        return False


class ShardedReduceScatter(ReduceScatter):
    """FSDP2's reduce-scatter of one group (a :class:`sturdy.training.sharding.ShardGroup`) through a compression
    hook (see the module docstring)."""

    def __init__(self, group: Any, *, state: Any, hook: Callable[..., Any], steps: _Steps) -> None:
        self.group, self.state, self.hook, self.steps = group, state, hook, steps
        self._layouts: Dict[Tuple[int, int, str], ShardLayout] = {}

    def allocate(self, size: Sequence[Any], *, dtype: torch.dtype, device: torch.device) -> Tensor:
        return torch.empty(tuple(int(s) for s in size), dtype=dtype, device=device)

    def layout(self, process_group: dist.ProcessGroup, device: torch.device) -> ShardLayout:
        world, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
        key = (world, rank, str(device))
        if key not in self._layouts:
            lay = shard_layout(self.group.shapes, world=world, rank=rank)
            self._layouts[key] = ShardLayout(lay.gather.to(device), lay.own_positions.to(device),
                                             lay.own_sources.to(device), lay.input_numel)
        return self._layouts[key]

    def __call__(self, output_tensor: Tensor, input_tensor: Tensor, group: dist.ProcessGroup, op: Any,
                 async_op: bool = False) -> Optional[dist.Work]:
        lay = self.layout(group, input_tensor.device)
        if input_tensor.numel() != lay.input_numel:
            raise DistributedError(f"FSDP2 reduce-scatter of group {self.group.index} has {input_tensor.numel()} "
                                   f"elements, its parameters {lay.input_numel}: this torch version lays out the "
                                   "sharded gradients differently")
        bucket = ShardBucket(self.group.index, self.group.params, input_tensor[lay.gather],
                             self.steps.next_is_last())
        average = self.hook(self.state, bucket).wait()
        output_tensor.zero_()
        output_tensor[lay.own_positions] = average[lay.own_sources].to(output_tensor.dtype)
        if op != dist.ReduceOp.AVG:  # FSDP2 divides a summed reduction afterwards
            output_tensor.mul_(dist.get_world_size(group))
        return None


def install_sharded_compression(groups: Sequence[Any], *, state: Any, hook: Callable[..., Any]) -> None:
    """Reduce every group's gradients through ``hook(state, bucket)`` (a compression method's DDP hook).

    ``groups``: the sharded groups (:class:`sturdy.training.sharding.ShardGroup`: ``index``, ``module``,
    ``params`` as they were before sharding, their ``shapes``).
    """
    steps = _Steps(len(groups))
    for g in groups:
        g.module.set_custom_reduce_scatter(  # type: ignore[operator]
            ShardedReduceScatter(g, state=state, hook=hook, steps=steps))
