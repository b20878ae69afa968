"""The data contract of a run: mini-batches on the device, in an order fixed by (seed, epoch, rank).

Training data is either an in-memory :class:`~sturdy.data.ImageDataset` (the fast path: its tensors are indexed
directly) or any map-style :class:`torch.utils.data.Dataset` of ``(image, label)`` pairs, streamed through a
:class:`~torch.utils.data.DataLoader` (worker processes, pinned memory on CUDA). Both follow one order: each
epoch draws one permutation from ``(seed, epoch)`` and rank ``r`` of ``W`` takes its ``r``-th equal share, so a
resumed run sees the same batches. Images may be stored as ``uint8`` (0..255, e.g. a memory-mapped ``.npy``);
they are converted to ``[0, 1]`` in the model's dtype one batch at a time, on the device. Augmentation
(:mod:`.augment`) is batched and seeded by ``(seed, epoch, rank)``.

A streamed data set is checked batch by batch (image shape, integer labels in range): a bad item stops the run
with one line naming its batch.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Sampler

from sturdy.errors import ConfigurationError, DataError
from sturdy.training.augment import crop_flip

__all__ = ["Batches", "steps_per_epoch", "shard", "num_classes_of", "labels_of", "to_model_input"]

_SEED_STRIDE = 100_003  # epoch e of seed s draws its permutation from s * stride + e (unchanged across versions)
_ORDER_BLOCK = 4096  # indices handed to the loader per conversion to Python ints
_LOADER_SEED_OFFSET = 1 << 60  # the loader's generator: keys far from every augmentation key


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int = 1) -> int:
    """Optimizer steps per epoch: each of ``world_size`` ranks takes ``num_samples // world_size`` samples.

    Raises:
        ConfigurationError: fewer samples than workers.
    """
    per_rank = num_samples // world_size
    if per_rank < 1:
        raise ConfigurationError(f"{num_samples} training samples cannot be split over {world_size} workers")
    return math.ceil(per_rank / batch_size)


def shard(n: int, *, seed: int, epoch: int, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s indices of epoch ``epoch``: an equal share of one permutation drawn from ``(seed, epoch)``."""
    gen = torch.Generator().manual_seed(seed * _SEED_STRIDE + epoch)
    perm = torch.randperm(n, generator=gen)
    per_rank = n // world
    return perm[rank * per_rank : (rank + 1) * per_rank]


def labels_of(data: Any) -> Optional[torch.Tensor]:
    """All labels of a data set when it exposes them (``labels`` or ``targets``), else ``None``."""
    for name in ("labels", "targets"):
        value = getattr(data, name, None)
        if value is not None:
            return torch.as_tensor(value)
    return None


def num_classes_of(data: Any) -> Optional[int]:
    """The class count a data set declares (``num_classes`` or ``len(classes)``), else ``None``."""
    k = getattr(data, "num_classes", None)
    if k is None and getattr(data, "classes", None) is not None:
        k = len(data.classes)
    return int(k) if k is not None else None


class Batches:
    """Mini-batches ``(x, y)`` of one data set on ``device``, ``x`` in ``dtype`` (see the module doc).

    Args:
        data: an :class:`~sturdy.data.ImageDataset` or a map-style data set of ``(image, label)`` pairs.
        batch_size: samples per batch (per rank).
        device, dtype: where and in which precision the model computes.
        seed, rank, world: the order (``shuffle``) and this rank's share of it.
        shuffle: a new permutation per epoch; else the data set's own order, whole on every rank.
        labels: labels replacing the data set's (label noise), indexed like the data set.
        num_classes: labels must lie in ``[0, num_classes)``.
        workers: loader processes for a streamed data set.
        augment: ``"none"`` or ``"crop-flip"``.
        channels_last: batches in channels-last memory format.
        name: the data set's role in messages (``"training"``, ``"test"``).
    """

    def __init__(self, data: Any, *, batch_size: int, device: torch.device, dtype: torch.dtype, seed: int = 0,
                 rank: int = 0, world: int = 1, shuffle: bool = True, labels: Optional[torch.Tensor] = None,
                 num_classes: Optional[int] = None, workers: int = 0, augment: str = "none",
                 channels_last: bool = False, name: str = "training") -> None:
        self.data, self.batch_size, self.device, self.dtype = data, batch_size, device, dtype
        self.seed, self.rank, self.world, self.shuffle = seed, rank, world if shuffle else 1, shuffle
        self.labels, self.num_classes, self.workers = labels, num_classes, workers
        self.augment, self.channels_last, self.name = augment, channels_last, name
        self.in_memory = isinstance(getattr(data, "images", None), torch.Tensor) and labels_of(data) is not None
        # in memory, with a class count and no replaced labels: the labels were checked once for the whole data set
        self._checked_whole = self.in_memory and labels is None and num_classes is not None
        self.num_samples = len(data)
        self.steps = steps_per_epoch(self.num_samples, batch_size, self.world) if self.num_samples else 0
        self.sample_shape: Optional[Tuple[int, ...]] = (
            tuple(data.images.shape[1:]) if self.in_memory else None)

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        return shard(self.num_samples, seed=self.seed, epoch=epoch, rank=self.rank, world=self.world)

    def epoch(self, epoch: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """The batches of ``epoch`` (``self.steps`` of them), ready for the model."""
        order = self.order(epoch)
        key = self.seed * _SEED_STRIDE + epoch + 7919 * (self.rank + 1)
        gen = torch.Generator().manual_seed(key)
        # the loader draws its workers' base seed from a generator of its own: augmentation stays the same
        # whether the data is in memory or streamed
        raw = (self._in_memory(order) if self.in_memory
               else self._streamed(order, torch.Generator().manual_seed(key + _LOADER_SEED_OFFSET)))
        for step, (x, y) in enumerate(raw):
            yield self._prepare(x, y, step, gen)

    def _in_memory(self, order: torch.Tensor) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        images = self.data.images
        labels = self.labels if self.labels is not None else labels_of(self.data)
        assert labels is not None  # in_memory: the data set exposes its labels
        # the order moves to the data once per epoch: indexing device tensors with host indices would copy (and
        # wait) at every step
        on_images, on_labels = order.to(images.device), order.to(labels.device)
        shared = on_images is on_labels  # one slice of the order per step when both lie on one device
        for start in range(0, len(order), self.batch_size):
            stop = start + self.batch_size
            idx = on_images[start:stop]
            yield images[idx], labels[idx if shared else on_labels[start:stop]]

    def _streamed(self, order: torch.Tensor, gen: torch.Generator) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        loader = DataLoader(self.data, batch_size=self.batch_size, sampler=_Order(order), num_workers=self.workers,
                            pin_memory=self.device.type == "cuda", generator=gen, drop_last=False)
        batches = iter(loader)
        for step in range(math.ceil(len(order) / self.batch_size)):
            try:
                item = next(batches)
            except StopIteration:
                return
            except (RuntimeError, TypeError, ValueError, IndexError, KeyError, OSError) as exc:
                raise DataError(f"{self.name} data, batch {step + 1}: reading its items failed ({_cause(exc)}); "
                                "every item must be an (image tensor C x H x W, integer label) pair of one shape"
                                ) from exc
            x, y = self._pair(item, step)
            if self.labels is not None:
                y = self.labels[order[step * self.batch_size : (step + 1) * self.batch_size]]
            yield x, y

    def _pair(self, item: Any, step: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if not (isinstance(item, (tuple, list)) and len(item) >= 2 and isinstance(item[0], torch.Tensor)):
            got = (f"images of type {type(item[0]).__name__}" if isinstance(item, (tuple, list)) and len(item) >= 2
                   else f"batches of type {type(item).__name__}")
            raise DataError(f"{self.name} data, batch {step + 1}: items must be (image tensor, label) pairs, got "
                            f"{got}")
        x, y = item[0], torch.as_tensor(item[1])
        if x.dim() != 4:
            raise DataError(f"{self.name} data, batch {step + 1}: images have shape {tuple(x.shape[1:])}; expected "
                            "C x H x W tensors")
        if self.sample_shape is None:
            self.sample_shape = tuple(x.shape[1:])
        elif tuple(x.shape[1:]) != self.sample_shape:
            raise DataError(f"{self.name} data, batch {step + 1}: images of shape {tuple(x.shape[1:])} after "
                            f"{self.sample_shape}; every image must have one shape (resize them)")
        return x, y

    def _prepare(self, x: torch.Tensor, y: torch.Tensor, step: int, gen: torch.Generator
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
        self._check_labels(y, step)
        x = to_model_input(x, device=self.device, dtype=self.dtype, name=f"{self.name} images")
        if self.augment == "crop-flip":
            x = crop_flip(x, generator=gen)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.device, dtype=torch.long, non_blocking=True)

    def _check_labels(self, y: torch.Tensor, step: int) -> None:
        if self._checked_whole:
            return
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool or y.dim() != 1:
            raise DataError(f"{self.name} data, batch {step + 1}: labels must be integer class indices, got "
                            f"dtype {y.dtype}, shape {tuple(y.shape)}")
        k = self.num_classes
        if y.numel() and (int(y.min()) < 0 or (k is not None and int(y.max()) >= k)):
            raise DataError(f"{self.name} data, batch {step + 1}: labels in [{int(y.min())}, {int(y.max())}] but "
                            f"the classes are 0..{k - 1 if k is not None else '?'}; fix the labels of those items")


class _Order(Sampler):
    """The indices of ``order`` as ints, converted a block at a time (a list of a million Python ints would
    take 36 MB)."""

    def __init__(self, order: torch.Tensor) -> None:
        self.order = order

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[int]:
        for block in self.order.split(_ORDER_BLOCK):
            yield from block.tolist()


def _cause(exc: BaseException) -> str:
    """One line naming what went wrong; a loader worker's error is re-raised with its traceback in the message,
    whose last line names the cause."""
    text = str(exc).strip()
    if "Original Traceback" in text:
        return " ".join(text.splitlines()[-1].split())[:300]
    return f"{type(exc).__name__}: {' '.join(text.split())[:300]}"


def to_model_input(x: torch.Tensor, *, device: torch.device, dtype: torch.dtype, name: str = "images") -> torch.Tensor:
    """``x`` on ``device`` in ``dtype``; ``uint8`` pixels (0..255) become ``[0, 1]`` (after the copy: 4x less
    traffic)."""
    if x.is_floating_point():
        return x.to(device, dtype=dtype, non_blocking=True)
    if x.dtype == torch.uint8:
        return x.to(device, non_blocking=True).to(dtype).div_(255.0)
    raise DataError(f"{name} have dtype {x.dtype}; expected floating-point values in [0, 1] or uint8 pixels 0..255")
