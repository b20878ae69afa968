"""The shared loop under DDP: two local gloo workers (the core launcher: FileStore, no port), disjoint shards,
same weights."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from sturdy.data import load_dataset
from sturdy.distributed import run_local_workers
from sturdy.training import TrainConfig, train

pytestmark = pytest.mark.distributed
WORLD = 2
LAUNCH_TIMEOUT_S = 240.0
SAME_WEIGHTS = dict(rtol=0, atol=0)
MEAN_GRAD_TOL = dict(rtol=1e-5, atol=1e-6)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


def _worker(rank, world):
    data = load_dataset("digits", split="train").subset(range(256))
    calls = []

    def counting_allreduce(state, bucket):
        calls.append(bucket.index())
        tensor = bucket.buffer().div_(WORLD)
        return dist.all_reduce(tensor, async_op=True).get_future().then(lambda fut: fut.value()[0])

    model = _model()
    config = TrainConfig(epochs=1, batch_size=32, lr=0.1, optimizer="sgd", momentum=0.0, schedule="constant",
                         device="cpu")
    result = train(model, data, config=config, comm_hook=(None, counting_allreduce), progress=False)
    assert result.world_size == WORLD and result.steps_per_epoch == 4
    return {"state": model.state_dict(), "calls": len(calls)}  # tensors come back by value


def test_two_workers_train_identical_weights_equal_to_large_batch():
    states = run_local_workers(_worker, nproc=WORLD, timeout_s=LAUNCH_TIMEOUT_S)
    for a, b in zip(states[0]["state"].values(), states[1]["state"].values()):
        torch.testing.assert_close(a, b, **SAME_WEIGHTS)
    assert states[0]["calls"] >= 4  # the hook ran on every step

    # Reference: one process, batch 64 made of both ranks' 32-sample shards (mean of means = mean).
    data = load_dataset("digits", split="train").subset(range(256))
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0 * 100_003 + 0)
    perm = torch.randperm(256, generator=gen)
    shards = [perm[r * 128 : (r + 1) * 128] for r in range(WORLD)]
    for step in range(4):
        idx = torch.cat([s[step * 32 : (step + 1) * 32] for s in shards])
        opt.zero_grad()
        nn.functional.cross_entropy(model(data.images[idx]), data.labels[idx]).backward()
        opt.step()
    for a, b in zip(model.state_dict().values(), states[0]["state"].values()):
        torch.testing.assert_close(a, b, **MEAN_GRAD_TOL)
