"""Results as JSON files: the one writer of every command, demo section and benchmark.

The parts, which never import :mod:`sturdy.experiments`, write their one JSON file (the heat map's
resumable partial counts, :mod:`sturdy.fourier.partial`) through the same atomic writer
(:func:`sturdy.utils.atomic_write_bytes`)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from sturdy.utils import atomic_write_bytes

__all__ = ["write_json", "json_safe"]


def json_safe(value: Any) -> Any:
    """``value`` with tuples as lists, keys as strings and non-finite floats as ``None`` (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(data: Any, path: str | os.PathLike) -> Path:
    """Write ``data`` as indented, strict JSON, atomically (temporary file, then rename); returns the path.

    Values JSON does not know (paths, devices, ...) are written as their ``str``.
    """
    text = json.dumps(json_safe(data), indent=2, default=str, allow_nan=False) + "\n"
    return atomic_write_bytes(path, text.encode("utf-8"))
