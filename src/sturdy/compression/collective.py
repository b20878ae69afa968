"""All-gather of variable-size ``uint8`` payloads over ``torch.distributed`` (gloo or NCCL).

Two protocols, both correct for empty payloads:

* :func:`all_gather_variable` (exact): an all-gather of the sizes (int64, synchronous), then an
  asynchronous all-gather of the payloads padded to the largest size; skipped when every rank
  sends nothing. Bytes on the wire per rank: ``8 + max size``.
* :func:`all_gather_with_capacity` (one round in the steady state): every rank sends a slot of
  ``8 + capacity`` bytes holding its size and the head of its payload; only if some payload is
  longer than ``capacity`` a second all-gather carries the tails. ``capacity`` must be the same on
  every rank (the hooks derive it from the previous step's sizes, which every rank knows). Bytes
  per rank: ``8 + capacity`` (+ the padded tail round when it happens). Fewer round trips cost
  padding: this trades bytes for latency.
* :func:`all_gather_slots` (one asynchronous round, like a plain allreduce): fixed slots of
  ``8 + capacity`` bytes; the caller guarantees that its payload fits (the bounded compression
  mode truncates its selection, the rest stays in the residual). Each slot also carries the size the
  rank *wanted* to send, so every rank can derive the same next capacity.

Every round sends tensors of the same size from every rank, as NCCL requires (gloo would take any
sizes; the exact protocol pads to the largest payload). On NCCL the rounds use
``all_gather_into_tensor`` into one buffer; the host reads the sizes (and, for the capacity protocol,
every payload's header with them, for :mod:`~sturdy.compression.device_codec`) in one copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from sturdy.compression.wire import HEADER_BYTES

__all__ = ["GatherResult", "all_gather_variable", "all_gather_with_capacity", "all_gather_slots"]

SIZE_BYTES = 8


@dataclass(frozen=True)
class GatherResult:
    """A pending variable-size all-gather.

    Attributes:
        future: completes with the list of payloads (one ``uint8`` tensor per rank, trimmed).
        sizes: payload sizes in bytes, per rank.
        wire_bytes: bytes this rank transmitted (all rounds).
        heads: per rank, the first :data:`~sturdy.compression.wire.HEADER_BYTES` bytes of its
            payload as a host ``uint8`` array (rows of short payloads hold padding), when the
            protocol read them with the sizes; else ``None``.
    """

    future: torch.futures.Future
    sizes: List[int]
    wire_bytes: int
    heads: Optional[np.ndarray] = None


def _gather_into(out: Tensor, slot: Tensor, process_group: Optional[dist.ProcessGroup]) -> None:
    """All-gather equal-size ``slot`` into the rows of ``out`` (one buffer on NCCL, a list of views on gloo)."""
    if out.is_cuda and dist.get_backend(process_group) == "nccl":
        dist.all_gather_into_tensor(out, slot, group=process_group)
    else:
        dist.all_gather(list(out.unbind(0)), slot, group=process_group)


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
    sizes_t = torch.zeros(world, 1, dtype=torch.int64, device=device)
    _gather_into(sizes_t, size, process_group)
    sizes = sizes_t.reshape(-1).tolist()  # one host read
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


def all_gather_with_capacity(
    payload: Tensor,
    *,
    capacity: int,
    process_group: Optional[dist.ProcessGroup] = None,
    device: Optional[torch.device] = None,
) -> GatherResult:
    """Gather one 1-D ``uint8`` payload per rank in one round when every payload fits ``capacity`` bytes.

    Args:
        payload: this rank's message.
        capacity: bytes of payload per slot, identical on every rank (``>= 0``).
        process_group: the group (default: the world).
        device: where collective buffers live; default ``payload.device``.
    """
    device = device if device is not None else payload.device
    world = dist.get_world_size(process_group)
    payload = payload.reshape(-1).to(device, torch.uint8)
    n = payload.numel()
    head = min(n, capacity)
    if device.type == "cpu":  # numpy views: a fraction of torch's per-call cost on a few small copies
        slot = torch.empty(SIZE_BYTES + capacity, dtype=torch.uint8)
        slot_np = slot.numpy()
        slot_np[:SIZE_BYTES] = np.array([n], dtype="<i8").view(np.uint8)
        slot_np[SIZE_BYTES : SIZE_BYTES + head] = payload.numpy()[:head]
        slot_np[SIZE_BYTES + head :] = 0
    else:
        slot = torch.zeros(SIZE_BYTES + capacity, dtype=torch.uint8, device=device)
        slot[:SIZE_BYTES] = torch.tensor([n], dtype=torch.int64).view(torch.uint8).to(device)
        slot[SIZE_BYTES : SIZE_BYTES + head] = payload[:head]
    gathered = torch.empty(world, SIZE_BYTES + capacity, dtype=torch.uint8, device=device)
    outputs = list(gathered.unbind(0))
    # Synchronous on purpose: whether a tail round follows must be decided in the same order on every
    # rank, so no collective is ever issued from a future's callback (that would race between buckets).
    _gather_into(gathered, slot, process_group)
    read = gathered[:, : SIZE_BYTES + min(capacity, HEADER_BYTES)].cpu().numpy()  # sizes and headers, one copy
    sizes = [int(x) for x in np.ascontiguousarray(read[:, :SIZE_BYTES]).view("<i8").reshape(-1)]
    heads = read[:, SIZE_BYTES:] if capacity >= HEADER_BYTES else None
    extra_wire_bytes = 0
    longest = max(sizes)
    payloads = [o[SIZE_BYTES : SIZE_BYTES + min(s, capacity)] for o, s in zip(outputs, sizes)]
    if longest > capacity:
        extra = longest - capacity
        tail = torch.zeros(extra, dtype=torch.uint8, device=device)
        if n > capacity:
            tail[: n - capacity] = payload[capacity:]
        tails = [torch.empty_like(tail) for _ in range(world)]
        dist.all_gather(tails, tail, group=process_group)
        extra_wire_bytes = extra
        payloads = [torch.cat([h, t[: max(0, s - capacity)]]) for h, t, s in zip(payloads, tails, sizes)]
    done: torch.futures.Future = torch.futures.Future()
    done.set_result(payloads)
    return GatherResult(done, sizes, SIZE_BYTES + capacity + extra_wire_bytes, heads)


def all_gather_slots(
    payload: Tensor,
    *,
    capacity: int,
    wanted: int,
    process_group: Optional[dist.ProcessGroup] = None,
    device: Optional[torch.device] = None,
) -> GatherResult:
    """One asynchronous all-gather of fixed slots; the future yields ``(payloads, wanted sizes)``.

    Args:
        payload: this rank's message, at most ``capacity`` bytes.
        capacity: slot size in bytes, identical on every rank.
        wanted: the size this rank would have sent without the capacity limit.
    """
    device = device if device is not None else payload.device
    world = dist.get_world_size(process_group)
    n = payload.numel()
    if n > capacity:
        raise ValueError(f"payload of {n} bytes does not fit a slot of {capacity} bytes")
    slot = torch.zeros(SIZE_BYTES + capacity, dtype=torch.uint8, device=device)
    slot[:SIZE_BYTES] = torch.tensor([n, wanted], dtype=torch.int32).view(torch.uint8).to(device)
    slot[SIZE_BYTES : SIZE_BYTES + n] = payload.reshape(-1).to(device, torch.uint8)
    gathered = torch.empty(world, SIZE_BYTES + capacity, dtype=torch.uint8, device=device)
    outputs = list(gathered.unbind(0))
    if device.type == "cuda" and dist.get_backend(process_group) == "nccl":
        work = dist.all_gather_into_tensor(gathered, slot, group=process_group, async_op=True)
    else:
        work = dist.all_gather(outputs, slot, group=process_group, async_op=True)

    def unpack(_: torch.futures.Future) -> tuple:
        heads = gathered[:, :SIZE_BYTES].cpu().contiguous().view(torch.int32).tolist()  # one host read
        return [o[SIZE_BYTES : SIZE_BYTES + h[0]] for o, h in zip(outputs, heads)], [h[1] for h in heads]

    return GatherResult(work.get_future().then(unpack), [], SIZE_BYTES + capacity)
