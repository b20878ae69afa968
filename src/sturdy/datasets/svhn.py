"""SVHN, cropped digits: ``train_32x32.mat`` and ``test_32x32.mat`` (MATLAB files, read with SciPy).

Each file holds ``X``, uint8 ``(32, 32, 3, N)``, and ``y``, ``(N, 1)`` labels 1..10 where 10 stands for the digit 0
(so labels become 0..9, the digit shown).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from sturdy.data import ImageDataset
from sturdy.datasets._common import find_file, to_dataset
from sturdy.datasets.cache import cached_arrays, fingerprint
from sturdy.errors import DataError, MissingDependencyError

__all__ = ["read_svhn", "SVHN_FILES"]

SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}


def _loadmat(path: Path) -> dict:
    try:
        from scipy.io import loadmat
    except ImportError as exc:  # pragma: no cover - scikit-learn installs SciPy
        raise MissingDependencyError("reading SVHN's .mat files needs SciPy: pip install scipy") from exc
    try:
        return dict(loadmat(str(path)))
    except (OSError, ValueError, TypeError, NotImplementedError) as exc:
        raise DataError(f"{path} could not be read as a MATLAB file: {exc}") from exc


def _decode(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    mat = _loadmat(path)
    if "X" not in mat or "y" not in mat:
        raise DataError(f"{path} holds no SVHN arrays 'X' and 'y' (it holds {sorted(k for k in mat if k[0] != '_')})")
    x, y = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1)
    if x.ndim != 4 or x.shape[2] != 3 or x.dtype != np.uint8:
        raise DataError(f"{path}: 'X' has shape {x.shape} and dtype {x.dtype}; expected uint8 (32, 32, 3, N)")
    if x.shape[3] != y.shape[0]:
        raise DataError(f"{path} holds {x.shape[3]} images and {y.shape[0]} labels; expected one label per image")
    labels = y.astype(np.int64)
    if labels.size and (labels.min() < 1 or labels.max() > 10):
        bad = int(labels.min()) if labels.min() < 1 else int(labels.max())
        raise DataError(f"{path} holds label {bad}, outside SVHN's 1..10 (10 stands for the digit 0)")
    labels[labels == 10] = 0
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), labels


def read_svhn(root: Path, *, split: str = "train", limit: Optional[int] = None,
              image_size: Optional[int] = None) -> ImageDataset:
    """SVHN from ``root/train_32x32.mat`` or ``root/test_32x32.mat``.

    Returns:
        uint8 images ``(N, 3, 32, 32)`` (memory-mapped from the cache after the first run), labels 0..9.

    Raises:
        DataError: the file missing or not an SVHN file, or a label outside 1..10.
    """
    path = find_file([Path(root)], [SVHN_FILES[split]], what=f"svhn {split} file")
    images, labels = cached_arrays(path.parent, f"svhn-{split}", fingerprint([path]), lambda: _decode(path))
    return to_dataset(images, labels, num_classes=10, name="svhn", split=split, limit=limit, image_size=image_size)
