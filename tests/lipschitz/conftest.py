"""Fixtures of the Lipschitz tests: a small LMT-trained digits CNN, trained once per session."""

from __future__ import annotations

import pytest
import torch

from sturdy.data import load_dataset
from sturdy.lipschitz import LipschitzTracker, lmt_loss
from sturdy.models import create_model


def train_lmt_digits(*, epochs: int = 12, c: float = 0.3, seed: int = 0, form: str = "pairwise"):
    """A small digits CNN trained with the LMT loss (Adam, batch 64); returns (model in eval mode, test set)."""
    torch.manual_seed(seed)
    train, test = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    model = create_model("cnn", in_shape=train.image_shape, num_classes=10, channels=(8, 16), width=32)
    tracker = LipschitzTracker(model, input_shape=(1, *train.image_shape), seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=gen)
        for start in range(0, len(train), 64):
            idx = order[start : start + 64]
            loss = lmt_loss(model(train.images[idx]), train.labels[idx], c=c, bound=tracker(), form=form)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval(), test


@pytest.fixture(scope="session")
def lmt_digits():
    with torch.random.fork_rng():
        return train_lmt_digits()
