"""Fixtures of the flatness tests: tiny float64 ReLU networks and data, single-threaded torch."""

from __future__ import annotations

import torch
from torch import nn


def tiny_mlp(seed: int = 0, *, inplace: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(12, 6), nn.ReLU(inplace=inplace), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)
    ).double()


def tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 2, stride=2, bias=False), nn.ReLU(), nn.AvgPool2d(1),
        nn.Flatten(), nn.Linear(4, 3),
    ).double()


def tiny_data(shape, n: int = 9, classes: int = 3, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((n, *shape), generator=gen, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=gen)
    return x, y
