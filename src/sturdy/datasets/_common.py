"""What every reader shares: the split, ``limit`` and ``image_size`` settings, label checks, turning decoded arrays
into an :class:`~sturdy.data.ImageDataset`, and finding a file among a few usual names."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from sturdy.data import SPLITS, ImageDataset, check_fits_in_memory, check_side, check_split
from sturdy.errors import ConfigurationError, DataError

__all__ = ["SPLITS", "LIMIT_SEED", "check_split", "check_limit", "check_image_size", "check_labels_in_range",
           "find_file", "to_dataset", "resize_uint8", "limit_indices"]

LIMIT_SEED = 0  # ``limit`` keeps a fixed random subset: the same images on every run, whatever the user's seed
RESIZE_CHUNK = 1024  # images resized per interpolation call (bounds the float32 working memory)


def check_limit(limit: object) -> Optional[int]:
    """``None`` or a positive integer count of images; else :class:`ConfigurationError`."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ConfigurationError(f"limit must be a positive number of images (e.g. 1000), got {limit!r}")
    return limit


def check_image_size(image_size: object) -> Optional[int]:
    """``None`` or a square side length in ``[1, MAX_IMAGE_SIDE]`` (:func:`sturdy.data.check_side`)."""
    return check_side(image_size, "image size")


def check_labels_in_range(labels: np.ndarray, num_classes: int, *, where: str) -> None:
    """Refuse labels outside ``[0, num_classes)`` with one line naming ``where`` they come from."""
    if labels.size == 0:
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise DataError(f"{where} holds label {bad}, outside 0..{num_classes - 1} ({num_classes} classes)")


def find_file(folders: Sequence[Path], names: Iterable[str], *, what: str) -> Path:
    """The first existing ``folder / name`` (folders in order, then names); else :class:`DataError` listing them."""
    names = tuple(names)
    for folder in folders:
        for name in names:
            if (folder / name).is_file():
                return folder / name
    where = ", ".join(str(f) for f in folders)
    raise DataError(f"no {what} found: looked for {' or '.join(names)} in {where}")


def limit_indices(n: int, limit: Optional[int]) -> Optional[np.ndarray]:
    """Sorted indices of a fixed random subset of ``limit`` of ``n`` items (seeded by :data:`LIMIT_SEED`), or
    ``None`` when all are kept."""
    if limit is None or limit >= n:
        return None
    gen = torch.Generator().manual_seed(LIMIT_SEED)
    return np.sort(torch.randperm(n, generator=gen)[:limit].numpy())


def resize_uint8(images: torch.Tensor, side: int) -> torch.Tensor:
    """uint8 images ``(N, C, H, W)`` resized to ``side x side`` (bilinear, like :func:`sturdy.data.load_dataset`'s
    ``resize``), rounded back to uint8, a chunk of images at a time."""
    if images.shape[-2:] == (side, side):
        return images
    check_fits_in_memory((images.shape[0], images.shape[1], side, side), element_bytes=1,
                         what=f"resizing {images.shape[0]} images to {side}x{side}",
                         fix="choose a smaller image size or a limit")
    out = torch.empty((images.shape[0], images.shape[1], side, side), dtype=torch.uint8)
    for start in range(0, images.shape[0], RESIZE_CHUNK):
        chunk = images[start:start + RESIZE_CHUNK].to(torch.float32)
        small = F.interpolate(chunk, size=(side, side), mode="bilinear", align_corners=False)
        out[start:start + RESIZE_CHUNK] = small.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _tensor(array: Any) -> torch.Tensor:
    if not array.flags.writeable:  # e.g. decoded from a bytes object; caches are mapped copy-on-write (writable)
        array = np.array(array)
    return torch.from_numpy(array)


def to_dataset(images: np.ndarray, labels: np.ndarray, *, num_classes: int, name: str, split: str,
               limit: Optional[int] = None, image_size: Optional[int] = None) -> ImageDataset:
    """An :class:`ImageDataset` over decoded ``images`` (uint8 or float ``(N, C, H, W)``, kept as they are: a
    memory-mapped cache stays mapped) and ``labels``, cut to ``limit`` images (a fixed random subset, in file order)
    and resized to ``image_size``."""
    keep = limit_indices(int(images.shape[0]), limit)
    if keep is not None:
        images, labels = images[keep], labels[keep]
    x = _tensor(images)
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    if image_size is not None:
        x = resize_uint8(x, image_size) if x.dtype == torch.uint8 else _resize_float(x, image_size)
    return ImageDataset(x, y, num_classes, name, split)


def _resize_float(images: torch.Tensor, side: int) -> torch.Tensor:
    if images.shape[-2:] == (side, side):
        return images
    return F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
