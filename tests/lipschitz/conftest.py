"""Fixtures of the Lipschitz tests: a small LMT-trained digits CNN, trained once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sturdy.experiments.lipschitz import LMTPlugin
from sturdy.experiments.train_job import TrainJob, fit, load_job_data
from sturdy.training import TrainConfig


def train_lmt_digits(out: Path, *, epochs: int = 12, c: float = 0.5, seed: int = 0):
    """A small digits CNN (no pooling) trained with the pairwise LMT loss (clipped, c warm-up, Adam, batch 64).

    Returns ``(model in eval mode, test set)``.
    """
    config = TrainConfig(epochs=epochs, batch_size=64, lr=3e-3, optimizer="adam", schedule="constant", seed=seed,
                         device="cpu")
    job = TrainJob(model="cnn", model_kwargs=dict(channels=(8, 16), width=32, pool="none"), config=config,
                   out=str(out), options=dict(method="lmt", c=c, c_warmup_epochs=epochs / 3, lmt_clip=True))
    fitted = fit(job, plugins=[LMTPlugin.from_options(job.options)], resume=False, progress=False)
    return fitted.model.eval(), load_job_data(job)[1]


@pytest.fixture(scope="session")
def lmt_digits(tmp_path_factory):
    with torch.random.fork_rng():
        return train_lmt_digits(tmp_path_factory.mktemp("lmt_digits"))
