"""Pixel-space normalisation, frequency subsets, sharded (gloo, 2 processes) and resumed heat maps."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from sturdy.errors import ConfigurationError
from sturdy.experiments.fourier import local_sharded_heatmap
from sturdy.fourier import (
    band_frequencies,
    canonical_rows,
    fourier_heatmap,
    half_plane,
    single_fourier_attack,
    strided_frequencies,
    with_normalization,
)

from .conftest import tiny_cnn

ABS_TOL = 1e-12  # rates are exact fractions of integer counts
BUDGET_TOL = 1e-9  # float64 applied budgets
NORMALIZE_TOL = 1e-12  # float64: (x - m) / s inside the wrapper vs by hand
LAUNCH_TIMEOUT_S = 240.0
SHAPE = (2, 6, 5)


def _data(n=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, *SHAPE, generator=gen, dtype=torch.float64), torch.randint(0, 4, (n,), generator=gen)


def _assert_same_map(a, b):
    assert torch.equal(a.measured, b.measured)
    for which in ("error", "fooling"):
        torch.testing.assert_close(a.values(which), b.values(which), atol=ABS_TOL, rtol=0, equal_nan=True)
    torch.testing.assert_close(a.applied, b.applied, atol=BUDGET_TOL, rtol=0, equal_nan=True)


# ------------------------------------------------------------------------------------------ normalisation


def test_with_normalization_equals_normalising_by_hand():
    torch.manual_seed(0)
    net = tiny_cnn(SHAPE)
    mean, std = (0.4, 0.6), (0.2, 0.3)
    wrapped = with_normalization(net, mean, std)
    x, y = _data()
    m = torch.tensor(mean, dtype=torch.float64)[:, None, None]
    s = torch.tensor(std, dtype=torch.float64)[:, None, None]
    torch.testing.assert_close(wrapped(x), net((x - m) / s), atol=NORMALIZE_TOL, rtol=0)

    class ByHand(nn.Module):  # what the user would write: normalisation inside forward
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, images):
            return self.net((images - m) / s)

    _assert_same_map(fourier_heatmap(wrapped, x, y, eps=1.0, batch_size=16),
                     fourier_heatmap(ByHand(), x, y, eps=1.0, batch_size=16))
    a = single_fourier_attack(wrapped, x, eps=1.0)
    b = single_fourier_attack(ByHand(), x, eps=1.0)
    assert (a.frequency, a.phase, a.signs, a.fooling_rate) == (b.frequency, b.phase, b.signs, b.fooling_rate)
    assert wrapped.training is False or True  # the wrapper is an nn.Module: eval mode reaches the inner model


def test_with_normalization_validates():
    with pytest.raises(ConfigurationError, match="std must be > 0"):
        with_normalization(tiny_cnn(SHAPE), 0.5, (0.2, 0.0))
    with pytest.raises(ConfigurationError, match="same number of channels"):
        with_normalization(tiny_cnn(SHAPE), (0.5, 0.5, 0.5), (0.2, 0.2))
    with pytest.raises(ConfigurationError, match="model must be an nn.Module"):
        with_normalization(lambda t: t, 0.5, 0.2)


# ------------------------------------------------------------------------------------------------ subsets


def test_strided_band_and_listed_subsets():
    h, w = 8, 8
    freqs = half_plane(h, w)
    s2 = strided_frequencies(h, w, 2)
    assert all(((k if k <= 4 else k - 8) % 2 == 0) and (col % 2 == 0) for k, col in s2.tolist())
    band = band_frequencies(h, w, 1.0, 2.5)
    radii = [math.hypot(k if k <= 4 else k - 8, col) for k, col in band.tolist()]
    assert radii and all(1.0 <= r < 2.5 for r in radii)
    everything = torch.cat([band_frequencies(h, w, 0, 2.0), band_frequencies(h, w, 2.0)])
    assert sorted(map(tuple, everything.tolist())) == sorted(map(tuple, freqs.tolist()))
    # A listed frequency and its conjugate name the same direction.
    assert canonical_rows([[1, 2], [-1, -2], [7, 6]], h, w).tolist() == canonical_rows([[1, 2]], h, w).tolist()
    with pytest.raises(ConfigurationError, match=r"shape \(F, 2\)"):
        canonical_rows([1, 2, 3], h, w)


def test_subset_map_equals_the_full_map_where_measured_and_is_nan_elsewhere():
    x, y = _data()
    model = tiny_cnn(SHAPE)
    full = fourier_heatmap(model, x, y, eps=1.0, batch_size=9, seed=2)
    subset = strided_frequencies(6, 5, 2)
    part = fourier_heatmap(model, x, y, eps=1.0, batch_size=9, seed=2, frequencies=subset)
    m = part.measured
    assert int(m.sum()) == len(subset) < len(m)
    torch.testing.assert_close(part.fooling[m], full.fooling[m], atol=ABS_TOL, rtol=0)
    assert bool(torch.isnan(part.fooling[~m]).all()) and bool(torch.isnan(part.full("error")).any())
    assert part.evaluations == 12 * (len(subset) + 1)
    d = part.to_dict()
    measured_map = torch.tensor(d["measured"])
    assert measured_map.shape == (6, 5) and int(measured_map.sum()) == int(torch.isfinite(part.full("error")).sum())
    assert d["measured_frequencies"] == len(subset) and math.isfinite(d["max_fooling"])
    assert all(k_l[:2] in subset.tolist() for k_l in d["top_fooling"])
    fig = part.figure()  # unmeasured frequencies are hatched
    assert any(p.get_hatch() == "///" for ax in fig.axes for p in ax.patches)
    json.dumps(__import__("sturdy.experiments.jsonio", fromlist=["json_safe"]).json_safe(d), allow_nan=False)


# ------------------------------------------------------------------------------------------ sharding


@pytest.mark.distributed
def test_sharded_heatmap_equals_single_process(tmp_path):
    """Two gloo processes through the core launcher; every rank gets the full map, equal to one process."""
    x, y = _data(n=10)
    model = tiny_cnn(SHAPE)
    single = fourier_heatmap(model, x, y, eps=1.0, seed=4, batch_size=8, phase=None)
    partial = str(tmp_path / "partial.json")
    sharded = local_sharded_heatmap(model, x, y, nproc=2, timeout_s=LAUNCH_TIMEOUT_S, eps=1.0, seed=4, batch_size=8,
                                    phase=None, partial=partial)
    assert sharded.world_size == 2
    _assert_same_map(sharded, single)
    assert sharded.evaluations == single.evaluations + 10  # each rank predicts the clean images once
    # The partial file written by rank 0 holds every frequency: a rerun measures nothing.
    again = fourier_heatmap(model, x, y, eps=1.0, seed=4, batch_size=8, phase=None, partial=partial)
    _assert_same_map(again, single)
    assert again.resumed == len(single.measured) and again.evaluations == 10


def test_distributed_without_a_process_group_is_refused():
    x, y = _data(n=3)
    with pytest.raises(ConfigurationError, match="distributed=True needs an initialised default process group"):
        fourier_heatmap(tiny_cnn(SHAPE), x, y, eps=1.0, distributed=True)


# ---------------------------------------------------------------------------------------------- resume


class _Interrupt(Exception):
    pass


class _DiesAfter(nn.Module):
    """Raises after ``calls`` model calls (an interrupted run)."""

    def __init__(self, inner, calls):
        super().__init__()
        self.inner, self.calls = inner, calls

    def forward(self, x):
        self.calls -= 1
        if self.calls < 0:
            raise _Interrupt
        return self.inner(x)


def test_interrupted_map_resumes_and_equals_an_uninterrupted_one(tmp_path):
    x, y = _data(n=12)
    model = tiny_cnn(SHAPE)
    reference = fourier_heatmap(model, x, y, eps=1.0, seed=1, batch_size=12)
    partial = tmp_path / "hm.partial.json"
    with pytest.raises(_Interrupt):
        fourier_heatmap(_DiesAfter(model, 9), x, y, eps=1.0, seed=1, batch_size=12, partial=partial, save_every=2)
    saved = json.loads(partial.read_text())["content"]
    assert 0 < len(saved["rows"]) < len(reference.measured)  # some frequencies kept, not all
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary file
    resumed = fourier_heatmap(model, x, y, eps=1.0, seed=1, batch_size=12, partial=partial, save_every=2)
    _assert_same_map(resumed, reference)
    assert resumed.resumed == len(saved["rows"])
    assert resumed.evaluations == 12 * (len(reference.measured) - len(saved["rows"]) + 1)
    # Other settings are refused, naming the difference.
    with pytest.raises(ConfigurationError, match="eps: 1.0 there, 2.0 now"):
        fourier_heatmap(model, x, y, eps=2.0, seed=1, partial=partial)
    with pytest.raises(ConfigurationError, match="images"):
        fourier_heatmap(model, x * 0.5, y, eps=1.0, seed=1, partial=partial)
