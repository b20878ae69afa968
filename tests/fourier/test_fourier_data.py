"""The Fourier heat map and attacks read data through the contract of sturdy.datasource: a DataLoader or a stream
of batches gives the counts of the same images held as tensors, one batch on the device at a time."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from sturdy.data import ImageDataset
from sturdy.errors import ConfigurationError, DataError
from sturdy.fourier import fourier_heatmap

from .conftest import tiny_cnn

APPLIED_TOL = 1e-12  # applied budgets are float64 sums, added batch by batch in another order; rates are counts
SHAPE = (2, 5, 6)
GEN = torch.Generator().manual_seed(3)
X = torch.rand(13, *SHAPE, generator=GEN, dtype=torch.float64)
Y = torch.randint(0, 4, (13,), generator=GEN)


def _same_map(a, b, *, resumed: bool = False):
    assert torch.equal(a.error, b.error) and torch.equal(a.fooling, b.fooling)
    torch.testing.assert_close(a.applied, b.applied, rtol=APPLIED_TOL, atol=APPLIED_TOL)
    assert a.clean_error == b.clean_error and a.n_images == b.n_images
    assert resumed or a.evaluations == b.evaluations  # frequencies loaded from partial results cost none


@pytest.mark.parametrize("phase", [0.5, None])
def test_a_dataloader_gives_the_heatmap_of_tensors(phase):
    model = tiny_cnn(SHAPE)
    whole = fourier_heatmap(model, X, Y, eps=1.0, phase=phase, batch_size=16, seed=2)
    assert 0 < float(whole.fooling.max()) < 1
    for data in (DataLoader(TensorDataset(X, Y), batch_size=4), TensorDataset(X, Y), ImageDataset(X, Y, 4)):
        _same_map(fourier_heatmap(model, data, eps=1.0, phase=phase, batch_size=16, seed=2), whole)


def test_a_streamed_heatmap_reads_each_batch_once_one_at_a_time():
    model = tiny_cnn(SHAPE)
    log = []
    model.register_forward_pre_hook(lambda m, args: log.append(("forward", args[0].shape[0])))

    def stream():
        for start in range(0, 13, 5):
            log.append(("read", start))
            yield X[start : start + 5], Y[start : start + 5]

    streamed = fourier_heatmap(model, stream(), count=13, eps=1.0, batch_size=16, seed=2)
    reads = [i for i, event in enumerate(log) if event[0] == "read"]
    assert len(reads) == 3  # one pass
    for earlier, later in zip(reads, reads[1:]):
        assert any(event[0] == "forward" for event in log[earlier + 1 : later])  # no read-ahead
    _same_map(streamed, fourier_heatmap(model, X, Y, eps=1.0, batch_size=16, seed=2))


def test_streamed_heatmap_refusals(tmp_path):
    model = tiny_cnn(SHAPE)
    batches = [(X[:6], Y[:6]), (X[6:], Y[6:])]
    with pytest.raises(ConfigurationError, match="needs the number of images.*count=N"):
        fourier_heatmap(model, iter(batches), eps=1.0)
    with pytest.raises(ConfigurationError, match="reads the data several times.*can be read once"):
        fourier_heatmap(model, iter(batches), count=13, eps=1.0, partial=tmp_path / "p.json")
    bad = X.clone()
    bad[7, 0, 0, 0] = 2.0
    with pytest.raises(DataError, match=r"batch 1 \(samples 6 to 12\).*outside the valid pixel range"):
        fourier_heatmap(model, [(X[:6], Y[:6]), (bad[6:], Y[6:])], count=13, eps=1.0)
    with pytest.raises(DataError, match="held 13 samples but its count says 14"):
        fourier_heatmap(model, batches, count=14, eps=1.0)
    with pytest.raises(ConfigurationError, match="labels y go with image tensors"):
        fourier_heatmap(model, batches, Y, eps=1.0)


def test_streamed_partial_results_resume_like_tensors(tmp_path):
    model = tiny_cnn(SHAPE)
    batches = [(X[:6], Y[:6]), (X[6:], Y[6:])]
    path = tmp_path / "partial.json"
    first = fourier_heatmap(model, batches, count=13, eps=1.0, batch_size=16, seed=2, frequencies=[(0, 1), (1, 1)],
                            partial=path, save_every=1)
    assert int(first.measured.sum()) == 2
    whole = fourier_heatmap(model, X, Y, eps=1.0, batch_size=16, seed=2, partial=path)  # the same digests
    assert whole.resumed == 2
    _same_map(whole, fourier_heatmap(model, X, Y, eps=1.0, batch_size=16, seed=2), resumed=True)


@pytest.mark.parametrize("search", ["staged", "halving", "exhaustive"])
def test_a_dataloader_gives_the_attack_of_tensors(search):
    from sturdy.fourier import single_fourier_attack

    model = tiny_cnn(SHAPE)
    kw = dict(eps=1.5, search=search, phases=2, batch_size=32, seed=4, screen_images=6, keep_frequencies=3)
    whole = single_fourier_attack(model, X, **kw)
    assert 0 < whole.fooling_rate < 1
    for data in (DataLoader(TensorDataset(X, Y), batch_size=5), TensorDataset(X, Y)):
        streamed = single_fourier_attack(model, data, **kw)
        assert streamed.fooling_rate == whole.fooling_rate and streamed.queries == whole.queries
        assert (streamed.frequency, streamed.phase, streamed.signs) == (whole.frequency, whole.phase, whole.signs)
        assert torch.equal(streamed.delta, whole.delta)


def test_the_attacks_refuse_a_one_shot_stream_and_read_one_batch_at_a_time():
    from sturdy.fourier import fourier_combination_attack, single_fourier_attack

    model = tiny_cnn(SHAPE)
    with pytest.raises(ConfigurationError, match="Single Fourier Attack reads the data several times"):
        single_fourier_attack(model, iter([(X, Y)]), count=13, eps=1.0)
    with pytest.raises(ConfigurationError, match="combination attack reads the data several times"):
        fourier_combination_attack(model, (b for b in [(X, Y)]), count=13, eps=1.0)
    log = []
    model.register_forward_pre_hook(lambda m, args: log.append(("forward", args[0].shape[0])))

    class Stream:
        def __iter__(self):
            for start in range(0, 13, 5):
                log.append(("read", start))
                yield X[start : start + 5], Y[start : start + 5]

    streamed = single_fourier_attack(model, Stream(), count=13, eps=1.5, search="halving", phases=2, batch_size=32)
    reads = [i for i, event in enumerate(log) if event[0] == "read"]
    for earlier, later in zip(reads, reads[1:]):
        assert any(event[0] == "forward" for event in log[earlier + 1 : later])  # no read-ahead
    whole = single_fourier_attack(model, X, eps=1.5, search="halving", phases=2, batch_size=32)
    assert streamed.fooling_rate == whole.fooling_rate and torch.equal(streamed.delta, whole.delta)


def test_a_dataloader_gives_the_combination_of_tensors():
    from sturdy.fourier import fourier_combination_attack

    model = tiny_cnn(SHAPE)
    kw = dict(eps=1.5, pool=4, rounds=2, scan_images=6, batch_size=64, seed=1)
    whole = fourier_combination_attack(model, X, **kw)
    streamed = fourier_combination_attack(model, DataLoader(TensorDataset(X, Y), batch_size=5), **kw)
    assert streamed.fooling_rate == whole.fooling_rate and streamed.queries == whole.queries
    assert streamed.steps == whole.steps and torch.equal(streamed.delta, whole.delta)


@pytest.mark.parametrize("shifts", [0, 3])
def test_a_dataloader_gives_the_held_out_rates_of_tensors(shifts):
    from sturdy.fourier import evaluate_perturbation, random_noise_baseline, single_fourier_attack

    model = tiny_cnn(SHAPE)
    delta = single_fourier_attack(model, X, eps=1.5, phases=2, batch_size=32).delta
    whole = evaluate_perturbation(model, delta, X, Y, shifts=shifts, batch_size=4, seed=3)
    assert 0 < whole.fooling_rate < 1
    for data in (DataLoader(TensorDataset(X, Y), batch_size=5), ImageDataset(X, Y, 4)):
        streamed = evaluate_perturbation(model, delta, data, shifts=shifts, batch_size=4, seed=3)
        for key in ("fooling_rate", "error_rate", "clean_error_rate", "shifted_fooling_rate", "shifted_error_rate",
                    "n_images"):
            assert getattr(streamed, key) == getattr(whole, key), key
        assert streamed.mean_l2 == pytest.approx(whole.mean_l2, rel=APPLIED_TOL)
    noise = random_noise_baseline(model, X, Y, eps=1.0, draws=2, shifts=shifts, batch_size=4)
    streamed_noise = random_noise_baseline(model, DataLoader(TensorDataset(X, Y), batch_size=5), eps=1.0, draws=2,
                                           shifts=shifts, batch_size=4)
    assert streamed_noise.fooling_rates == noise.fooling_rates
    with pytest.raises(ConfigurationError, match="random_noise_baseline reads the data several times"):
        random_noise_baseline(model, iter([(X, Y)]), count=13, eps=1.0, draws=2)


def test_a_one_shot_stream_is_refused_before_its_first_batch_is_read():
    from sturdy.fourier import fourier_combination_attack, random_noise_baseline, single_fourier_attack

    model = tiny_cnn(SHAPE)
    for attack in (single_fourier_attack, fourier_combination_attack):
        stream = iter([(X[:7], Y[:7]), (X[7:], Y[7:])])
        with pytest.raises(ConfigurationError, match="reads the data several times"):
            attack(model, stream, count=13, eps=1.0)
        assert len(list(stream)) == 2  # left untouched: the caller can still use it
    stream = iter([(X, Y)])
    with pytest.raises(ConfigurationError, match="reads the data several times"):
        random_noise_baseline(model, stream, count=13, eps=1.0, draws=2)
    assert len(list(stream)) == 1


def test_a_label_out_of_range_in_a_streamed_batch_is_named_by_its_batch():
    model = tiny_cnn(SHAPE)
    y = Y.clone()
    y[12] = 9
    with pytest.raises(DataError, match=r"batch 2 \(samples 10 to 12\): targets must be class indices in \[0, "):
        fourier_heatmap(model, DataLoader(TensorDataset(X, y), batch_size=5), eps=1.0, frequencies=[(0, 1)])


def test_a_count_smaller_than_the_stream_is_refused_at_the_batch_that_passes_it():
    model = tiny_cnn(SHAPE)

    class Stream:
        def __iter__(self):
            for start in range(0, 13, 5):
                yield X[start : start + 5], Y[start : start + 5]

    with pytest.raises(DataError, match=r"batch 2 \(samples 10 to 12\): the data holds more samples than its count"):
        fourier_heatmap(model, Stream(), count=11, eps=1.0, frequencies=[(0, 1)])


def test_the_gradient_spectrum_names_the_streamed_batch_of_a_label_out_of_range():
    from sturdy.fourier import gradient_spectrum

    y = Y.clone()
    y[12] = 9
    with pytest.raises(DataError, match=r"batch 2 \(samples 10 to 12\): y must lie in \[0, "):
        gradient_spectrum(tiny_cnn(SHAPE), DataLoader(TensorDataset(X, y), batch_size=5))
