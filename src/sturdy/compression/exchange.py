"""The exchange of sparse selections: the body of every error-feedback hook (variance, Strom, top-k).

Per bucket and step, after ``state.start_iter`` (plain allreduce before it): add the gradient to the
residual (:meth:`~sturdy.compression.residual.ResidualState.accumulate`; with momentum correction its
velocity), let the state :meth:`~sturdy.compression.residual.ResidualState.select` what to send,
all-gather the payloads (:mod:`sturdy.compression.collective`, mode ``state.gather``), and write the
sum of every rank's decoded update, divided by the world size, into the bucket. This rank's own
payload is not decoded: its selection holds exactly the decoded values. Every rank sums in rank
order, so replicas stay bit-identical.

CUDA buckets decode on the device (:mod:`~sturdy.compression.device_codec`): with the headers the
capacity all-gather read alongside the sizes, and one read of the payloads' validity flags per bucket.
bf16 and fp16 buckets (their residuals and variances are float32) sum the decoded updates in float32
and cast the average to the bucket's dtype once.
"""

from __future__ import annotations

import math
from typing import List, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from sturdy.compression import codec, device_codec
from sturdy.compression.collective import all_gather_slots, all_gather_variable, all_gather_with_capacity
from sturdy.compression.compressor import Selection, max_payload_bytes
from sturdy.compression.residual import BucketView, ResidualState
from sturdy.compression.wire import HEADER_BYTES

__all__ = ["sparse_exchange"]


def sparse_exchange(state: ResidualState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """One bucket of an error-feedback hook: select, gather, sum; returns the averaged bucket's future."""
    if state.iter < state.start_iter:
        state.before_plain_step(bucket)
        return state.plain_allreduce(bucket)
    rank, world = state.rank_and_world()
    view = state.bucket_view(bucket)
    buffer = view.gradient
    state.accumulate(view)
    if state.gather == "bounded":
        return _bounded_exchange(state, bucket, view, rank, world)
    selection = state.select(view)
    _mark_sent(view.buffers["ever_sent"], selection)
    if state.gather == "exact":
        gathered = all_gather_variable(selection.payload, process_group=state.process_group, device=buffer.device)
    else:
        gathered = all_gather_with_capacity(
            selection.payload, capacity=state.slot_bytes.get(view.index, 0), process_group=state.process_group,
            device=buffer.device,
        )
        state.slot_bytes[view.index] = math.ceil(state.slack * max(gathered.sizes))  # every rank saw the same sizes
    state.count_bucket(bucket, elements=buffer.numel(), sent=selection.count, payload=int(selection.payload.numel()),
                       wire=gathered.wire_bytes)

    def combine(fut: torch.futures.Future) -> Tensor:
        return _average(buffer, _sum_updates(buffer, fut.value(), view.boundaries, rank, selection, gathered.heads),
                        world)

    return gathered.future.then(combine)


def _mark_sent(ever_sent: Tensor, selection: Selection) -> None:
    if not selection.count:
        return
    if ever_sent.device.type == "cpu" and selection.indices.device.type == "cpu":
        ever_sent.numpy()[selection.indices.numpy()] = True
    else:
        ever_sent[selection.indices] = True


_WIDE = (torch.float32, torch.float64)


def _sum_updates(
    buffer: Tensor, payloads: List[Tensor], boundaries: Tensor, rank: int, selection: Selection,
    heads: Optional[np.ndarray] = None,
) -> Tensor:
    """The sum of the decoded payloads in rank order: in ``buffer``, or for a bf16/fp16 bucket in a float32
    tensor (returned). This rank's own payload is not decoded: its selection holds exactly the decoded
    values (float32), added at the same point of the sum."""
    if buffer.dtype in _WIDE:
        target = buffer.zero_()
    else:
        target = torch.zeros(buffer.numel(), dtype=torch.float32, device=buffer.device)
    own = selection if target.dtype == torch.float32 and selection.count else None
    on_device = device_codec.enabled_for(target.device)
    flags = []
    for index, payload in enumerate(payloads):
        if index == rank and own is not None:
            if target.device.type == "cpu" and own.indices.device.type == "cpu":
                target.numpy()[own.indices.numpy()] += own.values.numpy()
            else:
                target.index_add_(0, own.indices.to(target.device), own.values.to(target.device, target.dtype))
        elif on_device:
            header = heads[index].tobytes() if heads is not None and payload.numel() >= HEADER_BYTES else None
            flags.append(device_codec.decode_add_unchecked(target, payload, boundaries=boundaries, header=header))
        else:
            codec.decode_add_(target, payload, boundaries=boundaries)
    if flags and not bool(torch.stack(flags).all()):  # one host read per bucket
        bad = next(i for i, ok in enumerate(torch.stack(flags).tolist()) if not ok)
        payload = [p for i, p in enumerate(payloads) if not (i == rank and own is not None)][bad]
        raise device_codec.corrupt_error(payload, target.numel(), boundaries)
    return target


def _average(buffer: Tensor, total: Tensor, world: int) -> Tensor:
    """``buffer = total / world`` (cast once to a bf16/fp16 bucket's dtype)."""
    if total is buffer:
        return buffer.div_(world)
    return buffer.copy_(total.div_(world))


def _bounded_exchange(
    state: ResidualState, bucket: dist.GradBucket, view: BucketView, rank: int, world: int
) -> torch.futures.Future[Tensor]:
    """One asynchronous all-gather of fixed slots; what does not fit stays in the residual."""
    buffer, index = view.gradient, view.index
    worst = max_payload_bytes(buffer.numel(), value_format=state.value_format, num_scales=view.boundaries.numel() - 1)
    capacity = min(state.slot_bytes.get(index, worst), worst)
    selection = state.select(view, max_bytes=capacity)
    _mark_sent(view.buffers["ever_sent"], selection)
    gathered = all_gather_slots(
        selection.payload, capacity=capacity, wanted=selection.wanted_bytes, process_group=state.process_group,
        device=buffer.device,
    )
    state.count_bucket(bucket, elements=buffer.numel(), sent=selection.count, payload=int(selection.payload.numel()),
                       wire=gathered.wire_bytes)

    def combine(fut: torch.futures.Future) -> Tensor:
        payloads, wanted = fut.value()
        state.slot_bytes[index] = max(1, math.ceil(state.slack * max(wanted)))  # identical on every rank
        return _average(buffer, _sum_updates(buffer, payloads, view.boundaries, rank, selection), world)

    return gathered.future.then(combine)
