"""Heat map: batched and streamed equals a slow one-frequency, one-image loop; maps, plots, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sturdy.errors import ConfigurationError, DataError
from sturdy.fourier import fourier_heatmap, half_plane, heatmap_draws

from .conftest import tiny_cnn
from .fourier_reference import direct_direction, direct_perturbation, predict_one

ABS_TOL = 1e-12  # rates are exact fractions; applied budgets are float64 sums
BUDGET_TOL = 1e-9


def slow_heatmap(model, x, y, *, eps, norm, wave, phase, seed):
    """One frequency and one image at a time, directions from the direct cos formula."""
    n, channels, height, width = x.shape
    clean = [predict_one(model, x[i]) for i in range(n)]
    freqs = half_plane(height, width).tolist()
    error, fooling, applied = [], [], []
    for index, (k, l) in enumerate(freqs):  # noqa: E741
        signs, phases = heatmap_draws(seed, index, n, channels, random_phase=phase is None)
        e = f = a = 0.0
        for i in range(n):
            ph = float(phases[i]) if phase is None else phase
            u = direct_direction(height, width, k, l, ph)
            delta = direct_perturbation(u, signs[i].tolist(), eps=eps, norm=norm, wave=wave)
            image = (x[i] + delta).clamp(0.0, 1.0)
            pred = predict_one(model, image)
            e += pred != int(y[i])
            f += pred != clean[i]
            diff = (image - x[i]).flatten()
            a += float(diff.norm()) if norm == "l2" else float(diff.abs().max())
        error.append(e / n)
        fooling.append(f / n)
        applied.append(a / n)
    as64 = dict(dtype=torch.float64)
    return torch.tensor(error, **as64), torch.tensor(fooling, **as64), torch.tensor(applied, **as64)


@pytest.mark.parametrize(
    "shape,norm,wave,phase,batch_size",
    [
        ((3, 5, 6), "l2", "sine", -0.785398, 7),  # RGB, odd x even, chunks split the images
        ((1, 6, 5), "linf", "square", 0.5, 64),  # grayscale, several frequencies per chunk
        ((2, 4, 7), "l2", "sine", None, 25),  # random phase per image
    ],
)
def test_batched_heatmap_equals_slow_loop(shape, norm, wave, phase, batch_size):
    channels, height, width = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(10, *shape, generator=gen, dtype=torch.float64)
    model = tiny_cnn(shape)
    y = torch.randint(0, 4, (10,), generator=gen)
    eps = 1.0 if norm == "l2" else 0.3
    hm = fourier_heatmap(model, x, y, eps=eps, norm=norm, wave=wave, phase=phase, batch_size=batch_size, seed=5)
    error, fooling, applied = slow_heatmap(model, x, y, eps=eps, norm=norm, wave=wave, phase=phase, seed=5)
    assert float(hm.fooling.max()) > 0  # the comparison is not between two all-zero maps
    torch.testing.assert_close(hm.error, error, atol=ABS_TOL, rtol=0)
    torch.testing.assert_close(hm.fooling, fooling, atol=ABS_TOL, rtol=0)
    torch.testing.assert_close(hm.applied, applied, atol=BUDGET_TOL, rtol=0)
    assert hm.evaluations == 10 * (len(error) + 1)


class _BatchRecorder(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.largest = 0

    def forward(self, x):
        self.largest = max(self.largest, x.shape[0])
        return self.inner(x)


def test_model_batches_never_exceed_batch_size():
    """Streaming: peak memory is set by batch_size, whatever the number of frequencies."""
    model = _BatchRecorder(tiny_cnn((1, 8, 8)))
    x = torch.rand(30, 1, 8, 8, dtype=torch.float64)
    hm = fourier_heatmap(model, x, torch.zeros(30, dtype=torch.long), eps=0.5, batch_size=16)
    assert model.largest == 16
    assert hm.error.shape == (half_plane(8, 8).shape[0],)


def test_applied_budget_is_eps_without_clipping():
    x = torch.full((4, 2, 6, 6), 0.5, dtype=torch.float64)
    hm = fourier_heatmap(tiny_cnn((2, 6, 6)), x, torch.zeros(4, dtype=torch.long), eps=0.25)
    torch.testing.assert_close(hm.applied, torch.full_like(hm.applied, 0.25))
    clipped = fourier_heatmap(tiny_cnn((2, 6, 6)), x, torch.zeros(4, dtype=torch.long), eps=8.0)
    assert float(clipped.applied.max()) < 8.0


def test_trained_model_map_is_symmetric_and_plots(trained_cnn, digits, tmp_path):
    _, test = digits
    hm = fourier_heatmap(trained_cnn, test.images[:60], test.labels[:60], eps=2.0, seed=1)
    full = hm.full("fooling", centered=False)
    assert full.shape == (8, 8)
    torch.testing.assert_close(full, torch.roll(full.flip(0, 1), (1, 1), (0, 1)))
    clean_error = float((trained_cnn(test.images[:60]).argmax(1) != test.labels[:60]).double().mean())
    assert hm.clean_error == clean_error
    assert float(hm.error.max()) > clean_error  # some direction hurts a trained CNN at L2 budget 2
    summary = hm.to_dict()
    assert len(summary["error_map"]) == 8 and summary["top_fooling"][0][2] == float(hm.fooling.max())
    hm.plot(tmp_path / "map.png")
    assert (tmp_path / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_inputs_give_clear_errors():
    model = tiny_cnn((1, 5, 5))
    x = torch.rand(3, 1, 5, 5, dtype=torch.float64)
    y = torch.zeros(3, dtype=torch.long)
    with pytest.raises(ConfigurationError, match=r"eps must be a finite number in \(0, inf\]"):
        fourier_heatmap(model, x, y, eps=0.0)
    with pytest.raises(DataError, match=r"shape \(N, C, H, W\), got shape \(3, 5, 5\)"):
        fourier_heatmap(model, x[:, 0], y, eps=1.0)
    bad = x.clone()
    bad[1, 0, 2, 2] = float("nan")
    with pytest.raises(DataError, match="NaN or infinite"):
        fourier_heatmap(model, bad, y, eps=1.0)
    with pytest.raises(DataError, match=r"outside the valid pixel range \[0, 1\]"):
        fourier_heatmap(model, x * 255, y, eps=1.0)
    with pytest.raises(DataError, match="one label per sample"):
        fourier_heatmap(model, x, y[:2], eps=1.0)
    flat_model = nn.Linear(25, 4).double()
    with pytest.raises(ConfigurationError, match=r"model failed on an image batch .*nn\.Flatten\(\)"):
        fourier_heatmap(flat_model, x, y, eps=1.0)
    with pytest.raises(ConfigurationError, match="norm must be one of"):
        fourier_heatmap(model, x, y, eps=1.0, norm="l3")
    with pytest.raises(ConfigurationError, match="batch_size must be a positive int"):
        fourier_heatmap(model, x, y, eps=1.0, batch_size=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    """One code path: the same map on CUDA (model and images moved) as on the CPU, in float64."""
    model = tiny_cnn((3, 6, 7))
    x = torch.rand(12, 3, 6, 7, dtype=torch.float64)
    y = torch.randint(0, 4, (12,))
    cpu = fourier_heatmap(model, x, y, eps=1.0, seed=2)
    gpu = fourier_heatmap(model.cuda(), x.cuda(), y.cuda(), eps=1.0, seed=2)
    torch.testing.assert_close(gpu.fooling, cpu.fooling)
    torch.testing.assert_close(gpu.applied, cpu.applied)
