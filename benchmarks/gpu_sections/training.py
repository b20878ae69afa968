"""GPU section of the training core: a bf16 WRN-16-4 training step through ``sturdy.training.train`` against a
plain hand-written loop, and the host synchronisations inside a step.

Both loops train the same model from the same weights on the same data (an in-memory
:class:`~sturdy.data.ImageDataset` held on the device, 20 steps of batch 128 per epoch), Adam with the same per-step
cosine schedule, bf16 autocast, channels-last model and images. The hand loop draws each epoch's permutation on
the host, moves it to the device once and indexes there; it reads nothing back. Each call runs two epochs (the
first warms up); the second epoch is timed from its start to its last step, between ``torch.cuda.synchronize``
calls, and the calls alternate (which goes first alternates too). Reported: the ratio of the median seconds per
step (``hand / train``, target >= 0.95).

Host synchronisations are counted with ``torch.cuda.set_sync_debug_mode("warn")`` in a separate run of each loop,
catching the warnings from the end of an epoch's first step to the end of its last (the first step of a run
checks the model's logits once, by design; the loss is read every ``sync_every`` steps, more than an epoch here,
and at the epoch's end, outside the steps): target 0 per step. A control, the hand loop reading its loss after
every step, must count 1 per step (``host_syncs.control``). Skipped on the CPU.

``smoke=True`` runs a WRN-10-1 on 8x8 images in seconds on any device.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
import warnings
from typing import Any, Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from sturdy.data import ImageDataset
from sturdy.models import create_model
from sturdy.training import Plugin, TrainConfig, train

TARGET = 0.95
SEED_STRIDE = 100_003  # the order of ``train``: epoch e of seed s permutes with seed s * stride + e


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Clock(Plugin):
    """Seconds of each epoch's steps and the sync warnings caught from the end of its first step to its last."""

    name = "clock"

    def __init__(self, device: torch.device, steps: int, caught: List[Any]) -> None:
        self.device, self.steps, self.caught = device, steps, caught
        self.seconds: List[float] = []
        self.syncs: List[int] = []
        self._t0 = 0.0
        self._mark = 0

    def on_epoch_start(self, ctx: Any, epoch: int) -> None:
        _sync(self.device)
        self._t0 = time.perf_counter()

    def after_step(self, ctx: Any, step: int) -> None:
        i = step % self.steps
        if i == 0:
            self._mark = _sync_warnings(self.caught)
        if i == self.steps - 1:
            self.syncs.append(_sync_warnings(self.caught) - self._mark)
            _sync(self.device)
            self.seconds.append(time.perf_counter() - self._t0)


SYNC_WARNING = "called a synchronizing CUDA operation"


def _sync_warnings(caught: List[Any]) -> int:
    return sum(SYNC_WARNING in str(w.message) for w in caught)


def _hand(model: nn.Module, data: ImageDataset, *, epochs: int, batch: int, lr: float, seed: int,
          clock: _Clock, read_loss: bool = False) -> None:
    """The plain loop (see the module doc), timed per epoch by ``clock`` like ``train``."""
    device = data.images.device
    n, steps = len(data), math.ceil(len(data) / batch)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    total = epochs * steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total) / total)))
    model.train()
    for epoch in range(epochs):
        clock.on_epoch_start(None, epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * SEED_STRIDE + epoch)).to(device)
        for i, idx in enumerate(order.split(batch)):
            x = data.images[idx].contiguous(memory_format=torch.channels_last)
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), data.labels[idx])
            loss.backward()
            opt.step()
            sched.step()
            if read_loss:  # the control of the sync counter: one host read per step
                float(loss)
            clock.after_step(None, epoch * steps + i)


def run(*, device: torch.device, smoke: bool) -> Dict[str, Any]:
    """train / hand loop step time and host syncs per step (see the module doc)."""
    torch.manual_seed(0)
    size, batch, steps = (8, 8, 4) if smoke else (32, 128, 20)
    kwargs = {"depth": 10, "widen": 1} if smoke else {"depth": 16, "widen": 4}
    repeats = 2 if smoke else 5
    shape = (3, size, size)
    n = batch * steps
    gen = torch.Generator().manual_seed(0)
    data = ImageDataset(torch.rand(n, *shape, generator=gen).to(device),
                        torch.randint(0, 10, (n,), generator=gen).to(device), 10)
    init = create_model("wrn", in_shape=shape, num_classes=10, **kwargs).to(device)
    config = TrainConfig(epochs=2, batch_size=batch, lr=1e-3, optimizer="adam", schedule="cosine", seed=0,
                         device=str(device), amp="bf16", channels_last=True)

    def call(which: str, caught: List[Any]) -> _Clock:
        clock = _Clock(device, steps, caught)
        model = copy.deepcopy(init).to(memory_format=torch.channels_last)
        if which == "train":
            train(model, data, config=config, plugins=[clock], progress=False)
        else:
            _hand(model, data, epochs=2, batch=batch, lr=1e-3, seed=0, clock=clock, read_loss=which == "control")
        return clock

    seconds: Dict[str, List[float]] = {"hand": [], "train": []}
    for r in range(repeats):
        for which in ("hand", "train") if r % 2 == 0 else ("train", "hand"):
            seconds[which].append(call(which, []).seconds[-1] / steps)
    med = {k: statistics.median(v) for k, v in seconds.items()}
    ratio = med["hand"] / med["train"]
    out: Dict[str, Any] = {
        "model": f"wrn-{kwargs['depth']}-{kwargs['widen']}",
        "input_shape": [batch, *shape],
        "steps_per_epoch": steps,
        "median_step_seconds": med,
        "step_seconds": seconds,
        "ratio_hand_over_train_step": ratio,
        "targets": {"train_step_over_hand_step": {"value": ratio, "target": f">= {TARGET}", "met": ratio >= TARGET}},
    }
    if device.type != "cuda":
        out["host_syncs_per_step"] = "skipped (counted on CUDA only)"
        return out
    syncs = {}
    for which in ("hand", "train", "control"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                clock = call(which, caught)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        messages = sorted({str(w.message)[:200] for w in caught if SYNC_WARNING in str(w.message)})
        syncs[which] = {"per_step": clock.syncs[-1] / (steps - 1), "examples": messages[:3]}
    out["host_syncs"] = syncs
    per_step = syncs["train"]["per_step"]
    out["targets"]["train_host_syncs_per_step"] = {"value": per_step, "target": "0", "met": per_step == 0}
    return out
