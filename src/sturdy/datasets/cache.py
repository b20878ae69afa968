"""The decoded-array cache: a reader's images as a uint8 ``.npy`` next to the data, memory-mapped on later runs.

For a source read under the cache key ``KEY`` (e.g. ``cifar10-train``) the folder ``.sturdy-cache/`` beside the
data holds ``KEY.images.npy`` (uint8 ``(N, C, H, W)``), ``KEY.labels.npy`` (int64 ``(N,)``) and ``KEY.json``: the
cache format version, a fingerprint of the source files (names, sizes, modification times) and of the reader's
settings, and the two arrays' shapes. Every file is written atomically (temporary file, then rename), the
description last, so a run killed half-way leaves no cache that looks complete. A cache whose description, shapes
or dtypes do not match (the source changed, a file was damaged) is decoded again and replaced. A folder that cannot
be written to (read-only data) is read without a cache, silently.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple

import numpy as np

from sturdy.utils import atomic_write_bytes, atomic_writer

__all__ = ["CACHE_DIR", "CACHE_VERSION", "fingerprint", "cached_arrays", "cache_files", "load_cached", "save_cached"]

CACHE_DIR = ".sturdy-cache"
CACHE_VERSION = 1  # raised when the layout of the cached arrays changes: older caches are rebuilt

Arrays = Tuple[np.ndarray, np.ndarray]


def fingerprint(sources: Sequence[Path], settings: Optional[Mapping[str, Any]] = None, *,
                base: Optional[Path] = None) -> str:
    """sha256 over the source files' names (relative to ``base`` when given), sizes and modification times and the
    reader's ``settings``."""
    digest = hashlib.sha256()
    for path in sources:
        st = path.stat()
        name = path.relative_to(base).as_posix() if base is not None else path.name
        digest.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    digest.update(json.dumps(dict(settings or {}), sort_keys=True).encode())
    return digest.hexdigest()


def cache_files(folder: Path, key: str) -> Tuple[Path, Path, Path]:
    """The images, labels and description files of cache ``key`` beside the data in ``folder``."""
    cache = Path(folder) / CACHE_DIR
    return cache / f"{key}.images.npy", cache / f"{key}.labels.npy", cache / f"{key}.json"


def load_cached(folder: Path, key: str, print_: str) -> Optional[Arrays]:
    """The arrays of cache ``key`` when its description matches ``print_`` and the files agree with it, else
    ``None``; images memory-mapped copy-on-write (changing them never writes to the file)."""
    images_path, labels_path, meta_path = cache_files(folder, key)
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("version") != CACHE_VERSION or meta.get("fingerprint") != print_:
            return None
        images = np.load(images_path, mmap_mode="c", allow_pickle=False)  # copy-on-write: never written back
        labels = np.load(labels_path, allow_pickle=False)
    except (OSError, ValueError, TypeError, AttributeError):  # missing, damaged or foreign files: rebuild
        return None
    if (images.dtype != np.uint8 or labels.dtype != np.int64 or list(images.shape) != meta.get("images")
            or list(labels.shape) != meta.get("labels") or images.ndim != 4 or labels.shape[:1] != images.shape[:1]):
        return None
    return images, labels


def save_cached(folder: Path, key: str, print_: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Write cache ``key`` (atomically, the description last); a folder that cannot be written to is skipped."""
    images_path, labels_path, meta_path = cache_files(folder, key)
    meta = {"version": CACHE_VERSION, "fingerprint": print_, "images": list(images.shape),
            "labels": list(labels.shape)}
    try:
        for path, array in ((images_path, images), (labels_path, labels)):
            with atomic_writer(path) as fh:
                np.save(fh, array, allow_pickle=False)
        atomic_write_bytes(meta_path, json.dumps(meta).encode())
    except OSError:  # a read-only or full data folder: the data is read without a cache
        return


def cached_arrays(folder: Path, key: str, print_: str, decode: Callable[[], Arrays]) -> Arrays:
    """The arrays of cache ``key`` in ``folder``: memory-mapped from the cache when it matches the fingerprint
    ``print_``, else ``decode()``d (uint8 images ``(N, C, H, W)``, labels ``(N,)``) and cached for the next run."""
    found = load_cached(folder, key, print_)
    if found is not None:
        return found
    images, labels = decode()
    images = np.ascontiguousarray(images, dtype=np.uint8)
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    save_cached(folder, key, print_, images, labels)
    return images, labels
