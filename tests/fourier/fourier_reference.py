"""Brute-force references of the Fourier tests: direct cos formula, one image and one direction at a time."""

from __future__ import annotations

import math

import torch


def direct_direction(height: int, width: int, k: int, l: int, phase: float) -> torch.Tensor:  # noqa: E741
    """Unit-norm cos(2 pi (k p / H + l q / W) + phase) in float64 (self-conjugate rule: docs/design.md section 2)."""
    p, q = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    theta = 2 * math.pi * (k * p.double() / height + l * q.double() / width)
    if (2 * k) % height == 0 and (2 * l) % width == 0:
        u = torch.cos(theta) * (1.0 if math.cos(phase) >= -1e-9 else -1.0)
    else:
        u = torch.cos(theta + phase)
    return u / u.norm()


def direct_perturbation(u: torch.Tensor, signs, *, eps: float, norm: str, wave: str) -> torch.Tensor:
    """The perturbation (C, H, W) of docs/design.md section 2 written out per channel."""
    if wave == "square":
        u = torch.where(u.abs() < 1e-6 * u.abs().max(), 0.0, torch.sign(u))
    channels = []
    for s in signs:
        if norm == "l2":
            channels.append(float(s) * eps * u / (u.norm() * math.sqrt(len(signs))))
        else:
            channels.append(float(s) * eps * u / u.abs().max())
    return torch.stack(channels)


def predict_one(model, image: torch.Tensor) -> int:
    with torch.no_grad():
        return int(model(image[None]).argmax(dim=1))
