import sys

import pytest
import torch

from sturdy.data import apply_label_noise, available_datasets, load_dataset
from sturdy.errors import ConfigurationError, DataError, MissingDependencyError


def test_digits_shapes_ranges_and_split():
    train = load_dataset("digits", split="train")
    test = load_dataset("digits", split="test")
    assert train.images.shape == (1300, 1, 8, 8) and test.images.shape == (497, 1, 8, 8)
    assert train.images.dtype == torch.float32 and train.labels.dtype == torch.long
    for ds in (train, test):
        assert float(ds.images.min()) >= 0.0 and float(ds.images.max()) <= 1.0
        assert set(ds.labels.tolist()) == set(range(10))
    assert train.num_classes == 10 and train.image_shape == (1, 8, 8)
    x, y = train[3]
    assert x.shape == (1, 8, 8) and int(y) == int(train.labels[3])
    assert len(train) == 1300


def test_digits_is_deterministic_and_independent_of_seed():
    a = load_dataset("digits", split="train", seed=0)
    b = load_dataset("digits", split="train", seed=123)
    torch.testing.assert_close(a.images, b.images, rtol=0, atol=0)
    assert torch.equal(a.labels, b.labels)


def test_digits_resize():
    ds = load_dataset("digits", split="test", resize=16)
    assert ds.images.shape == (497, 1, 16, 16)
    assert float(ds.images.min()) >= 0.0 and float(ds.images.max()) <= 1.0
    with pytest.raises(ConfigurationError, match="resize must be a positive integer"):
        load_dataset("digits", resize=0)


def test_synthetic_is_seeded_and_shaped():
    a = load_dataset("synthetic", split="train", seed=1, num_samples=20, image_shape=(3, 5, 7), num_classes=4)
    b = load_dataset("synthetic", split="train", seed=1, num_samples=20, image_shape=(3, 5, 7), num_classes=4)
    c = load_dataset("synthetic", split="train", seed=2, num_samples=20, image_shape=(3, 5, 7), num_classes=4)
    assert a.images.shape == (20, 3, 5, 7) and a.num_classes == 4
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    assert int(a.labels.max()) < 4


def test_unknown_dataset_lists_known_names():
    with pytest.raises(DataError, match="unknown data set 'nope'.*digits"):
        load_dataset("nope")
    assert "digits" in available_datasets() and "cifar10" in available_datasets()


def test_bad_split():
    with pytest.raises(ConfigurationError, match="split must be 'train' or 'test'"):
        load_dataset("digits", split="validation")


def test_missing_torchvision_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes `import torchvision` fail
    with pytest.raises(MissingDependencyError, match=r"pip install 'sturdy\[vision\]'"):
        load_dataset("cifar10", split="train")


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 1.0])
def test_label_noise_changes_exactly_the_fraction(fraction):
    labels = load_dataset("digits", split="train").labels
    noisy = apply_label_noise(labels, fraction=fraction, num_classes=10, seed=3)
    changed = int((noisy != labels).sum())
    assert changed == round(fraction * len(labels))
    assert int(noisy.min()) >= 0 and int(noisy.max()) < 10
    again = apply_label_noise(labels, fraction=fraction, num_classes=10, seed=3)
    assert torch.equal(noisy, again)


def test_label_noise_validates_fraction():
    with pytest.raises(ConfigurationError, match=r"label noise fraction must lie in \[0, 1\]"):
        apply_label_noise(torch.zeros(5, dtype=torch.long), fraction=1.5, num_classes=10, seed=0)


def test_shipped_digits_equal_scikit_learn():
    from sklearn.datasets import load_digits

    from sturdy.data import digits_arrays

    bunch = load_digits()
    images, labels = digits_arrays()
    assert images.shape == (1797, 8, 8) and labels.shape == (1797,)
    assert (images == bunch.images).all() and (labels == bunch.target).all()
