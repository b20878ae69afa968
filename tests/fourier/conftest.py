"""Fixtures of the Fourier tests: a small digits CNN trained once per session, tiny random models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sturdy.data import load_dataset


def tiny_cnn(shape, classes: int = 4, *, seed: int = 0, dtype=torch.float64) -> nn.Module:
    """A random, untrained conv net on ``(C, H, W)`` images with a position-dependent read-out.

    The read-out weights are scaled up so that Fourier perturbations of budget ~1 change a sizeable
    fraction of its predictions (the reference comparisons then compare non-trivial maps).
    """
    torch.manual_seed(seed)
    c, h, w = shape
    model = nn.Sequential(nn.Conv2d(c, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * h * w, classes))
    with torch.no_grad():
        model[3].weight.mul_(3.0)
    return model.to(dtype).eval()


@pytest.fixture(scope="package")
def digits():
    train = load_dataset("digits", split="train")
    test = load_dataset("digits", split="test")
    return train, test


@pytest.fixture(scope="package")
def trained_cnn(digits):
    """A small CNN trained for a few epochs on the digits (about 95% test accuracy after 4 epochs), in eval mode."""
    train, _ = digits
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64, 10),
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        perm = torch.randperm(len(train), generator=gen)
        for i in range(0, len(train), 64):
            idx = perm[i : i + 64]
            loss = F.cross_entropy(model(train.images[idx]), train.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()
