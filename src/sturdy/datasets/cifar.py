"""CIFAR-10 and CIFAR-100, binary version (the archives ``cifar-10-binary.tar.gz`` and ``cifar-100-binary.tar.gz``).

Each file is a run of fixed-size records: CIFAR-10 one label byte, CIFAR-100 a coarse then a fine label byte (the
fine label, 100 classes, is used), then 3072 pixel bytes, the red, green and blue 32x32 planes in row-major order.
CIFAR-10 splits its training set over ``data_batch_1.bin`` .. ``data_batch_5.bin`` and its test set is
``test_batch.bin``; CIFAR-100 has ``train.bin`` and ``test.bin``. The files are looked for in ``DIR`` and in the
folder the archive unpacks to (``cifar-10-batches-bin``, ``cifar-100-binary``).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from sturdy.data import ImageDataset
from sturdy.datasets._common import check_labels_in_range, find_file, to_dataset
from sturdy.datasets.cache import cached_arrays, fingerprint
from sturdy.errors import DataError

__all__ = ["read_cifar", "CIFAR_LAYOUT", "IMAGE_BYTES"]

IMAGE_BYTES = 3 * 32 * 32

# kind: (unpacked folder, training files, test files, label bytes per record, label byte used, classes)
CIFAR_LAYOUT = {
    "cifar10": ("cifar-10-batches-bin", tuple(f"data_batch_{i}.bin" for i in range(1, 6)), ("test_batch.bin",),
                1, 0, 10),
    "cifar100": ("cifar-100-binary", ("train.bin",), ("test.bin",), 2, 1, 100),
}


def _files(kind: str, root: Path, split: str) -> List[Path]:
    unpacked, train, test, *_ = CIFAR_LAYOUT[kind]
    folders = [root, root / unpacked]
    if (root / "cifar-10-batches-py").is_dir() and not any((f / train[0]).is_file() for f in folders):
        raise DataError(f"{root} holds torchvision's pickled CIFAR-10 (cifar-10-batches-py); sturdy reads the binary "
                        "version (cifar-10-binary.tar.gz): download it (--download) into this folder")
    return [find_file(folders, [name], what=f"{kind} {split} file") for name in (train if split == "train" else test)]


def _decode(kind: str, files: List[Path]) -> Tuple[np.ndarray, np.ndarray]:
    *_, label_bytes, label_at, classes = CIFAR_LAYOUT[kind]
    record = label_bytes + IMAGE_BYTES
    images, labels = [], []
    for path in files:
        raw = np.fromfile(path, dtype=np.uint8)
        if raw.size == 0 or raw.size % record:
            raise DataError(f"{path} is not a {kind} binary file: {raw.size} bytes is not a whole number of "
                            f"{record}-byte records ({label_bytes} label byte(s) + {IMAGE_BYTES} pixels)")
        rows = raw.reshape(-1, record)
        label = rows[:, label_at].astype(np.int64)
        check_labels_in_range(label, classes, where=str(path))
        labels.append(label)
        images.append(rows[:, label_bytes:].reshape(-1, 3, 32, 32))
    return np.concatenate(images), np.concatenate(labels)


def read_cifar(root: Path, *, kind: str = "cifar10", split: str = "train", limit: Optional[int] = None,
               image_size: Optional[int] = None) -> ImageDataset:
    """CIFAR-10 (``kind="cifar10"``) or CIFAR-100 (``"cifar100"``, fine labels) from the binary files in ``root``.

    Returns:
        uint8 images ``(N, 3, 32, 32)`` (memory-mapped from the cache after the first run; see
        :mod:`sturdy.datasets.cache`), ``name`` the kind.

    Raises:
        DataError: a file missing, not a whole number of records, or a label out of range (the file is named).
    """
    root = Path(root)
    files = _files(kind, root, split)
    images, labels = cached_arrays(files[0].parent, f"{kind}-{split}", fingerprint(files),
                                   lambda: _decode(kind, files))
    return to_dataset(images, labels, num_classes=CIFAR_LAYOUT[kind][5], name=kind, split=split, limit=limit,
                      image_size=image_size)
