"""Shared set-up of the Fourier benchmarks: the demo's digits CNN (trained once, cached) and its data."""

from __future__ import annotations

from pathlib import Path
from typing import Tuple

import torch
from torch import nn

from sturdy.data import ImageDataset
from sturdy.experiments.demo import standard_job
from sturdy.experiments.train_job import fit, load_job_data


def digits_model(
    cache: str = "runs/bench/fourier_model", *, seed: int = 0
) -> Tuple[nn.Module, ImageDataset, ImageDataset]:
    """The demo's standard digits CNN (20 epochs, Adam), trained on the CPU or reloaded from ``cache``."""
    job = standard_job(Path(cache), quick=False, seed=seed, device="cpu")
    train_set, test_set = load_job_data(job)
    model = fit(job, resume=True, progress=False).model.eval()
    return model, train_set, test_set


def attack_split(train_set: ImageDataset, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` training images in a seeded random order (the attack set; held-out is the test split)."""
    gen = torch.Generator().manual_seed(seed)
    return train_set.images[torch.randperm(len(train_set), generator=gen)[:n]]
