"""Batched, seeded augmentation on the device (docs/design.md, "Training core").

``crop-flip``: each image is zero-padded by ``p`` pixels, cropped back to its size at a random offset, and
flipped horizontally with probability 1/2; ``p = max(1, round(4 * H / 32))`` (the CIFAR recipe's 4 pixels at
32x32, scaled to the image size). Offsets and flips come from a CPU generator, so the result depends only on
the seed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["crop_flip", "crop_padding"]


def crop_padding(height: int) -> int:
    return max(1, round(4 * height / 32))


def crop_flip(x: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip of a batch ``(B, C, H, W)``."""
    b, _, h, w = x.shape
    p = crop_padding(h)
    dy = torch.randint(0, 2 * p + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * p + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    padded = F.pad(x, (p, p, p, p))
    rows = (dy[:, None] + torch.arange(h)).to(x.device)  # (B, H)
    cols = (dx[:, None] + torch.arange(w)).to(x.device)  # (B, W)
    cols = torch.where(flip.to(x.device)[:, None], cols.flip(1), cols)
    batch = torch.arange(b, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()
