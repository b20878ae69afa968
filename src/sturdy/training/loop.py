"""The training loop: a short function over named steps (docs/design.md, "Training core").

:func:`train` sets up the run, resumes it from its checkpoint, then per epoch: starts the plugins, trains the
epoch, stops if it diverged, evaluates, ends the plugins' epoch, saves the checkpoint and calls the caller's
``on_epoch_end``. The loop knows no method: objectives, plugins, extra state and a DDP communication hook come
from the caller (:mod:`.plugins`). Under ``torch.distributed`` the model trains as DDP, or sharded by FSDP2
(``sharding``, :mod:`.sharding`); every rank takes an equal share of one seeded permutation per epoch
(:mod:`.batches`), so every rank runs the same number of steps.

A run whose loss or weights blow up stops with one line, keeping the last good checkpoint: a non-finite loss is
seen within ``sync_every`` steps (one process) or at the epoch's end (every rank decides together under DDP).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from sturdy.data import apply_label_noise
from sturdy.errors import ConfigurationError, DataError
from sturdy.training.batches import Batches, labels_of, num_classes_of
from sturdy.training.config import EpochMetrics, TrainConfig, TrainResult
from sturdy.training.devices import autocast_dtype, resolve_device, world
from sturdy.training.evaluation import check_in_memory, check_logits, cross_entropy_loss, evaluate
from sturdy.training.plugins import GradientClipping, Objective, Plugin, RunContext, Stateful
from sturdy.training.sharding import Sharding, check_shardable, local_tensor, shard_model
from sturdy.training.state import RunState
from sturdy.training.step import EpochSums, Stepper
from sturdy.utils import model_device_dtype
from sturdy.validation import check_finite_output, check_model

__all__ = ["train", "DIVERGED_CROSS_ENTROPY"]

DIVERGED_CROSS_ENTROPY = 1e4  # an epoch's mean cross-entropy above this is a blown-up run, not a slow one


def train(
    model: nn.Module,
    train_set: Any,
    *,
    config: TrainConfig,
    test_set: Optional[Any] = None,
    objective: Optional[Objective] = None,
    plugins: Sequence[Plugin] = (),
    extra_state: Optional[Mapping[str, Stateful]] = None,
    comm_hook: Optional[Tuple[Any, Callable[..., Any]]] = None,
    sharding: Optional[Sharding] = None,
    checkpoint_path: Optional[str | os.PathLike] = None,
    checkpoint_extra: Optional[Mapping[str, Any]] = None,
    resume: bool = True,
    until_epoch: Optional[int] = None,
    on_epoch_end: Optional[Callable[[EpochMetrics], Optional[bool]]] = None,
    check_resume: Optional[Callable[[Mapping[str, Any]], None]] = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``model`` in place.

    Args:
        model: the network; moved to the configured device.
        train_set: an :class:`~sturdy.data.ImageDataset` (in memory, the fast path) or any map-style data set of
            ``(image, label)`` pairs (streamed; images float in [0, 1] or uint8 0..255). Label noise from
            ``config`` is applied here.
        config: hyper-parameters.
        test_set: optional held-out data evaluated after each epoch (same kinds as ``train_set``).
        objective: training objective (default: mean cross-entropy); see :class:`~sturdy.training.Objective`.
        plugins: hooks around every step and epoch (:class:`~sturdy.training.Plugin`); a plugin with
            ``state_dict`` is checkpointed under its ``name``.
        extra_state: objects whose ``state_dict()`` is checkpointed and restored on resume (every rank's for
            objects with ``per_rank_state = True``).
        comm_hook: ``(state, hook)`` for ``DistributedDataParallel.register_comm_hook`` when a process group is
            initialised (ignored otherwise).
        sharding: shard the model with FSDP2 instead of DDP (:class:`~sturdy.training.sharding.Sharding`; needs a
            process group of at least 2 ranks); the checkpoint then holds the gathered full state.
        checkpoint_path: written after every epoch (by rank 0); when it exists and ``resume`` is true, training
            continues from it. Give it on every rank (or none): gathering per-rank extra state is a collective.
        checkpoint_extra: plain data stored in the checkpoint as ``checkpoint["extra"]``.
        until_epoch: stop after this epoch (the schedule still spans ``config.epochs``).
        on_epoch_end: called with each epoch's metrics after its checkpoint is written; returning ``True`` stops
            training there (``TrainResult.stopped_early``).
        check_resume: called with the loaded checkpoint before anything is restored from it; raise to refuse it.
        progress: show a tqdm progress bar (rank 0 only).

    Returns:
        A :class:`TrainResult`; the model is left in eval mode.
    """
    run = _Run(model, train_set, test_set, config=config, objective=objective or cross_entropy_loss,
               plugins=plugins, extra_state=extra_state or {}, comm_hook=comm_hook, sharding=sharding,
               path=checkpoint_path, checkpoint_extra=checkpoint_extra)
    start = run.state.restore(check_resume) if resume else 0
    last = config.epochs if until_epoch is None else min(until_epoch, config.epochs)
    t_start, stopped = time.perf_counter(), False
    bar = tqdm(range(start, last), desc="train", unit="epoch", disable=not progress or run.ctx.rank != 0,
               initial=start, total=last)
    for epoch in bar:
        metrics = run.epoch(epoch, first=epoch == start)
        bar.set_postfix(loss=f"{metrics.train_loss:.3f}", acc=f"{metrics.train_accuracy:.3f}",
                        test=f"{metrics.test_accuracy:.3f}" if metrics.test_accuracy is not None else "-")
        stop = run.end_epoch(metrics)
        if (on_epoch_end is not None and on_epoch_end(metrics)) or stop:
            stopped = True
            break
    bar.close()
    model.eval()
    return TrainResult(history=tuple(run.state.history), seconds=time.perf_counter() - t_start,
                       steps_per_epoch=run.batches.steps, resumed_from_epoch=start, world_size=run.ctx.world,
                       stopped_early=stopped)


class _Run:
    """One run's parts, built once: data, optimizer and schedule, the (DDP) network, the stepper, the state."""

    def __init__(self, model: nn.Module, train_set: Any, test_set: Optional[Any], *, config: TrainConfig,
                 objective: Objective, plugins: Sequence[Plugin], extra_state: Mapping[str, Stateful],
                 comm_hook: Optional[Tuple[Any, Callable[..., Any]]], sharding: Optional[Sharding],
                 path: Optional[str | os.PathLike],
                 checkpoint_extra: Optional[Mapping[str, Any]]) -> None:
        device = resolve_device(config.device)
        amp_dtype = autocast_dtype(config.amp, device)
        rank, size = world()
        check_model(model)
        model.to(device)
        if config.channels_last:
            model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # missing from torch's stubs
        clip = [GradientClipping(config.grad_clip)] if config.grad_clip > 0 else []
        self.config, self.objective, self.plugins, self.path = config, objective, clip + list(plugins), path
        self.train_set, self.test_set = train_set, test_set
        self.batches = _training_batches(train_set, test_set, config, device, model_device_dtype(model)[1],
                                         rank, size)
        net: nn.Module = model
        if sharding is not None:  # FSDP2 replaces the parameters: the optimizer is built afterwards
            check_shardable(size)
            groups = shard_model(model, blocks=None if sharding.blocks is None else sharding.blocks(model),
                                 mixed_precision=sharding.mixed_precision)
            if sharding.install is not None:
                sharding.install(groups)
        elif size > 1:
            ids = [device.index] if device.type == "cuda" else None
            net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
            if comm_hook is not None:
                net.register_comm_hook(*comm_hook)
        optimizer = _make_optimizer(model, config)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, _lr_factor(config.schedule, config.epochs * self.batches.steps))
        self.ctx = RunContext(model=model, net=net, optimizer=optimizer, config=config, device=device, rank=rank,
                              world=size, steps_per_epoch=self.batches.steps)
        self.stepper = Stepper(self.ctx, objective=objective, scheduler=scheduler, plugins=self.plugins,
                               amp_dtype=amp_dtype)
        state = dict(extra_state)
        state.update({p.name: p for p in self.plugins if hasattr(p, "state_dict")})  # type: ignore[misc]
        self.state = RunState(model=model, optimizer=optimizer, scheduler=scheduler, scaler=self.stepper.scaler,
                              config=config, extra_state=state, device=device, rank=rank, world=size, path=path,
                              extra=checkpoint_extra)

    def epoch(self, epoch: int, *, first: bool) -> EpochMetrics:
        """Train one epoch, stop if it diverged, evaluate: the epoch's metrics."""
        t0 = time.perf_counter()
        for p in self.plugins:
            p.on_epoch_start(self.ctx, epoch)
        sums, lr, diverged = self._train_epoch(epoch, first=first)
        train_loss, train_acc = sums.means()  # the epoch's host reads
        self._stop_if_diverged(epoch, sums, train_loss, diverged)
        test_loss = test_acc = None
        if self.test_set is not None:
            test_loss, test_acc = evaluate(self.ctx.model, self.test_set, batch_size=self.config.eval_batch_size,
                                           device=self.ctx.device, workers=self.config.workers)
        return EpochMetrics(epoch + 1, train_loss, train_acc, test_loss, test_acc, time.perf_counter() - t0, lr)

    def _train_epoch(self, epoch: int, *, first: bool) -> Tuple[EpochSums, float, Optional[str]]:
        ctx, steps, every = self.ctx, self.batches.steps, self.config.sync_every
        ctx.net.train()
        sums = EpochSums(ctx.device)
        lr = ctx.optimizer.param_groups[0]["lr"]
        diverged: Optional[str] = None
        for i, (x, y) in enumerate(self.batches.epoch(epoch)):
            step = epoch * steps + i
            loss, logits = self.stepper.forward(x, y, epoch=epoch, step=step)
            if first and i == 0:
                self._check_first_logits(logits, len(y))
            sums.add(loss, logits, y)
            if diverged is None and (i + 1) % every == 0 and sums.non_finite():
                diverged = f"epoch {epoch + 1}, steps {max(1, i + 2 - every)}..{i + 1} (a loss was not finite)"
                if ctx.world == 1:  # under DDP every rank runs the epoch to its end and all decide together
                    raise _diverged_error(diverged, self.config, self.path, epoch)
            lr = ctx.optimizer.param_groups[0]["lr"]
            self.stepper.update(loss, step)
        return sums, lr, diverged

    def _check_first_logits(self, logits: torch.Tensor, batch: int) -> None:
        check_logits(logits, num_classes_of(self.train_set), batch)
        if self.batches.num_classes is None:  # a data set without a class count: later labels must fit the model
            self.batches.num_classes = int(logits.shape[1])
        if self.ctx.world == 1:  # before any update NaN logits are the model's, not a divergence
            check_finite_output(logits, name="the model's logits on the first training batch")

    def _stop_if_diverged(self, epoch: int, sums: EpochSums, mean_loss: float, diverged: Optional[str]) -> None:
        if diverged is None and sums.non_finite():
            diverged = f"epoch {epoch + 1} (a loss was not finite)"
        diverged = diverged or _non_finite_weights(self.ctx.model, epoch)
        if diverged is None and self.objective is cross_entropy_loss and mean_loss > DIVERGED_CROSS_ENTROPY:
            k = num_classes_of(self.train_set) or 2
            diverged = f"epoch {epoch + 1} (mean cross-entropy {mean_loss:.3g}; chance level is {math.log(k):.3g})"
        if self.ctx.world > 1:
            flag = torch.tensor([0.0 if diverged is None else 1.0], device=self.ctx.device)
            dist.all_reduce(flag)
            diverged = diverged or (f"epoch {epoch + 1} (on another worker)" if float(flag) > 0 else None)
        if diverged is not None:
            raise _diverged_error(diverged, self.config, self.path, epoch)

    def end_epoch(self, metrics: EpochMetrics) -> bool:
        """The plugins' epoch end, then the checkpoint; whether a plugin asked to stop."""
        stop = False
        for p in self.plugins:
            stop = bool(p.on_epoch_end(self.ctx, metrics)) or stop
        self.state.history.append(metrics)
        self.state.save(metrics.epoch)
        return stop


def _training_batches(train_set: Any, test_set: Optional[Any], config: TrainConfig, device: torch.device,
                      dtype: torch.dtype, rank: int, size: int) -> Batches:
    """Check the data (in memory: once; streamed: per batch) and build the training batches."""
    check_in_memory(train_set, "training")
    if test_set is not None:
        check_in_memory(test_set, "test", allow_empty=True)
        a, b = getattr(train_set, "image_shape", None), getattr(test_set, "image_shape", None)
        if a is not None and b is not None and a != b:
            raise DataError(f"test images have shape {b}, training images {a}; pass the test split of the same data "
                            "set")
    labels = None
    if config.label_noise > 0:
        all_labels, k = labels_of(train_set), num_classes_of(train_set)
        if all_labels is None or k is None:
            raise ConfigurationError("label noise needs a data set that exposes its labels and class count "
                                     "(attributes labels or targets, and num_classes or classes)")
        labels = apply_label_noise(all_labels, fraction=config.label_noise, num_classes=k, seed=config.seed)
    return Batches(train_set, batch_size=config.batch_size, device=device, dtype=dtype, seed=config.seed, rank=rank,
                   world=size, labels=labels, num_classes=num_classes_of(train_set), workers=config.workers,
                   augment=config.augment, channels_last=config.channels_last)


def _make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


def _lr_factor(schedule: str, total_steps: int) -> Callable[[int], float]:
    if schedule == "cosine":
        return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
    if schedule == "step":
        return lambda step: 0.1 ** ((step >= 0.5 * total_steps) + (step >= 0.75 * total_steps))
    return lambda step: 1.0


def _non_finite_weights(model: nn.Module, epoch: int) -> Optional[str]:
    """Where the weights hold NaN or inf (one host read when they are all finite).

    The quick test is each tensor's sum (non-finite whenever one of its values is; 10x cheaper than an elementwise
    test); only a sum that is not finite (such a value, or an overflow) is looked at value by value."""
    params = [(name, local_tensor(p.detach())) for name, p in model.named_parameters() if p.is_floating_point()]
    if not params or bool(torch.stack([p.sum() for _, p in params]).isfinite().all()):
        return None
    name = next((n for n, p in params if not bool(torch.isfinite(p).all())), None)
    return None if name is None else f"epoch {epoch + 1} (parameter {name} holds NaN or infinite values)"


def _diverged_error(where: str, config: TrainConfig, path: Optional[str | os.PathLike], epoch: int
                    ) -> ConfigurationError:
    """The one-line message of a run whose loss or weights blew up (its last good checkpoint is kept)."""
    if path is not None and epoch > 0 and Path(path).is_file():
        kept = f"the checkpoint of epoch {epoch} is kept in {str(path)!r}"
    else:
        kept = "no checkpoint was written"
    return ConfigurationError(f"training diverged at {where} with lr {config.lr:g}; {kept}; lower the learning rate "
                              "(--lr) and start over (--no-resume or a new output folder)")
