"""The data contract of the analyses (sturdy.datasource): every form of data gives the same checked batches,
bad batches are named, counts are checked, a one-shot source is told apart."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from sturdy.data import ImageDataset
from sturdy.datasource import DataSource, data_source
from sturdy.errors import ConfigurationError, DataError

CPU = torch.device("cpu")
X = torch.rand(10, 1, 4, 4, generator=torch.Generator().manual_seed(0))
Y = torch.arange(10) % 3


def _read(src: DataSource, **kw):
    return list(src.batches(device=CPU, dtype=torch.float64, **kw))


def _same(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_every_form_gives_the_same_batches():
    reference = _read(data_source(X, Y, batch_size=4))
    assert [x.shape[0] for x, _ in reference] == [4, 4, 2]
    assert all(x.dtype == torch.float64 for x, _ in reference)
    forms = [(X, Y), ImageDataset(X, Y, 3), TensorDataset(X, Y), DataLoader(TensorDataset(X, Y), batch_size=4),
             [(X[i : i + 4], Y[i : i + 4]) for i in range(0, 10, 4)]]
    for form in forms:
        _same(_read(data_source(form, batch_size=4)), reference)


def test_counts_are_known_checked_and_refused_when_wrong():
    assert data_source(X, Y).count == 10
    assert data_source(TensorDataset(X, Y)).count == 10
    assert data_source(DataLoader(TensorDataset(X, Y), batch_size=4, drop_last=True)).count == 8
    assert data_source(iter([(X, Y)])).count is None
    with pytest.raises(DataError, match="count is 9 but the data holds 10"):
        data_source(X, Y, count=9)
    src = data_source([(X, Y)], count=11)
    with pytest.raises(DataError, match="held 10 samples but its count says 11"):
        _read(src)
    with pytest.raises(ConfigurationError, match="count must be an integer"):
        data_source(X, Y, count=0)


def test_a_bad_batch_is_named_by_its_index():
    bad = X.clone()
    bad[5, 0, 1, 1] = float("nan")
    with pytest.raises(DataError, match=r"batch 1 \(samples 4 to 7\): inputs hold NaN or inf values in 1 sample\(s\), "
                                        r"the first is sample 5"):
        _read(data_source(bad, Y, batch_size=4))
    with pytest.raises(DataError, match=r"batch 2 \(samples 8 to 9\): targets must be class indices in \[0, 2\]"):
        _read(data_source(X, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 5]), batch_size=4), num_classes=3)
    with pytest.raises(DataError, match="batch 0.*integer class indices, got dtype torch.float32"):
        _read(data_source(X, Y.float(), batch_size=4))
    with pytest.raises(DataError, match="batch 1.*same number of samples"):
        _read(data_source([(X[:4], Y[:4]), (X[4:], Y[4:6])]))
    with pytest.raises(DataError, match=r"batch 1 \(samples 4 to 9\): inputs of shape \(1, 4, 3\) after \(1, 4, 4\)"):
        _read(data_source([(X[:4], Y[:4]), (X[4:, :, :, :3], Y[4:])]))
    with pytest.raises(DataError, match="batch 0: each batch must be an"):
        _read(data_source([X]))
    with pytest.raises(DataError, match="must hold floating-point values.*uint8"):
        _read(data_source((X * 255).to(torch.uint8), Y))
    with pytest.raises(DataError, match="holds no samples"):
        _read(data_source([(X[:0], Y[:0])]))
    with pytest.raises(DataError, match="cannot read samples from a int"):
        data_source(3)


def test_class_count_from_the_first_batch_and_regression_targets():
    widths = []

    def width(x: torch.Tensor) -> int:
        widths.append(x.shape[0])
        return 2

    with pytest.raises(DataError, match=r"batch 0 \(samples 0 to 3\).*\[0, 1\]"):
        _read(data_source(X, Y, batch_size=4), num_classes=width)
    assert widths == [4]
    targets = torch.rand(10, 2)  # regression targets pass without classes
    assert len(_read(data_source(X, targets, batch_size=4), classes=False)) == 3


def test_uint8_pixels_of_an_image_dataset_become_unit_floats_per_batch():
    pixels = (X * 255).to(torch.uint8)
    batches = _read(data_source(ImageDataset(pixels, Y, 3), batch_size=4))
    torch.testing.assert_close(torch.cat([x for x, _ in batches]), pixels.double() / 255, rtol=0, atol=0)


def test_one_shot_sources_are_told_apart():
    for again in [(X, Y), TensorDataset(X, Y), DataLoader(TensorDataset(X, Y)), [(X, Y)]]:
        data_source(again).require_reiterable("the search")
    once = data_source(b for b in [(X, Y)])
    assert not once.reiterable
    with pytest.raises(ConfigurationError, match="the search reads the data several times.*can be read once"):
        once.require_reiterable("the search")


def test_batches_are_read_one_at_a_time():
    log = []

    class Stream:
        def __iter__(self):
            for i in range(0, 10, 4):
                log.append(("read", i))
                yield X[i : i + 4], Y[i : i + 4]

    for x, _ in data_source(Stream()).batches(device=CPU, dtype=torch.float32):
        log.append(("used", x.shape[0]))
    assert log == [("read", 0), ("used", 4), ("read", 4), ("used", 4), ("read", 8), ("used", 2)]


def test_batches_of_another_form_are_refused_naming_their_form():
    loader = DataLoader(TensorDataset(X, Y, torch.arange(10)), batch_size=4)  # (x, y, index) batches
    with pytest.raises(DataError, match=r"batch 0: each batch must be an \(inputs, targets\) pair, got 3 items"):
        _read(data_source(loader))
    with pytest.raises(DataError, match="got a dict"):
        _read(data_source([{"x": X, "y": Y}]))
    # a DataLoader of batch_size=None yields single samples: refused when the source is built, before any work
    with pytest.raises(DataError, match="batch_size=None, so it yields single samples"):
        data_source(DataLoader(TensorDataset(X, Y), batch_size=None))
