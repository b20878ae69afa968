"""BatchNorm in the training-time tracker: the factor certification uses (running statistics), the larger
batch factor during training with its gradient, hooks only inside the forward, and the drift warning."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from sturdy.lipschitz import LipschitzTracker, lipschitz_bound
from sturdy.lipschitz.tracker import LipschitzDriftWarning

from .lipschitz_reference import exact_norm, randomize_batchnorm

CONVERGED_REL_TOL = 1e-6  # power iteration after hundreds of steps on tiny operators
EULER_REL_TOL = 1e-3  # <grad, W> / L of a function scale-invariant up to BatchNorm's eps (1e-5 / var)


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.ReLU(),
                        nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    return randomize_batchnorm(net.double())


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_without_batch_statistics_the_tracker_bounds_the_certified_map():
    net = _net()
    tracker = LipschitzTracker(net, input_shape=(1, 1, 4, 4), warmup_iterations=500)
    with torch.no_grad():
        est = float(tracker().lipschitz)
    bound = lipschitz_bound(net, input_shape=(1, 1, 4, 4))
    torch.testing.assert_close(est, bound.upper, rtol=CONVERGED_REL_TOL, atol=0.0)


def test_batch_factor_is_the_larger_one_and_hooks_are_removed():
    net = _net()
    tracker = LipschitzTracker(net, input_shape=(1, 1, 4, 4), warmup_iterations=500)
    x = torch.randn(32, 1, 4, 4, dtype=torch.float64) * 5.0
    net.train()
    with tracker.batch_statistics(net):
        assert _hooks(net) == 2
        net(x)
    assert _hooks(net) == 0
    conv, bn1, bn2 = net[0], net[1], net[3]
    with torch.no_grad():
        pre = conv(x)
        post = torch.relu(bn1(pre))  # train mode: the running statistics move once more, as in the tracked forward
    net.train()  # the recorded variances are those of the tracked forward; recompute them the same way
    bv1 = pre.var(dim=(0, 2, 3), unbiased=False)
    bv2 = post.var(dim=(0, 2, 3), unbiased=False)
    with tracker.batch_statistics(net):
        net(x)
    scales = []
    for bn, bv in ((bn1, bv1), (bn2, bv2)):
        running = torch.rsqrt(bn.running_var + bn.eps)
        scales.append(bn.weight.detach() * torch.maximum(running, torch.rsqrt(bv + bn.eps)))
    for _ in range(400):  # converge the folded operator's vector with the same statistics
        tracker._batch_var = {id(bn1): bv1, id(bn2): bv2}
        est = tracker()
    folded = nn.Conv2d(1, 3, 3, padding=1, bias=False).double()
    with torch.no_grad():
        folded.weight.copy_(conv.weight * scales[0][:, None, None, None])
    expected = exact_norm(folded, (1, 4, 4)) * float(scales[1].abs().max()) * exact_norm(net[5], (48,))
    torch.testing.assert_close(float(est.lipschitz.detach()), expected, rtol=1e-5, atol=0.0)


def test_gradient_sees_batchnorm_undo_the_scale_of_the_conv():
    # In training mode conv -> BatchNorm is invariant to the conv's scale; the training constant (batch factor
    # dominant) must be too: <d L / d W, W> = 0 (Euler). With the running factor alone it would be L > 0,
    # the pull that drove the running variance to zero.
    net = _net()
    with torch.no_grad():
        net[1].running_var.fill_(1e3)  # running factor small: the batch factor is the larger one
    tracker = LipschitzTracker(net, input_shape=(1, 1, 4, 4), warmup_iterations=300)
    net.train()
    x = torch.randn(64, 1, 4, 4, dtype=torch.float64)
    with tracker.batch_statistics(net):
        net(x)
    est = tracker().lipschitz
    (g_w,) = torch.autograd.grad(est, net[0].weight, retain_graph=True)
    assert abs(float((g_w * net[0].weight).sum())) < EULER_REL_TOL * float(est)
    (g_gamma,) = torch.autograd.grad(est, net[1].weight)
    assert float(g_gamma.abs().sum()) > 0  # and through gamma
    with torch.no_grad():  # the running factor alone: L is linear in the conv's scale, <grad, W> = L
        net[1].running_var.fill_(1e-3)
    with tracker.batch_statistics(net):
        net.eval()(x)  # eval mode: nothing recorded
    est_running = tracker().lipschitz
    (g_run,) = torch.autograd.grad(est_running, net[0].weight)
    torch.testing.assert_close(float((g_run * net[0].weight).sum()), float(est_running), rtol=1e-6, atol=0.0)


def test_drift_check_warns_and_records():
    net = _net()
    tracker = LipschitzTracker(net, input_shape=(1, 1, 4, 4), warmup_iterations=300)
    with torch.no_grad():
        tracker()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rec = tracker.check_drift(net, tolerance=0.05, epoch=3)
    assert not rec["warned"] and abs(rec["relative_gap"]) < 0.05
    with torch.no_grad():
        net[5].weight.mul_(3.0)  # the weights moved faster than the vectors: a resync closes the gap, quietly
        net[5].weight.add_(0.3 * torch.randn(net[5].weight.shape, generator=torch.Generator().manual_seed(0)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rec = tracker.check_drift(net, tolerance=0.25, epoch=4)
    assert rec["resynced"] and not rec["warned"] and abs(rec["relative_gap"]) < 0.01 < abs(rec["lagged_gap"])
    net[5].register_forward_hook(lambda m, i, o: 3.0 * o)  # a change the traced estimate cannot follow
    with pytest.warns(LipschitzDriftWarning, match="epoch 5.*differ by 67%"):
        rec = tracker.check_drift(net, tolerance=0.25, epoch=5)
    assert rec["warned"] and rec["resynced"] and rec["upper"] > rec["estimate"]


def test_lmt_plugin_checks_drift_each_epoch_and_leaves_no_hooks(tmp_path):
    from sturdy.experiments.lipschitz import LMTPlugin
    from sturdy.experiments.train_job import TrainJob, fit
    from sturdy.training import TrainConfig

    config = TrainConfig(epochs=3, batch_size=128, lr=1e-3, seed=0, device="cpu")
    job = TrainJob(dataset="digits", model="resnet", model_kwargs={"widths": (4, 8, 8)}, config=config,
                   out=str(tmp_path / "run"), options={"method": "lmt"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fitted = fit(job, plugins=[LMTPlugin(drift_tolerance=0.25)], resume=False, progress=False)
    drift = fitted.results["lipschitz_drift"]
    assert [d["epoch"] for d in drift] == [1, 2, 3]  # at the end of every epoch
    assert all(d["upper"] > 0 and d["warned"] == (abs(d["relative_gap"]) > 0.25) for d in drift), drift
    assert sum(issubclass(w.category, LipschitzDriftWarning) for w in caught) == sum(d["warned"] for d in drift)
    assert _hooks(fitted.model) == 0


@pytest.mark.slow
def test_lmt_resnet_with_batchnorm_does_not_collapse(tmp_path):
    # the reported failure: LMT on the BatchNorm resnet drove BatchNorm's running variance to ~1e-7 and the
    # clean accuracy to chance; with the running-or-batch factor it trains (recipe of benchmarks/lipschitz_digits.py)
    from sturdy.data import load_dataset
    from sturdy.experiments.lipschitz import LMTPlugin
    from sturdy.experiments.lipschitz_certify import certify_model
    from sturdy.experiments.train_job import TrainJob, fit
    from sturdy.training import TrainConfig

    config = TrainConfig(epochs=40, batch_size=64, lr=3e-3, optimizer="adam", schedule="cosine", seed=0, device="cpu")
    options = {"method": "lmt", "c": 0.5, "c_warmup_epochs": 12, "lmt_clip": True}
    job = TrainJob(dataset="digits", model="resnet", config=config, out=str(tmp_path / "run"), options=options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LipschitzDriftWarning)
        model = fit(job, plugins=[LMTPlugin.from_options(options)], resume=False, progress=False).model
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert min(float(m.running_var.min()) for m in bns) > 1e-3
    test = load_dataset("digits", split="test")
    _, summary = certify_model(model, test.images, test.labels, eps=(0.1,))
    assert summary["clean_accuracy"] > 0.7 and summary["certified_accuracy"]["0.1"] > 0.3  # old rule: 0.49, 0.0


def test_an_lmt_run_collapsing_to_chance_warns_once_naming_the_remedy(tmp_path):
    from sturdy.experiments.lipschitz import LMTCollapseWarning, LMTPlugin
    from sturdy.experiments.train_job import TrainJob, fit
    from sturdy.training import TrainConfig

    def run(c, out):
        job = TrainJob(model="mlp", config=TrainConfig(epochs=3, lr=1e-3, device="cpu"), out=str(tmp_path / out),
                       options={"method": "lmt"})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit(job, plugins=[LMTPlugin(c=c)], resume=False, progress=False)
        return [w for w in caught if issubclass(w.category, LMTCollapseWarning)]

    collapsed = run(50.0, "collapsed")  # the margin term swamps the loss: accuracy stays at chance
    assert len(collapsed) == 1 and "lower --c" in str(collapsed[0].message)
    assert run(0.1, "healthy") == []


def test_the_drift_check_runs_at_powers_of_two_and_at_the_last_epoch():
    from types import SimpleNamespace

    from sturdy.experiments.lipschitz import LMTDriftCheck

    class Tracker:
        def check_drift(self, model, *, tolerance, epoch):
            return {"epoch": epoch}

    check = LMTDriftCheck(Tracker(), tolerance=0.25)  # type: ignore[arg-type]
    ctx = SimpleNamespace(model=None, config=SimpleNamespace(epochs=20))
    for epoch in range(1, 21):
        check.on_epoch_end(ctx, SimpleNamespace(epoch=epoch))  # type: ignore[arg-type]
    assert [d["epoch"] for d in check.drift] == [1, 2, 4, 8, 16, 20]
    off = LMTDriftCheck(Tracker(), tolerance=0.0)  # type: ignore[arg-type]
    off.on_epoch_end(ctx, SimpleNamespace(epoch=1))  # type: ignore[arg-type]
    assert off.drift == []
