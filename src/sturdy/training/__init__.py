"""The training core: one loop that owns every run (docs/design.md, "Training core").

Modules, one idea each: :mod:`.config` (settings and results), :mod:`.devices` (device, ranks, autocast),
:mod:`.batches` (the data contract: in-memory or streamed, order fixed by seed, epoch and rank),
:mod:`.augment`, :mod:`.plugins` (objective, plugins, extra state; gradient clipping and a weight average),
:mod:`.step` (one step, sums kept on the device), :mod:`.state` (checkpoint and resume), :mod:`.evaluation`,
:mod:`.loop` (:func:`train`).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from sturdy.data import ImageDataset
    >>> from sturdy.training import GradientClipping, TrainConfig, train
    >>> data = ImageDataset(torch.rand(32, 1, 4, 4), torch.randint(0, 3, (32,)), num_classes=3)
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    >>> result = train(net, data, config=TrainConfig(epochs=2, batch_size=8, device="cpu"),
    ...                plugins=[GradientClipping(1.0)], progress=False)
    >>> len(result.history)
    2
"""

from sturdy.checkpoints import CHECKPOINT_FORMAT, check_state_dict_shapes, load_checkpoint, save_checkpoint
from sturdy.training.batches import Batches, steps_per_epoch
from sturdy.training.config import EpochMetrics, TrainConfig, TrainResult, config_from_dict
from sturdy.training.devices import resolve_device, world
from sturdy.training.evaluation import cross_entropy_loss, evaluate
from sturdy.training.loop import train
from sturdy.training.plugins import GradientClipping, Objective, Plugin, RunContext, Stateful, WeightAverage

__all__ = [
    "TrainConfig",
    "EpochMetrics",
    "TrainResult",
    "Objective",
    "Stateful",
    "Plugin",
    "RunContext",
    "GradientClipping",
    "WeightAverage",
    "Batches",
    "steps_per_epoch",
    "train",
    "evaluate",
    "cross_entropy_loss",
    "resolve_device",
    "world",
    "config_from_dict",
    "save_checkpoint",
    "load_checkpoint",
    "check_state_dict_shapes",
    "CHECKPOINT_FORMAT",
]
