"""Shared test settings: seeded, single-threaded torch (the test models are tiny, CI has two cores)."""

import os

import matplotlib
import pytest
import torch

from sturdy.distributed import loopback_interface

matplotlib.use("Agg")
os.environ.setdefault("TQDM_DISABLE", "1")
# in-process gloo groups bind the loopback interface, as the project's local workers do (no hostname lookup)
if loopback_interface() is not None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback_interface())


@pytest.fixture(scope="session", autouse=True)
def _single_thread():
    """Tiny models are dominated by intra-op thread synchronisation; one thread also keeps the
    multi-process tests from oversubscribing the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
