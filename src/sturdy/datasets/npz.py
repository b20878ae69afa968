"""A NumPy ``.npz`` file holding ``images`` and ``labels``.

``images``: ``(N, H, W)`` (one channel), ``(N, C, H, W)`` or ``(N, H, W, C)`` with ``C`` in 1, 3 or 4 (the layout is
told by which axis has such a length; ``(N, C, H, W)`` wins a tie), either uint8 pixels 0..255 or floating-point
values in ``[0, 1]``. ``labels``: ``(N,)`` non-negative integers. An optional scalar ``num_classes`` sets the class
count (labels must lie below it); otherwise it is the largest label plus one. A file holding ``train_images`` /
``train_labels`` and ``test_images`` / ``test_labels`` instead gives one array pair per split.

uint8 images are cached as a ``.npy`` beside the file and memory-mapped on later runs; floating-point images are
kept as float32, exactly (not rounded to 256 levels). Arrays are read with ``allow_pickle=False``: a data file
cannot run code.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Optional, Tuple, cast

import numpy as np

from sturdy.data import ImageDataset
from sturdy.datasets._common import check_labels_in_range, to_dataset
from sturdy.datasets.cache import fingerprint, load_cached, save_cached
from sturdy.errors import DataError

__all__ = ["read_npz", "to_nchw"]

_CHANNELS = (1, 3, 4)


def to_nchw(images: np.ndarray, *, where: str) -> np.ndarray:
    """``images`` as ``(N, C, H, W)`` (see the module docstring for the layouts read).

    Raises:
        DataError: not 3- or 4-dimensional, no channel axis of length 1, 3 or 4, or neither uint8 nor floating point.
    """
    if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
        raise DataError(f"{where} 'images' have dtype {images.dtype}; expected uint8 pixels 0..255 or floating-point "
                        "values in [0, 1]")
    if images.ndim == 3:
        return images[:, None]
    if images.ndim != 4:
        raise DataError(f"{where} 'images' have shape {images.shape}; expected (N, H, W), (N, C, H, W) or "
                        "(N, H, W, C)")
    if images.shape[1] in _CHANNELS:
        return images
    if images.shape[3] in _CHANNELS:
        return images.transpose(0, 3, 1, 2)
    raise DataError(f"{where} 'images' have shape {images.shape}: no channel axis of length 1, 3 or 4 at position 1 "
                    "(N, C, H, W) or 3 (N, H, W, C)")


def _load(path: Path, split: str, *, with_images: bool) -> Tuple[Optional[np.ndarray], np.ndarray, Optional[int]]:
    """``images`` (only ``with_images``: the labels alone are cheap to read), ``labels`` and ``num_classes``."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            prefix = "" if {"images", "labels"} & keys else f"{split}_"
            for name in ("images", "labels"):
                if prefix + name not in keys:
                    raise DataError(f"{path} holds no {prefix + name!r} array (it holds {sorted(keys) or 'nothing'}); "
                                    "expected 'images' and 'labels'")
            count = _count(npz["num_classes"], path) if "num_classes" in keys else None
            images = npz[prefix + "images"] if with_images else None
            return images, npz[prefix + "labels"], count
    except DataError:  # a ValueError: the checks above already name the file
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path} could not be read as an .npz file: {exc}") from exc


def _count(value: np.ndarray, path: Path) -> int:
    if value.ndim != 0 or not np.issubdtype(value.dtype, np.integer) or int(value) < 1:
        raise DataError(f"{path}: 'num_classes' must be one positive integer, got {value!r}")
    return int(value)


def _check_labels(path: Path, labels: np.ndarray, num_classes: Optional[int]) -> Tuple[np.ndarray, int]:
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path} 'labels' have shape {labels.shape} and dtype {labels.dtype}; expected integer class "
                        "indices (N,)")
    if labels.shape[0] == 0:
        raise DataError(f"{path} holds no labels (and so no images)")
    labels = labels.astype(np.int64)
    if num_classes is None:
        num_classes = max(int(labels.max()) + 1, 2)  # a negative label is refused below, as any other
    check_labels_in_range(labels, num_classes, where=f"{path} 'labels'")
    return labels, num_classes


def _check_images(path: Path, images: np.ndarray, count: int) -> np.ndarray:
    images = to_nchw(images, where=str(path))
    if images.shape[0] != count:
        raise DataError(f"{path} holds {images.shape[0]} images and {count} labels; expected one label per image")
    if 0 in images.shape[2:]:
        raise DataError(f"{path} 'images' have shape {images.shape} (N, C, H, W): images of no pixels")
    if images.dtype == np.uint8:
        return images
    if not (np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1):
        raise DataError(f"{path} 'images' are floating point with values outside [0, 1] (or NaN/inf); scale them to "
                        "[0, 1] or store uint8 pixels 0..255")
    return np.ascontiguousarray(images, dtype=np.float32)


def read_npz(path: Path, *, split: str = "train", limit: Optional[int] = None,
             image_size: Optional[int] = None) -> ImageDataset:
    """The images and labels of an ``.npz`` file (see the module docstring).

    Raises:
        DataError: the file unreadable, without ``images`` or ``labels``, of an unreadable layout, labels negative or
            not below ``num_classes``, or float images outside ``[0, 1]``.
    """
    path = Path(path)
    _, raw_labels, num_classes = _load(path, split, with_images=False)
    labels, num_classes = _check_labels(path, raw_labels, num_classes)
    key, print_ = f"npz-{path.stem}-{split}", fingerprint([path], {"split": split})
    cached = load_cached(path.parent, key, print_)
    if cached is not None and cached[1].shape == labels.shape:
        images = cached[0]
    else:
        raw_images = cast(np.ndarray, _load(path, split, with_images=True)[0])
        images = _check_images(path, raw_images, labels.shape[0])
        if images.dtype == np.uint8:
            save_cached(path.parent, key, print_, np.ascontiguousarray(images), labels)
    return to_dataset(images, labels, num_classes=num_classes, name="npz", split=split, limit=limit,
                      image_size=image_size)
