"""Shared helpers of :mod:`sturdy.flatness`: data batching (the contract of :mod:`sturdy.datasource`), loss,
parameter selection.

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
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sturdy.datasource import data_source
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
    data: Any, *, batch_size: int, device: torch.device, dtype: torch.dtype, classes: bool = False,
    model: Optional[nn.Module] = None,
) -> Iterator[Tuple[Tensor, Tensor]]:
    """Yield the non-empty ``(inputs, targets)`` batches of ``data`` on ``device`` (inputs cast to ``dtype``).

    ``data`` is read through the contract of :mod:`sturdy.datasource`: a pair ``(inputs, targets)`` of tensors, an
    :class:`sturdy.data.ImageDataset`, a map-style dataset of ``(x, y)`` pairs, or an iterable of
    ``(inputs, targets)`` batches (e.g. a ``DataLoader``), used as given. Every batch is checked as it is read
    (a :class:`DataError` naming it); with ``classes`` its targets must be class indices; integer inputs pass as
    token indices of a ``model`` that embeds them.
    """
    check_positive_int("batch_size", batch_size)
    yield from data_source(data, batch_size=batch_size).batches(device=device, dtype=dtype, classes=classes,
                                                                model=model)


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
    batches = collect_batches(data, batch_size=batch_size, device=device, dtype=dtype, classes=True, model=model)
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
        batch), and the number of samples when known before the pass (``None`` for an iterable without a length).

    Raises:
        DataError: no samples, or targets that are not class indices of the model's outputs.
    """
    check_positive_int("batch_size", batch_size)
    source = data_source(data, batch_size=batch_size)
    pair = source.tensors
    if pair is not None:
        x, y = pair
        # every batch checked before any work, where the data lies: views of it, nothing is kept
        for _ in source.batches(device=x.device, dtype=x.dtype if x.is_floating_point() else dtype, model=model):
            pass
        first = next(source.batches(device=device, dtype=dtype, model=model))
        num_classes = output_width(model, first[0])
        check_class_range([(x, y)], num_classes)
        return source.batches(device=device, dtype=dtype, model=model), num_classes, source.count
    widths: List[int] = []

    def width(xb: Tensor) -> int:
        widths.append(output_width(model, xb))
        return widths[0]

    batches = source.batches(device=device, dtype=dtype, model=model, num_classes=width)
    first = next(batches)
    return itertools.chain([first], batches), widths[0], source.count


def collect_batches(
    data: Any, *, batch_size: int, device: torch.device, dtype: torch.dtype, classes: bool = False,
    model: Optional[nn.Module] = None,
) -> List[Tuple[Tensor, Tensor]]:
    """All batches of ``data`` as a list (so that several passes see identical batches); refuses empty data.

    With ``classes`` the targets must be integer class indices (:func:`iter_batches`).
    """
    return list(iter_batches(data, batch_size=batch_size, device=device, dtype=dtype, classes=classes, model=model))


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
        batches = collect_batches(data, batch_size=batch_size, device=device, dtype=dtype, model=model)
        return batches
    with eval_mode(model):
        return classification_batches(model, data, batch_size=batch_size, device=device, dtype=dtype)[0]
