"""Layers whose operator is exactly zero (timm's ResNets zero-initialise the last BatchNorm of every residual
block): the guaranteed bound is 0 for them, not an error, on the dense and the FFT path alike; and a certificate
with no correct prediction (a randomly initialised model) plots its radius histogram without a warning."""

import pytest
import torch
from torch import nn

from sturdy.lipschitz import lipschitz_bound
from sturdy.lipschitz.norms import max_singular_value_upper

from .lipschitz_reference import exact_norm


@pytest.mark.parametrize("shape", [(3, 4, 5), (2, 6, 2), (1, 1, 1)])
def test_zero_blocks_give_zero_and_a_unit_top_vector(shape):
    for blocks in (torch.zeros(shape), torch.zeros(shape, dtype=torch.complex64)):
        bound, (index, vector) = max_singular_value_upper(blocks, return_vector=True)
        assert bound == 0.0 and index == 0 and vector.shape == (shape[-1],)
        assert float(vector.norm()) == pytest.approx(1.0, rel=1e-12)


class _ZeroInitBlock(nn.Module):
    """x + BN(conv(x)) with the BatchNorm's scale zero (timm's ``zero_init_last``), then a linear head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(2)
        nn.init.zeros_(self.bn.weight)
        self.head = nn.Linear(2 * 6 * 6, 3)

    def forward(self, x):
        return self.head((x + self.bn(self.conv(x))).flatten(1))


@pytest.mark.parametrize("dense_max_entries", [0, 10**6])  # 0: every operator takes the FFT path
def test_a_zero_initialised_residual_branch_is_bounded(dense_max_entries):
    torch.manual_seed(0)
    model = _ZeroInitBlock().eval()
    bound = lipschitz_bound(model, input_shape=(1, 2, 6, 6), dense_max_entries=dense_max_entries)
    exact = exact_norm(model, (2, 6, 6))  # the block is the identity: the head's norm
    assert exact <= bound.upper <= exact * (1 + 1e-3)
    branch = [layer for layer in bound.per_layer if "conv" in layer.path]
    assert branch and branch[0].upper == 0.0


@pytest.mark.parametrize("correct", [[False, False], [True, False]])
def test_the_radius_histogram_draws_without_a_warning_when_nothing_is_correct(correct):
    import warnings

    from sturdy.experiments.lipschitz_certify import plot_radius_histogram
    from sturdy.lipschitz.certify import Certificate

    cert = Certificate(radius=torch.zeros(2, dtype=torch.float64), predicted=torch.zeros(2, dtype=torch.long),
                       correct=torch.tensor(correct), bound=None, form="pairwise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns when a log scale has no positive value
        fig = plot_radius_histogram({"model": cert})
    assert fig.axes[0].get_yscale() == ("log" if any(correct) else "linear")
