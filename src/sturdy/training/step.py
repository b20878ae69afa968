"""One optimizer step and the running sums of an epoch, kept on the device (docs/design.md, "Training core").

The loss, the number of correct predictions and a "saw a non-finite loss" flag are accumulated on the device;
the host reads them every ``sync_every`` steps and at the epoch's end, so a GPU never waits for the host inside
a step. Under ``--amp`` the objective runs in autocast (the gradient scaler of fp16 is applied here).
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Optional, Sequence, Tuple

import torch

from sturdy.training.plugins import Objective, Plugin, RunContext

__all__ = ["EpochSums", "Stepper"]


class EpochSums:
    """Running sums of one epoch on the device: loss x samples, correct predictions, samples.

    The loss sum doubles as the non-finite flag: a NaN or infinite step loss makes it NaN or infinite for the rest
    of the epoch (inf + finite = inf, inf - inf = NaN, NaN + anything = NaN), and finite float32 losses times a batch
    size cannot overflow a float64 sum, so no flag is kept per step.
    """

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        self.seen = 0

    @torch.no_grad()  # no graph is recorded (cheaper than detaching both tensors)
    def add(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        n = len(targets)
        self.loss += loss.double() * n
        self.correct += (logits.argmax(1) == targets).sum()
        self.seen += n

    def non_finite(self) -> bool:
        """Whether a step's loss was NaN or infinite (a host read)."""
        return not bool(torch.isfinite(self.loss))

    def means(self) -> Tuple[float, float]:
        """``(mean loss, accuracy)`` of the epoch so far (host reads)."""
        return float(self.loss) / max(self.seen, 1), int(self.correct) / max(self.seen, 1)


class Stepper:
    """Runs the steps of a run: objective (in autocast), backward (scaled for fp16), plugins, optimizer, schedule."""

    def __init__(self, ctx: RunContext, *, objective: Objective, scheduler: Any, plugins: Sequence[Plugin],
                 amp_dtype: Optional[torch.dtype]) -> None:
        self.ctx, self.objective, self.scheduler, self.plugins = ctx, objective, scheduler, list(plugins)
        self.amp_dtype = amp_dtype
        fp16 = amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(ctx.device.type) if fp16 else None
        self._unscaled = False
        ctx.unscale = self._unscale if fp16 else None

    def autocast(self) -> ContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.ctx.device.type, dtype=self.amp_dtype)

    def _unscale(self) -> None:
        if self.scaler is not None and not self._unscaled:
            self.scaler.unscale_(self.ctx.optimizer)
            self._unscaled = True

    def forward(self, x: torch.Tensor, y: torch.Tensor, *, epoch: int, step: int
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The objective's ``(mean loss, clean logits)`` on one batch (gradients cleared first)."""
        self.ctx.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            return self.objective(self.ctx.net, x, y, epoch=epoch, step=step)

    def update(self, loss: torch.Tensor, step: int) -> None:
        """Backward, the plugins around the optimizer step, the step itself and the schedule."""
        opt = self.ctx.optimizer
        self._unscaled = False
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        for p in self.plugins:
            p.after_backward(self.ctx, step)
        if self.scaler is not None:
            self.scaler.step(opt)
            self.scaler.update()
        else:
            opt.step()
        self.scheduler.step()
        for p in self.plugins:
            p.after_step(self.ctx, step)
