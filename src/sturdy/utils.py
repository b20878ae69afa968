"""Small helpers every part shares (device/dtype convention, temporary eval mode, atomic files)."""

from __future__ import annotations

import contextlib
import io
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional, Tuple

import torch
from torch import nn

__all__ = [
    "eval_mode",
    "model_device_dtype",
    "atomic_write_bytes",
    "atomic_writer",
    "atomic_save_figure",
    "prepare_output_dir",
]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode and restore every submodule's training flag on exit."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def model_device_dtype(model: Any, fallback: Optional[torch.Tensor] = None) -> Tuple[torch.device, torch.dtype]:
    """Device and dtype of the model: those of its first floating-point parameter.

    A model without one takes those of its first floating-point buffer (a parameter-free module that
    holds fixed tensors, e.g. a normalisation layer's mean and std); a model with neither (a plain
    function, an empty module) takes those of ``fallback``, else CPU and the default dtype. This is the
    one helper for the convention (docs/design.md, Conventions 7); the pair is always (device, dtype).

    Example:
        >>> import torch
        >>> model_device_dtype(torch.nn.Linear(2, 2).double())
        (device(type='cpu'), torch.float64)
        >>> model_device_dtype(torch.nn.BatchNorm1d(2, affine=False).half())
        (device(type='cpu'), torch.float16)
        >>> model_device_dtype(torch.nn.ReLU(), torch.zeros(1, dtype=torch.float64))
        (device(type='cpu'), torch.float64)
    """
    if isinstance(model, nn.Module):
        for p in model.parameters():
            if p.dtype.is_floating_point:
                return p.device, p.dtype
        for b in model.buffers():
            if b.dtype.is_floating_point:
                return b.device, b.dtype
    if fallback is not None:
        return fallback.device, fallback.dtype
    return torch.device("cpu"), torch.get_default_dtype()


_TMP_NAME = re.compile(r"\..+\.[A-Za-z0-9_]{8}\.tmp")  # tempfile.mkstemp's ".<name>.<8 characters>.tmp"


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike) -> Iterator[Any]:
    """A binary file handle whose content replaces ``path`` atomically when the block succeeds.

    The data goes to a temporary ``.<name>.<random>.tmp`` in the same folder (with the permissions a
    plain ``open`` would give), is fsynced and renamed over ``path``. An interrupted or failed write
    (a full disk included) leaves the previous file (or none) in place, never a partial one, and
    removes its temporary file; only a SIGKILL can leave the temporary file, which the next
    :func:`prepare_output_dir` of that folder removes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_save_figure(fig: Any, path: str | os.PathLike, **savefig_kwargs: Any) -> Path:
    """Save a matplotlib figure atomically (never a 0-byte or partial image); format from the suffix."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format=Path(path).suffix.lstrip(".") or "png", **savefig_kwargs)
    return atomic_write_bytes(path, buffer.getvalue())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_writer`); returns the path."""
    with atomic_writer(path) as fh:
        fh.write(data)
    return Path(path)


def prepare_output_dir(path: str | os.PathLike) -> Path:
    """Create the output folder ``path`` and check that files can be written there, before any work.

    Temporary files left in it by a killed atomic write are removed.

    Raises:
        ConfigurationError: an empty path, a path that is an existing file, or a folder that cannot be
            created or written to.
    """
    from sturdy.errors import ConfigurationError

    if not str(path).strip():
        raise ConfigurationError("the output folder is empty; give a folder name (e.g. --out runs/x)")
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ConfigurationError(f"output folder {str(folder)!r} is an existing file; choose a folder name")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigurationError(f"cannot write to output folder {str(folder)!r}: {exc.strerror or exc}") from exc
    for stale in folder.iterdir():  # temporary files of a write that was killed (see atomic_writer)
        if _TMP_NAME.fullmatch(stale.name) and stale.is_file():
            stale.unlink(missing_ok=True)
    return folder
