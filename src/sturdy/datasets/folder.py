"""An image folder: ``DIR/<class>/<image>``, one folder per class (Pillow reads the images).

Classes are the sub-folders' names in sorted order (label ``i`` is the ``i``-th name); images are the files with an
image extension below each class folder (any depth), in sorted order; hidden files and folders are skipped. When
``DIR`` holds a ``train`` or a ``test`` (or ``val``) folder, the split reads ``DIR/train`` or ``DIR/test``
(``DIR/val`` when there is no ``DIR/test``); otherwise every split reads ``DIR`` itself.

Images are grayscale (one channel) when all of them are, else RGB (three channels; alpha is dropped). All images
must have one size unless ``image_size`` is given: then each is resized to ``image_size x image_size`` with
Pillow's bilinear filter as it is read. A folder with no images, images of mixed sizes without ``image_size``, or a
file Pillow cannot read is refused with one line naming the folder or the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from sturdy.data import ImageDataset, check_fits_in_memory
from sturdy.datasets._common import to_dataset
from sturdy.datasets.cache import cached_arrays, fingerprint
from sturdy.errors import DataError

__all__ = ["read_image_folder", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def split_folder(root: Path, split: str) -> Path:
    """The folder holding ``split``'s class folders (see the module docstring)."""
    subfolders = {p.name for p in root.iterdir() if p.is_dir()}
    if not subfolders & {"train", "test", "val"}:
        return root
    names = ("train",) if split == "train" else ("test", "val")
    for name in names:
        if name in subfolders:
            return root / name
    raise DataError(f"{root} has split folders {sorted(subfolders & {'train', 'test', 'val'})} but none for the "
                    f"{split} split ({' or '.join(names)})")


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file() and not path.name.startswith(".")


def scan(folder: Path) -> Tuple[List[str], List[Path], List[int]]:
    """Class names, image files and their labels below ``folder``.

    Raises:
        DataError: no class folder, or no image in any of them.
    """
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{folder} holds no class folders: expected {folder}/<class>/<image>.png")
    files: List[Path] = []
    labels: List[int] = []
    for label, name in enumerate(classes):
        found = sorted(p for p in (folder / name).rglob("*")
                       if _is_image(p) and not any(part.startswith(".") for part in p.relative_to(folder).parts))
        files += found
        labels += [label] * len(found)
    if not files:
        shown = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
        raise DataError(f"{folder} holds no images in its class folders ({shown}); expected files ending in "
                        f"{', '.join(IMAGE_EXTENSIONS)}")
    return classes, files, labels


def _headers(files: List[Path]) -> Tuple[List[Tuple[int, int]], bool]:
    """Every image's size and whether all are grayscale (reads headers only)."""
    from PIL import Image

    sizes, gray = [], True
    for path in files:
        try:
            with Image.open(path) as img:
                sizes.append(img.size)
                gray = gray and img.mode in _GRAY_MODES
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(f"{path} is not a readable image: {exc}") from exc
    return sizes, gray


def _decode(files: List[Path], labels: List[int], image_size: Optional[int]) -> Tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    bilinear = getattr(Image, "Resampling", Image).BILINEAR  # Pillow >= 9.1 names it Image.Resampling.BILINEAR
    sizes, gray = _headers(files)
    if image_size is None and len(set(sizes)) > 1:
        other = next(i for i, s in enumerate(sizes) if s != sizes[0])
        raise DataError(f"images of mixed sizes: {files[0]} is {sizes[0][0]}x{sizes[0][1]}, {files[other]} is "
                        f"{sizes[other][0]}x{sizes[other][1]}; give an image size (--image-size SIDE) to resize them")
    width, height = (image_size, image_size) if image_size is not None else sizes[0]
    channels, mode = (1, "L") if gray else (3, "RGB")
    check_fits_in_memory((len(files), channels, height, width), element_bytes=1,
                         what=f"{len(files)} images of {channels}x{height}x{width}", fix="give a smaller image size")
    images = np.empty((len(files), channels, height, width), dtype=np.uint8)
    for i, path in enumerate(files):
        try:
            with Image.open(path) as img:
                converted = img.convert(mode)
            if converted.size != (width, height):
                converted = converted.resize((width, height), bilinear)
            pixels = np.asarray(converted, dtype=np.uint8)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(f"{path} is not a readable image: {exc}") from exc
        images[i] = pixels.reshape(height, width, channels).transpose(2, 0, 1)
    return images, np.asarray(labels, dtype=np.int64)


def read_image_folder(root: Path, *, split: str = "train", limit: Optional[int] = None,
                      image_size: Optional[int] = None) -> ImageDataset:
    """The images below ``root`` (see the module docstring), one class per sub-folder.

    Returns:
        uint8 images ``(N, C, H, W)`` (C = 1 when every image is grayscale, else 3), memory-mapped from the cache
        after the first run; ``num_classes`` the number of class folders.

    Raises:
        DataError: no images, mixed sizes without ``image_size``, or an unreadable file (named).
    """
    root = Path(root)
    folder = split_folder(root, split)
    classes, files, labels = scan(folder)
    key = f"folder-{folder.name if folder != root else 'all'}-{image_size or 'native'}"
    print_ = fingerprint(files, {"classes": classes, "image_size": image_size}, base=folder)
    images, y = cached_arrays(root, key, print_, lambda: _decode(files, labels, image_size))
    # the cache holds the resized images: image_size is not applied a second time
    return to_dataset(images, y, num_classes=len(classes), name="folder", split=split, limit=limit)
