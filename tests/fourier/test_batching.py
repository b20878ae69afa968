"""Automatic batch size and inference options: results independent of the slicing, exact arithmetic."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sturdy.errors import ConfigurationError
from sturdy.fourier import BatchSizer, fourier_heatmap, single_fourier_attack

from .conftest import tiny_cnn

ABS_TOL = 1e-12  # rates are exact fractions of integer counts
BUDGET_TOL = 1e-9  # float64 applied budgets summed in another order
BF16_MEAN_RATE_TOL = 0.05  # bf16 logits flip a few borderline predictions: mean |rate difference| per frequency


class _Recorder(nn.Module):
    """Records the batch sizes, input dtypes, memory formats and autocast state the model sees."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.sizes, self.dtypes, self.channels_last, self.autocast = [], set(), set(), set()

    def forward(self, x):
        self.sizes.append(x.shape[0])
        self.dtypes.add(x.dtype)
        self.channels_last.add(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        self.autocast.add(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return self.inner(x)


def _data(shape, n=12, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, *shape, generator=gen, dtype=dtype), torch.randint(0, 4, (n,), generator=gen)


def test_automatic_batch_size_gives_the_fixed_size_result():
    shape = (2, 6, 5)
    x, y = _data(shape, n=40)
    model = _Recorder(tiny_cnn(shape))
    fixed = fourier_heatmap(model, x, y, eps=1.0, batch_size=7, seed=3)
    model.sizes.clear()
    auto = fourier_heatmap(model, x, y, eps=1.0, seed=3)
    assert len(set(model.sizes)) > 1  # the probe really tried several sizes
    assert auto.batch_size in model.sizes and fixed.batch_size == 7
    torch.testing.assert_close(auto.error, fixed.error, atol=ABS_TOL, rtol=0)
    torch.testing.assert_close(auto.fooling, fixed.fooling, atol=ABS_TOL, rtol=0)
    torch.testing.assert_close(auto.applied, fixed.applied, atol=BUDGET_TOL, rtol=0)
    assert auto.to_dict()["batch_size"] == auto.batch_size


def test_sizer_probes_powers_of_two_then_keeps_the_fastest():
    sizer = BatchSizer(None, device=torch.device("cpu"), total=10**6, item_bytes=4)
    fake_rate = {16: 1.0, 32: 3.0, 64: 2.0, 128: 2.5}  # items per second: 32 is the best, two slower after it
    seen = []
    while sizer.tuning:
        b = sizer.next(10**6)
        seen.append(b)
        sizer.start()
        sizer._t0 -= b / fake_rate[b]  # pretend the step took b / rate seconds
        sizer.stop(b)
    assert seen == [16, 16, 32, 32, 64, 64, 128, 128] and sizer.best == 32 and sizer.next(10**6) == 32
    assert sizer.to_dict()["automatic"] is True and [b for b, _ in sizer.to_dict()["probe"]] == [16, 32, 64, 128]
    fixed = BatchSizer(5, device=torch.device("cpu"), total=100, item_bytes=4)
    assert fixed.next(3) == 3 and fixed.next(100) == 5 and not fixed.shrink()
    with pytest.raises(ConfigurationError, match="batch_size must be a positive int or None"):
        BatchSizer(0, device=torch.device("cpu"), total=1, item_bytes=1)


def test_probe_budget_is_a_small_share_of_the_work():
    sizer = BatchSizer(None, device=torch.device("cpu"), total=2000, item_bytes=4)
    done = 0
    while sizer.tuning:
        b = sizer.next(2000 - done)
        sizer.start()
        sizer.stop(b)
        done += b
    assert done <= 2000 // 8 + 4 * 16


def test_attack_with_automatic_batch_equals_fixed_batch():
    shape = (1, 6, 6)
    x, _ = _data(shape, n=30)
    model = tiny_cnn(shape)
    a = single_fourier_attack(model, x, eps=1.0, batch_size=11, seed=1)
    b = single_fourier_attack(model, x, eps=1.0, seed=1)
    assert (a.frequency, a.phase, a.signs, a.fooling_rate, a.queries) == (
        b.frequency, b.phase, b.signs, b.fooling_rate, b.queries)


def test_bf16_autocast_keeps_perturbations_float32_and_counts_exact():
    shape = (3, 8, 8)
    x, y = _data(shape, n=24, dtype=torch.float32)
    inner = tiny_cnn(shape, dtype=torch.float32)
    model = _Recorder(inner)
    ref = fourier_heatmap(inner, x, y, eps=1.0, batch_size=64)
    hm = fourier_heatmap(model, x, y, eps=1.0, batch_size=64, autocast=torch.bfloat16, channels_last=True)
    assert model.dtypes == {torch.float32} and model.autocast == {torch.bfloat16} and model.channels_last == {True}
    counts = hm.fooling * hm.n_images
    torch.testing.assert_close(counts, counts.round(), atol=ABS_TOL, rtol=0)  # integer counts / N
    torch.testing.assert_close(hm.applied, ref.applied, atol=1e-6, rtol=0)  # same float32 perturbations
    assert float((hm.fooling - ref.fooling).abs().mean()) <= BF16_MEAN_RATE_TOL
    sfa = single_fourier_attack(model, x, eps=1.0, autocast=torch.bfloat16)
    assert sfa.delta.dtype == torch.float32 and torch.bfloat16 in model.autocast


def test_channels_last_and_compiled_callable_give_the_plain_result():
    shape = (2, 5, 6)
    x, y = _data(shape, n=10)
    model = tiny_cnn(shape)
    ref = fourier_heatmap(model, x, y, eps=1.0, batch_size=16)
    cl = fourier_heatmap(model, x, y, eps=1.0, batch_size=16, channels_last=True)
    compiled = torch.compile(model, backend="eager")
    comp = fourier_heatmap(compiled, x, y, eps=1.0, batch_size=16)
    for other in (cl, comp):
        torch.testing.assert_close(other.fooling, ref.fooling, atol=ABS_TOL, rtol=0)
        torch.testing.assert_close(other.applied, ref.applied, atol=BUDGET_TOL, rtol=0)


def test_bad_inference_options_are_refused():
    shape = (1, 4, 4)
    x, y = _data(shape, n=3)
    with pytest.raises(ConfigurationError, match="autocast must be None, torch.bfloat16 or torch.float16"):
        fourier_heatmap(tiny_cnn(shape), x, y, eps=1.0, autocast=torch.float64)
    with pytest.raises(ConfigurationError, match="channels_last must be a bool"):
        fourier_heatmap(tiny_cnn(shape), x, y, eps=1.0, channels_last="yes")
