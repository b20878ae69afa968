"""Measured inputs of the cost model (:mod:`sturdy.compression.costmodel`): compute and codec time per step,
and the step time of a running DDP job.

Every measurement warms up first, synchronises CUDA around each timed step and reports a median.
"""

from __future__ import annotations

import statistics as pystats
import time
from typing import Callable, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sturdy.compression import codec
from sturdy.compression.compressor import variance_select
from sturdy.distributed import all_reduce_sum

__all__ = ["WARMUP_STEPS", "StepClock", "measure_step_seconds", "measure_codec_seconds"]

WARMUP_STEPS = 3


class StepClock:
    """Wraps a DDP communication hook to time steps (from one step's last bucket to the next).

    Register :meth:`hook` in place of the wrapped hook (``ddp.register_comm_hook(state, clock.hook)``).
    """

    def __init__(self, hook: Callable[..., torch.futures.Future]) -> None:
        self.inner = hook
        self.marks: List[float] = []

    def hook(self, state, bucket):  # noqa: ANN001 - DDP inspects the signature; keep it unannotated
        """The wrapped hook, noting the time after each step's last bucket."""
        fut = self.inner(state, bucket)
        if bucket.is_last():
            self.marks.append(time.perf_counter())
        return fut

    def median_step_s(self) -> Optional[float]:
        """Median time between consecutive steps on this rank (``None`` before the second step)."""
        gaps = [b - a for a, b in zip(self.marks, self.marks[1:])]
        return pystats.median(gaps) if gaps else None

    def mean_median_step_s(self, *, process_group: Optional[dist.ProcessGroup] = None) -> Optional[float]:
        """Mean over the ranks of :meth:`median_step_s` (a collective: call it on every rank)."""
        step_s = self.median_step_s()
        total = all_reduce_sum([step_s if step_s is not None else 0.0], process_group=process_group)[0]
        return total / dist.get_world_size(process_group) if step_s is not None else None


def measure_step_seconds(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                         batch_size: int, repeats: int = 20) -> float:
    """Median wall time of forward + backward + SGD step (learning rate 0) on one batch, after warm-up.

    The model is left in eval mode.
    """
    device = next(model.parameters()).device
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x, y = images[:batch_size].to(device), labels[:batch_size].to(device)
    times = []
    for i in range(repeats + WARMUP_STEPS):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= WARMUP_STEPS:
            times.append(time.perf_counter() - t0)
    model.eval()
    return pystats.median(times)


def measure_codec_seconds(num_elements: int, sent_fraction: float, *, repeats: int = 30) -> float:
    """Median time of one variance selection + 4-bit encoding + one decode for a gradient of
    ``num_elements`` with ``sent_fraction`` of the elements passing the test (synthetic values)."""
    gen = torch.Generator().manual_seed(0)
    chosen = torch.rand(num_elements, generator=gen) < max(sent_fraction, 1.0 / num_elements)
    r0 = torch.randn(num_elements, generator=gen)
    v0 = torch.where(chosen, torch.zeros(()), torch.full((), 1e30))
    times = []
    for i in range(repeats + WARMUP_STEPS):
        r, v, out = r0.clone(), v0.clone(), torch.zeros(num_elements)
        t0 = time.perf_counter()
        selection = variance_select(r, v, alpha=1.0, zeta=0.999, quantize="4bit")
        codec.decode_add_(out, selection.payload)
        if i >= WARMUP_STEPS:
            times.append(time.perf_counter() - t0)
    return pystats.median(times)
