"""Fixtures of the Lipschitz tests: a small LMT-trained digits CNN, trained once per session."""

from __future__ import annotations

import pytest
import torch

from sturdy.data import load_dataset
from sturdy.lipschitz import CWarmup, LipschitzTracker, lmt_loss
from sturdy.models import create_model


def train_lmt_digits(*, epochs: int = 12, c: float = 0.5, seed: int = 0):
    """A small digits CNN (no pooling) trained with the pairwise LMT loss (clipped, c warm-up, Adam, batch 64).

    Returns ``(model in eval mode, test set)``.
    """
    torch.manual_seed(seed)
    train, test = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    model = create_model("cnn", in_shape=train.image_shape, num_classes=10, channels=(8, 16), width=32, pool="none")
    tracker = LipschitzTracker(model, input_shape=(1, *train.image_shape), seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    schedule = CWarmup(c=c, warmup_epochs=epochs / 3)
    gen = torch.Generator().manual_seed(seed)
    steps = (len(train) + 63) // 64
    for epoch in range(epochs):
        order = torch.randperm(len(train), generator=gen)
        for step in range(steps):
            idx = order[step * 64 : (step + 1) * 64]
            c_now = schedule(epoch=epoch, step=step, steps_per_epoch=steps)
            loss = lmt_loss(model(train.images[idx]), train.labels[idx], c=c_now, bound=tracker(), clip_factor=True)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval(), test


@pytest.fixture(scope="session")
def lmt_digits():
    with torch.random.fork_rng():
        return train_lmt_digits()
