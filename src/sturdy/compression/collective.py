"""All-gather of variable-size ``uint8`` payloads over ``torch.distributed`` (gloo or NCCL).

Two collectives: an all-gather of the sizes (int64, synchronous), then an asynchronous all-gather of
the payloads padded to the largest size. When every rank sends nothing the second collective is
skipped (every rank sees the same sizes, so they all skip it). Bytes on the wire per rank:
``8 + max size`` (what the padded all-gather really transmits per rank).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["GatherResult", "all_gather_variable"]

SIZE_BYTES = 8


@dataclass(frozen=True)
class GatherResult:
    """A pending variable-size all-gather.

    Attributes:
        future: completes with the list of payloads (one ``uint8`` tensor per rank, trimmed).
        sizes: payload sizes in bytes, per rank.
        wire_bytes: bytes this rank transmitted (size exchange plus the padded payload).
    """

    future: torch.futures.Future
    sizes: List[int]
    wire_bytes: int


def all_gather_variable(
    payload: Tensor, *, process_group: Optional[dist.ProcessGroup] = None, device: Optional[torch.device] = None
) -> GatherResult:
    """Gather one 1-D ``uint8`` payload per rank, of any size (zero included).

    Args:
        payload: this rank's message (any device; moved to ``device``).
        process_group: the group (default: the world).
        device: where collective buffers live (``cuda`` for NCCL); default ``payload.device``.
    """
    device = device if device is not None else payload.device
    world = dist.get_world_size(process_group)
    payload = payload.reshape(-1).to(device, torch.uint8)
    size = torch.tensor([payload.numel()], dtype=torch.int64, device=device)
    sizes_t = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes_t, size, group=process_group)
    sizes = [int(s.item()) for s in sizes_t]
    longest = max(sizes)
    if longest == 0:
        done: torch.futures.Future = torch.futures.Future()
        done.set_result([payload.new_zeros(0) for _ in range(world)])
        return GatherResult(done, sizes, SIZE_BYTES)
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: payload.numel()] = payload
    outputs = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in range(world)]
    work = dist.all_gather(outputs, padded, group=process_group, async_op=True)

    def trim(_: torch.futures.Future) -> List[Tensor]:
        return [out[:n] for out, n in zip(outputs, sizes)]

    return GatherResult(work.get_future().then(trim), sizes, SIZE_BYTES + longest)
