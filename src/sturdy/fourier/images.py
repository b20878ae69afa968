"""The images of a Fourier analysis: tensors, moved whole to the model's device (one batch), or any data of the
contract of :mod:`sturdy.datasource` (a ``Dataset``, a ``DataLoader``, an iterable of ``(x, y)`` batches), read
batch by batch, one on the device at a time (docs/design.md, "Data contract").

The analyses see the data as passes of ``(offset, x, y)``: ``x`` the images ``offset .. offset + len(x) - 1`` in
the perturbation dtype on the model's device. Their results are sums over images (integer counts, and float64
budget sums added in another order), so a streamed run gives the counts of the same images held as tensors.
A streamed source needs its number of images before the first pass (the random draws of a heat map are made
for all of them; the attacks' image orders too): it is known for tensors, datasets and ``DataLoader``\\ s, and
given as ``count`` for other iterables. Streamed batches go to the device and dtype of the model's parameters (a
plain function, which has none, gets them on the CPU in float32; tensors keep their own).
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterator, Optional, Tuple, Union

import torch
from torch import Tensor

from sturdy.datasource import data_source
from sturdy.errors import ConfigurationError, DataError
from sturdy.fourier._common import Model, call_model, check_labels
from sturdy.fourier.batching import BatchSizer, ModelRunner, work_dtype
from sturdy.fourier.perturbation import Bounds, check_images
from sturdy.fourier.search import count_fooled
from sturdy.utils import model_device_dtype

__all__ = ["AnalysisImages", "DATA_BATCH"]

DATA_BATCH = 256
"""Images per batch read from a map-style ``Dataset`` when the analysis has no batch size of its own."""

Pass = Iterator[Tuple[int, Tensor, Optional[Tensor]]]


class AnalysisImages:
    """The images (and with ``labels`` their class labels) of one Fourier analysis (see the module doc).

    Attributes:
        shape: ``(N, C, H, W)`` of all the images.
        device, dtype: where the batches are, in the perturbation dtype (:func:`work_dtype`).
        model_dtype: the dtype of the model's parameters.
        streamed: the images are read batch by batch (not held as tensors).

    ``work``: the images are in the perturbation dtype (:func:`work_dtype`), else in the model's own.
    ``passes``: how many times the analysis reads the data (a one-shot source is refused when more than one,
    before its first batch is read).
    """

    def __init__(self, model: Model, x: Any, y: Any = None, *, bounds: Bounds, labels: bool, what: str,
                 count: Optional[int] = None, batch_size: Optional[int] = None, work: bool = True,
                 passes: int = 1) -> None:
        self.streamed = not isinstance(x, Tensor)
        self.what = what
        if not self.streamed:
            check_images(x, bounds)
            self.device, self.model_dtype = model_device_dtype(model, x)
            floating = self.model_dtype if self.model_dtype.is_floating_point else x.dtype
            self.dtype = work_dtype(floating) if work else floating
            self._y = check_labels(y, x.shape[0]).to(self.device) if labels else None
            self._x = x.to(device=self.device, dtype=self.dtype)
            self.shape: Tuple[int, ...] = tuple(x.shape)
            return
        if y is not None:
            raise ConfigurationError(f"{what}: labels y go with image tensors x; a Dataset or an iterable of batches "
                                     "carries its labels in its (x, y) pairs")
        self.source = data_source(x, batch_size=batch_size or DATA_BATCH, count=count)
        self.require_passes(passes)  # before the first batch is read: a one-shot source is left untouched
        if self.source.count is None:
            raise ConfigurationError(f"{what} needs the number of images before it starts; pass count=N with an "
                                     "iterable of batches")
        self.device, self.model_dtype = model_device_dtype(model)
        floating = self.model_dtype if self.model_dtype.is_floating_point else torch.float32
        self.dtype = work_dtype(floating) if work else floating
        self._labels = labels
        self._bounds = bounds
        self._model = model
        self._pending: Optional[Iterator[Tuple[Tensor, Tensor]]] = self._read()
        self._first = next(self._pending)  # the image shape, before any work
        self.shape = (self.source.count, *self._first[0].shape[1:])

    @property
    def tensor(self) -> Tensor:
        """The images held as a tensor (on the device, in ``dtype``); only when not streamed."""
        assert not self.streamed
        return self._x

    @property
    def n(self) -> int:
        return int(self.shape[0])

    def require_passes(self, passes: int) -> None:
        """Refuse a one-shot source when the analysis reads the data ``passes`` times."""
        if self.streamed and passes > 1:
            self.source.require_reiterable(self.what)

    def _read(self) -> Iterator[Tuple[Tensor, Tensor]]:
        def check(x: Tensor, name: str) -> None:
            check_images(x, self._bounds, name=name)

        def classes(x: Tensor) -> int:  # the model's output width, from one image: labels are checked per batch
            floating = self.model_dtype if self.model_dtype.is_floating_point else x.dtype
            with torch.no_grad():
                return int(call_model(self._model, x[:1].to(floating)).shape[1])

        return self.source.batches(device=self.device, dtype=self.dtype, classes=self._labels, check_x=check,
                                   num_classes=classes if self._labels else None)

    def passes(self) -> Pass:
        """One pass over the images as ``(offset, x, y)`` (``y`` ``None`` without ``labels``)."""
        if not self.streamed:
            yield 0, self._x, self._y
            return
        if self._pending is not None:
            batches, self._pending = itertools.chain([self._first], self._pending), None
        else:
            batches = self._read()
        offset = 0
        for xb, yb in batches:
            if tuple(xb.shape[1:]) != self.shape[1:]:
                raise DataError(f"{self.what}: images {offset} to {offset + len(xb) - 1} have shape "
                                f"{tuple(xb.shape[1:])} after {self.shape[1:]}; every image must have one shape")
            yield offset, xb, (yb if self._labels else None)
            offset += int(xb.shape[0])

    def labels(self, predict: Callable[[Tensor], Tensor]) -> Tensor:
        """``predict(x)`` of every batch of a pass, concatenated (e.g. the clean predicted labels)."""
        return torch.cat([predict(xb) for _, xb, _ in self.passes()])

    def count_fooled(self, model: Model, clean: Tensor, make_deltas: Callable[[int, int], Tensor], n_deltas: int,
                     images: Tensor, *, bounds: Bounds, batch_size: Union[None, int, BatchSizer],
                     runner: Optional[ModelRunner] = None) -> Tensor:
        """:func:`~sturdy.fourier.search.count_fooled` on the images with indices ``images``, batch by batch (a
        pass, stopped after the last batch that holds one of them); the counts do not depend on the batches."""
        total = torch.zeros(n_deltas, dtype=torch.long)
        last = int(images.max()) if len(images) else -1
        for offset, xb, _ in self.passes():
            if offset > last:
                break
            size = int(xb.shape[0])
            inside = images[(images >= offset) & (images < offset + size)] - offset
            total += count_fooled(model, xb, clean[offset : offset + size], make_deltas, n_deltas, inside,
                                  bounds=bounds, batch_size=batch_size, runner=runner)
        return total
