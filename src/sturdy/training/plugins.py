"""Plugin points of the training loop (docs/design.md, "Training core: plugins").

The loop knows no method. What a method adds comes through:

* the **objective** ``(model, inputs, targets, *, epoch, step) -> (mean loss, clean logits)``
  (:class:`Objective`; e.g. Lipschitz-margin training);
* **plugins** (:class:`Plugin`), called around every step and at every epoch's start and end:
  ``on_epoch_start``, ``after_backward`` (gradients are final and, under DDP, averaged; e.g. clipping),
  ``after_step`` (the optimizer has stepped; e.g. an average of the weights), ``on_epoch_end`` (may stop the
  run); a plugin with ``state_dict``/``load_state_dict`` is checkpointed under its ``name``;
* **extra state** (:class:`Stateful`) checkpointed and restored on resume (every rank's for objects with
  ``per_rank_state = True``), and a DDP **communication hook** (e.g. gradient compression).

Shipped plugins: :class:`GradientClipping` and :class:`WeightAverage` (an exponential moving average of the
weights).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Protocol, Tuple

import torch
from torch import nn

from sturdy.errors import CheckpointError, ConfigurationError
from sturdy.training.config import EpochMetrics, TrainConfig

__all__ = ["Objective", "Stateful", "Plugin", "RunContext", "GradientClipping", "WeightAverage"]


class Objective(Protocol):
    """A training objective: ``(model, inputs, targets, *, epoch, step) -> (mean loss, clean logits)``.

    ``step`` counts optimizer steps from the start of the run (``epoch * steps_per_epoch + i``).
    """

    def __call__(
        self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *, epoch: int, step: int
    ) -> Tuple[torch.Tensor, torch.Tensor]: ...


class Stateful(Protocol):
    """Checkpointed extra state; set ``per_rank_state = True`` when it differs between ranks."""

    def state_dict(self) -> Dict[str, Any]: ...

    def load_state_dict(self, state: Dict[str, Any]) -> Any: ...


@dataclass
class RunContext:
    """What a plugin sees of the run: the model (unwrapped), the network that trains (DDP-wrapped under
    ``torch.distributed``), the optimizer, the configuration and where the run stands."""

    model: nn.Module
    net: nn.Module
    optimizer: torch.optim.Optimizer
    config: TrainConfig
    device: torch.device
    rank: int
    world: int
    steps_per_epoch: int
    unscale: Any = None  # call before reading gradients under an fp16 gradient scaler (no-op otherwise)


class Plugin:
    """Base class of training plugins: override the hooks you need (each is a no-op here)."""

    name: str = "plugin"

    def on_epoch_start(self, ctx: RunContext, epoch: int) -> None:
        """Before the first step of ``epoch`` (0-based), also the first epoch of a resumed run."""

    def after_backward(self, ctx: RunContext, step: int) -> None:
        """Gradients are final (averaged under DDP); the optimizer has not stepped."""

    def after_step(self, ctx: RunContext, step: int) -> None:
        """The optimizer has stepped."""

    def on_epoch_end(self, ctx: RunContext, metrics: EpochMetrics) -> Optional[bool]:
        """After the epoch's evaluation, before its checkpoint; return ``True`` to stop after it."""
        return None


class GradientClipping(Plugin):
    """Clip the global L2 norm of the gradients to ``max_norm`` before every optimizer step
    (``torch.nn.utils.clip_grad_norm_``; under DDP on the averaged gradients, identically on every rank)."""

    name = "grad_clip"

    def __init__(self, max_norm: float) -> None:
        if not (isinstance(max_norm, (int, float)) and 0 < max_norm < float("inf")):
            raise ConfigurationError(f"gradient clipping needs a finite max_norm > 0, got {max_norm!r}")
        self.max_norm = float(max_norm)
        self.last_norm: Optional[torch.Tensor] = None  # on the device: reading it is the caller's choice

    def after_backward(self, ctx: RunContext, step: int) -> None:
        if ctx.unscale is not None:
            ctx.unscale()
        params = [p for p in ctx.model.parameters() if p.grad is not None]
        self.last_norm = torch.nn.utils.clip_grad_norm_(params, self.max_norm)


@dataclass
class WeightAverage(Plugin):
    """Exponential moving average of the floating-point parameters and buffers, ``a <- decay a + (1 - decay) w``
    after every optimizer step (float32 or wider, whatever the parameters' dtype); checkpointed.

    :meth:`swapped` puts the average into the model for a block (evaluation, export) and restores the weights.
    """

    decay: float = 0.999
    name: str = "weight_average"
    average: Dict[str, torch.Tensor] = field(default_factory=dict)
    updates: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.decay, float) and 0.0 <= self.decay < 1.0):
            raise ConfigurationError(f"the weight average needs a decay in [0, 1), got {self.decay!r}")

    def _tensors(self, model: nn.Module) -> List[Tuple[str, torch.Tensor]]:
        state = model.state_dict(keep_vars=True)
        return [(k, v) for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]

    @torch.no_grad()
    def after_step(self, ctx: RunContext, step: int) -> None:
        for name, t in self._tensors(ctx.model):
            value = t.detach()
            wide = value.to(torch.promote_types(value.dtype, torch.float32))
            if name not in self.average:
                self.average[name] = wide.clone()
            else:
                self.average[name].mul_(self.decay).add_(wide, alpha=1.0 - self.decay)
        self.updates += 1

    @contextlib.contextmanager
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """``model`` holding the average inside the block; its own weights come back afterwards."""
        saved = {k: v.detach().clone() for k, v in self._tensors(model) if k in self.average}
        with torch.no_grad():
            for k, v in self._tensors(model):
                if k in self.average:
                    v.copy_(self.average[k].to(v.dtype))
        try:
            yield model
        finally:
            with torch.no_grad():
                for k, v in self._tensors(model):
                    if k in saved:
                        v.copy_(saved[k])

    def state_dict(self) -> Dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "average": dict(self.average)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        try:
            average = {str(k): v for k, v in state["average"].items()}
            updates = int(state["updates"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"weight-average state is damaged ({type(exc).__name__}: {exc})") from exc
        if not all(isinstance(v, torch.Tensor) and bool(torch.isfinite(v).all()) for v in average.values()):
            raise CheckpointError("weight-average state holds non-tensors or NaN/inf values; start over (--no-resume)")
        self.average, self.updates = average, updates
