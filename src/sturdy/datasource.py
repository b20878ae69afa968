"""The data contract of the analyses: an iterable of ``(x, y)`` batches plus a sample count (docs/design.md,
"Data contract").

Certification (:func:`sturdy.lipschitz.certify`), the Fourier heat map and attacks, and the flatness measures read
their data through :func:`data_source`, which accepts

* tensors ``x`` and ``y`` (or a pair ``(x, y)``, or an :class:`~sturdy.data.ImageDataset`): held where they are
  and cut into ``batch_size`` slices, each moved to the device when it is used;
* a map-style :class:`torch.utils.data.Dataset` of ``(x, y)`` pairs with a length: read in index order through a
  ``DataLoader`` of ``batch_size``;
* any iterable of ``(x, y)`` batches (a ``DataLoader``, a generator, ...): read as given, its batches in its order;

plus an optional sample ``count`` (as curvlinops' ``num_data``). Reading (:meth:`DataSource.batches`) checks every
batch as it arrives with the rules of :mod:`sturdy.validation` (a pair of one sample count; samples of the first
batch's shape; finite inputs of a floating-point dtype; with ``classes``, integer labels ``(N,)`` inside the
model's class range), moves it to the model's device and dtype, and names the batch (its index and samples) in the
:class:`~sturdy.errors.DataError` of a bad one. A batch that goes past the given ``count`` is refused when it
arrives, and at the end of the pass a sample count other than ``count``. The next batch is read only when the
consumer asks for it: a streamed analysis holds one batch on the device at a time.

``uint8`` pixels (0..255) of an ``ImageDataset`` (the memory-mapped caches of :mod:`sturdy.datasets`) become
``[0, 1]`` per batch, on the device; other integer inputs follow :func:`sturdy.validation.check_inputs` (refused,
except token indices of a model that embeds them).

A source that can be read only once (a generator or another iterator) serves the analyses that read the data
once; those that read it several times (the Fourier attacks' searches) call :meth:`DataSource.require_reiterable`
before any work, so a one-shot source is refused with one line instead of being copied into memory.

Example:
    >>> import torch
    >>> from sturdy.datasource import data_source
    >>> src = data_source(torch.rand(10, 1, 4, 4), torch.arange(10) % 3, batch_size=4)
    >>> src.count, [tuple(x.shape) for x, _ in src.batches(device=torch.device("cpu"), dtype=torch.float32)]
    (10, [(4, 1, 4, 4), (4, 1, 4, 4), (2, 1, 4, 4)])
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple, Union

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from sturdy.errors import ConfigurationError, DataError
from sturdy.validation import check_inputs, check_int, check_labels

__all__ = ["DataSource", "data_source"]

Batch = Tuple[Tensor, Tensor]
ClassCount = Union[None, int, Callable[[Tensor], int]]


def _pair_of_tensors(data: Any) -> Optional[Tuple[Tensor, Tensor]]:
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        return data[0], data[1]
    images, labels = getattr(data, "images", None), getattr(data, "labels", None)
    if isinstance(images, Tensor) and isinstance(labels, Tensor):
        return images, labels
    return None


def _loader_count(loader: DataLoader) -> Optional[int]:
    """Samples a ``DataLoader`` yields, when its sampler has a length (``None`` otherwise)."""
    try:
        n = len(loader.sampler)  # type: ignore[arg-type]
    except TypeError:
        return None
    if loader.batch_size is None:
        return None
    return n - n % loader.batch_size if loader.drop_last else n


@dataclass(frozen=True, eq=False)
class DataSource:
    """Data of an analysis under the contract of this module (build it with :func:`data_source`).

    Attributes:
        data: a pair of tensors ``(x, y)`` or an iterable of ``(x, y)`` batches.
        count: the number of samples: given, or known from the data (tensors, a sized dataset or sampler);
            ``None`` when only a pass can tell.
        batch_size: samples per batch of tensors and map-style datasets (an iterable keeps its own batches).
        pixels: the inputs are ``uint8`` pixels 0..255 of an ``ImageDataset``, divided by 255 per batch.
    """

    data: Any
    count: Optional[int]
    batch_size: int
    pixels: bool = False

    @property
    def tensors(self) -> Optional[Tuple[Tensor, Tensor]]:
        """``(x, y)`` when the data is held as tensors (random access, no pass needed), else ``None``."""
        return self.data if isinstance(self.data, tuple) else None

    @property
    def reiterable(self) -> bool:
        """Whether every :meth:`batches` call reads the data from its start (``False`` for an iterator)."""
        return not isinstance(self.data, Iterator)

    def require_reiterable(self, what: str) -> None:
        """Refuse a one-shot source for a method that reads the data several times.

        Raises:
            ConfigurationError: naming ``what`` needs the passes and how to give such data.
        """
        if not self.reiterable:
            raise ConfigurationError(
                f"{what} reads the data several times, but it was given an iterator that can be read once (a "
                "generator?); pass tensors, a Dataset, a DataLoader or another iterable whose iter() starts again"
            )

    def raw_batches(self) -> Iterator[Any]:
        """The batches as they come, unchecked and where they lie."""
        pair = self.tensors
        if pair is None:
            yield from self.data
            return
        x, y = pair
        for start in range(0, int(x.shape[0]), self.batch_size):
            yield x[start : start + self.batch_size], y[start : start + self.batch_size]

    def batches(
        self,
        *,
        device: torch.device,
        dtype: torch.dtype,
        classes: bool = True,
        num_classes: ClassCount = None,
        model: Any = None,
        check_x: Optional[Callable[[Tensor, str], Any]] = None,
    ) -> Iterator[Batch]:
        """One pass over the data as checked batches on ``device`` (floating-point inputs cast to ``dtype``).

        Args:
            device, dtype: where the batches go (the model's device and dtype).
            classes: the targets are integer class indices ``(N,)`` (``False``: any targets of one per sample).
            num_classes: the class count the targets must lie under, or a function of the first batch's inputs
                (on ``device``) that returns it (e.g. the model's output width), or ``None`` (unchecked).
            model: the model the inputs are for (integer token indices pass when it embeds them).
            check_x: an extra check of each batch's inputs (on ``device``, in ``dtype``), called as
                ``check_x(x, name)``; a :class:`DataError` it raises is named with the batch.

        Raises:
            DataError: a batch that is not an ``(x, y)`` pair of one sample count, samples of another shape than
                the first batch's, inputs that are not finite
                floating-point values, targets that are not class indices in range (with ``classes``), no
                samples, or a pass of another sample count than ``count``; each naming the batch.
        """
        seen, k, sample = 0, num_classes, None
        for index, raw in enumerate(self.raw_batches()):
            x, y = self._pair(raw, index, seen)
            n = int(x.shape[0])
            if n == 0:
                continue
            where = f"batch {index} (samples {seen} to {seen + n - 1})"
            _check_within_count(seen + n, self.count, where)
            sample = tuple(x.shape[1:]) if sample is None else sample
            if tuple(x.shape[1:]) != sample:
                raise DataError(f"{where}: inputs of shape {tuple(x.shape[1:])} after {sample}; every sample must have "
                                "one shape (resize them)")
            _check_finite_samples(x, seen, where)
            try:
                if not (self.pixels and x.dtype == torch.uint8):
                    check_inputs(x, model=model, name="inputs")
                if classes:
                    check_labels(y, name="targets")
                x, y = self._move(x, device, dtype), y.to(device)
                if check_x is not None:
                    check_x(x, "inputs")
            except DataError as exc:
                raise DataError(f"{where}: {exc}") from None
            if callable(k):
                k = int(k(x))
            if classes and k is not None:
                _check_range(y, k, where)
            seen += n
            yield x, y
        if seen == 0:
            raise DataError("the data holds no samples; pass at least one (input, target) pair")
        if self.count is not None and seen != self.count:
            raise DataError(f"the data held {seen} samples but its count says {self.count}; pass the count of "
                            "samples the batches hold (or none)")

    def _pair(self, raw: Any, index: int, seen: int) -> Batch:
        if not (isinstance(raw, (tuple, list)) and len(raw) == 2):
            got = f"{len(raw)} items" if isinstance(raw, (tuple, list)) else f"a {type(raw).__name__}"
            raise DataError(f"batch {index}: each batch must be an (inputs, targets) pair, got {got} (map a batch of "
                            "another form to (x, y) first, e.g. a generator ((b[0], b[1]) for b in loader))")
        try:
            x, y = torch.as_tensor(raw[0]), torch.as_tensor(raw[1])
        except (TypeError, ValueError, RuntimeError) as exc:
            raise DataError(f"batch {index}: inputs and targets must be tensors ({exc})") from None
        if x.dim() == 0 or y.dim() == 0 or x.shape[0] != y.shape[0]:
            raise DataError(f"batch {index} (from sample {seen}): inputs and targets must have the same number of "
                            f"samples, got {_count_of(x)} and {_count_of(y)} (shapes {tuple(x.shape)} and "
                            f"{tuple(y.shape)})")
        return x, y

    def _move(self, x: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
        if self.pixels and x.dtype == torch.uint8:
            return x.to(device).to(dtype).div_(255.0)
        return x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)


def _count_of(t: Tensor) -> str:
    return str(int(t.shape[0])) if t.dim() else "a scalar"


def _check_finite_samples(x: Tensor, first: int, where: str) -> None:
    """Refuse NaN or infinite inputs, naming the first sample that holds one (``first``: the batch's first sample)."""
    if x.is_floating_point() or x.is_complex():
        finite = torch.isfinite(x).reshape(x.shape[0], -1).all(1)
        if not bool(finite.all()):
            bad = (~finite).nonzero()
            raise DataError(f"{where}: inputs hold NaN or inf values in {len(bad)} sample(s), the first is sample "
                            f"{int(bad[0, 0]) + first}; remove or repair them (e.g. torch.nan_to_num) first")


def _check_within_count(seen: int, count: Optional[int], where: str) -> None:
    """Refuse a batch that goes past the given sample count, before a consumer sized by the count sees it."""
    if count is not None and seen > count:
        raise DataError(f"{where}: the data holds more samples than its count says ({count}); pass the count of "
                        "samples the batches hold (or none)")


def _check_range(y: Tensor, k: int, where: str) -> None:
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= k):
        raise DataError(f"{where}: targets must be class indices in [0, {k - 1}] for a model with {k} outputs, got "
                        f"values in [{int(y.min())}, {int(y.max())}]; check the labels (or the model's number of "
                        "classes)")


def data_source(data: Any, y: Optional[Tensor] = None, *, batch_size: int = 256,
                count: Optional[int] = None) -> DataSource:
    """``data`` (and ``y``) under the contract of this module (see the module doc).

    Args:
        data: inputs ``x`` (with ``y``), a pair ``(x, y)``, an ``ImageDataset``, a map-style ``Dataset`` of
            ``(x, y)`` pairs, or an iterable of ``(x, y)`` batches; a :class:`DataSource` is returned as it is.
        y: the targets of tensor inputs ``data`` (only with them).
        batch_size: samples per batch of tensors and datasets.
        count: the number of samples, when known (refused when it contradicts the data; checked after a pass).

    Raises:
        DataError: data of none of these forms, ``x`` and ``y`` of different sample counts, or a count the data
            contradicts.
        ConfigurationError: ``batch_size`` or ``count`` not a positive integer, ``y`` with data other than a tensor.
    """
    batch_size = check_int(batch_size, "batch_size", low=1)
    count = None if count is None else check_int(count, "count", low=1)
    if isinstance(data, DataSource):
        return data
    if y is not None:
        if not isinstance(data, Tensor):
            raise ConfigurationError(f"targets y go with input tensors x; got x of type {type(data).__name__} (pass "
                                     "a Dataset or an iterable of batches alone)")
        data = (data, y if isinstance(y, Tensor) else torch.as_tensor(y))
    pair = _pair_of_tensors(data)
    pixels = False
    source: Any
    known: Optional[int]
    if pair is not None:
        x, labels = pair
        if x.dim() == 0 or labels.dim() == 0 or x.shape[0] != labels.shape[0]:
            raise DataError(f"inputs and targets must have the same number of samples, got {_count_of(x)} and "
                            f"{_count_of(labels)} (shapes {tuple(x.shape)} and {tuple(labels.shape)})")
        pixels = x.dtype == torch.uint8 and getattr(data, "images", None) is x
        source, known = pair, int(x.shape[0])
    elif isinstance(data, Dataset) and hasattr(data, "__len__"):
        source, known = DataLoader(data, batch_size=batch_size, shuffle=False), len(data)
    elif isinstance(data, DataLoader):
        if data.batch_size is None and data.batch_sampler is None:
            raise DataError("the DataLoader has batch_size=None, so it yields single samples, not batches; give it "
                            "a batch_size (or pass its dataset)")
        source, known = data, _loader_count(data)
    elif isinstance(data, Iterable):
        source, known = data, None
    else:
        raise DataError(f"cannot read samples from a {type(data).__name__}; pass (inputs, targets) tensors, an "
                        "ImageDataset, a map-style Dataset of (x, y) pairs, or an iterable of (inputs, targets) "
                        "batches")
    if count is not None and known is not None and count != known:
        raise DataError(f"count is {count} but the data holds {known} samples; pass the data's count (or none)")
    return DataSource(source, known if count is None else count, batch_size, pixels)
