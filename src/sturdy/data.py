"""Image data sets as in-memory tensors.

Convention: images are float32 tensors of shape ``(N, C, H, W)`` with values in ``[0, 1]``;
labels are int64 class indices in ``[0, num_classes)``.

The default data set, ``digits``, is scikit-learn's 8x8 handwritten digits (1797 real images,
no download). A copy of its arrays ships as ``sturdy/digits.npz`` (45 kB; loading it takes
milliseconds, importing scikit-learn about a second per process); scikit-learn's copy stays the
source of truth and the test suite checks that both are equal. Torchvision data sets (``mnist``, ``fashion-mnist``,
``cifar10``, ``svhn``) are loaded when the ``vision`` extra is installed and the files are present; the project's
own readers of the standard files (no torchvision, uint8 images cached beside the data) are
:func:`sturdy.datasets.load_data`'s.

Example:
    >>> from sturdy.data import load_dataset
    >>> train = load_dataset("digits", split="train")
    >>> train.images.shape[1:], train.num_classes
    (torch.Size([1, 8, 8]), 10)
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from sturdy.errors import ConfigurationError, DataError, MissingDependencyError
from sturdy.validation import check_input_shape, check_int

__all__ = ["ImageDataset", "load_dataset", "available_datasets", "apply_label_noise", "MAX_IMAGE_SIDE", "SPLITS",
           "check_split", "check_side"]

MAX_IMAGE_SIDE = 4096  # largest side length ``resize`` accepts
SPLITS = ("train", "test")

DIGITS_TEST_SIZE = 497  # fixed held-out size of the digits split (1797 images in total)
DIGITS_SPLIT_SEED = 0  # the split never changes with the user's seed: results stay comparable


@dataclass(frozen=True, eq=False)
class ImageDataset(Dataset):
    """An in-memory labelled image data set.

    Attributes:
        images: float32 tensor ``(N, C, H, W)``, values in ``[0, 1]``; or uint8 pixels 0..255 (the readers of
            :mod:`sturdy.datasets` return them, memory-mapped from their cache: the training core converts them per
            batch, and :meth:`as_float` gives the ``[0, 1]`` floats an analysis takes).
        labels: int64 tensor ``(N,)``.
        num_classes: number of classes.
        name: data set name (e.g. ``"digits"``).
        split: ``"train"`` or ``"test"``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    name: str = ""
    split: str = ""

    def __post_init__(self) -> None:
        """Structural checks only (cheap): values are checked where they are used (e.g. :func:`train`)."""
        x, y = self.images, self.labels
        if (not isinstance(x, torch.Tensor) or x.ndim != 4
                or not (x.is_floating_point() or x.dtype == torch.uint8)):
            got = f"shape {tuple(x.shape)}, dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise DataError(f"ImageDataset images must be a floating-point tensor (N, C, H, W) in [0, 1] or uint8 "
                            f"pixels 0..255, got {got}")
        if (not isinstance(y, torch.Tensor) or y.ndim != 1 or y.is_floating_point() or y.is_complex()
                or y.dtype == torch.bool):
            got = f"shape {tuple(y.shape)}, dtype {y.dtype}" if isinstance(y, torch.Tensor) else type(y).__name__
            raise DataError(f"ImageDataset labels must be an integer tensor (N,) of class indices, got {got}")
        if x.shape[0] != y.shape[0]:
            raise DataError(f"ImageDataset holds {x.shape[0]} images and {y.shape[0]} labels; expected one label "
                            "per image")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise DataError(f"ImageDataset num_classes must be an integer >= 1, got {self.num_classes!r}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def as_float(self, dtype: torch.dtype = torch.float32) -> ImageDataset:
        """This data set with floating-point images in ``[0, 1]`` (uint8 pixels divided by 255; float images are
        returned as they are when already of ``dtype``)."""
        if self.images.dtype == dtype:
            return self
        images = self.images.to(dtype)
        if not self.images.is_floating_point():
            images = images.div_(255.0)
        return ImageDataset(images, self.labels, self.num_classes, self.name, self.split)

    def subset(self, indices: torch.Tensor | Sequence[int]) -> ImageDataset:
        """A new data set holding only ``indices`` (same name, split and class count)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return ImageDataset(self.images[idx], self.labels[idx], self.num_classes, self.name, self.split)

    def with_labels(self, labels: torch.Tensor) -> ImageDataset:
        """A copy with replaced labels (e.g. after label noise)."""
        if labels.shape != self.labels.shape:
            raise DataError(f"labels must have shape {tuple(self.labels.shape)}, got {tuple(labels.shape)}")
        return ImageDataset(self.images, labels.to(torch.long), self.num_classes, self.name, self.split)


def check_split(split: object) -> str:
    """``split`` if it is ``"train"`` or ``"test"``; else :class:`ConfigurationError`."""
    if split not in SPLITS:
        raise ConfigurationError(f"split must be 'train' or 'test', got {split!r}")
    return str(split)


def check_side(side: object, name: str = "resize") -> Optional[int]:
    """``None`` or a square side length in ``[1, MAX_IMAGE_SIDE]``; else :class:`ConfigurationError` naming ``name``."""
    if side is None:
        return None
    if isinstance(side, bool) or not isinstance(side, int) or not 1 <= side <= MAX_IMAGE_SIDE:
        raise ConfigurationError(f"{name} must be a positive integer side length, at most {MAX_IMAGE_SIDE} (e.g. 16 "
                                 f"or 32), got {side!r}")
    return side


def _memory_bytes() -> Optional[int]:
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):  # not available on this platform
        return None


def check_fits_in_memory(shape: Sequence[int], *, what: str, fix: str, element_bytes: int = 4) -> None:
    """Refuse to allocate a tensor of ``shape`` larger than half this machine's memory (one readable line).

    Raises:
        DataError: naming ``what`` would be allocated and how to ``fix`` it.
    """
    need = math.prod(int(s) for s in shape) * element_bytes
    have = _memory_bytes()
    if have is not None and need > have // 2:
        raise DataError(f"{what} needs {need / 2**30:.1f} GiB, more than half of this machine's memory "
                        f"({have / 2**30:.1f} GiB); {fix}")


def _resize(images: torch.Tensor, resize: Optional[int]) -> torch.Tensor:
    if resize is None:
        return images
    check_side(resize)
    if images.shape[-1] == resize and images.shape[-2] == resize:
        return images
    check_fits_in_memory((images.shape[0], images.shape[1], resize, resize),
                         what=f"resizing {images.shape[0]} images to {resize}x{resize}", fix="choose a smaller resize")
    out = F.interpolate(images, size=(resize, resize), mode="bilinear", align_corners=False)
    return out.clamp_(0.0, 1.0)


@functools.lru_cache(maxsize=1)
def digits_arrays() -> Tuple[Any, Any]:
    """scikit-learn's digits as shipped with sturdy: images ``(1797, 8, 8)`` in 0..16 and labels, uint8."""
    import numpy as np

    with resources.files("sturdy").joinpath("digits.npz").open("rb") as fh, np.load(fh) as arrays:
        return arrays["images"], arrays["labels"]


def _load_digits(split: str, root: Optional[str], download: bool, seed: int) -> ImageDataset:
    raw_images, raw_labels = digits_arrays()
    images = torch.tensor(raw_images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(raw_labels, dtype=torch.long)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    test_idx, train_idx = perm[:DIGITS_TEST_SIZE], perm[DIGITS_TEST_SIZE:]
    idx = train_idx if split == "train" else test_idx
    return ImageDataset(images[idx].contiguous(), labels[idx].contiguous(), 10, "digits", split)


def _load_synthetic(
    split: str,
    root: Optional[str],
    download: bool,
    seed: int,
    *,
    num_samples: int = 512,
    image_shape: Sequence[int] = (3, 32, 32),
    num_classes: int = 10,
) -> ImageDataset:
    shape = check_input_shape(image_shape)[1:]
    num_samples = check_int(num_samples, "num_samples (synthetic data)", low=1)
    num_classes = check_int(num_classes, "num_classes (synthetic data)", low=2)
    check_fits_in_memory((num_samples, *shape), what=f"{num_samples} synthetic images of shape {shape}",
                         fix="ask for fewer samples or smaller images")
    image_shape = shape
    gen = torch.Generator().manual_seed(seed * 2 + (0 if split == "train" else 1))
    images = torch.rand((num_samples, *image_shape), generator=gen)
    labels = torch.randint(0, num_classes, (num_samples,), generator=gen)
    return ImageDataset(images, labels, num_classes, "synthetic", split)


_VISION = {
    # name: (torchvision class name, how the split is passed, number of classes)
    "mnist": ("MNIST", "train", 10),
    "fashion-mnist": ("FashionMNIST", "train", 10),
    "cifar10": ("CIFAR10", "train", 10),
    "svhn": ("SVHN", "split", 10),
}


def _load_vision(name: str) -> Callable[..., ImageDataset]:
    def load(split: str, root: Optional[str], download: bool, seed: int) -> ImageDataset:
        if importlib.util.find_spec("torchvision") is None:
            raise MissingDependencyError(
                f"data set {name!r} needs torchvision: install it with `pip install 'sturdy[vision]'` "
                "(or `pip install torchvision`), or use the embedded data set 'digits'"
            )
        import torchvision

        cls_name, split_kind, num_classes = _VISION[name]
        folder = Path(root) if root is not None else Path("data")
        kwargs = {"train": split == "train"} if split_kind == "train" else {"split": split}
        try:
            ds = getattr(torchvision.datasets, cls_name)(str(folder), download=download, **kwargs)
        except RuntimeError as exc:  # torchvision's "Dataset not found or corrupted"; its own words are kept
            raise DataError(
                f"data set {name!r} ({split}) could not be read from {str(folder)!r} ({exc}): put the torchvision "
                f"files there (root=... / --data-root DIR) or pass download=True (--download) on a machine with "
                f"internet"
            ) from exc
        data = torch.as_tensor(ds.data)
        if data.ndim == 3:  # (N, H, W) grayscale
            data = data.unsqueeze(1)
        elif data.shape[-1] in (1, 3):  # (N, H, W, C)
            data = data.permute(0, 3, 1, 2)
        labels = torch.as_tensor(getattr(ds, "targets", getattr(ds, "labels", None)), dtype=torch.long)
        images = data.to(torch.float32) / 255.0
        return ImageDataset(images.contiguous(), labels, num_classes, name, split)

    return load


_LOADERS: dict = {"digits": _load_digits, "synthetic": _load_synthetic}
_LOADERS.update({name: _load_vision(name) for name in _VISION})


def available_datasets() -> Tuple[str, ...]:
    """Names accepted by :func:`load_dataset`."""
    return tuple(_LOADERS)


def load_dataset(
    name: str = "digits",
    *,
    split: str = "train",
    root: Optional[str] = None,
    download: bool = False,
    resize: Optional[int] = None,
    seed: int = 0,
    **kwargs: object,
) -> ImageDataset:
    """Load a labelled image data set into memory.

    Args:
        name: one of :func:`available_datasets` (``"digits"`` is embedded; ``"synthetic"`` is random
            images, seeded, with ``num_samples``, ``image_shape`` and ``num_classes`` keywords).
        split: ``"train"`` or ``"test"``. The digits split is fixed (1300 train / 497 test).
        root: folder holding torchvision data files (default ``./data``).
        download: let torchvision download missing files (needs internet).
        resize: optional square side length; images are bilinearly resized (e.g. 8 -> 16 or 32).
        seed: seed of the synthetic data set.

    Returns:
        An :class:`ImageDataset` with images in ``[0, 1]``, shape ``(N, C, H, W)``.

    Raises:
        DataError: unknown name or files missing. MissingDependencyError: torchvision needed.
    """
    key = name.lower() if isinstance(name, str) else name
    if not isinstance(key, str) or key not in _LOADERS:
        raise DataError(f"unknown data set {name!r}; known data sets: {', '.join(available_datasets())}")
    check_split(split)
    check_side(resize)
    if kwargs and key != "synthetic":
        raise ConfigurationError(f"data set {key!r} takes no option(s) {', '.join(sorted(kwargs))}; only 'synthetic' "
                                 "takes num_samples, image_shape and num_classes")
    ds = _LOADERS[key](split, root, download, seed, **kwargs)
    if resize is not None:
        ds = ImageDataset(_resize(ds.images, resize), ds.labels, ds.num_classes, ds.name, ds.split)
    return ds


def apply_label_noise(labels: torch.Tensor, *, fraction: float, num_classes: int, seed: int) -> torch.Tensor:
    """Replace exactly ``round(fraction * N)`` labels by a different, uniformly random class.

    The corrupted positions and their new labels depend only on ``seed``, so the same noisy
    data set is produced on every run and on every worker.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ConfigurationError(f"label noise fraction must lie in [0, 1], got {fraction}")
    n = int(labels.shape[0])
    count = int(round(fraction * n))
    if count == 0:
        return labels.clone()
    gen = torch.Generator().manual_seed(seed + 7919)
    idx = torch.randperm(n, generator=gen)[:count]
    shift = torch.randint(1, num_classes, (count,), generator=gen)
    noisy = labels.clone()
    noisy[idx] = (labels[idx] + shift) % num_classes
    return noisy
