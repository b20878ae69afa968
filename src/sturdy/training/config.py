"""The settings and results of a training run (docs/design.md, "Training core").

:class:`TrainConfig` holds every hyper-parameter of :func:`~sturdy.training.train`; its fields carry their
command-line help in ``metadata["help"]`` so that ``sturdy train``'s options are generated from them (each
default lives here once). :class:`EpochMetrics` and :class:`TrainResult` are what a run reports.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, Mapping, Optional, Tuple

from sturdy.errors import ConfigurationError
from sturdy.validation import MAX_SEED

__all__ = ["TrainConfig", "EpochMetrics", "TrainResult", "config_from_dict", "resume_key", "AMP_MODES",
           "AUGMENTATIONS", "MAX_WORKERS", "DATA_PARALLEL_DEFAULTS"]

AMP_MODES = ("none", "bf16", "fp16")
AUGMENTATIONS = ("none", "crop-flip")
MAX_WORKERS = 64  # data-loading processes per training process


# Training settings of a run in several processes where the command line did not set them: momentum SGD
# applies the delayed, summed updates of compressed runs as they arrive; the single-process batch of 64 is
# split over the workers ("global_batch").
DATA_PARALLEL_DEFAULTS: Dict[str, Any] = {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "epochs": 40,
                                          "global_batch": 64}


def _help(text: str) -> Dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of :func:`~sturdy.training.train` (each field's help is its ``metadata["help"]``).

    ``seed`` fixes the data order, label noise and augmentation; :func:`train` leaves the initial weights to the
    caller, and a training job (``sturdy train``, :func:`sturdy.experiments.train_job.fit`) also seeds torch's
    global generator with it right before building the model, so the same seed gives the same initial weights.
    """

    epochs: int = field(default=20, metadata=_help("epochs of the run (the learning-rate schedule spans them)"))
    batch_size: int = field(default=64, metadata=_help("mini-batch size per worker"))
    lr: float = field(default=1e-3, metadata=_help("peak learning rate"))
    optimizer: str = field(default="adam", metadata={"help": "optimizer (SGD uses --momentum)",
                                                      "choices": ("adam", "sgd")})
    momentum: float = field(default=0.9, metadata=_help("SGD momentum"))
    weight_decay: float = field(default=0.0, metadata=_help("L2 penalty passed to the optimizer"))
    schedule: str = field(default="cosine", metadata={
        "help": "learning-rate schedule per step: cosine (to 0), constant, or step (x0.1 at 50%% and 75%%)",
        "choices": ("cosine", "constant", "step")})
    seed: int = field(default=0, metadata=_help("seed of data order, label noise, augmentation and initial weights"))
    device: str = field(default="auto", metadata=_help("'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'"))
    label_noise: float = field(default=0.0, metadata=_help("fraction of training labels replaced by a wrong class"))
    eval_batch_size: int = field(default=512, metadata=_help("batch size of evaluation passes"))
    augment: str = field(default="none", metadata={
        "help": "crop-flip: random crop with padding (4 pixels at 32x32, scaled to the image size) and horizontal "
                "flip", "choices": AUGMENTATIONS})
    amp: str = field(default="none", metadata={
        "help": "mixed precision: bf16 or fp16 (autocast; fp16 with a gradient scaler; CUDA only)",
        "choices": AMP_MODES})
    channels_last: bool = field(default=False, metadata=_help("channels-last memory format for model and images"))
    workers: int = field(default=0, metadata=_help("data-loading processes for a streamed data set (0: in process)"))
    grad_clip: float = field(default=0.0, metadata=_help(
        "clip the global L2 norm of the gradients to this value before each step (0: off)"))
    sync_every: int = field(default=50, metadata=_help(
        "steps between host reads of the running loss (a non-finite loss stops the run within this window)"))

    def __post_init__(self) -> None:
        for ok, message in self._checks():
            if not ok:
                raise ConfigurationError(message)

    def _checks(self) -> Tuple[Tuple[bool, str], ...]:
        def count(value: Any, low: int) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= low

        return (
            (count(self.epochs, 1), f"epochs must be an integer >= 1, got {self.epochs!r}"),
            (count(self.batch_size, 1), f"batch_size must be an integer >= 1, got {self.batch_size!r}"),
            (_finite(self.lr) and self.lr > 0, f"lr must be a finite number > 0, got {self.lr!r}"),
            (self.optimizer in ("sgd", "adam"), f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}"),
            (_finite(self.momentum) and 0 <= self.momentum < 1, f"momentum must lie in [0, 1), got {self.momentum!r}"),
            (_finite(self.weight_decay) and self.weight_decay >= 0,
             f"weight_decay must be >= 0, got {self.weight_decay!r}"),
            (self.schedule in ("constant", "cosine", "step"),
             f"schedule must be 'constant', 'cosine' or 'step', got {self.schedule!r}"),
            (_finite(self.label_noise) and 0 <= self.label_noise <= 1,
             f"label_noise must be a fraction in [0, 1], got {self.label_noise!r}"),
            (count(self.seed, 0) and self.seed <= MAX_SEED, f"seed must be an integer in [0, {MAX_SEED}], got "
                                                            f"{self.seed!r}"),
            (count(self.eval_batch_size, 1), f"eval_batch_size must be an integer >= 1, got {self.eval_batch_size!r}"),
            (self.augment in AUGMENTATIONS, f"augment must be one of {', '.join(AUGMENTATIONS)}, got {self.augment!r}"),
            (self.amp in AMP_MODES, f"amp must be one of {', '.join(AMP_MODES)}, got {self.amp!r}"),
            (isinstance(self.channels_last, bool), f"channels_last must be True or False, got {self.channels_last!r}"),
            (count(self.workers, 0) and self.workers <= MAX_WORKERS,
             f"workers must be an integer in [0, {MAX_WORKERS}], got {self.workers!r}"),
            (count(self.sync_every, 1), f"sync_every must be an integer >= 1, got {self.sync_every!r}"),
            (_finite(self.grad_clip) and self.grad_clip >= 0,
             f"grad_clip must be a finite number >= 0 (0: off), got {self.grad_clip!r}"),
        )


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# settings a resumed run may change: the length of the run, where it runs, and how fast data is read
_RESUMABLE_CHANGES = ("epochs", "device", "eval_batch_size", "workers", "sync_every")


def resume_key(config: Mapping[str, Any]) -> Dict[str, Any]:
    """The settings a resumed run must share with its checkpoint; fields a checkpoint of an older version lacks
    take their defaults."""
    defaults = asdict(TrainConfig())
    merged = {**defaults, **{k: v for k, v in config.items() if k in defaults}}
    return {k: v for k, v in merged.items() if k not in _RESUMABLE_CHANGES}


def config_from_dict(values: Mapping[str, Any]) -> TrainConfig:
    """Build a :class:`TrainConfig` from a mapping, ignoring keys it does not have."""
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in values.items() if k in names})


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
    """Outcome of :func:`~sturdy.training.train`: per-epoch history (resumed epochs included) and timings."""

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
