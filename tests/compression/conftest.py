"""Fixtures of the compression tests."""

import pytest
import torch.distributed as dist


@pytest.fixture
def single_process_group():
    """A one-rank gloo group on an in-memory store (no file for a background thread to find deleted)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
