"""certify reads data through the contract of sturdy.datasource: a DataLoader or a stream of batches gives the
radii of the same samples as tensors, bit for bit, reading one batch at a time."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sturdy.data import ImageDataset
from sturdy.errors import ConfigurationError, DataError
from sturdy.lipschitz import certify


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(48, 8), nn.ReLU(),
                         nn.Linear(8, 3)).eval()


X = torch.rand(11, 1, 4, 4, generator=torch.Generator().manual_seed(1))


def _labels(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        y = model(X).argmax(1)
    y[::3] = (y[::3] + 1) % 3  # some wrong predictions (radius 0)
    return y


@pytest.mark.parametrize("tiered", [False, True])
def test_a_dataloader_certifies_the_same_radii_as_tensors(tiered):
    model = _model()
    y = _labels(model)
    whole = certify(model, X, y, batch_size=4, tiered=tiered)
    for data in (DataLoader(TensorDataset(X, y), batch_size=4), TensorDataset(X, y), ImageDataset(X, y, 3)):
        streamed = certify(model, data, batch_size=4, tiered=tiered)
        assert torch.equal(streamed.radius, whole.radius)  # bit-exact: the same batches, the same arithmetic
        assert torch.equal(streamed.predicted, whole.predicted) and torch.equal(streamed.correct, whole.correct)
        if tiered:
            assert torch.equal(streamed.global_radius, whole.global_radius)
    assert bool((whole.radius > 0).any()) and not bool(whole.correct.all())


def test_a_stream_is_read_once_one_batch_at_a_time():
    model = _model()
    y = _labels(model)
    log = []
    model.register_forward_pre_hook(lambda m, args: log.append(("forward", args[0].shape[0])))

    def stream():
        for start in range(0, 11, 4):
            log.append(("read", start))
            yield X[start : start + 4], y[start : start + 4]

    cert = certify(model, stream(), self_check=False, tiered=True, count=11)
    reads = [i for i, event in enumerate(log) if event[0] == "read"]
    assert len(reads) == 3
    for earlier, later in zip(reads, reads[1:]):
        assert any(event[0] == "forward" for event in log[earlier + 1 : later])  # no read-ahead
    assert torch.equal(cert.radius, certify(model, X, y, batch_size=4, self_check=False, tiered=True).radius)


def test_streamed_data_is_checked_batch_by_batch():
    model = _model()
    y = _labels(model)
    bad = X.clone()
    bad[9, 0, 0, 0] = float("nan")
    with pytest.raises(DataError, match=r"batch 2 \(samples 8 to 10\).*NaN"):
        certify(model, DataLoader(TensorDataset(bad, y), batch_size=4))
    with pytest.raises(DataError, match="held 11 samples but its count says 12"):
        certify(model, [(X, y)], count=12, self_check=False)
    with pytest.raises(ConfigurationError, match=r"labels must lie in \[0, 2\]"):
        certify(model, [(X[:4], y[:4]), (X[4:], torch.full((7,), 3))], self_check=False)
    with pytest.raises(DataError, match=r"batch 1 \(samples 4 to 10\): inputs of shape \(1, 3, 4\) after"):
        certify(model, [(X[:4], y[:4]), (X[4:, :, :3], y[4:])], self_check=False)


def test_a_label_out_of_range_in_the_last_batch_is_named_by_its_batch():
    model = _model()
    y = _labels(model)
    y[10] = 7
    with pytest.raises(ConfigurationError, match=r"batch 2 \(samples 8 to 10\): labels must lie in \[0, 2\]"):
        certify(model, DataLoader(TensorDataset(X, y), batch_size=4), self_check=False)
