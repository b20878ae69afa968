"""Gradient fast path: power spectrum equals a per-image loop with an explicit DFT; rank correlation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sturdy.errors import ConfigurationError, DataError
from sturdy.fourier import fourier_heatmap, gradient_spectrum, half_plane, rank_correlation

from .conftest import tiny_cnn

REL_TOL = 1e-10  # float64 power spectra
MIN_TRAINED_CORRELATION = 0.5  # Spearman of gradient power vs forward fooling map on the digits CNN


def dft_matrix(n: int) -> torch.Tensor:
    idx = torch.arange(n, dtype=torch.float64)
    return torch.exp(-2j * math.pi * torch.outer(idx, idx) / n)


@pytest.mark.parametrize("shape", [(2, 5, 6), (1, 7, 4)])
def test_power_spectrum_equals_per_image_loop(shape):
    channels, height, width = shape
    model = tiny_cnn(shape)
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(9, *shape, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (9,), generator=gen)
    got = gradient_spectrum(model, x, y, batch_size=4)
    dh, dw = dft_matrix(height), dft_matrix(width)
    total = torch.zeros(height, width, dtype=torch.float64)
    for i in range(9):
        xi = x[i : i + 1].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(xi), y[i : i + 1]), xi)
        for c in range(channels):
            total += (dh @ g[0, c].to(torch.complex128) @ dw.T).abs() ** 2
    freqs = half_plane(height, width)
    expected = (total / 9)[freqs[:, 0], freqs[:, 1]]
    torch.testing.assert_close(got.power, expected, rtol=REL_TOL, atol=0)
    assert got.full().shape == (height, width)


def test_gradient_power_predicts_the_heat_map(trained_cnn, digits):
    _, test = digits
    x, y = test.images[:150], test.labels[:150]
    spectrum = gradient_spectrum(trained_cnn, x, y)
    heatmap = fourier_heatmap(trained_cnn, x, y, eps=2.0)
    assert rank_correlation(spectrum.power, heatmap.fooling) > MIN_TRAINED_CORRELATION


def test_rank_correlation_reference_values():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert math.isclose(rank_correlation(a, a * 10), 1.0, rel_tol=REL_TOL)
    assert math.isclose(rank_correlation(a, -a), -1.0, rel_tol=REL_TOL)
    # Ties get average ranks: ranks (0.5, 0.5, 2, 3) against (0, 1, 2, 3) -> Pearson of the ranks.
    ra = torch.tensor([0.5, 0.5, 2.0, 3.0], dtype=torch.float64) - 1.5
    rb = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64) - 1.5
    expected = float((ra * rb).sum() / (ra.norm() * rb.norm()))
    assert math.isclose(rank_correlation(torch.tensor([1.0, 1.0, 2.0, 3.0]), a), expected, rel_tol=REL_TOL)
    with pytest.raises(ConfigurationError, match="equal length"):
        rank_correlation(a, a[:3])


def test_gradient_spectrum_rejects_bad_input():
    model = tiny_cnn((1, 4, 4))
    with pytest.raises(DataError, match="one label per sample"):
        gradient_spectrum(model, torch.rand(3, 1, 4, 4, dtype=torch.float64), torch.zeros(2, dtype=torch.long))
    with pytest.raises(DataError, match=r"shape \(N, C, H, W\)"):
        gradient_spectrum(model, torch.rand(3, 16, dtype=torch.float64), torch.zeros(3, dtype=torch.long))
