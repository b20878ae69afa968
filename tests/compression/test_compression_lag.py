"""The lag monitor of variance compression: a run that holds its gradients back warns, healthy runs do not."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sturdy.compression import (
    CompressionLagWarning,
    VarianceCompressionState,
    attach_squared_gradient_statistics,
    variance_hook,
)
from sturdy.compression.lag import LAG_LIMIT, LagMonitor

STEPS = 120  # past the monitor's warm-up (50 compressed steps) with room for the averages to settle
LONG_STEPS = 250  # a residual that grows by one gradient per step passes the limit of 100 steps
NEVER_SENDS = 1e12  # an alpha whose variance test no element passes



def _train(model, state, steps, *, lr=0.05):
    ddp = nn.parallel.DistributedDataParallel(model)
    ddp.register_comm_hook(state, variance_hook)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 4, generator=g)
    for _ in range(steps):
        x = torch.randn(32, 16, generator=g)
        y = (x @ w).argmax(1)
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        opt.step()


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


class _Tokens(nn.Module):
    """Embedding + positional embedding (broadcast indices) + LayerNorm + Linear head."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(8, 8)
        self.pos = nn.Embedding(16, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(16 * 8, 4)

    def forward(self, x):
        ids = (x > 0).long() + 2 * (x > 1).long() + 4 * (x < -1).long()
        h = self.norm(self.tok(ids) + self.pos(torch.arange(ids.shape[1]))[None])
        return self.head(h.flatten(1))


def test_monitor_warns_once_when_the_residual_grows_against_the_gradient():
    monitor = LagMonitor(warmup=10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(400):  # nothing is ever sent: the residual is step * g
            monitor.observe(step, residual_sq=float(step * step), gradient_sq=1.0)
    lag = [w for w in caught if issubclass(w.category, CompressionLagWarning)]
    assert len(lag) == 1
    assert "steps' worth of gradient" in str(lag[0].message) and "lower alpha" in str(lag[0].message)
    assert monitor.report().residual_lag > LAG_LIMIT


def test_monitor_is_silent_on_a_bounded_residual():
    monitor = LagMonitor(warmup=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompressionLagWarning)
        for step in range(400):  # a residual of a few steps' worth, as error feedback keeps it
            monitor.observe(step, residual_sq=9.0 + (step % 7), gradient_sq=1.0)
            monitor.observe(step, residual_sq=1.0, gradient_sq=0.5)  # a second bucket of the same step
    report = monitor.report()
    assert report.steps == 399  # the last step closes with the next one
    assert 2.0 < report.residual_lag < 4.0


def test_a_run_that_never_sends_warns(single_process_group):
    """Regression: a compressed run that holds back every gradient trained on in silence."""
    model = _mlp()
    state = VarianceCompressionState(statistics=attach_squared_gradient_statistics(model), alpha=NEVER_SENDS)
    with pytest.warns(CompressionLagWarning, match="falls behind"):
        _train(model, state, LONG_STEPS)
    assert state.lag_report().residual_lag > LAG_LIMIT


@pytest.mark.parametrize("make", [_mlp, _Tokens], ids=["mlp", "embedding-layernorm"])
@pytest.mark.parametrize("alpha", [4.0, 5.0])
def test_default_path_is_silent_on_healthy_models(single_process_group, make, alpha):
    torch.manual_seed(0)
    model = make()
    state = VarianceCompressionState(statistics=attach_squared_gradient_statistics(model), alpha=alpha)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompressionLagWarning)
        _train(model, state, STEPS)
    report = state.lag_report()
    assert report.steps == STEPS - state.start_iter - 1
    assert 0 < report.residual_lag < LAG_LIMIT / 3
