"""Shared helpers of :mod:`sturdy.flatness`: data batching, loss, parameter selection.

Conventions used by every function of the subpackage:
    * the *training loss* is the **mean** over all samples of ``data`` of ``loss_fn(outputs, targets)``
      (default: cross-entropy on logits); batches only change memory, never the value;
    * the model is evaluated in eval mode (BatchNorm running statistics, no dropout); its training
      flag is restored afterwards;
    * device and dtype come from the model's parameters; inputs are moved and cast to them.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sturdy.errors import ConfigurationError, DataError
from sturdy.utils import eval_mode, model_device_dtype  # noqa: F401  (imported from here by curvature.py)

LossFn = Callable[[Tensor, Tensor], Tensor]
"""The criterion ``loss_fn(logits, targets) -> mean loss over the batch`` (a 0-d tensor).

Not to be confused with :class:`sturdy.training.Objective`, which runs the model itself.
"""

WEIGHT_LAYERS = (nn.Linear, nn.Conv2d)


def default_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of logits ``(N, C)`` against class indices ``(N,)``."""
    return F.cross_entropy(outputs, targets)


def check_positive_int(name: str, value: Any, *, minimum: int = 1) -> int:
    """Validate an integer option (``bool`` is refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def iter_batches(
    data: Any, *, batch_size: int, device: torch.device, dtype: torch.dtype
) -> Iterator[Tuple[Tensor, Tensor]]:
    """Yield ``(inputs, targets)`` batches of ``data`` on ``device`` (inputs cast to ``dtype``).

    ``data`` may be a pair ``(inputs, targets)`` of tensors, an object with ``images`` and ``labels``
    tensors (a :class:`sturdy.data.ImageDataset`), a map-style dataset of ``(x, y)`` pairs, or an
    iterable of ``(inputs, targets)`` batches (e.g. a ``DataLoader``), which is used as given.
    """
    check_positive_int("batch_size", batch_size)
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise DataError(
                f"inputs and targets must have the same number of samples, got {x.shape[0]} and {y.shape[0]}"
            )
        for start in range(0, x.shape[0], batch_size):
            yield _cast(x[start : start + batch_size], device, dtype), y[start : start + batch_size].to(device)
        return
    if isinstance(getattr(data, "images", None), Tensor) and isinstance(getattr(data, "labels", None), Tensor):
        yield from iter_batches((data.images, data.labels), batch_size=batch_size, device=device, dtype=dtype)
        return
    if isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__"):
        loader: Iterable = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    elif isinstance(data, Iterable):
        loader = data
    else:
        raise DataError(
            f"cannot read samples from a {type(data).__name__}; pass (inputs, targets) tensors, an ImageDataset, "
            "a map-style Dataset of (x, y) pairs, or an iterable of (inputs, targets) batches"
        )
    for batch in loader:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise DataError(f"each batch must be an (inputs, targets) pair, got a {type(batch).__name__}")
        x, y = batch
        yield _cast(torch.as_tensor(x), device, dtype), torch.as_tensor(y).to(device)


def _cast(x: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    return x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)


def collect_batches(
    data: Any, *, batch_size: int, device: torch.device, dtype: torch.dtype
) -> List[Tuple[Tensor, Tensor]]:
    """All batches of ``data`` as a list (so that several passes see identical batches); refuses empty data."""
    batches = list(iter_batches(data, batch_size=batch_size, device=device, dtype=dtype))
    if sum(int(x.shape[0]) for x, _ in batches) == 0:
        raise DataError("the data holds no samples; pass at least one (input, target) pair")
    return batches


def trainable_parameters(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every parameter with ``requires_grad``; refuses models without any."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ConfigurationError("the model has no trainable parameters (requires_grad=True); nothing to measure")
    return params


def weight_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``(name, module)`` of every ``nn.Linear`` / ``nn.Conv2d`` whose weight is trainable, in order."""
    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, WEIGHT_LAYERS) and m.weight.requires_grad
    ]
