"""The Lipschitz-margin training objective, for :func:`sturdy.training.train` or a loop of your own.

:class:`LMTObjective` is ``(model, inputs, targets, *, epoch, step) -> (mean LMT loss, clean logits)``: the loss
of :func:`~sturdy.lipschitz.lmt_loss` with the tracker's current estimate (one power-iteration update per call)
and the target radius of the warm-up schedule at that step. The tracker runs outside autocast, so under mixed
precision the estimate stays in the parameters' dtype.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from sturdy.lipschitz import lmt_objective
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    >>> objective = lmt_objective(net, input_shape=(1, 4), steps_per_epoch=10, c=0.1)
    >>> loss, logits = objective(net, torch.rand(8, 4), torch.zeros(8, dtype=torch.long), epoch=0, step=0)
    >>> loss.backward(); logits.shape
    torch.Size([8, 3])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import torch
from torch import nn

from sturdy.errors import ConfigurationError
from sturdy.lipschitz.losses import FORMS, CWarmup, lmt_loss
from sturdy.lipschitz.tracker import LipschitzTracker
from sturdy.validation import check_count

__all__ = ["LMTObjective", "lmt_objective", "MAX_LMT_ITERATIONS"]

MAX_LMT_ITERATIONS = 1000  # power iterations per training step


@dataclass
class LMTObjective:
    """The LMT training objective (see the module doc).

    Attributes:
        tracker: the power-iteration state (one update per call; checkpoint it to resume bit-exactly).
        schedule: target radius ``c`` per (fractional) epoch.
        form: ``"pairwise"`` or ``"global"``.
        clip: scale the added margin by ``clip(M / added, 0, 1)`` (no gradient).
        steps_per_epoch: optimizer steps per epoch (for the fractional epoch of the warm-up).
    """

    tracker: LipschitzTracker
    schedule: CWarmup
    form: str
    clip: bool
    steps_per_epoch: int

    def __call__(
        self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *, epoch: int, step: int
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(loss, clean logits)``; ``step`` counts optimizer steps from the start of the run.

        The forward runs inside :meth:`LipschitzTracker.batch_statistics`, so BatchNorm enters the estimate
        with the larger of its running and batch factors (see :mod:`sturdy.lipschitz.tracker`)."""
        with self.tracker.batch_statistics(model):
            logits = model(inputs)
        spe = self.steps_per_epoch
        c = self.schedule(epoch=epoch, step=step - epoch * spe, steps_per_epoch=spe)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            bound = self.tracker()
        loss = lmt_loss(logits.float(), targets, c=c, bound=bound, form=self.form, clip_factor=self.clip)
        return loss, logits


def check_lmt_settings(c: float, warmup_epochs: float, form: str, iterations: int) -> CWarmup:
    """The warm-up schedule of ``c``; refuses unknown forms and iteration counts out of range."""
    schedule = CWarmup(c=c, warmup_epochs=warmup_epochs)  # validates both, with its messages
    if form not in FORMS:
        raise ConfigurationError(f"form (--lmt-form) must be 'pairwise' or 'global', got {form!r}")
    check_count(iterations, "iterations (--lmt-iterations)", high=MAX_LMT_ITERATIONS,
                why="power iterations per training step; the vector persists across steps, so 1 to a few suffice")
    return schedule


def lmt_objective(
    model: nn.Module,
    *,
    input_shape: Sequence[int],
    steps_per_epoch: int,
    c: float = 0.3,
    warmup_epochs: float = 0.0,
    form: str = "pairwise",
    clip: bool = False,
    iterations: int = 1,
    seed: int = 0,
) -> LMTObjective:
    """The LMT objective of ``model``; its ``tracker`` is the state to checkpoint.

    Args:
        model: the (unwrapped) model, already on its device.
        input_shape: shape of one input batch including the batch dimension, e.g. ``(1, 1, 8, 8)``.
        steps_per_epoch: optimizer steps per epoch on this worker.
        c: target L2 radius; ``warmup_epochs``: linear warm-up of ``c`` from 0.
        form, clip: as :func:`sturdy.lipschitz.lmt_loss` (``clip`` is its ``clip_factor``).
        iterations: power iterations per step.
        seed: seed of the tracker's start vectors (identical on every rank).
    """
    schedule = check_lmt_settings(c, warmup_epochs, form, iterations)
    if steps_per_epoch < 1:
        raise ConfigurationError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    tracker = LipschitzTracker(model, input_shape=input_shape, iterations=iterations, seed=int(seed))
    tracker.broadcast_()
    return LMTObjective(tracker=tracker, schedule=schedule, form=form, clip=bool(clip),
                        steps_per_epoch=int(steps_per_epoch))
