"""Node-wise rescaling keeps the function and refuses what it cannot rescale."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sturdy.errors import ConfigurationError, UnsupportedModuleError
from sturdy.flatness import rescale_nodes
from sturdy.models import create_model

OUTPUT_RTOL = 1e-10


class _Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc1 = nn.Linear(4 * 4 * 4, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.conv(x)), 2)
        h = torch.relu(self.fc1(h.view(h.shape[0], -1)))
        return self.fc2(h)


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)) + x)


@pytest.mark.parametrize(
    "make,shape",
    [
        (lambda: create_model("mlp", in_shape=(1, 8, 8), num_classes=10, width=16), (1, 8, 8)),
        (lambda: create_model("cnn", in_shape=(1, 8, 8), num_classes=10, channels=(4, 6), width=8), (1, 8, 8)),
        (lambda: create_model("cnn", in_shape=(2, 6, 6), num_classes=3, channels=(3,), width=5, pool="avg"),
         (2, 6, 6)),
        (_Functional, (1, 8, 8)),
    ],
    ids=["mlp", "cnn-max", "cnn-avg", "functional"],
)
def test_function_preserved_and_weights_changed(make, shape):
    torch.manual_seed(0)
    model = make().double()
    x = torch.rand(6, *shape, dtype=torch.float64)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    scaled = rescale_nodes(model, seed=3)
    torch.testing.assert_close(scaled(x), model(x), rtol=OUTPUT_RTOL, atol=1e-12)
    for n, p in model.state_dict().items():
        assert torch.equal(p, before[n])  # the original is untouched
    changed = [n for n, p in scaled.state_dict().items() if not torch.allclose(p, before[n])]
    assert len(changed) >= 2
    again = rescale_nodes(model, seed=3)
    for n, p in scaled.state_dict().items():
        assert torch.equal(p, again.state_dict()[n])  # seeded


def test_refusals():
    bn = create_model("cnn", in_shape=(1, 8, 8), num_classes=10, batchnorm=True)
    with pytest.raises(UnsupportedModuleError, match="BatchNorm2d at '1'.*without BatchNorm") as info:
        rescale_nodes(bn)
    assert info.value.path == "1"
    with pytest.raises(UnsupportedModuleError, match="Sigmoid.*not positively homogeneous"):
        rescale_nodes(nn.Sequential(nn.Linear(2, 3), nn.Sigmoid(), nn.Linear(3, 1)))
    with pytest.raises(UnsupportedModuleError, match="residual connections are not handled"):
        rescale_nodes(_Residual())
    with pytest.raises(ConfigurationError, match="at least two weight layers"):
        rescale_nodes(nn.Sequential(nn.Linear(2, 3)))
    with pytest.raises(ConfigurationError, match="need 0 < low <= high"):
        rescale_nodes(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)), low=2.0, high=1.0)
