"""The project's own readers of the standard image data formats (no torchvision), one spec for every command.

:func:`load_data` reads ``digits | synthetic | npz:FILE | folder:DIR | cifar10:DIR | cifar100:DIR | mnist:DIR |
fashion-mnist:DIR | svhn:DIR`` (:mod:`.spec`); each format has its reader: :mod:`.cifar` (binary version),
:mod:`.idx` (MNIST and Fashion-MNIST, gzipped or not), :mod:`.svhn` (``.mat``), :mod:`.folder` (one folder per
class, Pillow) and :mod:`.npz`. Decoded images are cached as uint8 ``.npy`` beside the data and memory-mapped on
later runs (:mod:`.cache`); :func:`download` fetches the official files and checks their published checksums
(:mod:`.fetch`). Every reader returns an :class:`~sturdy.data.ImageDataset` with ``name`` and ``split`` set, and
takes ``limit`` and ``image_size``. Errors follow the rule of :mod:`sturdy.errors`: the data (missing or malformed
files, labels out of range) raises :class:`~sturdy.errors.DataError`, a setting (a malformed spec, a split, a
limit) :class:`~sturdy.errors.ConfigurationError`.

Example:
    >>> from sturdy.datasets import load_data
    >>> data = load_data("digits", split="test", limit=100)
    >>> len(data), data.name, data.split
    (100, 'digits', 'test')
"""

from sturdy.datasets.cifar import read_cifar
from sturdy.datasets.fetch import ARCHIVES, Archive, download
from sturdy.datasets.folder import read_image_folder
from sturdy.datasets.idx import read_idx, read_idx_dataset
from sturdy.datasets.npz import read_npz
from sturdy.datasets.spec import DATA_KINDS, DataSpec, load_data, parse_data_spec
from sturdy.datasets.svhn import read_svhn

__all__ = [
    "load_data",
    "parse_data_spec",
    "DataSpec",
    "DATA_KINDS",
    "download",
    "Archive",
    "ARCHIVES",
    "read_cifar",
    "read_idx",
    "read_idx_dataset",
    "read_svhn",
    "read_image_folder",
    "read_npz",
]
