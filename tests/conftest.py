"""Shared test settings: deterministic, single-threaded-friendly torch on the 2-core CI machine."""

import os

import matplotlib
import pytest
import torch

matplotlib.use("Agg")
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
