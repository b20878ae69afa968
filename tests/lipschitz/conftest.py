"""Fixtures of the Lipschitz tests: a small LMT-trained digits CNN, trained once per session."""

from __future__ import annotations

import pytest
import torch

from sturdy.experiments.lipschitz import build_lmt_objective
from sturdy.experiments.train_job import TrainJob, load_job_data
from sturdy.models import create_model
from sturdy.training import train


def train_lmt_digits(*, epochs: int = 12, c: float = 0.5, seed: int = 0):
    """A small digits CNN (no pooling) trained with the pairwise LMT loss (clipped, c warm-up, Adam, batch 64).

    Returns ``(model in eval mode, test set)``.
    """
    job = TrainJob(model="cnn", model_kwargs=dict(channels=(8, 16), width=32, pool="none"), epochs=epochs,
                   batch_size=64, lr=3e-3, optimizer="adam", schedule="constant", seed=seed, device="cpu",
                   options=dict(method="lmt", c=c, c_warmup_epochs=epochs / 3, lmt_clip=True))
    train_set, test = load_job_data(job)
    torch.manual_seed(seed)
    model = create_model(job.model, in_shape=train_set.image_shape, num_classes=10, **job.model_kwargs)
    loss_fn, _ = build_lmt_objective(model, job, input_shape=(1, *train_set.image_shape))
    train(model, train_set, config=job.train_config(), loss_fn=loss_fn, progress=False)
    return model.eval(), test


@pytest.fixture(scope="session")
def lmt_digits():
    with torch.random.fork_rng():
        return train_lmt_digits()
