"""The public Python API under hostile use: every mistake raises a ``SturdyError`` subclass whose message
says what was wrong and what was expected, before any work or allocation.

The shared checks of :mod:`sturdy.validation` come first, then the core (data, training, checkpoints),
then the parts' entry points.
"""

import copy
import errno
import json
import os
import warnings

import pytest
import torch
from torch import nn

import sturdy.fourier as fourier
import sturdy.lipschitz as lipschitz
from sturdy import flatness
from sturdy.checkpoints import load_checkpoint, save_checkpoint
from sturdy.data import ImageDataset, load_dataset
from sturdy.errors import CheckpointError, ConfigurationError, DataError, SturdyError
from sturdy.experiments.train_job import TrainJob, build_model, fit, load_trained_model
from sturdy.training import TrainConfig, evaluate, train
from sturdy.validation import (
    check_batch,
    check_finite_weights,
    check_images,
    check_input_shape,
    check_int,
    check_labels,
    check_number,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _model() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()


X = torch.rand(8, 1, 8, 8)
Y = torch.arange(8) % 10


def _nan(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[0, 0, 0, 0] = float("nan")
    return x


# ----------------------------------------------------------------------------- sturdy.validation


@pytest.mark.parametrize("x, message", [
    ([[0.0]], "torch.Tensor"),
    (torch.rand(1, 8, 8), r"\(N, C, H, W\).*unsqueeze\(1\)"),
    ((torch.rand(2, 1, 8, 8) * 255).to(torch.uint8), r"floating-point.*x.float\(\) / 255"),
    (torch.rand(0, 1, 8, 8), "no images"),
    (_nan(X), "1 of 512 values are NaN or infinite"),
    (X * float("inf"), "NaN or infinite"),
    (X * 300, r"outside the valid pixel range \[0, 1\]"),
])
def test_check_images_says_what_and_how(x, message):
    with pytest.raises(DataError, match=message):
        check_images(x)


def test_check_images_accepts_good_batches_and_other_ranges():
    assert check_images(X) is X
    check_images(X * 2 - 1, bounds=(-1, 1))
    check_images(X * 300, bounds=None)
    check_images(torch.rand(0, 1, 8, 8), allow_empty=True)


@pytest.mark.parametrize("y, kwargs, message", [
    (Y.float(), {}, "integer class indices.*float32"),
    (Y > 3, {}, "integer class indices.*bool"),
    (Y[:, None], {}, r"shape \(N,\)"),
    (torch.nn.functional.one_hot(Y, 10), {}, r"one-hot.*argmax"),
    (torch.full((8,), 10), {"num_classes": 10}, r"\[0, 9\].*\[10, 10\]"),
    (torch.full((8,), -1), {"num_classes": 10}, r"\[0, 9\]"),
    (Y[:3], {"count": 8}, "one label per sample"),
    ([1, 2], {}, "torch.Tensor"),
])
def test_check_labels_says_what_and_how(y, kwargs, message):
    with pytest.raises(DataError, match=message):
        check_labels(y, **kwargs)


def test_check_batch_and_weights():
    check_batch(X, Y, num_classes=10)
    with pytest.raises(DataError, match="one label per sample"):
        check_batch(X, Y[:3])
    model = _model()
    assert check_finite_weights(model) is model
    with torch.no_grad():
        model[1].weight[0, 0] = float("inf")
    with pytest.raises(DataError, match=r"1\.weight.*diverge"):
        check_finite_weights(model)


def test_check_input_shape():
    assert check_input_shape((1, 8, 8)) == (1, 1, 8, 8)
    assert check_input_shape([1, 3, 32, 32]) == (1, 3, 32, 32)
    for bad in [(8, 8), (2, 1, 8, 8), (1, 0, 8, 8), (1, 1, 8.5, 8), ("a", 1, 1), 5, (1, 1, 10**5, 10**5)]:
        with pytest.raises(ConfigurationError, match="input_shape"):
            check_input_shape(bad)


def test_check_number_and_int():
    assert check_number(0.5, "eps", low=0, low_open=True) == 0.5
    for bad in [float("nan"), float("inf"), 0.0, -1, "x", True, None]:
        with pytest.raises(ConfigurationError, match=r"eps must be a finite number in \(0, inf\]"):
            check_number(bad, "eps", low=0, low_open=True)
    assert check_int(torch.tensor(3), "n", low=1) == 3
    for bad in [0, 2.0, True, "3", None, 10**9]:
        with pytest.raises(ConfigurationError, match=r"n must be an integer in \[1, 100\]"):
            check_int(bad, "n", low=1, high=100)


# ----------------------------------------------------------------------------- sturdy.data


@pytest.mark.parametrize("kwargs, error, message", [
    ({"name": None}, DataError, "unknown data set"),
    ({"resize": 0}, ConfigurationError, "resize must be a positive integer"),
    ({"resize": True}, ConfigurationError, "resize"),
    ({"resize": 100000}, ConfigurationError, "at most 4096"),
    ({"resize": 4096}, DataError, "GiB.*smaller resize"),
    ({"num_samples": 5}, ConfigurationError, "'digits' takes no option"),
    ({"name": "synthetic", "num_samples": 10**12}, DataError, "GiB"),
    ({"name": "synthetic", "num_samples": 10.5}, ConfigurationError, "num_samples"),
    ({"name": "synthetic", "num_classes": 1}, ConfigurationError, "num_classes"),
    ({"name": "synthetic", "image_shape": (8, 8)}, ConfigurationError, "input_shape"),
    ({"split": "val"}, ConfigurationError, "split"),
])
def test_load_dataset_refuses(kwargs, error, message):
    kwargs = {"name": "digits", **kwargs}
    with pytest.raises(error, match=message):
        load_dataset(kwargs.pop("name"), **kwargs)


@pytest.mark.parametrize("images, labels, classes, message", [
    (X[:, 0], Y, 10, r"\(N, C, H, W\)"),
    ((X * 255).to(torch.int32), Y, 10, "floating-point .* or uint8"),  # uint8 pixels are accepted
    (X, Y.float(), 10, "integer tensor"),
    (X, Y[:3], 10, "8 images and 3 labels"),
    (X, Y, 0, "num_classes"),
])
def test_image_dataset_checks_its_structure(images, labels, classes, message):
    with pytest.raises(DataError, match=message):
        ImageDataset(images, labels, classes)


# ----------------------------------------------------------------------------- sturdy.training


def _data(n=32, images=None, labels=None, classes=10):
    images = torch.rand(n, 1, 8, 8) if images is None else images
    labels = torch.randint(0, classes, (n,)) if labels is None else labels
    return ImageDataset(images, labels, classes, "toy", "train")


CPU = TrainConfig(epochs=2, batch_size=16, device="cpu")


@pytest.mark.parametrize("data, message", [
    (_data(images=_nan(torch.rand(32, 1, 8, 8))), "training images: 1 of 2048 values are NaN"),
    (_data(labels=torch.full((32,), 10)), r"training labels must lie in \[0, 9\]"),
    (_data(n=0), "training images: no images"),
])
def test_train_checks_its_data(data, message):
    with pytest.raises(DataError, match=message):
        train(_model(), data, config=CPU, progress=False)


def test_train_checks_the_model_matches_the_classes():
    with pytest.raises(ConfigurationError, match=r"outputs of shape \(16, 10\).*expected logits \(16, 3\)"):
        train(_model(), _data(classes=3), config=CPU, progress=False)


def test_train_refuses_test_data_of_another_shape():
    test = ImageDataset(torch.rand(4, 1, 4, 4), torch.zeros(4, dtype=torch.long), 10)
    with pytest.raises(DataError, match="test images have shape"):
        train(_model(), _data(), config=CPU, test_set=test, progress=False)


def test_a_run_that_diverges_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    path = tmp_path / "model.pt"

    def blows_up_in_epoch_2(model, x, y, *, epoch, step):
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y)
        return (loss * float("nan") if epoch == 1 else loss), logits

    with pytest.raises(ConfigurationError, match=r"diverged at epoch 2\b.*a loss was not finite.*checkpoint of epoch 1 "
                                                 r"is kept.*lower the learning rate"):
        train(_model(), _data(), config=CPU, objective=blows_up_in_epoch_2, checkpoint_path=path, progress=False)
    kept = load_checkpoint(path)
    assert kept["epoch"] == 1 and all(bool(torch.isfinite(t).all()) for t in kept["model"].values())


def test_a_blown_up_cross_entropy_is_divergence_not_success():
    config = TrainConfig(epochs=1, batch_size=16, lr=1e6, device="cpu")
    with pytest.raises(ConfigurationError, match=r"diverged at epoch 1 .mean cross-entropy .*no checkpoint"):
        train(_model(), _data(n=256), config=config, progress=False)


def _trained(tmp_path):
    path = tmp_path / "model.pt"
    train(_model(), _data(), config=CPU, checkpoint_path=path, progress=False)
    return path


@pytest.mark.parametrize("change, message", [
    (lambda c: c.pop("optimizer"), "'optimizer' is missing"),
    (lambda c: c.update(epoch=True), "'epoch' is a bool"),
    (lambda c: c.update(history=c["history"][:1]), "epoch 2 with 1 epochs of history"),
    (lambda c: c["rng"].pop("torch"), "random number generator"),
    (lambda c: c["optimizer"].update(param_groups=[]), "ValueError"),
])
def test_resuming_from_a_damaged_checkpoint_is_refused(tmp_path, change, message):
    path = _trained(tmp_path)
    ckpt = copy.deepcopy(load_checkpoint(path))
    change(ckpt)
    save_checkpoint(ckpt, path)
    with pytest.raises(CheckpointError, match=f"damaged or incomplete.*{message}"):
        train(_model(), _data(), config=TrainConfig(epochs=3, batch_size=16, device="cpu"), checkpoint_path=path,
              progress=False)


def test_evaluate_refuses_empty_data_and_labels_beyond_the_model():
    with pytest.raises(DataError, match="empty"):
        evaluate(_model(), _data(n=0))
    with pytest.raises(ConfigurationError, match=r"expected logits \(8, 12\)"):
        evaluate(_model(), _data(n=8, classes=12))


def test_full_disk_keeps_the_previous_checkpoint_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    save_checkpoint({"format": "sturdy-checkpoint-v1", "epoch": 1}, path)

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left on device"):
        save_checkpoint({"format": "sturdy-checkpoint-v1", "epoch": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


# ----------------------------------------------------------------------------- jobs and stored settings


def test_model_settings_are_checked_before_anything_is_allocated(tmp_path):
    job = TrainJob(model="mlp", model_kwargs={"width": 1e3}, config=CPU, out=str(tmp_path))
    with pytest.raises(ConfigurationError, match="whole numbers"):
        build_model(job, (1, 8, 8), 10)
    with pytest.raises(DataError, match="GiB.*--model-arg"):
        fit(job.replace(model_kwargs={"width": 10**8}), progress=False)
    assert not (tmp_path / "model.pt").exists()


def test_a_stored_job_that_contradicts_its_input_shape_is_refused(tmp_path):
    job = TrainJob(model="linear", config=TrainConfig(epochs=1, device="cpu"), out=str(tmp_path))
    fit(job, progress=False)
    assert json.loads((tmp_path / "results.json").read_text())["job"]["model"] == "linear"
    ckpt = load_checkpoint(tmp_path / "model.pt")
    ckpt["extra"]["job"]["resize"] = 4096
    save_checkpoint(ckpt, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="inconsistent.*retrain"):
        load_trained_model(tmp_path / "model.pt")
    ckpt["extra"]["input_shape"] = [1, 1, 10**5, 10**5]
    save_checkpoint(ckpt, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="invalid input shape"):
        load_trained_model(tmp_path / "model.pt")


def test_a_resumed_run_removes_results_that_no_longer_describe_the_model(tmp_path):
    """Once a new epoch is checkpointed the old results.json is gone, so a killed rerun never looks finished."""
    job = TrainJob(model="linear", config=TrainConfig(epochs=1, device="cpu"), out=str(tmp_path))
    fit(job, progress=False)
    seen = []
    with pytest.raises(KeyboardInterrupt):
        from sturdy.experiments import train_job

        real = train_job._drop_stale_results

        def interrupted(out):
            real(out)
            seen.append((tmp_path / "results.json").exists())
            raise KeyboardInterrupt

        train_job._drop_stale_results = interrupted
        try:
            fit(job.replace(epochs=2), progress=False)
        finally:
            train_job._drop_stale_results = real
    assert seen == [False] and (tmp_path / "model.pt").is_file()


# ----------------------------------------------------------------------------- the parts' entry points


PART_CASES = [
    # lipschitz
    ("certify-nan", lambda: lipschitz.certify(_model(), _nan(X), Y)),
    ("certify-label-10", lambda: lipschitz.certify(_model(), X, torch.full((8,), 10))),
    ("certify-float-labels", lambda: lipschitz.certify(_model(), X, Y.float())),
    ("certify-uint8", lambda: lipschitz.certify(_model(), (X * 255).to(torch.uint8), Y)),
    ("certify-length", lambda: lipschitz.certify(_model(), X, Y[:3])),
    ("certify-empty", lambda: lipschitz.certify(_model(), X[:0], Y[:0])),
    ("bound-wrong-shape", lambda: lipschitz.lipschitz_bound(_model(), input_shape=(1, 3, 8, 8))),
    ("bound-negative-shape", lambda: lipschitz.lipschitz_bound(_model(), input_shape=(1, -1, 8, 8))),
    ("bound-huge-shape", lambda: lipschitz.lipschitz_bound(_model(), input_shape=(1, 1, 10**5, 10**5))),
    # fourier
    ("heatmap-nan", lambda: fourier.fourier_heatmap(_model(), _nan(X), Y, eps=1.0, frequencies=[(0, 1)])),
    ("heatmap-empty", lambda: fourier.fourier_heatmap(_model(), X[:0], Y[:0], eps=1.0, frequencies=[(0, 1)])),
    ("heatmap-range", lambda: fourier.fourier_heatmap(_model(), X * 300, Y, eps=1.0, frequencies=[(0, 1)])),
    ("heatmap-eps-nan", lambda: fourier.fourier_heatmap(_model(), X, Y, eps=float("nan"), frequencies=[(0, 1)])),
    ("heatmap-label-10",
     lambda: fourier.fourier_heatmap(_model(), X, torch.full((8,), 10), eps=1.0, frequencies=[(0, 1)])),
    ("heatmap-float-labels", lambda: fourier.fourier_heatmap(_model(), X, Y.float(), eps=1.0, frequencies=[(0, 1)])),
    ("heatmap-eps-1e308", lambda: fourier.fourier_heatmap(_model(), X, Y, eps=1e308, frequencies=[(0, 1)])),
    ("heatmap-phase-nan",
     lambda: fourier.fourier_heatmap(_model(), X, Y, eps=1.0, phase=float("nan"), frequencies=[(0, 1)])),
    ("attack-nan", lambda: fourier.single_fourier_attack(_model(), _nan(X), eps=1.0, max_queries=50)),
    ("attack-eps-inf", lambda: fourier.single_fourier_attack(_model(), X, eps=float("inf"), max_queries=50)),
    ("attack-empty", lambda: fourier.single_fourier_attack(_model(), X[:0], eps=1.0, max_queries=50)),
    ("attack-3d", lambda: fourier.single_fourier_attack(_model(), X[0], eps=1.0, max_queries=50)),
    # flatness
    ("sharpness-nan", lambda: flatness.normalized_sharpness(_model(), (_nan(X), Y))),
    ("sharpness-label-10", lambda: flatness.normalized_sharpness(_model(), (X, torch.full((8,), 10)))),
    ("sharpness-float-labels", lambda: flatness.normalized_sharpness(_model(), (X, Y.float()))),
    ("sharpness-empty", lambda: flatness.normalized_sharpness(_model(), (X[:0], Y[:0]))),
    ("hessian-nan", lambda: flatness.hessian_diagonal(_model(), (_nan(X), Y), method="ggn-exact")),
    ("hessian-label-10", lambda: flatness.hessian_diagonal(_model(), (X, torch.full((8,), 10)), method="ggn-exact")),
    ("hessian-length", lambda: flatness.hessian_diagonal(_model(), (X, Y[:3]), method="ggn-exact")),
    ("hessian-probes-0", lambda: flatness.hessian_diagonal(_model(), (X, Y), method="hutchinson", probes=0)),
    ("measures-nan", lambda: flatness.compute_measures(_model(), (_nan(X), Y))),
    ("measures-float-labels", lambda: flatness.compute_measures(_model(), (X, Y.float()))),
    ("measures-empty", lambda: flatness.compute_measures(_model(), (X[:0], Y[:0]))),
]


@pytest.mark.parametrize("case, call", PART_CASES, ids=[c.values[0] if hasattr(c, "values") else c[0]
                                                       for c in PART_CASES])
def test_part_entry_points_refuse_bad_inputs(case, call):
    with pytest.raises(SturdyError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message.strip() and 20 < len(message) < 400, message


def test_a_truncated_grid_record_is_retrained_with_a_warning(tmp_path):
    from sturdy.experiments.flatness_grid import PRESETS, _load_record

    path = tmp_path / "points" / "p.json"
    path.parent.mkdir()
    path.write_text('{"gap": 0.1, "measu')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _load_record(path, PRESETS["quick"], 0) is None
    assert any("unreadable" in str(w.message) for w in caught)
