"""The exchange of sparse selections: the body of every error-feedback hook (variance, Strom, top-k).

Per bucket and step, after ``state.start_iter`` (plain allreduce before it): add the gradient to the
residual, let the state :meth:`~sturdy.compression.residual.ResidualState.select` what to send,
all-gather the payloads (:mod:`sturdy.compression.collective`, mode ``state.gather``), and write the
sum of every rank's decoded update, divided by the world size, into the bucket. This rank's own
payload is not decoded: its selection holds exactly the decoded values. Every rank sums in rank
order, so replicas stay bit-identical.
"""

from __future__ import annotations

import math
from typing import List

import torch
import torch.distributed as dist
from torch import Tensor

from sturdy.compression import codec
from sturdy.compression.collective import all_gather_slots, all_gather_variable, all_gather_with_capacity
from sturdy.compression.compressor import Selection, max_payload_bytes
from sturdy.compression.residual import BucketView, ResidualState

__all__ = ["sparse_exchange"]


def sparse_exchange(state: ResidualState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """One bucket of an error-feedback hook: select, gather, sum; returns the averaged bucket's future."""
    if state.iter < state.start_iter:
        state.before_plain_step(bucket)
        return state.plain_allreduce(bucket)
    rank, world = state.rank_and_world()
    view = state.bucket_view(bucket)
    buffer = view.gradient
    view.buffers["residual"].add_(buffer)
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
        _sum_updates(buffer, fut.value(), view.boundaries, rank, selection)
        return buffer.div_(world)

    return gathered.future.then(combine)


def _mark_sent(ever_sent: Tensor, selection: Selection) -> None:
    if not selection.count:
        return
    if ever_sent.device.type == "cpu" and selection.indices.device.type == "cpu":
        ever_sent.numpy()[selection.indices.numpy()] = True
    else:
        ever_sent[selection.indices] = True


def _sum_updates(buffer: Tensor, payloads: List[Tensor], boundaries: Tensor, rank: int, selection: Selection) -> None:
    """``buffer = sum of the decoded payloads`` in rank order; this rank's own payload is not decoded:
    its selection holds exactly the decoded values (float32 buffers), added at the same point of the sum."""
    buffer.zero_()
    own = selection if buffer.dtype == torch.float32 and selection.count else None
    for index, payload in enumerate(payloads):
        if index == rank and own is not None:
            if buffer.device.type == "cpu" and own.indices.device.type == "cpu":
                buffer.numpy()[own.indices.numpy()] += own.values.numpy()
            else:
                buffer.index_add_(0, own.indices.to(buffer.device), own.values.to(buffer.device, buffer.dtype))
        else:
            codec.decode_add_(buffer, payload, boundaries=boundaries)


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
        _sum_updates(buffer, payloads, view.boundaries, rank, selection)
        return buffer.div_(world)

    return gathered.future.then(combine)
