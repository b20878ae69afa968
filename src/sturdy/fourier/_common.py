"""Helpers shared by the Fourier analyses: eval mode, input checks, batched predictions."""

from __future__ import annotations

import functools
from typing import Any, Callable, List, Optional, TypeVar, Union

import torch
from torch import Tensor, nn

from sturdy import validation
from sturdy.errors import ConfigurationError, DataError
from sturdy.utils import eval_mode

Model = Union[nn.Module, Callable[[Tensor], Tensor]]
F = TypeVar("F", bound=Callable[..., Any])


def in_eval_mode(fn: F) -> F:
    """Run the analysis ``fn(model, ...)`` with ``model`` in eval mode, restoring every training flag after.

    Applies :func:`sturdy.utils.eval_mode` when ``model`` is an ``nn.Module`` (a plain function is called
    as given), so a train-mode BatchNorm keeps its running statistics and dropout is off.
    """

    @functools.wraps(fn)
    def wrapper(model: Model, *args: Any, **kwargs: Any) -> Any:
        validation.check_model(model)
        if isinstance(model, nn.Module):
            with eval_mode(model):
                return fn(model, *args, **kwargs)
        return fn(model, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigurationError(f"batch_size must be a positive int, got {batch_size!r}")
    return batch_size


def check_labels(y: object, n: int, *, num_classes: Optional[int] = None) -> Tensor:
    """``y`` as integer class labels, one per image (shape ``(n,)``), in ``[0, num_classes)`` when given.

    A list or array is converted with ``torch.as_tensor``; the checks are the shared
    :func:`sturdy.validation.check_labels` (a :class:`DataError` otherwise).
    """
    if not isinstance(y, Tensor):
        try:
            y = torch.as_tensor(y)
        except (TypeError, ValueError, RuntimeError):
            raise DataError(f"y must be a tensor of class indices, one per image, got {type(y).__name__}") from None
    return validation.check_labels(y, num_classes=num_classes, count=n, name="y")


def check_label_range(y: Tensor, logits: Tensor) -> None:
    """Labels ``y`` must name classes of the model, whose ``(N, num_classes)`` logits are given."""
    validation.check_labels(y, num_classes=int(logits.shape[1]), name="y")


@torch.no_grad()
def predict_labels(model: Model, x: Tensor, *, batch_size: int, y: Optional[Tensor] = None) -> Tensor:
    """Predicted labels ``argmax model(x)`` computed in batches; validates the model's output shape.

    With labels ``y``, checks on the first batch that they name classes of the model.

    Raises:
        ConfigurationError: when the model does not take ``(N, C, H, W)`` images (see :func:`call_model`)
            or does not return ``(N, num_classes)`` logits.
        DataError: a label outside the model's classes.
    """
    out = []
    for start in range(0, x.shape[0], batch_size):
        chunk = x[start : start + batch_size]
        logits = call_model(model, chunk)
        if start == 0 and y is not None:
            check_label_range(y, logits)
        out.append(logits.argmax(dim=1))
    return torch.cat(out)


class _LayerMismatch(Exception):
    """Raised by the diagnostic pre-hooks of :func:`_input_mismatch` to stop the forward pass."""


def _input_mismatch(model: Model, images: Tensor) -> Optional[str]:
    """Why ``model`` cannot take ``images``, found structurally, or ``None`` when no layer explains it.

    Re-runs ``model`` on one image with forward pre-hooks on its ``nn.Linear`` and ``nn.Conv2d`` layers that
    compare the input each receives with the layer's declared size (``in_features``, ``in_channels``).
    """
    if not isinstance(model, nn.Module):
        return None
    found: List[str] = []

    def check(name: str, module: nn.Module, inputs: tuple) -> None:
        arg = inputs[0] if inputs else None
        if not isinstance(arg, Tensor):
            return
        if isinstance(module, nn.Linear) and (arg.dim() == 0 or arg.shape[-1] != module.in_features):
            found.append(
                f"its layer {name!r} (nn.Linear, in_features={module.in_features}) received an input of shape "
                f"{tuple(arg.shape)}. Fourier analyses need a model that takes images; wrap a model that "
                "expects flattened vectors, e.g. nn.Sequential(nn.Flatten(), model)"
            )
        elif isinstance(module, nn.Conv2d) and (arg.dim() not in (3, 4) or arg.shape[-3] != module.in_channels):
            found.append(
                f"its layer {name!r} (nn.Conv2d, in_channels={module.in_channels}) received an input of shape "
                f"{tuple(arg.shape)}; the images have {images.shape[1]} channel(s)"
            )
        if found:
            raise _LayerMismatch

    def hook_for(name: str) -> Callable[[nn.Module, tuple], None]:
        return lambda module, inputs: check(name, module, inputs)

    handles = [
        m.register_forward_pre_hook(hook_for(name or "model"))
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    ]
    try:
        with torch.no_grad():
            model(images[:1])
    except _LayerMismatch:
        pass
    except Exception:  # the diagnosis found nothing: the caller re-raises the original error
        return None
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def call_model(model: Model, images: Tensor) -> Tensor:
    """``model(images)``, checking that it returns ``(N, num_classes)`` logits.

    An exception raised by the model propagates unchanged, except when a layer of the model is found to
    receive inputs of the wrong size (a model on flattened vectors, a channel mismatch): that becomes a
    :class:`ConfigurationError` naming the layer, chained to the original error. NaN or infinite logits
    are a :class:`DataError` (:func:`sturdy.validation.check_finite_output`): no rate is computed from them.
    """
    try:
        logits = model(images)
    except (RuntimeError, ValueError, TypeError) as exc:
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            raise
        reason = _input_mismatch(model, images)
        if reason is None:
            raise
        raise ConfigurationError(
            f"the model failed on an image batch of shape {tuple(images.shape)} (N, C, H, W): {reason}"
        ) from exc
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != images.shape[0]:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ConfigurationError(
            f"the model must return logits of shape (N, num_classes) for N={images.shape[0]} images, "
            f"got {shape}"
        )
    return validation.check_finite_output(logits)
