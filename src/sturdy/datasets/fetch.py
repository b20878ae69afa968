"""Fetching the official archives: checked against their published checksums, unpacked, nothing partial left behind.

:data:`ARCHIVES` lists, per kind, each file's official URL and its published MD5 (the dataset authors' page for
CIFAR, the checksums torchvision and the authors publish for MNIST, Fashion-MNIST and SVHN). :func:`download`
streams each file to a temporary ``.NAME.*.part`` in the target folder while hashing it, renames it to ``NAME``
only when the checksum matches, and removes it on any failure (a checksum mismatch, a broken connection, an
interrupt, a connection closed before the announced ``Content-Length``), so a failed download leaves no partial
archive. A file already present with the right checksum is not fetched again.

A mirror (an argument of :func:`download`, or the environment variable :data:`MIRROR_ENV`, ``STURDY_DATA_MIRROR``)
replaces the official hosts: each file is then fetched from ``MIRROR/KIND/FILE`` (``MIRROR/cifar10/
cifar-10-binary.tar.gz``, ``MIRROR/mnist/train-images-idx3-ubyte.gz``, ``MIRROR/fashion-mnist/...``: MNIST and
Fashion-MNIST share their file names), over ``http://``, ``https://`` or ``file://``, and checked against the same
published MD5s. Proxies are taken from the usual ``https_proxy``/``http_proxy``/``no_proxy`` variables (urllib's
own handling). CIFAR's ``.tar.gz`` archives are unpacked in place (members checked: regular files and folders only,
no absolute path, no ``..``); the IDX ``.gz`` files and SVHN's ``.mat`` files are read as they are.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from sturdy.errors import ConfigurationError, DataError

__all__ = ["Archive", "ARCHIVES", "MIRROR_ENV", "download", "file_md5"]

CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60.0  # per network read: a stalled connection fails instead of hanging
MIRROR_ENV = "STURDY_DATA_MIRROR"  # a base URL replacing the official hosts (module docstring)


@dataclass(frozen=True)
class Archive:
    """One official file: where it comes from, its published MD5, and the folder it unpacks to (tar archives)."""

    url: str
    md5: str
    unpacks_to: Optional[str] = None

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


_MNIST = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_FASHION = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_SVHN = "http://ufldl.stanford.edu/housenumbers/"

ARCHIVES: Dict[str, Tuple[Archive, ...]] = {
    "cifar10": (Archive("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
                        "c32a1d4ab5d03f1284b67883e8d87530", "cifar-10-batches-bin"),),
    "cifar100": (Archive("https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
                         "03b5dce01913d631647c71ecec9e9cb8", "cifar-100-binary"),),
    "mnist": (Archive(_MNIST + "train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
              Archive(_MNIST + "train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
              Archive(_MNIST + "t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
              Archive(_MNIST + "t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c")),
    "fashion-mnist": (Archive(_FASHION + "train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
                      Archive(_FASHION + "train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
                      Archive(_FASHION + "t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
                      Archive(_FASHION + "t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310")),
    "svhn": (Archive(_SVHN + "train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373"),
             Archive(_SVHN + "test_32x32.mat", "eb5a983be6a315427106f1b164d9cef3")),
}

# how a URL is opened (a file-like object with read()); tests replace it
urlopen: Callable[..., Any] = urllib.request.urlopen


def file_md5(path: Path) -> str:
    """The MD5 hex digest of a file, read a chunk at a time."""
    digest = hashlib.md5(usedforsecurity=False)  # the published checksums are MD5: an integrity check
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _announced_length(src: Any) -> Optional[int]:
    """The ``Content-Length`` a response announced (``None``: none, e.g. a chunked transfer or a plain file)."""
    headers = getattr(src, "headers", None)
    value = headers.get("Content-Length") if headers is not None else None
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _fetch(archive: Archive, target: Path, url: str) -> None:
    """Stream ``url`` into ``target`` through a temporary file, renamed only when the transfer is complete and the
    checksum matches."""
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    tmp = Path(name)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        received = 0
        with os.fdopen(fd, "wb") as out, urlopen(url, timeout=TIMEOUT_S) as src:
            expected = _announced_length(src)
            for chunk in iter(lambda: src.read(CHUNK_BYTES), b""):
                digest.update(chunk)
                out.write(chunk)
                received += len(chunk)
        if expected is not None and received != expected:
            raise DataError(f"the download of {url} was cut off after {received} of {expected} bytes; nothing was "
                            "kept, try again")
        if digest.hexdigest() != archive.md5:
            raise DataError(f"{url} has MD5 {digest.hexdigest()}, not the published {archive.md5}: the "
                            "download is damaged or the file changed; nothing was kept")
        os.replace(tmp, target)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(f"could not download {url} ({reason}); without internet, put the official files in "
                        f"{target.parent} yourself, or set {MIRROR_ENV} to a mirror") from exc
    finally:
        tmp.unlink(missing_ok=True)


def _url(kind: str, archive: Archive, mirror: Optional[str]) -> str:
    """Where ``archive`` is fetched from: its official URL, or ``MIRROR/KIND/FILE``."""
    if not mirror:
        return archive.url
    return f"{mirror.rstrip('/')}/{kind}/{archive.filename}"


def _check_members(archive_path: Path, members: List[tarfile.TarInfo]) -> None:
    for member in members:
        parts = Path(member.name).parts
        if not (member.isfile() or member.isdir()) or member.name.startswith(("/", "\\")) or ".." in parts:
            raise DataError(f"{archive_path} holds {member.name!r}, not a plain file or folder inside the archive; it "
                            "was not unpacked")


def _unpack(archive_path: Path, folder: Path, unpacks_to: str) -> None:
    """Extract a ``.tar.gz`` into a temporary folder beside it (members checked first), then move its
    ``unpacks_to`` folder into ``folder``: an interrupted extraction leaves no half-filled data folder."""
    staging = Path(tempfile.mkdtemp(prefix=".unpack.", dir=folder))
    try:
        with tarfile.open(archive_path, "r:gz") as tar:
            members = tar.getmembers()
            _check_members(archive_path, members)
            extra: Dict[str, Any] = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(staging, members=members, **extra)  # members checked above
        if not (staging / unpacks_to).is_dir():
            raise DataError(f"{archive_path} holds no folder {unpacks_to!r}; it is not the expected archive")
        os.replace(staging / unpacks_to, folder / unpacks_to)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"{archive_path} could not be unpacked ({exc}); remove it and download again") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def download(kind: str, root: str | os.PathLike, *, mirror: Optional[str] = None) -> Path:
    """Fetch the official files of ``kind`` (``cifar10``, ``cifar100``, ``mnist``, ``fashion-mnist``, ``svhn``) into
    ``root`` (created), check their MD5 against :data:`ARCHIVES`, unpack the tar archives; returns ``root``, the
    folder to read them from (``KIND:ROOT``). Files already there with the right checksum are kept.

    ``mirror`` (default: the environment variable ``STURDY_DATA_MIRROR``, else the official hosts) is a base URL
    holding ``KIND/FILE`` for each file (module docstring).

    Raises:
        ConfigurationError: a kind without official archives.
        DataError: a file that cannot be fetched (no internet), a checksum mismatch or an archive that cannot be
            unpacked; no partial file is left behind.
    """
    if kind not in ARCHIVES:
        raise ConfigurationError(f"there is nothing to download for {kind!r}; downloadable: {', '.join(ARCHIVES)}")
    if mirror is None:
        mirror = os.environ.get(MIRROR_ENV, "").strip() or None
    if mirror is not None and not mirror.startswith(("http://", "https://", "file://")):
        raise ConfigurationError(f"the data mirror {mirror!r} is not a URL (http://, https:// or file://); it is the "
                                 f"base URL holding KIND/FILE for each file (set by {MIRROR_ENV} or mirror=)")
    folder = Path(root).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigurationError(f"cannot create the data folder {str(folder)!r}: {exc}") from exc
    for archive in ARCHIVES[kind]:
        target = folder / archive.filename
        if not (target.is_file() and file_md5(target) == archive.md5):
            _fetch(archive, target, _url(kind, archive, mirror))
        if archive.unpacks_to is not None and not (folder / archive.unpacks_to).is_dir():
            _unpack(target, folder, archive.unpacks_to)
    return folder
