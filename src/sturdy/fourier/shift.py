"""Circular shifts of a perturbation (the SFA's shift invariance).

``torch.roll`` convention: shifting by ``(a, b)`` moves pixel ``(p, q)`` to ``((p + a) mod H, (q + b) mod W)``.
A shifted Fourier direction of frequency ``(k, l)`` is the same frequency with phase
``phi - 2 pi (k a / H + l b / W)``, so a Fourier perturbation is fully described up to phase by its
frequency: for a model that is itself a circular convolution followed by a shift-invariant read-out,
the fooling rate does not depend on the shift at all.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from sturdy.errors import ConfigurationError

__all__ = ["random_shifts", "circular_shift"]


def random_shifts(
    n: int, height: int, width: int, *, generator: Optional[torch.Generator] = None
) -> Tensor:
    """``(n, 2)`` uniform random shifts ``(a, b)`` with ``0 <= a < H``, ``0 <= b < W`` (drawn on the CPU)."""
    a = torch.randint(0, height, (n,), generator=generator)
    b = torch.randint(0, width, (n,), generator=generator)
    return torch.stack([a, b], dim=1)


def circular_shift(delta: Tensor, shifts: Tensor) -> Tensor:
    """Copies of ``delta`` ``(C, H, W)`` rolled by each row of ``shifts`` ``(n, 2)``: ``(n, C, H, W)``.

    ``out[i] == torch.roll(delta, tuple(shifts[i]), dims=(1, 2))``, computed with one gather.

    Examples:
        >>> d = torch.arange(6.0).view(1, 2, 3)
        >>> bool(torch.equal(circular_shift(d, torch.tensor([[1, 2]]))[0], torch.roll(d, (1, 2), (1, 2))))
        True
    """
    if delta.dim() != 3:
        raise ConfigurationError(f"delta must have shape (C, H, W), got {tuple(delta.shape)}")
    shifts = torch.as_tensor(shifts, device=delta.device).long()
    if shifts.dim() != 2 or shifts.shape[1] != 2:
        raise ConfigurationError(f"shifts must have shape (n, 2), got {tuple(shifts.shape)}")
    _, height, width = delta.shape
    rows = (torch.arange(height, device=delta.device)[None, :] - shifts[:, :1]) % height  # (n, H)
    cols = (torch.arange(width, device=delta.device)[None, :] - shifts[:, 1:]) % width  # (n, W)
    out = delta[:, rows[:, :, None], cols[:, None, :]]  # (C, n, H, W)
    return out.transpose(0, 1)
