"""Checks at the public boundary, called by the core (training, data, training jobs) and by the lipschitz,
fourier and flatness parts; compression still checks its settings itself (``compression.compressor.validate_rate``).

Each check raises a :class:`~sturdy.errors.SturdyError` subclass whose one-line message says what
was wrong, what was expected and how to fix it: :class:`~sturdy.errors.DataError` for tensors
(images, labels), :class:`~sturdy.errors.ConfigurationError` for settings (numbers, shapes). Every
check returns its (possibly normalised) value, so a caller can write ``x = check_images(x)``.

Rules every public function of every part follows, through the checks below:

* **Models**: a model whose parameters or buffers are on the ``meta`` device (shapes, no values) is
  refused with a :class:`~sturdy.errors.ConfigurationError` before any work (:func:`check_model`).
* **Input dtypes**: inputs are floating point, in any precision (float16, bfloat16, float32, float64);
  they are accepted and computed in the dtype and on the device of the model's parameters (design
  convention 7). Integer inputs are refused with a :class:`~sturdy.errors.DataError` (uint8 pixels in
  0..255 have no agreed scale: pass ``x.float() / 255``), except integer token indices for a model that
  embeds them (one holding an ``nn.Embedding``) (:func:`check_inputs`).
* **Non-finite values**: NaN or infinite values in data (images, inputs) are a
  :class:`~sturdy.errors.DataError`; so are non-finite outputs of a model on finite inputs
  (:func:`check_finite_output`): the numbers handed in produce them, and no rate, radius or measure is
  reported from them. Non-finite or ``meta`` tensors in saved state (checkpoints, ``state_dict``) are a
  :class:`~sturdy.errors.CheckpointError` (:func:`check_state_tensors`), like every other damaged state.

Example:
    >>> import torch
    >>> from sturdy.validation import check_images, check_labels
    >>> x = check_images(torch.rand(4, 1, 8, 8))
    >>> y = check_labels(torch.tensor([0, 1, 2, 9]), num_classes=10, count=4)
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Optional, Sequence, Tuple

import torch
from torch import nn

from sturdy.errors import CheckpointError, ConfigurationError, DataError

__all__ = [
    "check_images",
    "check_labels",
    "check_batch",
    "check_finite_tensor",
    "check_finite_weights",
    "check_model",
    "check_inputs",
    "check_model_inputs",
    "check_finite_output",
    "check_state_tensors",
    "check_input_shape",
    "check_number",
    "check_int",
    "check_count",
    "check_seed",
    "memory_bound",
    "MAX_SEED",
    "MEMORY_BUDGET_BYTES",
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


def check_model(model: Any, *, name: str = "the model") -> Any:
    """``model`` unchanged unless it is an ``nn.Module`` with tensors on the ``meta`` device (shapes, no values).

    A plain function (``Callable[[Tensor], Tensor]``, accepted by the Fourier analyses) passes unchecked.

    Raises:
        ConfigurationError: naming the first tensors on the meta device and how to materialise them.
    """
    if isinstance(model, nn.Module):
        meta = [k for k, v in [*model.named_parameters(), *model.named_buffers()] if v.is_meta]
        if meta:
            more = f" and {len(meta) - 3} more" if len(meta) > 3 else ""
            raise ConfigurationError(
                f"{name} has tensors on the meta device ({', '.join(meta[:3])}{more}: shapes without values); "
                "materialise it first, e.g. model.to_empty(device='cpu') then model.load_state_dict(weights)"
            )
    return model


def _embeds_tokens(model: Any) -> bool:
    return isinstance(model, nn.Module) and any(isinstance(m, nn.Embedding) for m in model.modules())


def check_inputs(x: Any, *, model: Any = None, name: str = "inputs") -> torch.Tensor:
    """A batch of model inputs ``(N, ...)`` under the dtype and finiteness rules of this module.

    Floating-point inputs of any precision pass (the caller computes in the model's dtype); integer
    inputs pass only as token indices of a ``model`` holding an ``nn.Embedding``. Unlike
    :func:`check_images`, neither the number of dimensions nor the value range is checked.

    Raises:
        DataError: not a tensor, a bool/complex/integer dtype the model cannot take, or NaN/inf values.
    """
    if not isinstance(x, torch.Tensor):
        raise DataError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    integer = not (x.is_floating_point() or x.is_complex()) and x.dtype != torch.bool
    if not x.is_floating_point() and not (integer and x.dtype != torch.uint8 and _embeds_tokens(model)):
        hint = " (pixels in 0..255: pass x.float() / 255)" if x.dtype == torch.uint8 else ""
        raise DataError(f"{name} must hold floating-point values (any precision; they are computed in the "
                        f"model's dtype), got dtype {x.dtype}{hint}")
    return check_finite_tensor(x, name=name)


def check_model_inputs(
    model: Any, x: Any, *, name: str = "x", bounds: Optional[Tuple[float, float]] = None, images: bool = False
) -> torch.Tensor:
    """:func:`check_model` then the inputs: :func:`check_images` with ``images`` (``(N, C, H, W)`` in
    ``bounds``), else :func:`check_inputs`. Returns ``x`` unchanged; the one-line check of an entry point.

    Raises:
        ConfigurationError: a model on the meta device.
        DataError: inputs that break the rules of this module.
    """
    check_model(model)
    if images:
        return check_images(x, name=name, bounds=bounds)
    return check_inputs(x, model=model, name=name)


def check_finite_output(out: torch.Tensor, *, name: str = "the model's logits") -> torch.Tensor:
    """``out`` unchanged when finite: the outputs of a model (or a quantity derived from them) on finite inputs.

    Raises:
        DataError: counting the NaN or infinite values, pointing at the model's weights and forward.
    """
    if isinstance(out, torch.Tensor) and (out.is_floating_point() or out.is_complex()):
        finite = torch.isfinite(out)
        if not bool(finite.all()):
            raise DataError(
                f"{name}: {int((~finite).sum())} of {out.numel()} values are NaN or infinite on finite inputs; "
                "no result is computed from them: check the model's weights (an overflow) and its forward"
            )
    return out


def _tensors(value: Any, path: str, depth: int = 0) -> Iterator[Tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        yield path, value
    elif depth < 32 and isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors(item, f"{path}.{key}" if path else str(key), depth + 1)
    elif depth < 32 and isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _tensors(item, f"{path}[{i}]", depth + 1)


def check_state_tensors(state: Any, *, source: str, finite: bool = False) -> Any:
    """``state`` (nested dicts, lists and tensors) unchanged when every tensor holds values.

    ``finite``: floating-point tensors must also be free of NaN and infinite values (residuals,
    statistics), which weights written before a divergence may legitimately hold elsewhere.

    Raises:
        CheckpointError: a tensor on the meta device, or (with ``finite``) a non-finite value, naming it.
    """
    for path, t in _tensors(state, ""):
        if t.is_meta:
            raise CheckpointError(f"{source} holds tensors on the meta device ({path or 'the state'}: a shape "
                                  "with no values); it was saved from an unmaterialised model: save real weights")
        if finite and (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{source} holds NaN or infinite values in {path or 'the state'}; the state is "
                                  "damaged: restart from an earlier checkpoint or without it")
    return state


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
    hint: str = "",
) -> float:
    """A finite real number in the given range, as a float (bools and strings are refused).

    ``low``/``high`` (``None``: unbounded) are included unless ``low_open``/``high_open``. ``hint`` (what the
    setting means or a typical value) ends the message after a semicolon.

    Raises:
        ConfigurationError: not a real number, NaN/inf, or outside the range.

    Example:
        >>> check_number(3, "alpha", low=0)
        3.0
        >>> check_number(-1.0, "alpha", low=0, hint="typical values 1 to 8")
        Traceback (most recent call last):
            ...
        sturdy.errors.ConfigurationError: alpha must be a finite number in [0, inf], got -1.0; typical values 1 to 8
    """
    if low is None and high is None:
        want = "a finite number"
    else:
        lo_b, hi_b = ("(" if low_open else "["), (")" if high_open else "]")
        lo_text, hi_text = ("-inf" if low is None else f"{low:g}"), ("inf" if high is None else f"{high:g}")
        want = f"a finite number in {lo_b}{lo_text}, {hi_text}{hi_b}"
    try:
        number = math.nan if isinstance(value, (bool, str, bytes)) else float(value)
    except (TypeError, ValueError, OverflowError, RuntimeError):  # RuntimeError: a tensor of several values
        number = math.nan
    ok = math.isfinite(number)
    if ok and low is not None:
        ok = number > low if low_open else number >= low
    if ok and high is not None:
        ok = number < high if high_open else number <= high
    if not ok:
        raise ConfigurationError(f"{name} must be {want}, got {value!r}{'; ' + hint if hint else ''}")
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


MAX_SEED = 2**32 - 1
"""Largest seed a command or analysis accepts (NumPy's limit; torch's generators take every one of them)."""

MEMORY_BUDGET_BYTES = 2 * 2**30
"""Host memory a table sized by a count option (SFA candidates, grid points, bootstrap resamples) may plan
for. A count whose table would need more is refused before any work (batches of images are sized apart)."""


def check_count(value: Any, name: str, *, high: int, why: str, low: int = 1) -> int:
    """A count option (an integer, never a bool or float) in ``[low, high]``, ``high`` derived from the problem.

    ``why`` says where ``high`` comes from (e.g. ``"an 8x8 image has 64 distinct circular shifts"``) and
    is part of the one-line message, so the user learns the bound and its reason together.

    Raises:
        ConfigurationError: another type or outside ``[low, high]``.
    """
    is_int = not isinstance(value, (bool, float)) and hasattr(value, "__index__")
    number = int(value.__index__()) if is_int else None
    if number is None or not low <= number <= high:
        shown = repr(value) if len(repr(value)) <= 40 else f"{repr(value)[:30]}..."
        raise ConfigurationError(f"{name} must be an integer in [{low}, {high}] ({why}), got {shown}")
    return number


def memory_bound(bytes_each: int, *, budget: int = MEMORY_BUDGET_BYTES) -> int:
    """How many items of ``bytes_each`` bytes fit :data:`MEMORY_BUDGET_BYTES` (at least 1)."""
    return max(1, budget // max(1, int(bytes_each)))


def check_seed(value: Any, name: str = "seed") -> int:
    """A seed in ``[0, MAX_SEED]`` (see :data:`MAX_SEED`).

    Raises:
        ConfigurationError: another type or out of range.
    """
    return check_count(value, name, low=0, high=MAX_SEED, why="seeds are 32-bit unsigned integers")
