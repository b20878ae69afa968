"""Partial heat-map results: per-frequency counts that can be summed over ranks, saved and resumed.

A heat map is a sum over (frequency, image) pairs, so its state is three per-frequency sums (error and
fooling counts, integers; the applied budget, float64) plus which frequencies are done. Ranks of a sharded
run measure disjoint frequencies, so summing their states (one ``all_reduce``) gives exactly the
single-process state. The state is saved as strict JSON written atomically (temporary file, then rename),
with a fingerprint of the settings, images, labels and model weights: resuming under other settings is
refused, naming the differences. The file is read back as untrusted input (:mod:`sturdy.resumable`: a
checksum binds it to its content, so a file edited by hand is refused) and every row is checked.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from sturdy.errors import CheckpointError, ConfigurationError
from sturdy.resumable import read_resumable, write_resumable

__all__ = ["HeatmapCounts", "fingerprint", "load_partial", "save_partial"]

FORMAT = "sturdy.fourier.heatmap-partial"
VERSION = 2  # 2: checksummed (sturdy.resumable); a version-1 file is refused, remove it to start over
MAX_FIXED_BYTES = 64 * 1024  # format, settings and fingerprints
ROW_BYTES = 128  # one row: index, two counts, one float64 budget, separators (generously)
APPLIED_SLACK = 1e-6  # relative rounding of an applied budget above eps


class HeatmapCounts:
    """Per-frequency sums of a heat map over the canonical half plane of ``F`` frequencies."""

    def __init__(self, n_freq: int, device: torch.device) -> None:
        self.errors = torch.zeros(n_freq, dtype=torch.long, device=device)
        self.fooled = torch.zeros(n_freq, dtype=torch.long, device=device)
        self.applied = torch.zeros(n_freq, dtype=torch.float64, device=device)
        self.measured = torch.zeros(n_freq, dtype=torch.bool, device=device)

    def add(self, other: HeatmapCounts) -> None:
        """Add ``other`` (measuring disjoint frequencies) into ``self``."""
        self.errors += other.errors.to(self.errors.device)
        self.fooled += other.fooled.to(self.errors.device)
        self.applied += other.applied.to(self.errors.device)
        self.measured |= other.measured.to(self.errors.device)

    def all_reduce(self, group: Optional[dist.ProcessGroup] = None) -> None:
        """Sum over the ranks of ``group`` (exact: counts are integers, each frequency has one owner)."""
        from sturdy.distributed import collective_device

        where = collective_device(group)
        packed = torch.stack([self.errors.double(), self.fooled.double(), self.applied,
                              self.measured.double()]).to(where)
        dist.all_reduce(packed, group=group)
        packed = packed.to(self.errors.device)
        self.errors.copy_(packed[0].round().long())
        self.fooled.copy_(packed[1].round().long())
        self.applied.copy_(packed[2])
        self.measured.copy_(packed[3] > 0)


def _tensor_bytes(t: Tensor) -> bytes:
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def fingerprint(model: Any, batches: Iterable[Tuple[Tensor, Tensor]], shape: Sequence[int],
                dtype: torch.dtype) -> Dict[str, Optional[str]]:
    """SHA-256 digests of the images (all ``shape``, in ``dtype``), the labels and (for an ``nn.Module``) the weights
    and buffers. ``batches``: the images and labels in order, whole or in batches (the digests are the same)."""
    data = hashlib.sha256()
    data.update(str((tuple(int(s) for s in shape), str(dtype))).encode())
    labels = hashlib.sha256()
    for x, y in batches:
        data.update(_tensor_bytes(x))
        labels.update(_tensor_bytes(y.long()))
    weights: Optional[str] = None
    if isinstance(model, nn.Module):
        h = hashlib.sha256()
        for t in model.state_dict().values():  # values only: a wrapper or a compiled module hashes alike
            h.update(f"{tuple(t.shape)}:{t.dtype}".encode())
            h.update(_tensor_bytes(t))
        weights = h.hexdigest()
    return {"images": data.hexdigest(), "labels": labels.hexdigest(), "model": weights}


def save_partial(path: os.PathLike, counts: HeatmapCounts, settings: Dict[str, Any]) -> None:
    """Write the measured frequencies' sums and ``settings`` to ``path`` atomically, with their checksum."""
    rows = torch.nonzero(counts.measured.cpu()).flatten()
    payload = {
        "format": FORMAT, "version": VERSION, "settings": settings, "rows": rows.tolist(),
        "errors": counts.errors.cpu()[rows].tolist(), "fooled": counts.fooled.cpu()[rows].tolist(),
        "applied": counts.applied.cpu()[rows].tolist(),
    }
    write_resumable(path, payload)


def _is_int(v: Any) -> bool:
    return type(v) is int  # bool is an int subclass: a row `true` is refused


def _is_number(v: Any) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def _check_rows(payload: Dict[str, Any], n_freq: int, n_images: int, eps: float) -> Optional[str]:
    """What is wrong with the saved rows and sums, or ``None`` (``n_images`` images, budget ``eps``)."""
    rows = payload.get("rows")
    if not isinstance(rows, list) or not all(_is_int(r) and 0 <= r < n_freq for r in rows):
        return f"'rows' must list frequency indices in [0, {n_freq})"
    if len(set(rows)) != len(rows):
        return "'rows' names a frequency twice"
    for key in ("errors", "fooled", "applied"):
        if not isinstance(payload.get(key), list) or len(payload[key]) != len(rows):
            return f"{key!r} must be a list of {len(rows)} values, one per row"
    for key in ("errors", "fooled"):
        if not all(_is_int(v) and 0 <= v <= n_images for v in payload[key]):
            return f"{key!r} must hold counts in [0, {n_images}] (the number of images)"
    most = n_images * eps * (1 + APPLIED_SLACK)
    if not all(_is_number(v) and 0 <= v <= most for v in payload["applied"]):
        return f"'applied' must hold finite budgets in [0, {most:.6g}] ({n_images} images x eps {eps:g})"
    return None


def _shown(value: Any) -> str:
    """``repr(value)``, a digest cut to 12 hex digits (a one-line message names several)."""
    text = repr(value)
    return text[:13] + "...'" if isinstance(value, str) and len(value) == 64 else text[:60]


def load_partial(
    path: os.PathLike, n_freq: int, settings: Dict[str, Any], device: torch.device
) -> Optional[HeatmapCounts]:
    """The sums saved at ``path`` (``None`` when there is no file).

    The file is untrusted input: it is read through :func:`sturdy.resumable.read_resumable` (a regular
    file of bounded size and nesting, strict JSON, its checksum intact), and every row is checked: integer
    frequency indices (not booleans) without repeats, counts in ``[0, N]`` for ``N`` images (from
    ``settings["shape"]``), finite applied budgets in ``[0, N * eps]``, one value of each per row.

    Raises:
        CheckpointError: the file is damaged, edited by hand, or holds impossible values.
        ConfigurationError: the file is a partial heat map of another version or was written under other
            settings (naming the differences).
    """
    path = Path(path)
    payload = read_resumable(path, what="a partial heat map", max_bytes=MAX_FIXED_BYTES + ROW_BYTES * n_freq)
    if payload is None:
        return None
    if payload.get("format") != FORMAT or payload.get("version") != VERSION:
        raise ConfigurationError(f"{path} is not a partial heat map of this version; remove it to start over")
    saved = payload.get("settings")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path} is not a usable partial heat map ('settings' is not an object); remove it "
                              "to start over")
    diff = [f"{key}: {_shown(saved.get(key))} there, {_shown(value)} now" for key, value in settings.items()
            if saved.get(key) != value]
    if diff:
        more = f"; and {len(diff) - 2} more" if len(diff) > 2 else ""
        raise ConfigurationError(
            f"{path} holds a heat map measured under other settings ({'; '.join(diff[:2])}{more}); remove it (or "
            "pass another partial-results path) to start over"
        )
    problem = _check_rows(payload, n_freq, int(settings["shape"][0]), float(settings["eps"]))
    if problem is not None:
        raise CheckpointError(f"{path} is not a usable partial heat map ({problem}); remove it to start over")
    counts = HeatmapCounts(n_freq, device)
    rows = torch.tensor(payload["rows"], dtype=torch.long, device=device)
    counts.errors[rows] = torch.tensor(payload["errors"], dtype=torch.long, device=device)
    counts.fooled[rows] = torch.tensor(payload["fooled"], dtype=torch.long, device=device)
    counts.applied[rows] = torch.tensor(payload["applied"], dtype=torch.float64, device=device)
    counts.measured[rows] = True
    return counts
