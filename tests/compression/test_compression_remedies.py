"""Convergence remedies of variance compression (momentum correction with momentum-factor masking, the threshold
warm-up, what error feedback keeps) against a per-element reference, the loss watch, and the lag monitor's
checkpoint."""

import math
import warnings

import pytest
import torch

from sturdy.compression import CompressionLagWarning, VarianceCompressionState
from sturdy.compression.lag import LagMonitor
from sturdy.errors import CheckpointError, ConfigurationError

EXACT = dict(rtol=1e-12, atol=1e-15)  # float64 buffers, float32 values sent exactly (the reference rounds alike)
STEPS = 7
N = 12


class _Bucket:
    """One flat bucket of two parameters (index, parameters, buffer: what ``bucket_view`` reads)."""

    def __init__(self, params, buffer):
        self._params, self._buffer = params, buffer

    def index(self):
        return 0

    def parameters(self):
        return self._params

    def buffer(self):
        return self._buffer


class _Statistics:
    """Stands in for the squared-gradient statistics: adds a given ``s`` into the variance once per step."""

    def __init__(self):
        self.s = None

    def route(self, param, target):
        pass

    def clear_routes(self):
        pass

    def pop_add_(self, params, out):
        return out.add_(self.s)


def _drive(gs, ss, **settings):
    """Run the state's accumulate + select on one bucket for every step; (sent per step, r, v, u)."""
    params = [torch.zeros(5, dtype=torch.float64), torch.zeros(N - 5, dtype=torch.float64)]
    state = VarianceCompressionState(defer_statistics=True, named_parameters=[("a", params[0]), ("b", params[1])],
                                     start_iter=0, **settings)
    state.statistics_source = stats = _Statistics()
    sent = []
    for t, (g, s) in enumerate(zip(gs, ss)):
        state.iter = t
        stats.s = s
        view = state.bucket_view(_Bucket(params, g.clone()))
        state.accumulate(view)
        sel = state.select(view)
        sent.append({int(i): float(x) for i, x in zip(sel.indices, sel.values)})
    u = view.buffers["velocity"] if "velocity" in view.buffers else None
    return sent, view.buffers["residual"], view.buffers["variance"], u


def _reference(gs, ss, *, alpha, zeta, momentum=0.0, momentum_masking=True, warmup_steps=0, quantize=None,
               feedback="all"):
    """The remedies element by element, in Python floats (float32 values on the wire)."""
    assert quantize is None and feedback == "all"  # float32 values: a sent element's residual is exactly 0
    r, v, u = [0.0] * N, [0.0] * N, [0.0] * N
    sent = []
    for t, (g, s) in enumerate(zip(gs, ss)):
        a = alpha / (1 - momentum * momentum)  # the velocity's variance: s / (1 - m^2) per step
        a = a * min(1.0, (t + 1) / warmup_steps) if warmup_steps else a
        out = {}
        for i in range(N):
            v[i] += float(s[i])
            if momentum:
                u[i] = momentum * u[i] + float(g[i])
                r[i] += u[i]
            else:
                r[i] += float(g[i])
            if (r[i] != 0) if a == 0 else r[i] * r[i] > a * v[i]:
                out[i] = r[i]
                r[i], v[i] = 0.0, 0.0
                if momentum and momentum_masking:
                    u[i] = 0.0
            else:
                v[i] *= zeta
        sent.append(out)
    return sent, r, v, u


def _data(seed):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(N, generator=g, dtype=torch.float64) * 0.1
    gs = [mean + torch.randn(N, generator=g, dtype=torch.float64) * 0.3 for _ in range(STEPS)]
    gs = [x.float().double() for x in gs]  # float32-representable: values cross the wire unchanged
    ss = [x * x / 4 + torch.rand(N, generator=g, dtype=torch.float64) * 0.01 for x in gs]
    return gs, ss


@pytest.mark.parametrize("settings", [
    dict(alpha=2.0, zeta=0.9),
    dict(alpha=2.0, zeta=0.9, momentum=0.9),
    dict(alpha=2.0, zeta=0.9, momentum=0.9, momentum_masking=False),
    dict(alpha=4.0, zeta=0.99, warmup_steps=5),
    dict(alpha=4.0, zeta=0.99, momentum=0.5, warmup_steps=3),
    dict(alpha=0.0, zeta=0.5, momentum=0.9),
])
@pytest.mark.parametrize("seed", [0, 1])
def test_remedies_match_the_per_element_reference(settings, seed):
    gs, ss = _data(seed)
    sent, r, v, u = _drive(gs, ss, quantize=None, **settings)
    ref_sent, ref_r, ref_v, ref_u = _reference(gs, ss, **settings)
    for got, want in zip(sent, ref_sent):
        assert got.keys() == want.keys()
        for i in want:
            assert math.isclose(got[i], float(torch.tensor(want[i]).float()), rel_tol=1e-6)
    torch.testing.assert_close(r, torch.tensor(ref_r, dtype=torch.float64), **EXACT)
    torch.testing.assert_close(v, torch.tensor(ref_v, dtype=torch.float64), **EXACT)
    if settings.get("momentum"):
        torch.testing.assert_close(u, torch.tensor(ref_u, dtype=torch.float64), **EXACT)
    else:
        assert u is None
    assert any(sent) and not all(len(x) == N for x in sent[1:]) or settings["alpha"] == 0  # the test decides


def test_masking_and_warm_up_change_what_is_sent():
    """Neighbours of the reference: without masking a sent element keeps pushing; the ramp sends more early."""
    gs, ss = _data(3)
    masked = _drive(gs, ss, alpha=2.0, zeta=0.9, momentum=0.9, quantize=None)
    unmasked = _drive(gs, ss, alpha=2.0, zeta=0.9, momentum=0.9, momentum_masking=False, quantize=None)
    assert masked[0] != unmasked[0]
    ramped = _drive(gs, ss, alpha=4.0, zeta=0.99, warmup_steps=STEPS, quantize=None)[0]
    flat = _drive(gs, ss, alpha=4.0, zeta=0.99, quantize=None)[0]
    assert len(ramped[0]) > len(flat[0])


@pytest.mark.parametrize("feedback", ["all", "unsent"])
def test_what_error_feedback_keeps_of_a_4bit_value(feedback):
    gs, ss = _data(4)
    before = {}
    params = [torch.zeros(5, dtype=torch.float64), torch.zeros(N - 5, dtype=torch.float64)]
    state = VarianceCompressionState(defer_statistics=True, named_parameters=[("a", params[0]), ("b", params[1])],
                                     start_iter=0, alpha=1.0, zeta=0.9, feedback=feedback)
    state.statistics_source = stats = _Statistics()
    checked = 0
    for t, (g, s) in enumerate(zip(gs, ss)):
        state.iter, stats.s = t, s
        view = state.bucket_view(_Bucket(params, g.clone()))
        state.accumulate(view)
        before = view.buffers["residual"].clone()
        sel = state.select(view)
        after = view.buffers["residual"]
        for i, q in zip(sel.indices.tolist(), sel.values.tolist()):
            want = before[i].item() - q if feedback == "all" else 0.0
            assert math.isclose(after[i].item(), want, rel_tol=1e-12, abs_tol=1e-15)
            checked += q != before[i].item()  # a value the 4-bit code rounded
        unsent = torch.ones(N, dtype=torch.bool)
        unsent[sel.indices] = False
        torch.testing.assert_close(after[unsent], before[unsent], **EXACT)
    assert checked > 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(momentum=1.0), r"momentum must lie in \[0, 1\)"),
    (dict(momentum=-0.1), r"momentum must lie in \[0.0, 1.0\]"),
    (dict(warmup_steps=-1), "warmup_steps must be an integer >= 0"),
    (dict(warmup_steps=2.5), "warmup_steps must be an integer >= 0"),
    (dict(feedback="none"), "feedback must be one of"),
])
def test_remedy_settings_are_validated(kwargs, match):
    with pytest.raises(ConfigurationError, match=match):
        VarianceCompressionState(alpha=0.0, **kwargs)


# per-epoch mean training losses of benchmarks/compression_embedding.py (2 workers, 12 epochs, seed 0)
TOKMLP_VGC = [2.42, 2.39, 2.28, 2.25, 2.16, 2.07, 2.22, 2.28, 2.19, 2.03, 1.88, 1.79]  # 30.6% test accuracy
TOKMLP_PLAIN = [2.35, 2.27, 1.99, 1.61, 1.04, 0.78, 0.56, 0.44, 0.62, 0.35, 0.28, 0.24]  # 83.1%
TOKMLP_MOMENTUM_CORRECTION = [2.34, 2.29, 2.25, 2.16, 2.03, 1.80, 1.58, 1.26, 1.26, 1.01, 0.87, 0.87]  # 72.4%


def _watch(losses, window=1):
    monitor = LagMonitor(loss_window=window)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x in losses:
            monitor.observe_loss(torch.tensor(x))
    return [w for w in caught if issubclass(w.category, CompressionLagWarning)], monitor


def test_the_loss_watch_fires_on_a_stalled_run_and_not_on_healthy_ones():
    fired, monitor = _watch(TOKMLP_VGC)
    assert len(fired) == 1 and "stalls" in str(fired[0].message) and "momentum correction" in str(fired[0].message)
    assert monitor.report().best_loss == pytest.approx(min(TOKMLP_VGC), rel=1e-6)  # float32 losses
    for healthy in (TOKMLP_PLAIN, TOKMLP_MOMENTUM_CORRECTION):
        assert _watch(healthy)[0] == []
    g = torch.Generator().manual_seed(0)  # a converging run with noisy steps, watched per step in windows of 20
    noisy = [2.3 * math.exp(-t / 60) + 0.02 + 0.3 * float(torch.rand((), generator=g)) for t in range(600)]
    assert _watch(noisy, window=20)[0] == []


def test_the_loss_watch_fires_when_the_loss_climbs_back():
    fired, _ = _watch([2.3, 1.5, 0.9, 0.7, 0.7, 1.2, 1.9, 2.4])  # the tokmlp: 0.7 -> 2.4
    assert len(fired) == 1 and "rose to 1.9" in str(fired[0].message)  # the second window above 1.15
    assert _watch([2.3, 1.5, 0.9, 0.7, 0.7, 0.9, 0.8, 0.7])[0] == []  # noise, not a climb
    # tokmlp with momentum correction, 40 epochs (87.3%): one late spike of a small loss is not a climb
    late = [2.38, 2.34, 2.30, 2.23, 2.13, 2.07, 1.88, 1.63, 1.44, 1.21, 1.14, 1.13, 0.87, 0.70, 0.63, 0.58, 0.46,
            0.45, 0.39, 0.37, 0.43, 0.29, 0.25, 0.30, 0.50, 0.29, 0.17, 0.21, 0.23, 0.15, 0.17, 0.12, 0.09]
    assert _watch(late)[0] == []


def test_the_lag_monitor_resumes_where_it_stopped():
    def feed(monitor, steps):
        for step in steps:
            monitor.observe(step, residual_sq=float(step * step), gradient_sq=1.0)
            monitor.observe_loss(2.0 - 0.001 * step if step < 150 else 0.2 + 0.02 * step)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        whole = LagMonitor(warmup=10)
        feed(whole, range(300))
        first = LagMonitor(warmup=10)
        feed(first, range(70))
        saved = first.state_dict()
        resumed = LagMonitor(warmup=10)
        resumed.load_state_dict(saved)
        feed(resumed, range(70, 300))
    assert resumed.report() == whole.report()
    assert (resumed.warned, resumed.loss_warned) == (whole.warned, whole.loss_warned) == (True, True)
    assert sum(issubclass(w.category, CompressionLagWarning) for w in caught) == 4  # each run warned twice
    with pytest.raises(CheckpointError, match="lag monitor"):
        LagMonitor().load_state_dict({"steps": 1})


def test_the_variance_state_checkpoints_its_monitor_and_velocity():
    gs, ss = _data(5)
    params = [torch.zeros(5, dtype=torch.float64), torch.zeros(N - 5, dtype=torch.float64)]
    named = [("a", params[0]), ("b", params[1])]
    state = VarianceCompressionState(defer_statistics=True, named_parameters=named, start_iter=0, alpha=2.0,
                                     momentum=0.9, quantize=None)
    state.statistics_source = stats = _Statistics()
    for t in range(3):
        state.iter, stats.s = t, ss[t]
        view = state.bucket_view(_Bucket(params, gs[t].clone()))
        state.accumulate(view)
        state.select(view)
        state.observe_loss(1.0 + t)
    saved = state.state_dict()
    assert saved["config"]["momentum"] == 0.9 and "velocity" in saved["buffers"]
    fresh = VarianceCompressionState(defer_statistics=True, named_parameters=named, start_iter=0, alpha=2.0,
                                     momentum=0.9, quantize=None)
    fresh.load_state_dict(saved)
    assert fresh.lag_report() == state.lag_report()
    view = fresh.bucket_view(_Bucket(params, gs[3].clone()))
    torch.testing.assert_close(view.buffers["velocity"], state.bucket_view(_Bucket(params, gs[3])).buffers["velocity"])


def test_the_command_line_hands_the_momentum_to_the_hook():
    from sturdy.compression import create_compression
    from sturdy.experiments import compression as exp
    from sturdy.experiments.train_job import TrainContext, TrainJob
    from sturdy.training.config import EpochMetrics
    from sturdy.training.plugins import RunContext

    def job(**options):
        return TrainJob.from_dict(dict(model="mlp", optimizer="sgd", momentum=0.8,
                                       options={"compress": "vgc", "nproc": 2, **options}))

    on = exp.compression_options(job(momentum_correction="on", alpha_warmup_epochs=2.5))
    assert exp.hook_momentum(on, job()) == 0.8
    assert exp.hook_momentum({**on, "momentum_correction": "off"}, job()) == 0.0
    adam = TrainJob.from_dict(dict(model="mlp", optimizer="adam", options={"compress": "vgc", "nproc": 2}))
    assert exp.hook_momentum(on, adam) == 0.0  # Adam keeps its own moments
    for key, value, match in (("alpha_warmup_epochs", -1.0, "--alpha-warmup-epochs"),
                              ("feedback", "some", "--feedback must be one of"),
                              ("momentum_correction", "yes", "--momentum-correction must be one of")):
        with pytest.raises(ConfigurationError, match=match):
            exp.compression_options(job(**{key: value}))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    ctx = TrainContext(job=job(momentum_correction="on", alpha_warmup_epochs=2.5), input_shape=(1, 1, 2, 2),
                       num_classes=3, steps_per_epoch=4, device=torch.device("cpu"))
    hooks = exp.CompressionPlugin(on).setup(model, ctx)
    state = hooks.comm_hook[0]
    assert (state.momentum, state.warmup_steps) == (0.8, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.8)
    run = RunContext(model=model, net=model, optimizer=opt, config=ctx.job.config, device=torch.device("cpu"),
                     rank=0, world=2, steps_per_epoch=4)
    (watch,) = hooks.plugins
    watch.on_epoch_start(run, 0)
    assert opt.param_groups[0]["momentum"] == 0.0  # applied once, by the hook
    watch.on_epoch_end(run, EpochMetrics(0, 2.0, 0.1, None, None, 1.0, 0.1))
    assert state.lag_report().loss_windows == 1
    plain, _ = create_compression("vgc", model=torch.nn.Linear(2, 2))
    assert plain.momentum == 0.0 and "velocity" not in plain.buffer_kinds


@pytest.mark.parametrize("settings", [dict(compress="topk"), dict(optimizer="adam"), dict(momentum=0.0)])
def test_momentum_correction_is_refused_where_there_is_no_momentum_to_move(settings):
    from sturdy.experiments import compression as exp
    from sturdy.experiments.train_job import TrainJob

    options = {"compress": settings.pop("compress", "vgc"), "nproc": 2, "momentum_correction": "on"}
    job = TrainJob.from_dict(dict(model="mlp", **{"optimizer": "sgd", "momentum": 0.9, **settings}, options=options))
    with pytest.raises(ConfigurationError, match="--momentum-correction on"):
        exp.training_plugin(job)
    ok = TrainJob.from_dict(dict(model="mlp", optimizer="sgd", momentum=0.9,
                                 options={"compress": "vgc", "nproc": 2, "momentum_correction": "on"}))
    assert exp.training_plugin(ok) is not None
