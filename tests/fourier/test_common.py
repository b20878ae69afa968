"""Model calls: a layer that cannot take images is named; any other error propagates unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sturdy.errors import ConfigurationError
from sturdy.fourier import fourier_heatmap, single_fourier_attack

from .conftest import tiny_cnn


def _images(channels: int = 1):
    return torch.rand(3, channels, 5, 5, dtype=torch.float64), torch.zeros(3, dtype=torch.long)


def test_a_model_on_flattened_vectors_gets_the_flatten_hint():
    x, y = _images()
    model = nn.Sequential(nn.Linear(25, 8), nn.ReLU(), nn.Linear(8, 4)).double()
    with pytest.raises(ConfigurationError, match=r"layer '0' \(nn\.Linear, in_features=25\) .*nn\.Flatten\(\)"):
        fourier_heatmap(model, x, y, eps=1.0)


def test_a_channel_mismatch_names_the_conv_layer():
    x, y = _images(channels=3)
    with pytest.raises(ConfigurationError, match=r"layer '0' \(nn\.Conv2d, in_channels=1\).*3 channel"):
        fourier_heatmap(tiny_cnn((1, 5, 5)), x, y, eps=1.0)


class Failing(nn.Module):
    def __init__(self, exc: Exception):
        super().__init__()
        self.exc = exc
        self.lin = nn.Linear(25, 4).double()

    def forward(self, images):
        raise self.exc


@pytest.mark.parametrize("exc", [RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"),
                                 torch.cuda.OutOfMemoryError("CUDA out of memory"), ValueError("argument x")])
def test_other_model_errors_propagate_unchanged(exc):
    x, _ = _images()
    with pytest.raises(type(exc)) as info:
        single_fourier_attack(Failing(exc), x, eps=1.0)
    assert info.value is exc


def test_a_plain_function_is_a_model_too():
    x, y = _images()
    net = tiny_cnn((1, 5, 5))
    hm = fourier_heatmap(lambda images: net(images), x, y, eps=1.0)
    torch.testing.assert_close(hm.fooling, fourier_heatmap(net, x, y, eps=1.0).fooling, rtol=0, atol=0)
