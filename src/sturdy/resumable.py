"""Files a run writes in order to resume later, and the one reader that takes them back as untrusted input.

A resumable file (a partial heat map, a record of a flatness-grid point) is strict JSON written atomically,
bound to its content by a SHA-256 checksum stored inside it::

    {"checksum": "sha256:<64 hex digits>", "content": {...}}

where the digest is that of the content serialised canonically (sorted keys, no spaces, no NaN).
:func:`read_resumable` refuses, with one line that names the file and says how to start over:

* a path that is not a regular file (a FIFO would block the reader for ever, a folder cannot be read);
* a file larger than ``max_bytes`` (checked on its size, before reading);
* nesting deeper than :data:`MAX_DEPTH` (checked on the text, before parsing: the JSON parser would
  otherwise recurse until ``RecursionError``);
* text that is not UTF-8 strict JSON, including ``NaN``/``Infinity`` and numbers that overflow a float;
* a missing or wrong checksum: a file edited by hand (or written by an older version) is never used.

The checksum guards against edits and damage, not against an adversary who recomputes it: callers still
check every field they use (types, ranges, lengths), so a well-formed file cannot give a wrong result
either.

Example:
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "state.json"
    >>> _ = write_resumable(path, {"rows": [0, 3]})
    >>> read_resumable(path, what="test state")
    {'rows': [0, 3]}
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any, Dict, Mapping, NoReturn, Optional

from sturdy.errors import CheckpointError
from sturdy.utils import atomic_write_bytes

__all__ = ["write_resumable", "read_resumable", "content_digest", "UnusableStateError", "MAX_DEPTH",
           "DEFAULT_MAX_BYTES"]

MAX_DEPTH = 32
"""Deepest nesting of brackets a resumable file may have (the formats written here use at most 5)."""

DEFAULT_MAX_BYTES = 64 * 2**20
"""Largest resumable file read when the caller gives no tighter bound."""

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


class UnusableStateError(CheckpointError):
    """A resumable file that cannot be used (a :class:`~sturdy.errors.CheckpointError`); ``reason`` says why."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def content_digest(content: Any) -> str:
    """``"sha256:<hex>"`` of ``content`` serialised canonically (sorted keys, compact, strict JSON)."""
    body = json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return "sha256:" + hashlib.sha256(body.encode("utf-8")).hexdigest()


def write_resumable(path: str | os.PathLike, content: Mapping[str, Any]) -> Path:
    """Write ``content`` (JSON-able, finite numbers only) with its checksum to ``path`` atomically."""
    payload = {"checksum": content_digest(dict(content)), "content": dict(content)}
    return atomic_write_bytes(path, (json.dumps(payload, allow_nan=False) + "\n").encode("utf-8"))


def _refuse(path: Path, what: str, reason: str) -> NoReturn:
    raise UnusableStateError(f"{path} is not usable {what} ({reason}); remove it to start over", reason=reason)


def _open_regular(path: Path, what: str, max_bytes: int) -> Optional[bytes]:
    """The bytes of ``path`` (``None`` when it does not exist), refusing anything but a bounded regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO opens without blocking
    except FileNotFoundError:
        return None
    except OSError as exc:
        _refuse(path, what, f"cannot be opened: {exc.strerror or exc}")
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            _refuse(path, what, "not a regular file")
        if info.st_size > max_bytes:
            _refuse(path, what, f"{info.st_size} bytes, more than the {max_bytes} such a file can hold")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        _refuse(path, what, f"cannot be read: {exc.strerror or exc}")
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        _refuse(path, what, f"more than the {max_bytes} bytes such a file can hold")
    return data


def _check_depth(text: str, path: Path, what: str) -> None:
    depth = 0
    for match in _BRACKET.finditer(_STRING.sub('""', text)):
        depth += 1 if match.group() in "[{" else -1
        if depth > MAX_DEPTH:
            _refuse(path, what, f"nested deeper than {MAX_DEPTH} levels")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:30]} overflows a float")
    return value


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a number strict JSON allows")


def read_resumable(
    path: str | os.PathLike, *, what: str = "resumable state", max_bytes: int = DEFAULT_MAX_BYTES
) -> Optional[Dict[str, Any]]:
    """The content saved at ``path`` by :func:`write_resumable`, or ``None`` when there is no file.

    Args:
        path: the file.
        what: what the file holds, for the messages (e.g. ``"partial heat map"``).
        max_bytes: refuse files larger than this (before reading them).

    Raises:
        UnusableStateError: a :class:`~sturdy.errors.CheckpointError` of one line naming the file and the
            reason (see the module docstring).
    """
    path = Path(path)
    what = f"as {what}"
    data = _open_regular(path, what, max_bytes)
    if data is None:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        _refuse(path, what, "not UTF-8 text")
    _check_depth(text, path, what)
    try:
        payload = json.loads(text, parse_float=_finite_float, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        _refuse(path, what, f"not strict JSON: {' '.join(str(exc).split())[:80]}")
    if not isinstance(payload, dict) or set(payload) != {"checksum", "content"} or not isinstance(
            payload["content"], dict):
        _refuse(path, what, "no checksum: written by an older version or by hand")
    checksum = payload["checksum"]
    if not isinstance(checksum, str) or not _DIGEST.fullmatch(checksum):
        _refuse(path, what, "its checksum is malformed")
    if content_digest(payload["content"]) != checksum:
        _refuse(path, what, "its content does not match its checksum: edited or damaged")
    return payload["content"]
