"""MNIST and Fashion-MNIST: IDX files, gzipped or not.

An IDX file starts with a big-endian magic number: two zero bytes, a type byte (``0x08``: unsigned bytes, the only
type these data sets use) and the number of dimensions; then one big-endian uint32 per dimension, then the values
in row-major order. Images are ``idx3`` (magic 2051: count, rows, columns), labels ``idx1`` (magic 2049: count).
The files ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
``t10k-labels-idx1-ubyte`` (each also as ``.gz``, or spelled with a dot before ``idx``) are looked for in ``DIR``
and in torchvision's folders ``DIR/MNIST/raw`` and ``DIR/FashionMNIST/raw``.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from sturdy.data import ImageDataset
from sturdy.datasets._common import check_labels_in_range, find_file, to_dataset
from sturdy.datasets.cache import cached_arrays, fingerprint
from sturdy.errors import DataError

__all__ = ["read_idx", "read_idx_dataset", "IDX_IMAGES_MAGIC", "IDX_LABELS_MAGIC"]

IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
_UBYTE = 0x08
_TORCHVISION_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


def read_idx(path: Path, *, magic: Optional[int] = None) -> np.ndarray:
    """The uint8 array of an IDX file (``.gz`` read through gzip), checked against ``magic`` when given.

    Raises:
        DataError: a wrong magic number, a value type other than unsigned bytes, or a size that does not match the
            header (the file is named).
    """
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path} could not be read as an IDX file: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path} is not an IDX file (it does not start with two zero bytes)")
    found, ndim = struct.unpack(">I", raw[:4])[0], raw[3]
    if magic is not None and found != magic:
        raise DataError(f"{path} has IDX magic number {found}; expected {magic}")
    if raw[2] != _UBYTE:
        raise DataError(f"{path} holds IDX values of type 0x{raw[2]:02x}; expected unsigned bytes (0x08)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is shorter than its IDX header ({len(raw)} bytes)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) - header != int(np.prod(shape, dtype=np.int64)):
        raise DataError(f"{path} holds {len(raw) - header} values after its header; the header says shape {shape}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _candidates(prefix: str, what: str) -> List[str]:
    names = [f"{prefix}-{what}", f"{prefix}-{what.replace('-', '.', 1)}"]
    return [n + gz for n in names for gz in ("", ".gz")]


def _decode(images_path: Path, labels_path: Path) -> Tuple[np.ndarray, np.ndarray]:
    images = read_idx(images_path, magic=IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, magic=IDX_LABELS_MAGIC).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{images_path} holds {images.shape[0]} images and {labels_path} {labels.shape[0]} labels; "
                        "expected one label per image")
    check_labels_in_range(labels, 10, where=str(labels_path))
    return images[:, None], labels


def read_idx_dataset(root: Path, *, kind: str = "mnist", split: str = "train", limit: Optional[int] = None,
                     image_size: Optional[int] = None) -> ImageDataset:
    """MNIST (``kind="mnist"``) or Fashion-MNIST (``"fashion-mnist"``) from the IDX files in ``root``.

    Returns:
        uint8 images ``(N, 1, 28, 28)`` (memory-mapped from the cache after the first run), 10 classes.

    Raises:
        DataError: a file missing or malformed, or a label out of range (the file is named).
    """
    root = Path(root)
    folders = [root, root / _TORCHVISION_FOLDERS.get(kind, "MNIST") / "raw"]
    prefix = "train" if split == "train" else "t10k"
    images_path = find_file(folders, _candidates(prefix, "images-idx3-ubyte"), what=f"{kind} {split} images")
    labels_path = find_file(folders, _candidates(prefix, "labels-idx1-ubyte"), what=f"{kind} {split} labels")
    images, labels = cached_arrays(images_path.parent, f"{kind}-{split}", fingerprint([images_path, labels_path]),
                                   lambda: _decode(images_path, labels_path))
    return to_dataset(images, labels, num_classes=10, name=kind, split=split, limit=limit, image_size=image_size)
