"""Count options of the Python API: each is accepted at its bound and refused one past it, in one line,
before any work (the command-line side is in ``test_bad_inputs.py``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sturdy.compression.costmodel import MAX_MODEL_WORKERS, predict_step_times
from sturdy.distributed import max_local_workers
from sturdy.errors import ConfigurationError
from sturdy.experiments.flatness_grid import MAX_BOOTSTRAP, QUICK_GRID, max_grid_seeds, run_grid
from sturdy.fourier import evaluate_perturbation, fourier_heatmap, single_fourier_attack, strided_frequencies
from sturdy.fourier.limits import check_phases, check_shifts, max_phases
from sturdy.training import TrainConfig
from sturdy.validation import MAX_SEED, check_count, check_seed

MAX_LINE = 300


class _Counting(nn.Module):
    """A 4-class linear model on 1x4x4 images that counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.net(x)


X = torch.rand(5, 1, 4, 4)
Y = torch.arange(5) % 4


def _one_line(info) -> str:
    message = str(info.value)
    assert "\n" not in message and len(message) < MAX_LINE, message
    return message


def test_shifts_at_most_the_distinct_circular_shifts():
    model = _Counting()
    report = evaluate_perturbation(model, torch.zeros(1, 4, 4), X, Y, shifts=16)
    assert report.shifts == 16
    model = _Counting()
    with pytest.raises(ConfigurationError, match=r"shifts must be an integer in \[0, 16\] \(a 4x4 image has 16") as e:
        evaluate_perturbation(model, torch.zeros(1, 4, 4), X, Y, shifts=17)
    _one_line(e)
    assert model.calls == 0
    assert check_shifts(0, 3, 5) == 0
    with pytest.raises(ConfigurationError, match=r"\[0, 15\]"):
        check_shifts(16, 3, 5)


@pytest.mark.parametrize("value", [True, 1.0, "3", None, -1, 10**30])
def test_counts_of_another_type_or_sign_are_refused(value):
    with pytest.raises(ConfigurationError, match="shifts must be an integer"):
        check_shifts(value, 4, 4)


def test_phases_within_the_memory_budget():
    high = max_phases(1, 4, 4)
    assert check_phases(high, 1, 4, 4) == high
    model = _Counting()
    with pytest.raises(ConfigurationError, match=rf"phases must be an integer in \[1, {high}\].*memory") as e:
        single_fourier_attack(model, X, eps=1.0, phases=high + 1)
    _one_line(e)
    with pytest.raises(ConfigurationError, match="phases"):
        single_fourier_attack(model, X, eps=1.0, phases=10**9)
    assert model.calls == 0
    # more channels (more sign patterns) leave room for fewer phases
    assert max_phases(3, 4, 4) < high


def test_stride_and_save_every_bounded_by_the_image():
    assert strided_frequencies(4, 6, 6).tolist() == [[0, 0]]
    with pytest.raises(ConfigurationError, match=r"stride must be an integer in \[1, 6\]"):
        strided_frequencies(4, 6, 7)
    with pytest.raises(ConfigurationError, match="stride"):
        strided_frequencies(4, 4, 10**20)
    n_freq = 10  # the rfft half plane of a 4x4 image
    hm = fourier_heatmap(_Counting(), X, Y, eps=1.0, frequencies=[(0, 1)], save_every=n_freq)
    assert int(hm.measured.sum()) == 1
    model = _Counting()
    with pytest.raises(ConfigurationError, match=rf"save_every must be an integer in \[1, {n_freq}\]"):
        fourier_heatmap(model, X, Y, eps=1.0, frequencies=[(0, 1)], save_every=n_freq + 1)
    assert model.calls == 0


def test_frequencies_beyond_64_bits_are_refused_in_one_line():
    with pytest.raises(ConfigurationError, match="64 bits") as e:
        fourier_heatmap(_Counting(), X, Y, eps=1.0, frequencies=[(10**30, 1)])
    _one_line(e)


def test_seeds_are_32_bit():
    assert check_seed(MAX_SEED) == MAX_SEED and TrainConfig(seed=MAX_SEED).seed == MAX_SEED
    for bad in (MAX_SEED + 1, -1, 10**30, True):
        with pytest.raises(ConfigurationError, match="seed must be an integer in"):
            TrainConfig(seed=bad)
        with pytest.raises(ConfigurationError, match="seed"):
            check_seed(bad)


def test_grid_size_bootstrap_and_workers():
    from dataclasses import replace

    most = max_grid_seeds(QUICK_GRID)
    assert len(replace(QUICK_GRID, seeds=tuple(range(most))).seeds) == most
    with pytest.raises(ConfigurationError, match=rf"grid seeds must be an integer in \[1, {most}\]"):
        replace(QUICK_GRID, seeds=tuple(range(most + 1)))
    assert replace(QUICK_GRID, bootstrap=MAX_BOOTSTRAP).bootstrap == MAX_BOOTSTRAP
    with pytest.raises(ConfigurationError, match=rf"bootstrap must be an integer in \[0, {MAX_BOOTSTRAP}\]"):
        replace(QUICK_GRID, bootstrap=MAX_BOOTSTRAP + 1)


def test_grid_workers_refused_before_any_work(tmp_path):
    with pytest.raises(ConfigurationError, match=rf"workers must be an integer in \[1, {max_local_workers()}\]"):
        run_grid(out=tmp_path / "grid", spec=QUICK_GRID, workers=max_local_workers() + 1, progress=False)
    assert not (tmp_path / "grid").exists() or not any((tmp_path / "grid").iterdir())


def test_cost_model_worker_counts():
    kw = dict(compute_s=0.1, dense_bytes=1e6, compression_ratio=10.0, bandwidths_gbps=[1.0], latency_s=0.0)
    assert predict_step_times(workers=[MAX_MODEL_WORKERS], **kw)[0].workers == MAX_MODEL_WORKERS
    with pytest.raises(ConfigurationError, match=rf"worker counts must be ints in \[1, {MAX_MODEL_WORKERS}\]"):
        predict_step_times(workers=[MAX_MODEL_WORKERS + 1], **kw)


def test_check_count_names_the_bound_and_its_reason():
    with pytest.raises(ConfigurationError, match=r"n must be an integer in \[1, 3\] \(three of them\), got 4"):
        check_count(4, "n", high=3, why="three of them")
    with pytest.raises(ConfigurationError, match="got 1" + "0" * 29 + r"\.\.\.$"):
        check_count(10**60, "n", high=3, why="three")


def test_the_noise_baseline_and_the_combination_attack_bound_their_counts_before_any_work():
    from sturdy.fourier import fourier_combination_attack, random_noise_baseline
    from sturdy.fourier.limits import MAX_DRAWS

    model = _Counting()
    with pytest.raises(ConfigurationError, match=rf"draws must be an integer in \[1, {MAX_DRAWS}\]") as e:
        random_noise_baseline(model, X, Y, eps=0.5, draws=MAX_DRAWS + 1)
    _one_line(e)
    assert model.calls == 0
    assert random_noise_baseline(model, X, Y, eps=0.5, draws=2).draws == 2
    # a 4x4 image has 4 * 3 = 12 distinct directions: at most 12 rounds
    for kwargs, match in (({"rounds": 13}, r"rounds must be an integer in \[0, 12\]"),
                          ({"pool": 10**12}, r"pool must be an integer in \[1, ")):
        model = _Counting()
        with pytest.raises(ConfigurationError, match=match) as e:
            fourier_combination_attack(model, X, eps=0.5, **kwargs)
        _one_line(e)
        assert model.calls == 0
