"""Partial heat-map results: per-frequency counts that can be summed over ranks, saved and resumed.

A heat map is a sum over (frequency, image) pairs, so its state is three per-frequency sums (error and
fooling counts, integers; the applied budget, float64) plus which frequencies are done. Ranks of a sharded
run measure disjoint frequencies, so summing their states (one ``all_reduce``) gives exactly the
single-process state. The state is saved as strict JSON written atomically (temporary file, then rename),
with a fingerprint of the settings, images, labels and model weights: resuming under other settings is
refused, naming the differences.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from sturdy.errors import ConfigurationError
from sturdy.utils import atomic_write_bytes

__all__ = ["HeatmapCounts", "fingerprint", "load_partial", "save_partial"]

FORMAT = "sturdy.fourier.heatmap-partial"
VERSION = 1


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


def fingerprint(model: Any, x: Tensor, y: Tensor) -> Dict[str, Optional[str]]:
    """SHA-256 digests of the images, the labels and (for an ``nn.Module``) the weights and buffers."""
    data = hashlib.sha256()
    data.update(str((tuple(x.shape), str(x.dtype))).encode())
    data.update(_tensor_bytes(x))
    labels = hashlib.sha256(_tensor_bytes(y.long()))
    weights: Optional[str] = None
    if isinstance(model, nn.Module):
        h = hashlib.sha256()
        for t in model.state_dict().values():  # values only: a wrapper or a compiled module hashes alike
            h.update(f"{tuple(t.shape)}:{t.dtype}".encode())
            h.update(_tensor_bytes(t))
        weights = h.hexdigest()
    return {"images": data.hexdigest(), "labels": labels.hexdigest(), "model": weights}


def save_partial(path: os.PathLike, counts: HeatmapCounts, settings: Dict[str, Any]) -> None:
    """Write the measured frequencies' sums and ``settings`` to ``path`` atomically."""
    rows = torch.nonzero(counts.measured.cpu()).flatten()
    payload = {
        "format": FORMAT, "version": VERSION, "settings": settings, "rows": rows.tolist(),
        "errors": counts.errors.cpu()[rows].tolist(), "fooled": counts.fooled.cpu()[rows].tolist(),
        "applied": counts.applied.cpu()[rows].tolist(),
    }
    atomic_write_bytes(path, (json.dumps(payload, allow_nan=False) + "\n").encode("utf-8"))


def load_partial(
    path: os.PathLike, n_freq: int, settings: Dict[str, Any], device: torch.device
) -> Optional[HeatmapCounts]:
    """The sums saved at ``path`` (``None`` when there is no file).

    Raises:
        ConfigurationError: the file is not a partial heat map, or was written under other settings.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        ok = payload.get("format") == FORMAT and payload.get("version") == VERSION
    except (OSError, ValueError, AttributeError) as exc:
        raise ConfigurationError(
            f"{path} is not a readable partial heat map ({exc}); remove it to start over"
        ) from None
    if not ok:
        raise ConfigurationError(f"{path} is not a partial heat map of this version; remove it to start over")
    saved = payload.get("settings", {})
    diff = [f"{key}: {saved.get(key)!r} there, {value!r} now" for key, value in settings.items()
            if saved.get(key) != value]
    if diff:
        raise ConfigurationError(
            f"{path} holds a heat map measured under other settings ({'; '.join(diff)}); remove it (or pass "
            "another partial-results path) to start over"
        )
    counts = HeatmapCounts(n_freq, device)
    rows = torch.tensor(payload["rows"], dtype=torch.long)
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= n_freq):
        raise ConfigurationError(f"{path} names frequencies outside this image size; remove it to start over")
    counts.errors[rows.to(device)] = torch.tensor(payload["errors"], dtype=torch.long, device=device)
    counts.fooled[rows.to(device)] = torch.tensor(payload["fooled"], dtype=torch.long, device=device)
    counts.applied[rows.to(device)] = torch.tensor(payload["applied"], dtype=torch.float64, device=device)
    counts.measured[rows.to(device)] = True
    return counts
