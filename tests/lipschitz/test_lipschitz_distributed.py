"""LMT under DDP (gloo, 2 CPU processes from the core launcher): power-iteration vectors stay replicated (also with
BatchNorm, whose running statistics differ per rank) and the run matches single-process training on the
concatenated batch."""

from __future__ import annotations

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from sturdy.distributed import run_local_workers
from sturdy.lipschitz import LipschitzTracker, lmt_loss
from sturdy.models import create_model

WORLD = 2
STEPS = 4
BATCH = 8  # per rank
LAUNCH_TIMEOUT_S = 240.0
MATCH_TOL = 1e-5  # DDP (gradient average over ranks) vs. one process on the full batch


def _setup(batchnorm: bool, seed: int = 0):
    torch.manual_seed(seed)
    model = create_model("cnn", in_shape=(1, 6, 6), num_classes=4, channels=(3, 4), width=8, batchnorm=batchnorm,
                         pool="none")
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(STEPS, WORLD * BATCH, 1, 6, 6, generator=gen)
    y = torch.randint(0, 4, (STEPS, WORLD * BATCH), generator=gen)
    return model, x, y


def _train(model, net, x, y):
    tracker = LipschitzTracker(model, input_shape=(1, 1, 6, 6), seed=0)
    tracker.broadcast_()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for s in range(STEPS):
        loss = lmt_loss(net(x[s]), y[s], c=0.2, bound=tracker())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return tracker


def _worker(rank: int, world: int, out_path: str) -> None:
    state = {}
    for bn in (False, True):
        model, x, y = _setup(bn)
        shard = slice(rank * BATCH, (rank + 1) * BATCH)
        tracker = _train(model, DDP(model), x[:, shard], y[:, shard])
        state[bn] = {"model": {k: v.clone() for k, v in model.state_dict().items()},
                     "tracker": {k: v.clone() for k, v in tracker.state_dict().items()}}
    torch.save(state, f"{out_path}.{rank}")


@pytest.mark.distributed
def test_tracker_replicated_under_ddp(tmp_path):
    run_local_workers(_worker, nproc=WORLD, args=(str(tmp_path / "out"),), timeout_s=LAUNCH_TIMEOUT_S)
    states = [torch.load(tmp_path / f"out.{r}", weights_only=True) for r in range(WORLD)]
    for bn in (False, True):
        for key in ("model", "tracker"):
            for name in states[0][bn][key]:
                if "running" in name or "num_batches" in name:
                    continue  # per-rank batch statistics (DDP broadcasts rank 0's at the next forward)
                assert torch.equal(states[0][bn][key][name], states[1][bn][key][name]), (bn, key, name)
    # without BatchNorm, DDP equals one process on the concatenated batch (the LMT term is the same on every rank)
    model, x, y = _setup(False)
    tracker = _train(model, model, x, y)
    for key, ref in (("tracker", tracker.state_dict()), ("model", model.state_dict())):
        for name, value in ref.items():
            torch.testing.assert_close(states[0][False][key][name], value, rtol=MATCH_TOL, atol=MATCH_TOL)
