"""Hooks in real process groups: gloo workers on CPU started by the core launcher (FileStore rendezvous,
bounded by timeouts). One launch runs every scenario that needs a healthy group; the dying-worker test
has its own."""

import copy
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sturdy.compression import (
    StromState,
    TopKState,
    VarianceCompressionState,
    attach_squared_gradient_statistics,
    strom_hook,
    topk_hook,
    variance_hook,
)
from sturdy.distributed import run_local_workers
from sturdy.errors import DistributedError

pytestmark = pytest.mark.distributed

CONSERVATION_TOL = dict(rtol=1e-5, atol=1e-6)
LAUNCH_TIMEOUT_S = 240.0
TINY_BUCKET_MB = 0.0001  # forces several buckets


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10),
        nn.ReLU(), nn.Linear(10, 3),
    )


def _batch(rank, step, b=8):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(b, 1, 6, 6, generator=g), torch.randint(0, 3, (b,), generator=g)


def _ddp(model, state=None, hook=None):
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=TINY_BUCKET_MB)
    if hook is not None:
        ddp.register_comm_hook(state, hook)
    return ddp


def _step(ddp, opt, rank, step):
    x, y = _batch(rank, step)
    opt.zero_grad()
    F.cross_entropy(ddp(x), y).backward()
    opt.step()


def _same_everywhere(tensor):
    gathered = [torch.zeros_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor)
    return all(torch.equal(g, gathered[0]) for g in gathered)


class _RecordingVGC(VarianceCompressionState):
    """Records, per bucket, the sum of local gradients and of sent values (for conservation)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.grad_sum, self.sent_sum = {}, {}

    def select(self, view, *, max_bytes=None):
        grad = view.gradient.detach().clone()
        i = view.index
        self.grad_sum[i] = self.grad_sum.get(i, torch.zeros_like(grad)) + grad
        selection = super().select(view, max_bytes=max_bytes)
        sent = torch.zeros_like(grad)
        sent[selection.indices] = selection.values
        self.sent_sum[i] = self.sent_sum.get(i, torch.zeros_like(grad)) + sent
        return selection


def _hooks_scenarios(rank):
    report = {}
    # 1. alpha = 0, float32 values: identical gradients to plain allreduce, at every step.
    plain, hooked = _model(), _model()
    state = VarianceCompressionState(alpha=0.0, quantize=None, named_parameters=hooked.named_parameters())
    ddp_plain, ddp_hooked = _ddp(plain), _ddp(hooked, state, variance_hook)
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.1)
    opt_hooked = torch.optim.SGD(hooked.parameters(), lr=0.1)
    exact = True
    for step in range(5):
        _step(ddp_plain, opt_plain, rank, step)
        _step(ddp_hooked, opt_hooked, rank, step)
        for p, q in zip(plain.parameters(), hooked.parameters()):
            exact &= torch.equal(p.grad, q.grad) and torch.equal(p.data, q.data)
    report["alpha0_exact"] = exact
    report["alpha0_compressed_steps"] = state.iter - state.start_iter

    # 2. conservation on every rank, 4-bit values, many steps; identical parameters everywhere.
    model = _model(1)
    stats = attach_squared_gradient_statistics(model)
    state = _RecordingVGC(statistics=stats, alpha=2.0, quantize="4bit", zeta=0.99)
    ddp = _ddp(model, state, variance_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(30):
        _step(ddp, opt, rank, step)
    worst = 0.0
    for i, grad_sum in state.grad_sum.items():
        residual = state.residual(i)
        torch.testing.assert_close(state.sent_sum[i] + residual, grad_sum, **CONSERVATION_TOL)
        worst = max(worst, float((state.sent_sum[i] + residual - grad_sum).abs().max()))
    report["conservation_buckets"] = len(state.grad_sum)
    report["conservation_worst"] = worst
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    report["identical_params"] = _same_everywhere(flat)
    report["vgc_stats"] = state.statistics().to_dict()

    # 3. one rank sends nothing (its threshold is never met), then nobody sends anything. (float32
    # values: with 4-bit values a sent element keeps a residual with v = 0 and may be re-sent.)
    model = _model(2)
    stats = attach_squared_gradient_statistics(model)
    state = VarianceCompressionState(statistics=stats, alpha=2.0 if rank == 0 else 1e30, quantize=None)
    ddp = _ddp(model, state, variance_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(6):
        _step(ddp, opt, rank, step)
    report["one_empty_sent"] = state.statistics().elements_sent_per_step[2:]
    report["one_empty_identical"] = _same_everywhere(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    before = [p.detach().clone() for p in model.parameters()]
    state.alpha = 1e30
    _step(ddp, opt, rank, 99)
    report["all_empty_unchanged"] = all(torch.equal(a, p) for a, p in zip(before, model.parameters()))

    # 4. bounded gather (one asynchronous round, selections truncated to the slot): still conserves.
    model = _model(4)
    stats = attach_squared_gradient_statistics(model)
    state = _RecordingVGC(statistics=stats, alpha=1.0, quantize="4bit", gather="bounded", slack=1.0)
    ddp = _ddp(model, state, variance_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(15):
        _step(ddp, opt, rank, step)
    for i, grad_sum in state.grad_sum.items():
        torch.testing.assert_close(state.sent_sum[i] + state.residual(i), grad_sum, **CONSERVATION_TOL)
    report["bounded_identical"] = _same_everywhere(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    report["bounded_sent"] = sum(state.statistics().elements_sent_per_step[2:])

    # 5. baselines keep replicas identical.
    for name, make, hook in [
        ("strom", lambda m: StromState(tau=0.01, named_parameters=m.named_parameters()), strom_hook),
        ("topk", lambda m: TopKState(ratio=0.1, named_parameters=m.named_parameters()), topk_hook),
    ]:
        model = _model(3)
        st = make(model)
        ddp = _ddp(model, st, hook)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for step in range(5):
            _step(ddp, opt, rank, step)
        report[f"{name}_identical"] = _same_everywhere(
            torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        )
    return report


def _resume_scenario(rank, quantize, bucket_mb):
    def build(seed):
        model = _model(seed)
        stats = attach_squared_gradient_statistics(model)
        state = VarianceCompressionState(statistics=stats, alpha=1.5, quantize=quantize)
        ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=bucket_mb)
        ddp.register_comm_hook(state, variance_hook)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        return model, state, ddp, opt

    model, state, ddp, opt = build(0)
    for step in range(6):
        _step(ddp, opt, rank, step)
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "state": state.state_dict()})
    for step in range(6, 12):
        _step(ddp, opt, rank, step)
    reference = [p.detach().clone() for p in model.parameters()]

    model2, state2, ddp2, opt2 = build(7)  # other initial weights: everything must come from the checkpoint
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    state2.load_state_dict(saved["state"])
    for step in range(6, 12):
        _step(ddp2, opt2, rank, step)
    return {
        "bit_identical": all(torch.equal(a, b) for a, b in zip(reference, model2.parameters())),
        "iters": (state.iter, state2.iter),
        "steps": (state.statistics().steps, state2.statistics().steps),
    }


RESUME_CASES = {"float32-default-buckets": (None, 25.0), "4bit-tiny-buckets": ("4bit", TINY_BUCKET_MB)}


def _scenarios_worker(rank, world):
    """Every healthy-group scenario in one launch (each launch costs seconds of process start-up)."""
    return {
        "hooks": _hooks_scenarios(rank),
        "resume": {case: _resume_scenario(rank, *args) for case, args in RESUME_CASES.items()},
    }


@pytest.fixture(scope="module")
def reports():
    return run_local_workers(_scenarios_worker, nproc=2, timeout_s=LAUNCH_TIMEOUT_S)


def _dying_worker(rank, world):
    model = _model()
    stats = attach_squared_gradient_statistics(model)
    state = VarianceCompressionState(statistics=stats, alpha=2.0)
    ddp = _ddp(model, state, variance_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(1000):
        if rank == 1 and step == 4:
            os._exit(3)
        _step(ddp, opt, rank, step)
    return "finished"


def test_hooks_in_a_two_rank_gloo_group(reports):
    hooks = [r["hooks"] for r in reports]
    for rank, report in enumerate(hooks):
        assert report["alpha0_exact"], rank
        assert report["alpha0_compressed_steps"] == 3
        assert report["conservation_buckets"] >= 3  # several buckets were compressed
        assert report["identical_params"]
        stats = report["vgc_stats"]
        assert stats["steps"] == 30 and len(stats["elements_sent_per_step"]) == 30
        assert stats["elements_sent"] < stats["elements"]
        assert stats["compression_ratio"] > 1
        assert report["one_empty_identical"]
        assert report["all_empty_unchanged"]
        assert report["strom_identical"] and report["topk_identical"]
        assert report["bounded_identical"] and report["bounded_sent"] > 0
    assert sum(hooks[1]["one_empty_sent"]) == 0 and sum(hooks[0]["one_empty_sent"]) > 0


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_checkpoint_resume_is_bit_identical(reports, case):
    """A fresh DDP puts every parameter in one bucket for its first iteration, then rebuilds them:
    residuals and 4-bit scales follow parameters, so the continuation is still bit-identical."""
    for report in (r["resume"][case] for r in reports):
        assert report["bit_identical"]
        assert report["iters"] == (12, 12)


@pytest.mark.multiprocess
def test_a_dying_worker_fails_the_run_quickly():
    start = time.monotonic()
    with pytest.raises(DistributedError, match=r"rank 1 died \(exit code 3\)") as info:
        run_local_workers(_dying_worker, nproc=2, timeout_s=LAUNCH_TIMEOUT_S, collective_timeout_s=30.0)
    assert time.monotonic() - start < 120
    assert "rank 0" in str(info.value)
