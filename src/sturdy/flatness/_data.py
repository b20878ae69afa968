"""Shared helpers of :mod:`sturdy.flatness`: data batching, loss, parameter selection.

Conventions used by every function of the subpackage:
    * the *training loss* is the **mean** over all samples of ``data`` of ``loss_fn(outputs, targets)``
      (default: cross-entropy on logits); batches only change memory, never the value;
    * the model is evaluated in eval mode (BatchNorm running statistics, no dropout); its training
      flag is restored afterwards;
    * device and dtype come from the model's parameters; inputs are moved and cast to them.
"""

from __future__ import annotations

import itertools
import warnings
from typing import Any, Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sturdy.errors import ConfigurationError, DataError
from sturdy.utils import eval_mode
from sturdy.validation import check_finite_output, check_inputs

LossFn = Callable[[Tensor, Tensor], Tensor]
"""The criterion ``loss_fn(logits, targets) -> mean loss over the batch`` (a 0-d tensor).

Not to be confused with :class:`sturdy.training.Objective`, which runs the model itself.
"""

WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


def default_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of logits ``(N, C)`` against class indices ``(N,)``."""
    return F.cross_entropy(outputs, targets)


def check_positive_int(name: str, value: Any, *, minimum: int = 1) -> int:
    """Validate an integer option (``bool`` is refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def iter_batches(
    data: Any, *, batch_size: int, device: torch.device, dtype: torch.dtype, classes: bool = False
) -> Iterator[Tuple[Tensor, Tensor]]:
    """Yield ``(inputs, targets)`` batches of ``data`` on ``device`` (inputs cast to ``dtype``).

    ``data`` may be a pair ``(inputs, targets)`` of tensors, an object with ``images`` and ``labels``
    tensors (a :class:`sturdy.data.ImageDataset`), a map-style dataset of ``(x, y)`` pairs, or an
    iterable of ``(inputs, targets)`` batches (e.g. a ``DataLoader``), which is used as given.
    Every batch is checked (:func:`check_batch`); with ``classes`` its targets must be class indices.
    """
    check_positive_int("batch_size", batch_size)
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise DataError(
                f"inputs and targets must have the same number of samples, got {x.shape[0]} and {y.shape[0]}"
            )
        for start in range(0, x.shape[0], batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            check_batch(xb, yb, start, classes=classes)
            yield _cast(xb, device, dtype), yb.to(device)
        return
    if isinstance(getattr(data, "images", None), Tensor) and isinstance(getattr(data, "labels", None), Tensor):
        yield from iter_batches((data.images, data.labels), batch_size=batch_size, device=device, dtype=dtype,
                                classes=classes)
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
    seen = 0
    for batch in loader:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise DataError(f"each batch must be an (inputs, targets) pair, got a {type(batch).__name__}")
        x, y = torch.as_tensor(batch[0]), torch.as_tensor(batch[1])
        check_batch(x, y, seen, classes=classes)
        seen += int(x.shape[0]) if x.dim() else 0
        yield _cast(x, device, dtype), y.to(device)


def check_batch(x: Tensor, y: Tensor, first: int, *, classes: bool) -> None:
    """Refuse a batch whose sizes differ or whose floating inputs hold NaN/inf; with ``classes``, targets
    that are not one integer class index per sample (the range is checked by :func:`check_class_range`)."""
    if x.dim() == 0 or y.dim() == 0 or x.shape[0] != y.shape[0]:
        raise DataError(
            f"inputs and targets must have the same number of samples, got shapes {tuple(x.shape)} and "
            f"{tuple(y.shape)} (batch starting at sample {first})"
        )
    if x.is_floating_point() or x.is_complex():
        finite = torch.isfinite(x).reshape(x.shape[0], -1).all(1)
        if not bool(finite.all()):
            bad = int((~finite).nonzero()[0, 0]) + first
            raise DataError(
                f"inputs hold NaN or inf values ({int((~finite).sum())} sample(s) of the batch starting at sample "
                f"{first}, the first is sample {bad}); remove or repair them before measuring"
            )
    if classes:
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise DataError(
                f"targets must be integer class indices for the cross-entropy loss, got dtype {y.dtype} "
                "(convert with targets.long(), or pass loss_fn=... for other targets)"
            )
        if y.dim() != 1:
            raise DataError(f"targets must be one class index per sample, shape (N,), got {tuple(y.shape)}")


def check_class_range(batches: List[Tuple[Tensor, Tensor]], num_classes: int) -> None:
    """Refuse class indices outside ``[0, num_classes)`` (``num_classes``: the model's output width)."""
    low = min(int(y.min()) for _, y in batches if y.numel())
    high = max(int(y.max()) for _, y in batches if y.numel())
    if low < 0 or high >= num_classes:
        raise DataError(
            f"targets must be class indices in [0, {num_classes - 1}] for a model with {num_classes} outputs, "
            f"got values in [{low}, {high}]; check the labels (or the model's number of classes)"
        )


def output_width(model: nn.Module, x: Tensor) -> int:
    """Number of logits the model gives per sample (one forward pass of two samples, no graph).

    The first place the model meets the data: the inputs' dtype and the two samples' logits are checked
    against the rules of :mod:`sturdy.validation` (a :class:`DataError` otherwise).
    """
    check_inputs(x, model=model)
    with torch.no_grad():
        out = model(x[:2])
    if not isinstance(out, Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ConfigurationError(
            f"the model must return logits of shape (N, classes) for the cross-entropy loss, got {shape}; "
            "pass loss_fn=... (where accepted) for other outputs"
        )
    return int(check_finite_output(out).shape[1])


def classification_batches(
    model: nn.Module, data: Any, *, batch_size: int, device: torch.device, dtype: torch.dtype
) -> Tuple[List[Tuple[Tensor, Tensor]], int]:
    """:func:`collect_batches` for the cross-entropy loss: targets checked against the model's class count.

    Returns the batches and the number of classes. The model should already be in eval mode.
    """
    batches = collect_batches(data, batch_size=batch_size, device=device, dtype=dtype, classes=True)
    num_classes = output_width(model, batches[0][0])
    check_class_range(batches, num_classes)
    return batches, num_classes


def stream_classification_batches(
    model: nn.Module, data: Any, *, batch_size: int, device: torch.device, dtype: torch.dtype
) -> Tuple[Iterator[Tuple[Tensor, Tensor]], int, Optional[int]]:
    """One pass over ``data`` as checked class-index batches, read and moved to ``device`` one at a time.

    For methods that need a single pass: memory holds one batch, whatever the data size (a
    ``DataLoader`` is iterated once, as given). Data held as tensors (a pair of tensors, an
    ``ImageDataset``) is checked whole before the first batch is moved; other data batch by batch as it is
    read.
    The model should already be in eval mode.

    Returns:
        The batches (non-empty ones only), the number of classes (the model's output width on the first
        batch), and the number of samples when known before the pass (``None`` for an iterable).

    Raises:
        DataError: no samples, or targets that are not class indices of the model's outputs.
    """
    pair = data if isinstance(data, (tuple, list)) and len(data) == 2 else None
    if pair is None and isinstance(getattr(data, "images", None), Tensor):
        pair = (data.images, getattr(data, "labels", None))
    if pair is not None and all(isinstance(t, Tensor) for t in pair):
        x, y = pair
        # every batch checked before any work, where the data lies: views of it, nothing is copied
        views = [b for b in iter_batches(pair, batch_size=batch_size, device=x.device, dtype=x.dtype, classes=True)
                 if b[0].shape[0]]
        if not views:
            raise DataError("the data holds no samples; pass at least one (input, target) pair")
        num_classes = output_width(model, _cast(views[0][0], device, dtype))
        check_class_range(views, num_classes)
        return ((_cast(xb, device, dtype), yb.to(device)) for xb, yb in views), num_classes, int(y.shape[0])
    total = len(data) if isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__") else None
    batches = (b for b in iter_batches(data, batch_size=batch_size, device=device, dtype=dtype, classes=True)
               if b[0].shape[0])
    first = next(batches, None)
    if first is None:
        raise DataError("the data holds no samples; pass at least one (input, target) pair")
    num_classes = output_width(model, first[0])

    def checked() -> Iterator[Tuple[Tensor, Tensor]]:
        for xb, yb in itertools.chain([first], batches):
            check_class_range([(xb, yb)], num_classes)
            yield xb, yb

    return checked(), num_classes, total


def _cast(x: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    return x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)


def collect_batches(
    data: Any, *, batch_size: int, device: torch.device, dtype: torch.dtype, classes: bool = False
) -> List[Tuple[Tensor, Tensor]]:
    """All batches of ``data`` as a list (so that several passes see identical batches); refuses empty data.

    With ``classes`` the targets must be integer class indices (:func:`check_batch`).
    """
    batches = list(iter_batches(data, batch_size=batch_size, device=device, dtype=dtype, classes=classes))
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
    """``(name, module)`` of every layer whose trainable weight is a node-to-node matrix, in order.

    Covered: ``nn.Linear`` (out x in), ``nn.Conv1d/2d/3d`` (out x in/groups x kernel; any groups, dilation,
    stride, padding) and ``nn.Embedding`` (tokens x dim). Other weights are listed by :func:`skipped_weights`.
    """
    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, WEIGHT_LAYERS) and isinstance(getattr(m, "weight", None), Tensor) and m.weight.requires_grad
    ]


def skipped_weights(model: nn.Module) -> List[str]:
    """Names of trainable parameters with 2 or more dimensions that no covered layer owns as its ``weight``.

    Biases and normalisation scales (1-D) are outside the layer-wise measures by definition and not listed.
    """
    covered = {id(m.weight) for _, m in weight_layers(model)}
    return [n for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2 and id(p) not in covered]


def select_weight_layers(
    model: nn.Module, layers: Optional[Sequence[str]], *, strict: bool
) -> Tuple[List[Tuple[str, nn.Module]], Tuple[str, ...]]:
    """The layers normalized sharpness measures (``layers``: by module name; default: every covered layer),
    and the trainable matrices it leaves out (default only: warned about, refused when ``strict``)."""
    chosen = weight_layers(model)
    skipped = tuple(skipped_weights(model)) if layers is None else ()
    if skipped:
        message = (
            f"normalized sharpness covers Linear, Conv1d/2d/3d and Embedding weights; the trainable matrices "
            f"{', '.join(skipped)} are not covered"
        )
        if strict:
            raise ConfigurationError(message + " (strict=True); pass strict=False to measure the others")
        # stacklevel 3: the warning points at the caller of the measure
        warnings.warn(message + " and are left out of the value (listed in `skipped`)", stacklevel=3)
    if layers is not None:
        known = dict(chosen)
        missing = [n for n in layers if n not in known]
        if missing:
            raise ConfigurationError(
                f"no covered layer named {', '.join(map(repr, missing))}; layers are: {', '.join(known)}"
            )
        chosen = [(n, known[n]) for n in layers]
    if not chosen:
        raise ConfigurationError(
            "normalized sharpness needs at least one Linear, Conv1d/2d/3d or Embedding layer with a trainable weight"
        )
    return chosen, skipped


def loss_batches(
    model: nn.Module, data: Any, *, batch_size: int, device: torch.device, dtype: torch.dtype,
    loss_fn: Optional[LossFn],
) -> List[Tuple[Tensor, Tensor]]:
    """The batches of ``data`` for ``loss_fn``: checked as class indices (:func:`classification_batches`,
    the model in eval mode for that one forward pass) when ``loss_fn`` is ``None`` (the cross-entropy)."""
    if loss_fn is not None:
        batches = collect_batches(data, batch_size=batch_size, device=device, dtype=dtype)
        check_inputs(batches[0][0], model=model)
        return batches
    with eval_mode(model):
        return classification_batches(model, data, batch_size=batch_size, device=device, dtype=dtype)[0]
