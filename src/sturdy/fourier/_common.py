"""Helpers shared by the heat map, the attack and the evaluation: device/dtype, batched predictions."""

from __future__ import annotations

from typing import Callable, Union

import torch
from torch import Tensor, nn

from sturdy.errors import ConfigurationError, DataError
from sturdy.utils import model_device_dtype  # noqa: F401  (re-exported to the fourier modules)

Model = Union[nn.Module, Callable[[Tensor], Tensor]]


def check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigurationError(f"batch_size must be a positive int, got {batch_size!r}")
    return batch_size


def check_labels(y: object, n: int) -> Tensor:
    """``y`` as a tensor of one label per image (shape ``(n,)``), or a :class:`DataError`."""
    y = torch.as_tensor(y)
    if y.shape != (n,):
        raise DataError(f"y must hold one label per image, shape ({n},), got {tuple(y.shape)}")
    return y


@torch.no_grad()
def predict_labels(model: Model, x: Tensor, *, batch_size: int) -> Tensor:
    """Predicted labels ``argmax model(x)`` computed in batches; validates the model's output shape.

    Raises:
        ConfigurationError: when the model cannot take ``(N, C, H, W)`` images or does not return
            ``(N, num_classes)`` logits.
    """
    out = []
    for start in range(0, x.shape[0], batch_size):
        chunk = x[start : start + batch_size]
        logits = call_model(model, chunk)
        out.append(logits.argmax(dim=1))
    return torch.cat(out)


def call_model(model: Model, images: Tensor) -> Tensor:
    """``model(images)`` with a clear error when the model does not take image batches."""
    try:
        logits = model(images)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ConfigurationError(
            f"the model failed on an image batch of shape {tuple(images.shape)} (N, C, H, W): {exc}. "
            "Fourier analyses need a model that takes images; wrap a model that expects flattened "
            "vectors, e.g. nn.Sequential(nn.Flatten(), model)"
        ) from exc
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != images.shape[0]:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ConfigurationError(
            f"the model must return logits of shape (N, num_classes) for N={images.shape[0]} images, "
            f"got {shape}"
        )
    return logits
