"""State validation, checkpoints and bucket bookkeeping, in a one-process gloo group (no spawn)."""

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sturdy.compression import (
    StromState,
    TopKState,
    TorchHookState,
    VarianceCompressionState,
    create_compression,
    strom_hook,
    variance_hook,
)
from sturdy.compression.costmodel import (
    crossover_bandwidth_gbps,
    predict_step_times,
    ring_allreduce_seconds,
    sparse_allgather_seconds,
)
from sturdy.errors import CheckpointError, ConfigurationError, DistributedError

TIME_TOL = dict(rtol=1e-9, atol=1e-12)



class FakeBucket:
    """Just enough of ``dist.GradBucket`` for the hooks: index, flat buffer, parameters, last flag."""

    def __init__(self, index, params, buffer, last=True):
        self._index, self._params, self._buffer, self._last = index, params, buffer, last

    def index(self):
        return self._index

    def parameters(self):
        return self._params

    def buffer(self):
        return self._buffer

    def gradients(self):
        out, offset = [], 0
        for p in self._params:
            out.append(self._buffer[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        return out

    def is_last(self):
        return self._last


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: VarianceCompressionState(alpha=-1.0), r"alpha must lie in \[0.0, inf\]"),
        (lambda: VarianceCompressionState(alpha=float("nan")), "alpha must be a finite number"),
        (lambda: VarianceCompressionState(alpha=0.0, zeta=1.5), r"zeta must lie in \[0.0, 1.0\]"),
        (lambda: VarianceCompressionState(alpha=0.0, quantize="2bit"), "quantize must be '4bit' or None"),
        (lambda: VarianceCompressionState(alpha=2.0), "needs squared-gradient statistics"),
        (lambda: VarianceCompressionState(alpha=0.0, statistics=object()), "must be a SquaredGradientStatistics"),
        (lambda: VarianceCompressionState(alpha=0.0, start_iter=-1), "start_iter must be a non-negative int"),
        (lambda: StromState(tau=0.0), "tau must be > 0"),
        (lambda: TopKState(ratio=0.0), "ratio must be > 0"),
        (lambda: TopKState(ratio=2.0), r"ratio must lie in \[0.0, 1.0\]"),
        (lambda: TorchHookState("int8"), "wraps 'none', 'fp16', 'bf16' or 'powersgd'"),
        (lambda: TorchHookState("powersgd", rank=0), "rank must be a positive int"),
        (lambda: TorchHookState("powersgd", start_iter=1), "PowerSGD needs start_iter >= 2"),
        (lambda: create_compression("gzip"), "unknown compression method 'gzip'"),
        (lambda: TopKState(gather="bounded"), "implemented for 'vgc' only"),
        (lambda: StromState(gather="fast"), "gather must be one of"),
        (lambda: StromState(slack=0.5), r"slack must lie in \[1.0, inf\]"),
    ],
)
def test_state_validation_messages(make, match):
    with pytest.raises(ConfigurationError, match=match):
        make()


def test_residuals_follow_parameters_when_buckets_change(single_process_group):
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
    state = StromState(tau=100.0, start_iter=0, named_parameters=[("a", a), ("b", b)])
    grads = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    strom_hook(state, FakeBucket(0, [a, b], grads.clone())).wait()
    # DDP rebuilt its buckets: b first, alone in bucket 0; a in bucket 1.
    strom_hook(state, FakeBucket(0, [b], torch.zeros(2), last=False)).wait()
    strom_hook(state, FakeBucket(1, [a], torch.zeros(3))).wait()
    torch.testing.assert_close(state.residual(0), torch.tensor([4.0, 5.0]))
    torch.testing.assert_close(state.residual(1), torch.tensor([1.0, 2.0, 3.0]))
    saved = state.state_dict()
    torch.testing.assert_close(saved["buffers"]["residual"]["a"], torch.tensor([1.0, 2.0, 3.0]))

    anonymous = StromState(tau=100.0, start_iter=0)
    strom_hook(anonymous, FakeBucket(0, [a, b], grads.clone())).wait()
    with pytest.raises(DistributedError, match="pass named_parameters=model.named_parameters"):
        strom_hook(anonymous, FakeBucket(0, [b], torch.zeros(2))).wait()


def test_empty_selection_everywhere_gives_zero_update(single_process_group):
    p = nn.Parameter(torch.zeros(4))
    state = StromState(tau=10.0, start_iter=0, named_parameters=[("p", p)])
    out = strom_hook(state, FakeBucket(0, [p], torch.full((4,), 0.5))).wait()
    torch.testing.assert_close(out, torch.zeros(4))
    stats = state.statistics()
    assert stats.elements_sent == 0 and stats.payload_bytes == 0 and stats.wire_bytes == 8
    assert stats.never_sent_fraction == 1.0


def _train(model, state, hook, steps, seed=0):
    ddp = nn.parallel.DistributedDataParallel(model)
    ddp.register_comm_hook(state, hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        opt.step()


def _saved_and_loaded(state):
    """``state.state_dict()`` through ``torch.save`` and ``torch.load(weights_only=True)``."""
    buf = io.BytesIO()
    torch.save(state.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_state_dict_is_weights_only_safe_and_kind_checked(single_process_group):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    state, hook = create_compression("vgc", model=model, alpha=1.0)
    _train(model, state, hook, steps=5)
    loaded = _saved_and_loaded(state)
    assert set(loaded["buffers"]["residual"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert loaded["iter"] == 5 and loaded["config"]["alpha"] == 1.0
    fresh = VarianceCompressionState(alpha=1.0, defer_statistics=True)
    fresh.load_state_dict(loaded)
    assert fresh.statistics().steps == 5
    with pytest.raises(CheckpointError, match="of kind 'vgc' cannot be loaded into a 'topk' state"):
        TopKState().load_state_dict(loaded)
    with pytest.raises(CheckpointError, match="of kind 'list'"):
        TopKState().load_state_dict([])


def test_deferred_statistics_must_be_bound(single_process_group):
    model = nn.Sequential(nn.Linear(5, 3))
    state, hook = create_compression("vgc", alpha=1.0, start_iter=0)
    with pytest.raises(DistributedError, match="call state.bind_model"):
        _train(model, state, hook, steps=1)


def test_torch_hooks_run_and_count_bytes(single_process_group):
    for method, ratio in [("none", 1.0), ("fp16", 2.0), ("bf16", 2.0)]:
        model = nn.Sequential(nn.Linear(5, 3))
        state, hook = create_compression(method, model=model, start_iter=0)
        _train(model, state, hook, steps=3)
        assert state.statistics().compression_ratio == pytest.approx(ratio)
    model = nn.Sequential(nn.Linear(5, 3))
    state, hook = create_compression("powersgd", model=model, rank=1)
    _train(model, state, hook, steps=4)
    assert state.state_dict()["powersgd"]["iter"] >= 2
    # PyTorch's rule: a 64x32 matrix is compressed at rank 1 ((64 + 32) * 2 < 2048), a bias is not.
    state.iter = state.start_iter
    bucket = FakeBucket(0, [torch.zeros(64, 32), torch.zeros(64)], torch.zeros(64 * 32 + 64))
    assert state.bucket_bytes(bucket) == 4 * (64 + 32) + 4 * 64


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def test_powersgd_checkpoint_goes_through_its_own_state(single_process_group):
    """PowerSGD's error feedback, warm-start matrices, generator and counters travel through
    ``PowerSGDState.__getstate__`` (weights-only safe) and come back unchanged; training goes on."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))
    state, hook = create_compression("powersgd", model=model, rank=1)
    _train(model, state, hook, steps=4)
    saved = _saved_and_loaded(state)
    assert saved["powersgd"]["iter"] >= 2 and saved["powersgd"]["error"] and saved["powersgd"]["q"]
    fresh, fresh_hook = create_compression("powersgd", model=model, rank=1)
    fresh.load_state_dict(saved)
    assert fresh.inner.process_group is fresh.process_group
    assert _same(fresh.state_dict(), saved)
    assert fresh.inner.rng.randint(1 << 30) == state.inner.rng.randint(1 << 30)
    _train(model, fresh, fresh_hook, steps=2)
    assert fresh.statistics().steps == 6
    with pytest.raises(CheckpointError, match="PowerSGD state lacks"):
        fresh.load_state_dict({**saved, "powersgd": {}})


def test_variance_hook_float32_alpha0_returns_the_local_gradient(single_process_group):
    p = nn.Parameter(torch.zeros(5))
    state = VarianceCompressionState(alpha=0.0, quantize=None, start_iter=0, named_parameters=[("p", p)])
    grad = torch.tensor([0.5, 0.0, -2.0, 1e-30, 3.0])
    out = variance_hook(state, FakeBucket(0, [p], grad.clone())).wait()
    torch.testing.assert_close(out, grad, rtol=0, atol=0)
    assert state.statistics().elements_sent == 4


def test_cost_model_formulas_and_crossover():
    assert ring_allreduce_seconds(nbytes=1e6, workers=1, bandwidth_gbps=1, latency_s=1e-3) == 0.0
    # brute force: 2 (P - 1) ring rounds, each sending n / P bytes after one latency
    p, n, bw, lat = 4, 1e6, 1.0, 1e-4
    rounds = sum(lat + (n / p) / (bw * 1.25e8) for _ in range(2 * (p - 1)))
    torch.testing.assert_close(
        ring_allreduce_seconds(nbytes=n, workers=p, bandwidth_gbps=bw, latency_s=lat), rounds, **TIME_TOL
    )
    gather = sum(lat + 8 / 1.25e8 for _ in range(p - 1)) + sum(lat + 1e4 / 1.25e8 for _ in range(p - 1))
    torch.testing.assert_close(
        sparse_allgather_seconds(bytes_per_worker=1e4, workers=p, bandwidth_gbps=bw, latency_s=lat), gather,
        **TIME_TOL,
    )
    x = crossover_bandwidth_gbps(compute_s=0.01, dense_bytes=4e6, compression_ratio=100, workers=4, codec_s=0.002)
    pred = predict_step_times(compute_s=0.01, dense_bytes=4e6, compression_ratio=100, workers=[4],
                              bandwidths_gbps=[x], codec_s=0.002)[0]
    torch.testing.assert_close(pred.dense_step_s, pred.compressed_step_s, rtol=1e-9, atol=0.0)
    slow, fast = predict_step_times(compute_s=0.01, dense_bytes=4e6, compression_ratio=100, workers=[4],
                                    bandwidths_gbps=[x / 10, x * 10], codec_s=0.002)
    assert slow.speedup > 1 > fast.speedup
    with pytest.raises(ConfigurationError, match=r"compression_ratio must be a finite number in \(0, inf\]"):
        predict_step_times(compute_s=0.01, dense_bytes=4e6, compression_ratio=0, workers=[4], bandwidths_gbps=[1])
    with pytest.raises(ConfigurationError, match=r"worker counts must be ints in \[1, "):
        predict_step_times(compute_s=0.01, dense_bytes=4e6, compression_ratio=2, workers=[0], bandwidths_gbps=[1])


def test_time_to_accuracy_prediction():
    from sturdy.compression.costmodel import method_comm_seconds, predict_time_to_accuracy

    ring = ring_allreduce_seconds(nbytes=2e6, workers=4, bandwidth_gbps=1.0, latency_s=0.0)
    assert method_comm_seconds("fp16", dense_bytes=4e6, compression_ratio=2, workers=4, bandwidth_gbps=1.0,
                               latency_s=0.0) == ring
    gather = sparse_allgather_seconds(bytes_per_worker=4e4, workers=4, bandwidth_gbps=1.0, latency_s=0.0)
    assert method_comm_seconds("vgc", dense_bytes=4e6, compression_ratio=100, workers=4, bandwidth_gbps=1.0,
                               latency_s=0.0) == gather
    assert predict_time_to_accuracy(epochs=3, steps_per_epoch=10, compute_codec_s=0.01, comm_s=0.02,
                                    epoch_overhead_s=0.5) == pytest.approx(3 * (10 * 0.03 + 0.5))
    assert predict_time_to_accuracy(epochs=float("inf"), steps_per_epoch=10, compute_codec_s=0.01,
                                    comm_s=0.0) == float("inf")


def test_a_parameter_used_outside_its_module_is_refused(single_process_group):
    """No statistics would mean v = 0 and the parameter sent at every step: refused, naming it."""

    class Direct(nn.Module):
        def __init__(self):
            super().__init__()
            self.shift = nn.Embedding(2, 5)
            self.fc = nn.Linear(5, 3)

        def forward(self, x):
            return self.fc(x + self.shift.weight[0])  # the Embedding's forward never runs

    torch.manual_seed(0)
    model = Direct()
    state, hook = create_compression("vgc", model=model, alpha=2.0, start_iter=0)
    with pytest.raises(Exception, match="parameter 'shift.weight' has a gradient but no per-sample statistics"):
        _train(model, state, hook, steps=1)
