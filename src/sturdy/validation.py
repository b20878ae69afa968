"""Checks at the public boundary, called by the core (training, data, training jobs) and by the lipschitz,
fourier and flatness parts; compression still checks its settings itself (``compression.compressor.validate_rate``).

Each check raises a :class:`~sturdy.errors.SturdyError` subclass whose one-line message says what
was wrong, what was expected and how to fix it: :class:`~sturdy.errors.DataError` for tensors
(images, labels), :class:`~sturdy.errors.ConfigurationError` for settings (numbers, shapes). Every
check returns its (possibly normalised) value, so a caller can write ``x = check_images(x)``.

Example:
    >>> import torch
    >>> from sturdy.validation import check_images, check_labels
    >>> x = check_images(torch.rand(4, 1, 8, 8))
    >>> y = check_labels(torch.tensor([0, 1, 2, 9]), num_classes=10, count=4)
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Tuple

import torch
from torch import nn

from sturdy.errors import ConfigurationError, DataError

__all__ = [
    "check_images",
    "check_labels",
    "check_batch",
    "check_finite_tensor",
    "check_finite_weights",
    "check_input_shape",
    "check_number",
    "check_int",
]

PIXEL_SLACK = 1e-4  # rounding of resized or normalised images may step this far outside [lo, hi]


def check_finite_tensor(t: torch.Tensor, *, name: str = "x") -> torch.Tensor:
    """``t`` unchanged when it holds no NaN or infinite value, else :class:`DataError` counting them."""
    if t.is_floating_point() or t.is_complex():
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise DataError(f"{name}: {bad} of {t.numel()} values are NaN or infinite; expected finite numbers: "
                            "remove or repair those entries (e.g. torch.nan_to_num) first")
    return t


def check_images(
    x: Any,
    *,
    name: str = "images",
    bounds: Optional[Tuple[float, float]] = (0.0, 1.0),
    allow_empty: bool = False,
) -> torch.Tensor:
    """A finite floating-point batch of images ``(N, C, H, W)``, values inside ``bounds`` (``None``: any).

    Raises:
        DataError: not a tensor, wrong number of dimensions, integer dtype (e.g. uint8 pixels in
            0..255), no images, NaN/inf values, or values outside ``bounds``.
    """
    if not isinstance(x, torch.Tensor):
        raise DataError(f"{name} must be a torch.Tensor of shape (N, C, H, W), got {type(x).__name__}")
    if x.ndim != 4:
        hint = " (add a channel axis with x.unsqueeze(1) for grey (N, H, W) images)" if x.ndim == 3 else ""
        raise DataError(f"{name} must have shape (N, C, H, W), got shape {tuple(x.shape)}{hint}")
    if not x.is_floating_point():
        raise DataError(f"{name} must hold floating-point pixels, got dtype {x.dtype}"
                        f"{' (pixels in 0..255: pass x.float() / 255)' if x.dtype == torch.uint8 else ''}")
    if x.shape[0] == 0 and not allow_empty:
        raise DataError(f"{name}: no images (shape {tuple(x.shape)}); pass at least one")
    if min(x.shape[1:]) < 1:
        raise DataError(f"{name} must have positive channel, height and width sizes, got shape {tuple(x.shape)}")
    check_finite_tensor(x, name=name)
    if bounds is not None and x.numel():
        lo, hi = float(bounds[0]), float(bounds[1])
        x_min, x_max = float(x.min()), float(x.max())
        if x_min < lo - PIXEL_SLACK or x_max > hi + PIXEL_SLACK:
            raise DataError(f"{name} have values in [{x_min:.4g}, {x_max:.4g}], outside the valid pixel range "
                            f"[{lo:g}, {hi:g}]; rescale the images (e.g. x / 255) or state their range")
    return x


def check_labels(
    y: Any, *, num_classes: Optional[int] = None, count: Optional[int] = None, name: str = "labels"
) -> torch.Tensor:
    """Integer class labels ``(N,)`` in ``[0, num_classes)`` (``count``: the expected ``N``).

    Raises:
        DataError: not a tensor, not one dimension, a float or bool dtype, another length, or a
            label outside the class range.
    """
    if not isinstance(y, torch.Tensor):
        raise DataError(f"{name} must be a torch.Tensor of class indices, got {type(y).__name__}")
    if y.ndim != 1:
        raise DataError(f"{name} must have shape (N,), one class index per sample, got shape {tuple(y.shape)}"
                        f"{' (one-hot labels: pass y.argmax(1))' if y.ndim == 2 else ''}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise DataError(f"{name} must hold integer class indices, got dtype {y.dtype}; convert with y.long() "
                        "after checking that they are whole numbers")
    if count is not None and y.shape[0] != count:
        raise DataError(f"{name} must hold one label per sample ({count}), got {y.shape[0]}")
    if num_classes is not None and y.numel():
        y_min, y_max = int(y.min()), int(y.max())
        if y_min < 0 or y_max >= num_classes:
            raise DataError(f"{name} must lie in [0, {num_classes - 1}] for {num_classes} classes, got labels in "
                            f"[{y_min}, {y_max}]; check the labels or the number of classes")
    return y


def check_batch(
    x: Any,
    y: Any,
    *,
    num_classes: Optional[int] = None,
    bounds: Optional[Tuple[float, float]] = (0.0, 1.0),
    name: str = "",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Images (see :func:`check_images`) and one label per image (see :func:`check_labels`)."""
    prefix = f"{name} " if name else ""
    x = check_images(x, name=f"{prefix}images", bounds=bounds)
    y = check_labels(y, num_classes=num_classes, count=int(x.shape[0]), name=f"{prefix}labels")
    return x, y


def check_finite_weights(model: nn.Module, *, name: str = "the model") -> nn.Module:
    """``model`` unchanged when every floating-point parameter and buffer is finite.

    Raises:
        DataError: naming the first tensors that hold NaN or infinite values.
    """
    bad = [k for k, v in [*model.named_parameters(), *model.named_buffers()]
           if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise DataError(f"{name} holds non-finite (NaN or infinite) weights in {', '.join(bad[:3])}{more}; "
                        "expected finite weights (did training diverge? retrain with a lower learning rate)")
    return model


def check_input_shape(shape: Sequence[int], *, max_elements: int = 2**28) -> Tuple[int, ...]:
    """An input shape with the batch dimension, ``(1, C, H, W)``; ``(C, H, W)`` is accepted too.

    Raises:
        ConfigurationError: not 3 or 4 positive integers, a batch dimension other than 1, or more
            than ``max_elements`` values per input (a size no image model here can use).
    """
    try:
        dims = tuple(int(s) for s in shape)
        ok = all(float(s) == int(s) for s in shape) and len(dims) in (3, 4)
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok or min(dims) < 1 or (len(dims) == 4 and dims[0] != 1):
        raise ConfigurationError(f"input_shape must be (1, C, H, W) (or (C, H, W)) with positive sizes, e.g. "
                                 f"(1, 1, 8, 8) for 8x8 grey images; got {tuple(shape) if _seq(shape) else shape!r}")
    dims = dims if len(dims) == 4 else (1, *dims)
    if math.prod(dims) > max_elements:
        raise ConfigurationError(f"input_shape {dims} has {math.prod(dims)} values per input, more than "
                                 f"{max_elements}; check the shape (it includes the batch dimension)")
    return dims


def _seq(value: Any) -> bool:
    try:
        tuple(value)
    except TypeError:
        return False
    return True


def check_number(
    value: Any,
    name: str,
    *,
    low: Optional[float] = None,
    high: Optional[float] = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A finite real number in the given range, as a float (bools are refused).

    Raises:
        ConfigurationError: not a real number, NaN/inf, or outside the range.
    """
    lo_b, hi_b = ("(" if low_open else "["), (")" if high_open else "]")
    lo_text, hi_text = ("-inf" if low is None else f"{low:g}"), ("inf" if high is None else f"{high:g}")
    want = f"a finite number in {lo_b}{lo_text}, {hi_text}{hi_b}"
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError, OverflowError):
        number = math.nan
    ok = math.isfinite(number)
    if ok and low is not None:
        ok = number > low if low_open else number >= low
    if ok and high is not None:
        ok = number < high if high_open else number <= high
    if not ok:
        raise ConfigurationError(f"{name} must be {want}, got {value!r}")
    return number


def check_int(value: Any, name: str, *, low: Optional[int] = None, high: Optional[int] = None) -> int:
    """An integer (``int`` or an integer-valued tensor/NumPy scalar, never a bool or float) in ``[low, high]``.

    Raises:
        ConfigurationError: another type or out of range.
    """
    is_int = not isinstance(value, (bool, float)) and hasattr(value, "__index__")
    number = int(value.__index__()) if is_int else None
    if number is None or (low is not None and number < low) or (high is not None and number > high):
        rng = f"in [{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        raise ConfigurationError(f"{name} must be an integer {rng}, got {value!r}")
    return number
