"""`sturdy train --method lmt`, `sturdy certify`, and bit-exact resume of LMT training."""

from __future__ import annotations

import json

import pytest
import torch

from sturdy.cli import main
from sturdy.errors import ConfigurationError
from sturdy.experiments.lipschitz import build_lmt_objective
from sturdy.experiments.train_job import TrainJob, fit
from sturdy.models import create_model
from sturdy.training import load_checkpoint

TINY = ["--model-arg", "channels=(4,8)", "--model-arg", "width=16", "--model-arg", "pool=none"]


def test_train_lmt_and_certify_cli(tmp_path, capsys):
    train_dir, cert_dir = tmp_path / "lmt", tmp_path / "cert"
    rc = main(["train", "--method", "lmt", "--c", "0.3", "--c-warmup-epochs", "1", "--lmt-clip", "--epochs", "1",
               *TINY, "--out", str(train_dir), "--no-progress"])
    assert rc == 0
    ckpt = load_checkpoint(train_dir / "model.pt")
    assert "lipschitz_tracker" in ckpt["state"]
    assert ckpt["extra"]["job"]["options"]["method"] == "lmt"
    rc = main(["certify", "--checkpoint", str(train_dir / "model.pt"), "--eps", "0.05,0.1", "--out", str(cert_dir),
               "--tightness", "--tightness-points", "4", "--no-progress"])
    assert rc == 0
    res = json.loads((cert_dir / "results.json").read_text())
    assert set(res["certified_accuracy"]) == {"0.05", "0.1"}
    assert res["lipschitz_estimate"] <= res["lipschitz_upper"]
    assert res["tightness"]["violations"] == 0
    assert [layer["kind"] for layer in res["per_layer"]] == ["conv2d", "conv2d", "linear", "linear"]
    assert (cert_dir / "certified_accuracy.png").stat().st_size > 0
    assert (cert_dir / "radius_histogram.png").stat().st_size > 0
    capsys.readouterr()


def test_certify_cli_errors(tmp_path, capsys):
    assert main(["certify", "--checkpoint", str(tmp_path / "missing.pt")]) != 0
    assert "not found" in capsys.readouterr().err
    train_dir = tmp_path / "std"
    assert main(["train", "--epochs", "1", *TINY, "--out", str(train_dir), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["certify", "--checkpoint", str(train_dir / "model.pt"), "--eps", "0.1,abc"]) != 0
    assert "--eps must be comma-separated numbers" in capsys.readouterr().err


def _job(tmp_path, epochs: int, **options) -> TrainJob:
    opts = {"method": "lmt", "c": 0.3, "c_warmup_epochs": 1.0, "lmt_form": "pairwise", "lmt_clip": False,
            "lmt_iterations": 1, **options}
    return TrainJob(dataset="digits", model="cnn", model_kwargs={"channels": (4, 8), "width": 16, "pool": "none"},
                    epochs=epochs, batch_size=128, lr=3e-3, schedule="constant", seed=0, device="cpu",
                    out=str(tmp_path), options=opts)


def test_lmt_training_resumes_bit_exactly(tmp_path):
    # constant learning rate: a 1-epoch job then resumed to 2 epochs follows the same schedule as 2 epochs
    straight = fit(_job(tmp_path / "a", 2), resume=False, progress=False)
    fit(_job(tmp_path / "b", 1), resume=False, progress=False)
    resumed = fit(_job(tmp_path / "b", 2), resume=True, progress=False)
    for p, q in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(p, q)
    ta = load_checkpoint(tmp_path / "a" / "model.pt")["state"]["lipschitz_tracker"]
    tb = load_checkpoint(tmp_path / "b" / "model.pt")["state"]["lipschitz_tracker"]
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_build_lmt_objective_validates_options(tmp_path):
    model = create_model("cnn", in_shape=(1, 8, 8), num_classes=10, channels=(4,), width=8)
    with pytest.raises(ConfigurationError, match="c must be a finite number >= 0"):
        build_lmt_objective(model, _job(tmp_path, 1, c=-0.1), input_shape=(1, 1, 8, 8))
    with pytest.raises(ConfigurationError, match="--lmt-iterations must be >= 1"):
        build_lmt_objective(model, _job(tmp_path, 1, lmt_iterations=0), input_shape=(1, 1, 8, 8))
    loss_fn, state = build_lmt_objective(model, _job(tmp_path, 1), input_shape=(1, 1, 8, 8))
    x, y = torch.rand(5, 1, 8, 8), torch.arange(5)
    loss, logits = loss_fn(model, x, y, epoch=0, step=0)
    # at step 0 of a 1-epoch warm-up, c = 0: plain cross-entropy
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, y))
    assert list(state) == ["lipschitz_tracker"]
