"""The default objective and the evaluation pass (docs/design.md, "Training core")."""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from sturdy.errors import ConfigurationError, DataError
from sturdy.training.batches import Batches, labels_of, num_classes_of
from sturdy.utils import eval_mode, model_device_dtype
from sturdy.validation import check_finite_output, check_images, check_labels, check_model

__all__ = ["cross_entropy_loss", "evaluate", "check_logits", "check_in_memory"]


def cross_entropy_loss(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *, epoch: int, step: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Standard training objective: mean cross-entropy of the logits."""
    logits = model(inputs)
    return F.cross_entropy(logits, targets), logits


def check_logits(logits: torch.Tensor, num_classes: Optional[int], batch: int) -> None:
    """Logits ``(batch, num_classes)`` (any class count when the data set does not declare one)."""
    ok = logits.ndim == 2 and logits.shape[0] == batch and (num_classes is None or logits.shape[1] == num_classes)
    if not ok:
        want = f"({batch}, {num_classes})" if num_classes is not None else f"({batch}, classes)"
        raise ConfigurationError(f"the model returns outputs of shape {tuple(logits.shape)} for {batch} inputs; "
                                 f"expected logits {want}, one per class of the data set: build the model for this "
                                 "data set's classes")


def check_in_memory(data: Any, name: str, *, allow_empty: bool = False) -> None:
    """Value checks of an in-memory data set, once (a streamed one is checked batch by batch)."""
    images, labels = getattr(data, "images", None), labels_of(data)
    if not isinstance(images, torch.Tensor) or labels is None:
        return  # streamed
    if images.is_floating_point():
        check_images(images, name=f"{name} images", bounds=None, allow_empty=allow_empty)
    elif images.dtype != torch.uint8:
        raise DataError(f"{name} images have dtype {images.dtype}; expected floating-point values in [0, 1] or uint8 "
                        "pixels 0..255")
    check_labels(labels, num_classes=num_classes_of(data), name=f"{name} labels")


@torch.no_grad()
def evaluate(
    model: nn.Module, dataset: Any, *, batch_size: int = 512, device: Optional[torch.device] = None,
    workers: int = 0,
) -> Tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` (in eval mode, restored afterwards) on ``dataset``.

    ``dataset`` is an :class:`~sturdy.data.ImageDataset` or any map-style data set of ``(image, label)`` pairs
    (streamed, ``workers`` loader processes). Images are computed in the model's dtype (any floating-point
    precision, or uint8 pixels 0..255); the sums are kept on the device and read once.

    Raises:
        ConfigurationError: a model on the meta device, or logits that do not match the data set's classes.
        DataError: an empty data set, labels out of range, NaN/inf pixels, or NaN/inf logits.
    """
    check_model(model)
    name = getattr(dataset, "name", "") or "evaluation"
    if len(dataset) == 0:
        raise DataError(f"cannot evaluate on an empty data set ({name} {getattr(dataset, 'split', '')}); pass at "
                        "least one sample")
    check_in_memory(dataset, name)
    model_device, dtype = model_device_dtype(model)
    device = model_device if device is None else device
    k = num_classes_of(dataset)
    batches = Batches(dataset, batch_size=batch_size, device=device, dtype=dtype, shuffle=False, num_classes=k,
                      workers=workers, name=name)
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = 0
    with eval_mode(model):
        for x, y in batches.epoch(0):
            logits = model(x)
            if seen == 0:
                check_logits(logits, k, len(x))
            check_finite_output(logits, name=f"the model's logits on {name} images {seen}..{seen + len(x) - 1}")
            total_loss += F.cross_entropy(logits.float(), y, reduction="sum").double()
            correct += (logits.argmax(1) == y).sum()
            seen += len(x)
    return float(total_loss) / seen, int(correct) / seen
