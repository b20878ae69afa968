"""One training loop shared by every method.

A single idea, kept in one file although it is longer than most: the loop together with its
configuration, its results and the rules it enforces on its data, its checkpoints (resume) and its
divergence (a run whose loss or weights blow up stops, keeping the last good checkpoint).

The loop knows no method: a caller plugs in an objective (e.g. Lipschitz-margin training),
extra stateful objects to checkpoint (e.g. power-iteration vectors, compression residuals) and,
when ``torch.distributed`` is initialised, a DDP communication hook (e.g. gradient compression).

Conventions:
    * ``objective(model, inputs, targets, *, epoch, step) -> (loss, logits)``; ``loss`` is the
      **mean** over the batch, ``logits`` are the clean logits used for the accuracy metric.
    * ``batch_size`` is per worker; under DDP each rank takes a disjoint, equally long shard of one
      seeded permutation per epoch, so every rank runs the same number of steps.
    * The data order of epoch ``e`` depends only on ``(seed, e)``; the global RNG state (dropout,
      ...) is checkpointed, so resuming gives bit-identical weights.
    * Checkpoints are written atomically (temporary file, then rename) and read with
      ``torch.load(weights_only=True)``: a checkpoint can never run code.
    * Extra state that differs between ranks (an object with ``per_rank_state = True``, e.g. the
      compression residuals) is gathered from every rank into rank 0's one checkpoint, as
      ``{"per_rank": [state of rank 0, rank 1, ...]}``, and each rank resumes from its own entry; a
      checkpoint of another world size is refused. Other extra state is rank 0's.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Protocol, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sturdy.checkpoints import (
    CHECKPOINT_FORMAT,
    check_resumable,
    check_state_dict_shapes,
    damaged_message,
    load_checkpoint,
    save_checkpoint,
)
from sturdy.data import ImageDataset, apply_label_noise
from sturdy.distributed import gather_to_rank0
from sturdy.errors import CheckpointError, ConfigurationError, DataError
from sturdy.utils import model_device_dtype
from sturdy.validation import MAX_SEED, check_finite_output, check_images, check_labels, check_model

__all__ = [
    "TrainConfig",
    "EpochMetrics",
    "TrainResult",
    "Objective",
    "Stateful",
    "steps_per_epoch",
    "train",
    "evaluate",
    "cross_entropy_loss",
    "resolve_device",
    "save_checkpoint",
    "load_checkpoint",
    "check_state_dict_shapes",
    "CHECKPOINT_FORMAT",
]

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


def _per_rank(obj: Any) -> bool:
    return bool(getattr(obj, "per_rank_state", False))


def _saved_extra_state(extra_state: Mapping[str, Stateful], rank: int, world: int,
                       device: torch.device) -> Dict[str, Any]:
    """Every extra state for the checkpoint (on rank 0; a collective when some state is per rank)."""
    out: Dict[str, Any] = {}
    for name, obj in extra_state.items():
        if _per_rank(obj):
            parts = gather_to_rank0(obj.state_dict(), device=device) if world > 1 else [obj.state_dict()]
            out[name] = {"per_rank": parts}
        elif rank == 0:
            out[name] = obj.state_dict()
    return out


def _load_extra_state(obj: Stateful, saved: Any, *, name: str, rank: int, world: int, path: Any) -> None:
    if not _per_rank(obj):
        obj.load_state_dict(saved)
        return
    parts = saved.get("per_rank") if isinstance(saved, dict) else None
    if not isinstance(parts, list):
        raise CheckpointError(f"checkpoint {str(path)!r} holds one rank's {name!r} state, not every rank's (an older "
                              "version wrote it); resuming would lose the other ranks' state: use a new output folder "
                              "or --no-resume to start over")
    if len(parts) != world:
        raise CheckpointError(f"checkpoint {str(path)!r} holds the {name!r} state of {len(parts)} workers and this run "
                              f"has {world}; resume with {len(parts)} workers (e.g. --nproc {len(parts)}), or use a "
                              "new output folder or --no-resume to start over")
    obj.load_state_dict(parts[rank])


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of :func:`train`.

    Attributes:
        epochs: total number of epochs of the run (the LR schedule spans them).
        batch_size: mini-batch size per worker.
        lr: peak learning rate.
        optimizer: ``"sgd"`` (with ``momentum``) or ``"adam"``.
        momentum: SGD momentum.
        weight_decay: L2 penalty coefficient passed to the optimizer.
        schedule: ``"constant"``, ``"cosine"`` (per step, to 0) or ``"step"`` (x0.1 at 50% and 75%).
        seed: seed of data order and label noise. :func:`train` leaves the initial weights to the caller;
            a training job (``sturdy train``, :func:`sturdy.experiments.train_job.fit`) also seeds torch's
            global generator with it right before building the model, so the same seed gives the same
            initial weights.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        label_noise: fraction of training labels replaced by a wrong random class (fixed by ``seed``).
        eval_batch_size: batch size of evaluation passes.
    """

    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"
    seed: int = 0
    device: str = "auto"
    label_noise: float = 0.0
    eval_batch_size: int = 512

    def __post_init__(self) -> None:
        checks = [
            (isinstance(self.epochs, int) and self.epochs >= 1, f"epochs must be an integer >= 1, got {self.epochs!r}"),
            (
                isinstance(self.batch_size, int) and self.batch_size >= 1,
                f"batch_size must be an integer >= 1, got {self.batch_size!r}",
            ),
            (math.isfinite(self.lr) and self.lr > 0, f"lr must be a finite number > 0, got {self.lr!r}"),
            (self.optimizer in ("sgd", "adam"), f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}"),
            (0 <= self.momentum < 1, f"momentum must lie in [0, 1), got {self.momentum!r}"),
            (
                math.isfinite(self.weight_decay) and self.weight_decay >= 0,
                f"weight_decay must be >= 0, got {self.weight_decay!r}",
            ),
            (
                self.schedule in ("constant", "cosine", "step"),
                f"schedule must be 'constant', 'cosine' or 'step', got {self.schedule!r}",
            ),
            (0 <= self.label_noise <= 1, f"label_noise must be a fraction in [0, 1], got {self.label_noise!r}"),
            (isinstance(self.seed, int) and not isinstance(self.seed, bool) and 0 <= self.seed <= MAX_SEED,
             f"seed must be an integer in [0, {MAX_SEED}], got {self.seed!r}"),
            (self.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {self.eval_batch_size!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigurationError(message)


@dataclass(frozen=True)
class EpochMetrics:
    """Metrics of one epoch (losses are means over samples; accuracies in [0, 1])."""

    epoch: int
    train_loss: float
    train_accuracy: float
    test_loss: Optional[float]
    test_accuracy: Optional[float]
    seconds: float
    lr: float


@dataclass(frozen=True)
class TrainResult:
    """Outcome of :func:`train`: per-epoch history (resumed epochs included) and timings."""

    history: Tuple[EpochMetrics, ...]
    seconds: float
    steps_per_epoch: int
    resumed_from_epoch: int = 0
    world_size: int = 1
    stopped_early: bool = False

    @property
    def final(self) -> EpochMetrics:
        return self.history[-1]

    def to_dict(self) -> Dict[str, Any]:
        epoch_seconds = [m.seconds for m in self.history]
        return {
            "history": [asdict(m) for m in self.history],
            "train_accuracy": self.final.train_accuracy,
            "train_loss": self.final.train_loss,
            "test_accuracy": self.final.test_accuracy,
            "test_loss": self.final.test_loss,
            "seconds": self.seconds,
            "seconds_per_epoch": sum(epoch_seconds) / len(epoch_seconds),
            "steps_per_epoch": self.steps_per_epoch,
            "resumed_from_epoch": self.resumed_from_epoch,
            "world_size": self.world_size,
            "stopped_early": self.stopped_early,
        }


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; otherwise validate the given device."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ConfigurationError(f"invalid device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigurationError(f"device {device!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    return dev


def cross_entropy_loss(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *, epoch: int, step: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Standard training objective: mean cross-entropy of the logits."""
    logits = model(inputs)
    return F.cross_entropy(logits, targets), logits


@torch.no_grad()
def evaluate(
    model: nn.Module, dataset: ImageDataset, *, batch_size: int = 512, device: Optional[torch.device] = None
) -> Tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` (in eval mode) on ``dataset``.

    The images are computed in the model's dtype (any floating-point precision is accepted). The model's
    training flag is restored afterwards.

    Raises:
        ConfigurationError: a model on the meta device, or logits that do not match the data set's classes.
        DataError: an empty data set, labels out of range, NaN/inf pixels, or NaN/inf logits.
    """
    check_model(model)
    if len(dataset) == 0:
        raise DataError(f"cannot evaluate on an empty data set ({dataset.name or 'unnamed'} {dataset.split}); "
                        "pass at least one sample")
    name = dataset.name or "evaluation"
    check_images(dataset.images, name=f"{name} images", bounds=None)
    check_labels(dataset.labels, num_classes=dataset.num_classes, name=f"{name} labels")
    model_device, dtype = model_device_dtype(model, dataset.images)
    device = model_device if device is None else device
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        x = dataset.images[start : start + batch_size].to(device=device, dtype=dtype)
        y = dataset.labels[start : start + batch_size].to(device)
        logits = model(x)
        if start == 0:
            _check_logits(logits, dataset.num_classes, len(x))
        check_finite_output(logits, name=f"the model's logits on {name} images {start}..{start + len(x) - 1}")
        total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    model.train(was_training)
    n = len(dataset)
    return total_loss / n, correct / n


def _check_logits(logits: torch.Tensor, num_classes: int, batch: int) -> None:
    if logits.ndim != 2 or logits.shape[0] != batch or logits.shape[1] != num_classes:
        raise ConfigurationError(f"the model returns outputs of shape {tuple(logits.shape)} for {batch} inputs; "
                                 f"expected logits ({batch}, {num_classes}), one per class of the data set: build "
                                 "the model for this data set's classes")


# ----------------------------------------------------------------------------- the loop


def _world() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int = 1) -> int:
    """Optimizer steps per epoch: each of ``world_size`` ranks takes ``num_samples // world_size`` samples.

    Raises:
        ConfigurationError: fewer samples than workers.
    """
    per_rank = num_samples // world_size
    if per_rank < 1:
        raise ConfigurationError(f"{num_samples} training samples cannot be split over {world_size} workers")
    return math.ceil(per_rank / batch_size)


def _shard(n: int, *, seed: int, epoch: int, rank: int, world: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=gen)
    per_rank = n // world
    return perm[rank * per_rank : (rank + 1) * per_rank]


def _rng_state(device: torch.device) -> Dict[str, Any]:
    state: Dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _resume_key(config: Mapping[str, Any]) -> Dict[str, Any]:
    """The settings a resumed run must share with its checkpoint (epochs may grow, device may change)."""
    return {k: v for k, v in config.items() if k not in ("epochs", "device", "eval_batch_size")}


def train(
    model: nn.Module,
    train_set: ImageDataset,
    *,
    config: TrainConfig,
    test_set: Optional[ImageDataset] = None,
    objective: Optional[Objective] = None,
    extra_state: Optional[Mapping[str, Stateful]] = None,
    comm_hook: Optional[Tuple[Any, Callable[..., Any]]] = None,
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
        train_set: training data (label noise from ``config`` is applied here).
        config: hyper-parameters.
        test_set: optional held-out data evaluated after each epoch.
        objective: training objective (default: mean cross-entropy); see the module docstring.
        extra_state: objects whose ``state_dict()`` is checkpointed and restored on resume (every
            rank's for objects with ``per_rank_state = True``; see the module docstring).
        comm_hook: ``(state, hook)`` for ``DistributedDataParallel.register_comm_hook`` when a
            process group is initialised (ignored otherwise).
        checkpoint_path: written after every epoch (by rank 0); when it exists and ``resume`` is
            true, training continues from it. Give it on every rank (or none): gathering per-rank
            extra state into it is a collective.
        checkpoint_extra: plain data stored in the checkpoint as ``checkpoint["extra"]``.
        until_epoch: stop after this epoch (the schedule still spans ``config.epochs``), e.g. to
            split a run in two.
        on_epoch_end: called with each epoch's metrics after its checkpoint is written; returning
            ``True`` stops training there (``TrainResult.stopped_early``), e.g. for early stopping.
        check_resume: called with the loaded checkpoint before anything is restored from it; raise
            (e.g. :class:`~sturdy.errors.CheckpointError`) to refuse resuming from it.
        progress: show a tqdm progress bar (rank 0 only).

    Returns:
        A :class:`TrainResult`; the model is left in eval mode.
    """
    device = resolve_device(config.device)
    rank, world = _world()
    objective = objective or cross_entropy_loss
    extra_state = dict(extra_state or {})
    check_model(model)
    model.to(device)
    in_dtype = model_device_dtype(model, train_set.images)[1]  # images of any precision: the model's dtype
    check_images(train_set.images, name="training images", bounds=None)
    check_labels(train_set.labels, num_classes=train_set.num_classes, name="training labels")
    if test_set is not None:
        check_images(test_set.images, name="test images", bounds=None, allow_empty=True)
        check_labels(test_set.labels, num_classes=test_set.num_classes, name="test labels")
        if test_set.image_shape != train_set.image_shape:
            raise DataError(f"test images have shape {test_set.image_shape}, training images {train_set.image_shape}; "
                            "pass the test split of the same data set")
    labels = train_set.labels
    if config.label_noise > 0:
        labels = apply_label_noise(
            labels, fraction=config.label_noise, num_classes=train_set.num_classes, seed=config.seed
        )
    n = len(train_set)
    steps = steps_per_epoch(n, config.batch_size, world)
    optimizer = _make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_factor(config.schedule, config.epochs * steps)
    )

    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if comm_hook is not None:
            net.register_comm_hook(*comm_hook)

    history: List[EpochMetrics] = []
    start_epoch = 0
    if checkpoint_path is not None and resume and Path(checkpoint_path).is_file():
        ckpt = load_checkpoint(checkpoint_path, map_location=device)
        check_resumable(ckpt, checkpoint_path)
        if check_resume is not None:
            check_resume(ckpt)
        stored, wanted = _resume_key(ckpt["config"]), _resume_key(asdict(config))
        if stored != wanted:
            differ = ", ".join(f"{k}: {stored.get(k)!r} there, {wanted.get(k)!r} here"
                               for k in sorted(set(stored) | set(wanted)) if stored.get(k) != wanted.get(k))
            raise CheckpointError(
                f"checkpoint {str(checkpoint_path)!r} was made with a different training configuration ({differ}); "
                "use a new output folder or pass resume=False (--no-resume) to start over"
            )
        if int(ckpt["epoch"]) > config.epochs:
            raise CheckpointError(
                f"checkpoint {str(checkpoint_path)!r} is already past epoch {config.epochs} (it holds "
                f"{int(ckpt['epoch'])} epochs); ask for at least that many epochs, use a new output folder, or "
                "pass resume=False (--no-resume) to start over"
            )
        check_state_dict_shapes(model, ckpt["model"], source=str(checkpoint_path))
        model.load_state_dict(ckpt["model"])
        for name in extra_state:
            if name not in ckpt["state"]:
                raise CheckpointError(f"checkpoint {str(checkpoint_path)!r} holds no state for {name!r}")
        try:  # the file is checked as far as the loop relies on it; what remains is the objects' own format
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            for name, obj in extra_state.items():
                _load_extra_state(obj, ckpt["state"][name], name=name, rank=rank, world=world, path=checkpoint_path)
            _set_rng_state(ckpt["rng"], device)
            history = [EpochMetrics(**m) for m in ckpt["history"]]
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
            raise CheckpointError(damaged_message(checkpoint_path, f"{type(exc).__name__}: {exc}")) from exc
        start_epoch = int(ckpt["epoch"])

    stopped_early = False
    diverged: Optional[str] = None
    last_epoch = config.epochs if until_epoch is None else min(until_epoch, config.epochs)
    t_start = time.perf_counter()
    bar = tqdm(
        range(start_epoch, last_epoch),
        desc="train",
        unit="epoch",
        disable=not progress or rank != 0,
        initial=start_epoch,
        total=last_epoch,
    )
    for epoch in bar:
        t0 = time.perf_counter()
        net.train()
        order = _shard(n, seed=config.seed, epoch=epoch, rank=rank, world=world)
        loss_sum, correct, seen = 0.0, 0, 0
        lr = optimizer.param_groups[0]["lr"]
        for step in range(steps):
            idx = order[step * config.batch_size : (step + 1) * config.batch_size]
            x = train_set.images[idx].to(device, dtype=in_dtype, non_blocking=True)
            y = labels[idx].to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            loss, logits = objective(net, x, y, epoch=epoch, step=epoch * steps + step)
            if epoch == start_epoch and step == 0:
                _check_logits(logits, train_set.num_classes, len(idx))
                if world == 1:  # before any update NaN logits are the model's, not a divergence
                    check_finite_output(logits, name="the model's logits on the first training batch")
            loss_value = float(loss.detach())  # the one host read of the step
            if diverged is None and not math.isfinite(loss_value):
                diverged = f"epoch {epoch + 1}, step {step + 1} (loss {loss_value})"
                if world == 1:  # under DDP every rank runs the epoch to its end and all decide together
                    raise _diverged_error(diverged, config, checkpoint_path, epoch)
            loss.backward()
            optimizer.step()
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            loss_sum += loss_value * len(idx)
            correct += int((logits.detach().argmax(1) == y).sum())
            seen += len(idx)
        diverged = diverged or _non_finite_weights(model, epoch)
        if diverged is None and objective is cross_entropy_loss and loss_sum / seen > DIVERGED_CROSS_ENTROPY:
            diverged = f"epoch {epoch + 1} (mean cross-entropy {loss_sum / seen:.3g}; chance level is " \
                       f"{math.log(train_set.num_classes):.3g})"
        if world > 1:
            flag = torch.tensor([0.0 if diverged is None else 1.0], device=device)
            dist.all_reduce(flag)
            diverged = diverged or (f"epoch {epoch + 1} (on another worker)" if float(flag) > 0 else None)
        if diverged is not None:
            raise _diverged_error(diverged, config, checkpoint_path, epoch)
        test_loss = test_acc = None
        if test_set is not None:
            test_loss, test_acc = evaluate(model, test_set, batch_size=config.eval_batch_size, device=device)
        metrics = EpochMetrics(epoch + 1, loss_sum / seen, correct / seen, test_loss, test_acc,
                               time.perf_counter() - t0, lr)
        history.append(metrics)
        bar.set_postfix(loss=f"{metrics.train_loss:.3f}", acc=f"{metrics.train_accuracy:.3f}",
                        test=f"{test_acc:.3f}" if test_acc is not None else "-")
        saved_state = _saved_extra_state(extra_state, rank, world, device) if checkpoint_path is not None else {}
        if checkpoint_path is not None and rank == 0:
            save_checkpoint(
                {
                    "format": CHECKPOINT_FORMAT,
                    "epoch": epoch + 1,
                    "config": asdict(config),
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "state": saved_state,
                    "rng": _rng_state(device),
                    "history": [asdict(m) for m in history],
                    "extra": dict(checkpoint_extra or {}),
                },
                checkpoint_path,
            )
        if on_epoch_end is not None and on_epoch_end(metrics):
            stopped_early = True
            break
    bar.close()
    model.eval()
    return TrainResult(
        history=tuple(history),
        seconds=time.perf_counter() - t_start,
        steps_per_epoch=steps,
        resumed_from_epoch=start_epoch,
        world_size=world,
        stopped_early=stopped_early,
    )


DIVERGED_CROSS_ENTROPY = 1e4  # an epoch's mean cross-entropy above this is a blown-up run, not a slow one

def _non_finite_weights(model: nn.Module, epoch: int) -> Optional[str]:
    for name, p in model.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p.detach()).all()):
            return f"epoch {epoch + 1} (parameter {name} holds NaN or infinite values)"
    return None


def _diverged_error(
    where: str, config: TrainConfig, path: Optional[str | os.PathLike], epoch: int
) -> ConfigurationError:
    """The one-line message of a run whose loss or weights blew up (its last good checkpoint is kept)."""
    if path is not None and epoch > 0 and Path(path).is_file():
        kept = f"the checkpoint of epoch {epoch} is kept in {str(path)!r}"
    else:
        kept = "no checkpoint was written"
    return ConfigurationError(f"training diverged at {where} with lr {config.lr:g}; {kept}; lower the learning rate "
                              "(--lr) and start over (--no-resume or a new output folder)")


def config_from_dict(values: Mapping[str, Any]) -> TrainConfig:
    """Build a :class:`TrainConfig` from a mapping, ignoring keys it does not have."""
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in values.items() if k in names})
