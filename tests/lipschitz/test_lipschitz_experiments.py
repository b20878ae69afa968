"""`sturdy train --method lmt`, `sturdy lipschitz certify` (alias `sturdy certify`), the LMT training
plug-in, and bit-exact resume of LMT training."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from sturdy.cli import build_parser, main
from sturdy.errors import ConfigurationError
from sturdy.experiments.lipschitz import LMTPlugin, training_plugin
from sturdy.experiments.train_job import TrainContext, TrainJob, fit
from sturdy.lipschitz import LipschitzTracker
from sturdy.models import create_model
from sturdy.training import TrainConfig, load_checkpoint

TINY = ["--model-arg", "channels=(4,8)", "--model-arg", "width=16", "--model-arg", "pool=none"]


def test_train_lmt_and_certify_cli(tmp_path, capsys):
    train_dir, cert_dir = tmp_path / "lmt", tmp_path / "cert"
    rc = main(["train", "--method", "lmt", "--c", "0.3", "--c-warmup-epochs", "1", "--lmt-clip", "--epochs", "1",
               *TINY, "--out", str(train_dir), "--no-progress"])
    assert rc == 0
    ckpt = load_checkpoint(train_dir / "model.pt")
    assert "lipschitz" in ckpt["state"]
    assert ckpt["extra"]["job"]["options"]["method"] == "lmt"
    rc = main(["lipschitz", "certify", "--checkpoint", str(train_dir / "model.pt"), "--eps", "0.05,0.1",
               "--out", str(cert_dir), "--tightness", "--tightness-points", "4", "--no-progress"])
    assert rc == 0
    res = json.loads((cert_dir / "certify.json").read_text())
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


def test_certify_alias_and_group_share_options(tmp_path, capsys):
    parser = build_parser()
    for argv in (["certify"], ["lipschitz", "certify"]):
        args = parser.parse_args([*argv, "--checkpoint", "m.pt", "--limit", "7"])
        assert (args.limit, args.device, args.form, args.func.__name__) == (7, "auto", "pairwise", "_cmd_certify")
    with pytest.raises(ConfigurationError, match="--limit"):
        parser.parse_args(["lipschitz", "certify", "--checkpoint", "m.pt", "--limit", "0"])
    assert main(["lipschitz"]) != 0
    assert "choose a sub-command: certify" in capsys.readouterr().err
    # the top-level alias runs the same command
    train_dir, cert_dir = tmp_path / "std", tmp_path / "cert"
    assert main(["train", "--epochs", "1", *TINY, "--out", str(train_dir), "--no-progress"]) == 0
    assert main(["certify", "--checkpoint", str(train_dir / "model.pt"), "--limit", "20", "--device", "cpu",
                 "--out", str(cert_dir)]) == 0
    assert json.loads((cert_dir / "certify.json").read_text())["n"] == 20
    capsys.readouterr()


def _job(tmp_path, epochs: int, **options) -> TrainJob:
    opts = {"method": "lmt", "c": 0.3, "c_warmup_epochs": 1.0, "lmt_form": "pairwise", "lmt_clip": False,
            "lmt_iterations": 1, **options}
    config = TrainConfig(epochs=epochs, batch_size=128, lr=3e-3, schedule="constant", seed=0, device="cpu")
    return TrainJob(dataset="digits", model="cnn", model_kwargs={"channels": (4, 8), "width": 16, "pool": "none"},
                    config=config, out=str(tmp_path), options=opts)


def _fit(job: TrainJob, *, resume: bool):
    return fit(job, plugins=[training_plugin(job)], resume=resume, progress=False)


def test_lmt_training_resumes_bit_exactly(tmp_path):
    # constant learning rate: a 1-epoch job then resumed to 2 epochs follows the same schedule as 2 epochs
    straight = _fit(_job(tmp_path / "a", 2), resume=False)
    _fit(_job(tmp_path / "b", 1), resume=False)
    resumed = _fit(_job(tmp_path / "b", 2), resume=True)
    for p, q in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(p, q)
    ta = load_checkpoint(tmp_path / "a" / "model.pt")["state"]["lipschitz"]
    tb = load_checkpoint(tmp_path / "b" / "model.pt")["state"]["lipschitz"]
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_training_plugin_validates_options_and_pickles(tmp_path):
    assert training_plugin(_job(tmp_path, 1, method="standard")) is None
    with pytest.raises(ConfigurationError, match="unknown training method"):
        training_plugin(_job(tmp_path, 1, method="fancy"))
    with pytest.raises(ConfigurationError, match=r"c must be a finite number in \[0, inf\]"):
        training_plugin(_job(tmp_path, 1, c=-0.1))
    with pytest.raises(ConfigurationError, match="--lmt-iterations"):
        training_plugin(_job(tmp_path, 1, lmt_iterations=0))
    with pytest.raises(ConfigurationError, match="--lmt-form"):
        training_plugin(_job(tmp_path, 1, lmt_form="diagonal"))
    with pytest.raises(ConfigurationError, match="--lmt-drift-tolerance"):
        training_plugin(_job(tmp_path, 1, lmt_drift_tolerance=-0.5))
    args = build_parser().parse_args(["train", "--method", "lmt", "--lmt-drift-tolerance", "0.1"])
    assert args.lmt_drift_tolerance == 0.1
    plugin = training_plugin(_job(tmp_path, 1, lmt_clip=True))
    assert plugin == LMTPlugin(c=0.3, warmup_epochs=1.0, form="pairwise", clip=True, iterations=1)
    assert pickle.loads(pickle.dumps(plugin)) == plugin


def test_lmt_plugin_setup_uses_context(tmp_path):
    model = create_model("cnn", in_shape=(1, 8, 8), num_classes=10, channels=(4,), width=8)
    job = _job(tmp_path, 1)
    ctx = TrainContext(job=job, input_shape=(1, 1, 8, 8), num_classes=10, steps_per_epoch=4,
                       device=torch.device("cpu"))
    hooks = training_plugin(job).setup(model, ctx)
    assert list(hooks.extra_state) == ["lipschitz"]
    assert isinstance(hooks.extra_state["lipschitz"], LipschitzTracker)
    assert hooks.objective.steps_per_epoch == 4
    x, y = torch.rand(5, 1, 8, 8), torch.arange(5)
    loss, logits = hooks.objective(model, x, y, epoch=0, step=0)
    # at step 0 of a 1-epoch warm-up, c = 0: plain cross-entropy
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, y))
    # half-way through the warm-up (step 2 of 4), c = 0.15: the loss is the LMT loss with that radius
    loss_half, _ = hooks.objective(model, x, y, epoch=0, step=2)
    with torch.no_grad():
        assert float(loss_half) > float(torch.nn.functional.cross_entropy(model(x), y))


def test_resuming_an_lmt_run_with_another_objective_is_refused(tmp_path, capsys):
    from sturdy.cli import main

    run = tmp_path / "run"
    base = ["train", "--model", "linear", "--method", "lmt", "--epochs", "1", "--out", str(run), "--no-progress"]
    assert main([*base, "--c", "0.1"]) == 0
    before = (run / "model.pt").read_bytes()
    assert main([*base[:-3], "--epochs", "2", "--out", str(run), "--no-progress", "--c", "0.3"]) == 2
    err = capsys.readouterr().err
    assert "lipschitz c: 0.1 there, 0.3 here" in err and len(err.strip().splitlines()) == 1, err
    assert (run / "model.pt").read_bytes() == before
    assert main([*base[:-3], "--epochs", "2", "--out", str(run), "--no-progress", "--c", "0.1"]) == 0
