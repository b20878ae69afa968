"""Every Fourier analysis evaluates an nn.Module in eval mode and restores its training flags after."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sturdy.fourier import (
    evaluate_perturbation,
    fourier_combination_attack,
    fourier_heatmap,
    gradient_spectrum,
    plot_examples,
    random_noise_baseline,
    single_fourier_attack,
)

SHAPE = (2, 5, 5)


def train_mode_bn_model() -> nn.Module:
    """A conv net with BatchNorm (non-trivial running statistics) and Dropout, left in train mode."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(),
        nn.Linear(4 * 25, 3),
    ).double()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
        model[5].weight.mul_(3.0)
    model[3].eval()  # a mixed state: every submodule's own flag must come back
    return model


def _data():
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(10, *SHAPE, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (10,), generator=gen)
    return x, y


def _titles(fig) -> list:
    """The panel titles of a figure (they hold the predicted labels)."""
    return [ax.get_title() for ax in fig.axes]


ANALYSES = {
    "fourier_heatmap": lambda m, x, y: fourier_heatmap(m, x, y, eps=1.0).fooling,
    "single_fourier_attack": lambda m, x, y: single_fourier_attack(m, x, eps=1.0, initial_images=4).delta,
    "evaluate_perturbation": lambda m, x, y: evaluate_perturbation(
        m, torch.full(SHAPE, 0.1, dtype=torch.float64), x, y, shifts=1).fooling_rate,
    "gradient_spectrum": lambda m, x, y: gradient_spectrum(m, x, y).power,
    "fourier_combination_attack": lambda m, x, y: fourier_combination_attack(
        m, x, eps=1.0, rounds=1, pool=2).delta,
    "random_noise_baseline": lambda m, x, y: random_noise_baseline(m, x, y, eps=1.0, draws=2).fooling_rate,
    "plot_examples": lambda m, x, y: _titles(plot_examples(m, torch.full(SHAPE, 0.3), x, n=3)),
}


@pytest.mark.parametrize("name", list(ANALYSES))
def test_analysis_keeps_running_stats_and_training_flags(name):
    model = train_mode_bn_model()
    flags = [m.training for m in model.modules()]
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _data()
    got = ANALYSES[name](model, x, y)
    assert [m.training for m in model.modules()] == flags
    for key, value in model.state_dict().items():
        assert torch.equal(value, stats[key]), key
    # The analysis saw the model in eval mode: the same result as on an eval-mode copy (Dropout off).
    reference = ANALYSES[name](copy.deepcopy(model).eval(), x, y)
    if isinstance(got, torch.Tensor):
        torch.testing.assert_close(got, reference, rtol=0, atol=0)
    else:
        assert got == reference


def test_flags_are_restored_when_the_analysis_raises():
    model = train_mode_bn_model()
    x, _ = _data()
    with pytest.raises(Exception, match="search must be one of"):
        single_fourier_attack(model, x, eps=1.0, search="nope")
    assert model.training and model[1].training and not model[3].training
