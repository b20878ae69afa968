"""Checkpoint files: written atomically, read without unpickling code, checked against the model.

A checkpoint is a ``dict`` saved with ``torch.save`` carrying ``format: CHECKPOINT_FORMAT``. It is
serialised in memory and written through :func:`sturdy.utils.atomic_writer`, so an interrupted or
failed save (a full disk included) leaves the previous file intact; it is read with
``torch.load(weights_only=True)``, so a checkpoint from an untrusted source cannot run code.
"""

from __future__ import annotations

import hashlib
import io
import mmap
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from sturdy.errors import CheckpointError
from sturdy.utils import atomic_writer
from sturdy.validation import check_state_tensors

__all__ = [
    "file_sha256",
    "CHECKPOINT_FORMAT",
    "save_checkpoint",
    "load_checkpoint",
    "read_weights_only",
    "read_state_dict",
    "check_state_dict_shapes",
    "check_resumable",
    "damaged_message",
]

CHECKPOINT_FORMAT = "sturdy-checkpoint-v1"
_STATE_KEYS = ("state_dict", "model_state_dict", "model")  # where a dict saved by other code keeps its weights


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, then a rename.

    An interrupted or failed save (a full disk included, reported as the ``OSError`` it is) leaves
    the previous checkpoint intact. The checkpoint is serialised in memory first, so file-system
    errors surface from the plain write rather than from inside torch's archive writer.
    """
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    with atomic_writer(path) as fh:
        fh.write(buffer.getbuffer())


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> Dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` without unpickling code.

    Raises:
        CheckpointError: the file is missing, corrupt, not a sturdy checkpoint, contains pickled
            objects other than tensors and plain containers (refused as unsafe), or holds tensors on the
            meta device (shapes without values).
    """
    state = read_weights_only(path, map_location=map_location, expected="a model.pt written by `sturdy train`")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a sturdy checkpoint (missing format tag {CHECKPOINT_FORMAT!r})")
    return check_state_tensors(state, source=f"checkpoint {str(path)!r}")


def read_weights_only(path: str | os.PathLike, *, map_location: str | torch.device = "cpu",
                      expected: str = "a file written by torch.save") -> Any:
    """The object a ``torch.save`` archive holds, read with ``torch.load(weights_only=True)`` (no code runs).

    ``expected`` names what the file should be in the message for a missing file.

    Raises:
        CheckpointError: the file is missing, not a ``torch.save`` archive, corrupt, or holds pickled objects
            other than tensors and plain containers (refused as unsafe).
    """
    return _read_archive(Path(path), map_location, expected, None)


def _read_archive(path: Path, map_location: str | torch.device, expected: str, digest: Optional[Any]) -> Any:
    """:func:`read_weights_only`; with ``digest`` (a hashlib object) the file's bytes are hashed too, in the same
    single read from disk (the file is memory-mapped, hashed, then unpickled from the mapped pages; the tensors
    are copied out, so the mapping is closed when this returns)."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {str(path)!r} (expected {expected})")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{str(path)!r} is not a readable checkpoint (not a torch.save archive: corrupt, "
                              "truncated or another kind of file)")
    try:
        if digest is None:
            return torch.load(path, map_location=map_location, weights_only=True)
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            digest.update(mapped)
            mapped.seek(0)
            return torch.load(mapped, map_location=map_location, weights_only=True)  # type: ignore[arg-type]
    except pickle.UnpicklingError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if "global" in ln.lower()]
        if not lines:  # not a forbidden object: the byte stream itself is broken
            raise CheckpointError(f"{str(path)!r} is not a readable checkpoint (corrupt or truncated file)") from exc
        raise CheckpointError(
            f"refusing to load {str(path)!r}: it holds pickled objects other than tensors and plain containers, "
            f"which could run code ({lines[0][:160]}); only load checkpoints from sources you trust"
        ) from exc
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged archive fails inside the unpickler in many ways
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
        raise CheckpointError(
            f"{str(path)!r} is not a readable checkpoint (corrupt or truncated file; {detail})"
        ) from exc


def read_state_dict(path: Union[str, os.PathLike]) -> Tuple[Dict[str, torch.Tensor], str]:
    """The ``state_dict`` a weights file holds and the file's SHA-256.

    The file (read by :func:`read_weights_only`) holds a plain ``state_dict``, a dict with one under
    ``"state_dict"``, ``"model_state_dict"`` or ``"model"``, or a sturdy checkpoint (its ``"model"`` entry); a
    ``module.`` prefix on every name (saved from DDP) is removed.

    Raises:
        CheckpointError: missing, unreadable or unsafe file, no state dict inside, tensors on the meta device or
            with NaN or infinite values.
    """
    digest = hashlib.sha256()
    obj = _read_archive(Path(path), "cpu", "a state_dict or a model.pt written by `sturdy train`", digest)
    sha = digest.hexdigest()
    _remember_sha256(Path(path), sha)
    where = f"weights file {str(path)!r}"
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        obj = obj.get("model")
    elif isinstance(obj, dict) and not _is_state(obj):
        obj = next((obj[k] for k in _STATE_KEYS if isinstance(obj.get(k), dict) and _is_state(obj[k])), obj)
    if not isinstance(obj, dict) or not obj or not _is_state(obj):
        raise CheckpointError(f"{where} holds neither a state_dict (parameter names to tensors) nor a sturdy "
                              "checkpoint")
    state = dict(obj)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    check_state_tensors(state, source=where)
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{where} holds NaN or infinite values in {', '.join(bad[:3])}"
                              f"{' and more' if len(bad) > 3 else ''}; the run that wrote it diverged")
    return state, sha


def _is_state(obj: Mapping[Any, Any]) -> bool:
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


_SHA256_SEEN: Dict[Tuple[str, int, int, int], str] = {}  # (path, inode, size, mtime_ns) -> sha256 of a file read


def _file_key(path: Path) -> Tuple[str, int, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns


def _remember_sha256(path: Path, sha: str) -> None:
    try:
        _SHA256_SEEN[_file_key(path)] = sha
    except OSError:
        pass


def file_sha256(path: Union[str, os.PathLike]) -> str:
    """SHA-256 of a file's bytes (hex), read in 1 MiB blocks; a weights file :func:`read_state_dict` read (and
    hashed in the same read) is not read again while its inode, size and modification time are unchanged."""
    seen = _SHA256_SEEN.get(_file_key(Path(path)))
    if seen is not None:
        return seen
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


RESUME_ADVICE = "use a new output folder or --no-resume to start over"


def check_state_dict_shapes(
    model: nn.Module, state: Mapping[str, Any], *, source: str, advice: str = RESUME_ADVICE
) -> None:
    """Refuse ``state`` unless it holds exactly ``model``'s tensors with the same shapes, naming the difference.

    ``advice`` ends the message (what the user can do about it).

    Raises:
        CheckpointError: missing or unexpected entries, or different shapes (another architecture).
    """
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    stored = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    problems = [f"{k} is {stored[k]} there, {own[k]} here" for k in own if k in stored and stored[k] != own[k]]
    problems += [f"{k} missing there" for k in own if k not in stored]
    problems += [f"{k} unexpected" for k in stored if k not in own]
    if problems:
        more = f" and {len(problems) - 2} more" if len(problems) > 2 else ""
        raise CheckpointError(
            f"{source!r} holds weights of another architecture ({'; '.join(problems[:2])}{more}); {advice}"
        )


_CHECKPOINT_KEYS = {"epoch": int, "config": dict, "model": dict, "optimizer": dict, "scheduler": dict,
                    "state": dict, "rng": dict, "history": list}


def damaged_message(path: Any, detail: str) -> str:
    """The one-line message for a checkpoint whose content is not what resuming needs."""
    return (f"checkpoint {str(path)!r} is damaged or incomplete ({' '.join(detail.split())[:160]}); use a new "
            "output folder or --no-resume to start over")


def check_resumable(ckpt: Mapping[str, Any], path: Any) -> None:
    """Refuse a training checkpoint that lacks what resuming reads, before anything is loaded from it.

    Raises:
        CheckpointError: a missing or mistyped entry, or a history that does not match its epoch.
    """
    for key, kind in _CHECKPOINT_KEYS.items():
        value = ckpt.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            got = "missing" if key not in ckpt else f"a {type(value).__name__}"
            raise CheckpointError(damaged_message(path, f"{key!r} is {got}, expected a {kind.__name__}"))
    if ckpt["epoch"] < 0 or len(ckpt["history"]) != ckpt["epoch"]:
        detail = f"epoch {ckpt['epoch']} with {len(ckpt['history'])} epochs of history"
        raise CheckpointError(damaged_message(path, detail))
    if not isinstance(ckpt["rng"].get("torch"), torch.Tensor):
        raise CheckpointError(damaged_message(path, "no random number generator state"))
