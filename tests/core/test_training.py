import os
from pathlib import Path

import pytest
import torch
from torch import nn

from sturdy.data import load_dataset
from sturdy.errors import CheckpointError, ConfigurationError
from sturdy.models import create_model
from sturdy.training import (
    CHECKPOINT_FORMAT,
    TrainConfig,
    evaluate,
    load_checkpoint,
    save_checkpoint,
    train,
)

BIT_EXACT = dict(rtol=0, atol=0)
ACCURACY_TOL = 1e-12  # accuracies are counts divided once
LOSS_REL_TOL = 1e-5  # float32 logits, summed per batch in another order than the reference


class Counter:
    """A stand-in for method state (power-iteration vectors, compression residuals)."""

    def __init__(self):
        self.value = torch.zeros(3)

    def state_dict(self):
        return {"value": self.value.clone()}

    def load_state_dict(self, state):
        self.value = state["value"].clone()


def _dropout_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 10))


def _counting_loss(counter):
    def loss_fn(model, x, y, *, epoch, step):
        counter.value += torch.rand(3)  # consumes the global RNG like dropout does
        logits = model(x)
        return nn.functional.cross_entropy(logits, y), logits

    return loss_fn


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", split="train").subset(range(400)), load_dataset("digits", split="test")


def test_resume_one_plus_one_epochs_is_bit_identical(tmp_path, digits):
    train_set, test_set = digits
    config = TrainConfig(epochs=2, batch_size=32, lr=1e-2, optimizer="sgd", label_noise=0.1, seed=5, device="cpu")

    full_counter = Counter()
    full = _dropout_mlp()
    torch.manual_seed(1)
    train(full, train_set, config=config, test_set=test_set, objective=_counting_loss(full_counter),
          extra_state={"counter": full_counter}, progress=False)

    ckpt = tmp_path / "model.pt"
    c1 = Counter()
    first = _dropout_mlp()
    torch.manual_seed(1)
    r1 = train(first, train_set, config=config, test_set=test_set, objective=_counting_loss(c1),
               extra_state={"counter": c1}, checkpoint_path=ckpt, until_epoch=1, progress=False)
    assert len(r1.history) == 1
    torch.manual_seed(999)  # whatever happens between the two runs must not matter
    c2 = Counter()
    second = _dropout_mlp()
    r2 = train(second, train_set, config=config, test_set=test_set, objective=_counting_loss(c2),
               extra_state={"counter": c2}, checkpoint_path=ckpt, progress=False)
    assert r2.resumed_from_epoch == 1 and len(r2.history) == 2
    for a, b in zip(full.state_dict().values(), second.state_dict().values()):
        torch.testing.assert_close(a, b, **BIT_EXACT)
    torch.testing.assert_close(full_counter.value, c2.value, **BIT_EXACT)


def test_resume_refuses_a_different_configuration(tmp_path, digits):
    train_set, _ = digits
    ckpt = tmp_path / "model.pt"
    train(_dropout_mlp(), train_set, config=TrainConfig(epochs=1, device="cpu"), checkpoint_path=ckpt, progress=False)
    with pytest.raises(CheckpointError, match="different training configuration"):
        train(_dropout_mlp(), train_set, config=TrainConfig(epochs=2, lr=0.5, device="cpu"), checkpoint_path=ckpt,
              progress=False)


def test_cnn_reaches_95_percent_on_digits():
    train_set, test_set = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    torch.manual_seed(0)
    model = create_model("cnn", in_shape=(1, 8, 8), num_classes=10)
    result = train(model, train_set, config=TrainConfig(epochs=20, lr=2e-3, device="cpu"), test_set=test_set,
                   progress=False)
    assert result.final.test_accuracy >= 0.95
    # the loop's test metrics and ``evaluate`` against a plain forward pass over the whole test set
    with torch.no_grad():
        logits = model.eval()(test_set.images).double()
    model.train()
    ref_loss = float(nn.functional.cross_entropy(logits, test_set.labels))
    ref_acc = float((logits.argmax(1) == test_set.labels).double().mean())
    loss, acc = evaluate(model, test_set, batch_size=100)  # several batches, the last one partial
    assert model.training  # the flag is restored
    assert acc == pytest.approx(ref_acc, abs=ACCURACY_TOL)
    assert loss == pytest.approx(ref_loss, rel=LOSS_REL_TOL)
    assert result.final.test_accuracy == pytest.approx(ref_acc, abs=ACCURACY_TOL)


def test_label_noise_is_what_the_model_learns(digits):
    """The same run with every label replaced by a wrong class fits the true labels far worse than without
    noise: if ``label_noise`` were ignored both models would be the same."""
    train_set, _ = digits
    fits = {}
    for noise in (0.0, 1.0):
        model = _dropout_mlp()
        train(model, train_set, config=TrainConfig(epochs=5, lr=1e-2, device="cpu", label_noise=noise), progress=False)
        fits[noise] = evaluate(model, train_set)[1]  # accuracy on the true labels
    assert fits[0.0] >= 0.75, fits
    assert fits[1.0] <= 0.15, fits  # it learned to avoid the true class


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(epochs=0), "epochs must be an integer >= 1"),
        (dict(lr=-1.0), "lr must be a finite number > 0"),
        (dict(optimizer="rmsprop"), "optimizer must be 'sgd' or 'adam'"),
        (dict(label_noise=1.5), r"label_noise must be a fraction in \[0, 1\]"),
        (dict(schedule="linear"), "schedule must be"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ConfigurationError, match=message):
        TrainConfig(**kwargs)


def test_atomic_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"format": CHECKPOINT_FORMAT, "x": torch.ones(2)}, path)

    def broken_save(obj, fh, *a, **k):
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"format": CHECKPOINT_FORMAT, "x": torch.zeros(2)}, path)
    monkeypatch.undo()
    torch.testing.assert_close(load_checkpoint(path)["x"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left behind


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "payload": _Evil(str(marker))}, path)
    with pytest.raises(CheckpointError, match="refusing to load .*could run code"):
        load_checkpoint(path)
    assert not marker.exists()


def test_corrupt_and_foreign_checkpoints(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(bad)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.ones(1)}, foreign)
    with pytest.raises(CheckpointError, match="not a sturdy checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(Path(tmp_path / "missing.pt"))
