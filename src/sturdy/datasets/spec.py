"""The data source of every command: one spec string, parsed once, read by one reader.

``digits`` and ``synthetic`` are built in; ``npz:FILE``, ``folder:DIR``, ``cifar10:DIR``, ``cifar100:DIR``,
``mnist:DIR``, ``fashion-mnist:DIR`` and ``svhn:DIR`` read the user's files (modules of :mod:`sturdy.datasets`).
A downloadable kind written without a folder (``cifar10``) reads ``root_hint`` (the command's data folder).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Union

from sturdy.data import ImageDataset, load_dataset
from sturdy.datasets._common import check_image_size, check_limit, check_split, limit_indices
from sturdy.datasets.cifar import read_cifar
from sturdy.datasets.fetch import ARCHIVES
from sturdy.datasets.folder import read_image_folder
from sturdy.datasets.idx import read_idx_dataset
from sturdy.datasets.npz import read_npz
from sturdy.datasets.svhn import read_svhn
from sturdy.errors import ConfigurationError, DataError

__all__ = ["DataSpec", "DATA_KINDS", "BUILTIN_KINDS", "READERS", "parse_data_spec", "load_data"]

Reader = Callable[..., ImageDataset]

BUILTIN_KINDS = ("digits", "synthetic")
READERS: Dict[str, Reader] = {
    "npz": read_npz,
    "folder": read_image_folder,
    "cifar10": functools.partial(read_cifar, kind="cifar10"),
    "cifar100": functools.partial(read_cifar, kind="cifar100"),
    "mnist": functools.partial(read_idx_dataset, kind="mnist"),
    "fashion-mnist": functools.partial(read_idx_dataset, kind="fashion-mnist"),
    "svhn": read_svhn,
}
DATA_KINDS = BUILTIN_KINDS + tuple(READERS)
_ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "cifar-10": "cifar10",
            "cifar-100": "cifar100"}
_FORMS = "digits, synthetic, npz:FILE, folder:DIR, cifar10:DIR, cifar100:DIR, mnist:DIR, fashion-mnist:DIR, svhn:DIR"


@dataclass(frozen=True)
class DataSpec:
    """A parsed data spec: the ``kind`` and, for files, the ``path`` read."""

    kind: str
    path: Optional[Path] = None

    def __str__(self) -> str:
        return self.kind if self.path is None else f"{self.kind}:{self.path}"


def _placeholder(kind: str) -> str:
    return "FILE" if kind == "npz" else "DIR"


def _checked_path(kind: str, text: str) -> Path:
    path = Path(text).expanduser()
    hint = " (--download fetches it where there is internet)" if kind in ARCHIVES else ""
    if not path.exists():
        raise DataError(f"data {kind}:{text}: {str(path)!r} does not exist{hint}")
    if kind == "npz" and not path.is_file():
        raise DataError(f"data npz:{text}: {str(path)!r} is not a file; expected an .npz file")
    if kind != "npz" and not path.is_dir():
        raise DataError(f"data {kind}:{text}: {str(path)!r} is not a folder")
    return path


def parse_data_spec(spec: Union[str, DataSpec], *, root_hint: Union[str, os.PathLike, None] = None) -> DataSpec:
    """Parse a data spec (see the module docstring); the path must exist.

    Raises:
        ConfigurationError: an empty spec, a path given to a built-in kind, or a file kind without a path.
        DataError: an unknown kind, or a path that does not exist (or is a file where a folder is expected, or the
            other way round).
    """
    if isinstance(spec, DataSpec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigurationError(f"the data spec is empty or not text ({spec!r}); give one of {_FORMS}")
    head, sep, text = spec.strip().partition(":")
    kind = _ALIASES.get(head.lower(), head.lower())
    if kind not in DATA_KINDS:
        raise DataError(f"unknown data {head!r} in {spec!r}; known: {_FORMS}")
    if kind in BUILTIN_KINDS:
        if sep:
            raise ConfigurationError(f"data {kind!r} is built in and takes no path; write {kind} (got {spec!r})")
        return DataSpec(kind)
    if not text.strip():
        if sep or root_hint is None or kind not in ARCHIVES:
            raise ConfigurationError(f"data {kind!r} needs a path: write {kind}:{_placeholder(kind)} (got {spec!r})")
        text = os.fspath(root_hint)
    return DataSpec(kind, _checked_path(kind, text.strip()))


def load_data(spec: Union[str, DataSpec], *, split: str, image_size: Optional[int] = None,
              limit: Optional[int] = None, root_hint: Union[str, os.PathLike, None] = None) -> ImageDataset:
    """The data set a spec names, one split of it.

    Args:
        spec: ``digits | synthetic | npz:FILE | folder:DIR | cifar10:DIR | cifar100:DIR | mnist:DIR |
            fashion-mnist:DIR | svhn:DIR`` (or a parsed :class:`DataSpec`).
        split: ``"train"`` or ``"test"``.
        image_size: resize every image to ``image_size x image_size`` (bilinear).
        limit: keep at most this many images: a fixed random subset (the same on every run), in file order.
        root_hint: the folder a downloadable kind written without one reads (``cifar10`` = ``cifar10:ROOT_HINT``).

    Returns:
        An :class:`~sturdy.data.ImageDataset` named after the kind, with ``split`` set. The files' readers return
        uint8 images 0..255 (memory-mapped from the cache beside the data after the first run; the training core
        converts them per batch, :meth:`~sturdy.data.ImageDataset.as_float` gives ``[0, 1]``); ``digits``,
        ``synthetic`` and ``.npz`` files of floats give float32 images in ``[0, 1]``.

    Raises:
        ConfigurationError: a malformed spec, split, image size or limit.
        DataError: an unknown kind, missing or malformed files, labels out of range.
    """
    split = check_split(split)
    image_size = check_image_size(image_size)
    limit = check_limit(limit)
    parsed = parse_data_spec(spec, root_hint=root_hint)
    if parsed.kind in BUILTIN_KINDS:
        data = load_dataset(parsed.kind, split=split, resize=image_size)
        keep = limit_indices(len(data), limit)
        return data if keep is None else data.subset(keep.tolist())
    return READERS[parsed.kind](parsed.path, split=split, limit=limit, image_size=image_size)
