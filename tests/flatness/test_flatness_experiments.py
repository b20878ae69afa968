"""The flatness CLI commands, the grid harness on a tiny grid, and the demo section."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sturdy.cli import main
from sturdy.data import load_dataset
from sturdy.experiments.flatness import demo_section
from sturdy.experiments.flatness_grid import GridSpec, run_grid
from sturdy.models import create_model
from sturdy.report import Report

INVARIANCE_RTOL = 1e-6


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    argv = ["train", "--model", "mlp", "--epochs", "1", "--label-noise", "0.1", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    return out / "model.pt"


def _error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    return err[0]


def test_measure_command(checkpoint, tmp_path, capsys):
    out = tmp_path / "m"
    argv = ["flatness", "measure", "--checkpoint", str(checkpoint), "--out", str(out), "--limit", "120",
            "--measures", "normalized_sharpness,ggn_trace,log_spectral_product", "--no-progress"]
    assert main(argv) == 0
    result = json.loads((out / "measures.json").read_text())
    assert list(result["measures"]) == ["normalized_sharpness", "ggn_trace", "log_spectral_product"]
    assert result["samples"] == 120 and result["job"]["config"]["label_noise"] == 0.1
    assert result["measures"]["normalized_sharpness"]["value"] > 0
    assert result["gap"] == pytest.approx(result["train_accuracy"] - result["test_accuracy"])
    assert "normalized_sharpness" in capsys.readouterr().out
    # --samples is the older spelling of --limit
    argv = ["flatness", "measure", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "s"), "--samples", "30",
            "--measures", "log_spectral_product", "--no-progress"]
    assert main(argv) == 0
    assert json.loads((tmp_path / "s" / "measures.json").read_text())["samples"] == 30
    # the trace estimator and the balanced (attention-symmetry invariant) measure, where the others are
    argv = ["flatness", "measure", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "x"), "--samples", "30",
            "--measures", "hessian_trace,balanced_normalized_sharpness,normalized_sharpness", "--trace-method",
            "xtrace", "--no-progress"]
    assert main(argv) == 0
    measures = json.loads((tmp_path / "x" / "measures.json").read_text())["measures"]
    assert measures["hessian_trace"]["details"]["method"] == "xtrace"
    assert measures["hessian_trace"]["details"]["probes"] == 100
    balanced = measures["balanced_normalized_sharpness"]  # no attention: normalized sharpness itself
    assert balanced["details"]["heads"] == 0
    assert balanced["value"] == pytest.approx(measures["normalized_sharpness"]["value"], rel=1e-9)


def test_cli_defaults():
    import argparse

    from sturdy.experiments.flatness import register_cli

    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers(dest="command"))
    measure = parser.parse_args(["flatness", "measure", "--checkpoint", "c", "--out", "o"])
    grid = parser.parse_args(["flatness", "grid", "--out", "o"])
    assert measure.device == grid.device == "auto" and measure.limit is None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["flatness"], "choose a sub-command: grid or measure"),
        (["flatness", "measure", "--checkpoint", "CKPT", "--out", "OUT", "--measures", "flatness"],
         "unknown measure\\(s\\) flatness; choose from: normalized_sharpness"),
        (["flatness", "measure", "--checkpoint", "missing.pt", "--out", "OUT"], "missing.pt"),
        (["flatness", "grid", "--out", "OUT", "--bootstrap", "-1"], "expected an integer >= 0"),
        (["flatness", "measure", "--checkpoint", "CKPT", "--out", "OUT", "--trace-method", "lanczos"],
         "invalid choice: 'lanczos'"),
        (["flatness", "measure", "--checkpoint", "CKPT", "--out", "OUT", "--measures", "ggn_trace", "--trace-method",
          "xtrace"], "--trace-method xtrace is the estimator of the hessian_trace measure, which --measures leaves"),
    ],
)
def test_cli_errors(argv, message, checkpoint, tmp_path, capsys):
    argv = [str(checkpoint) if a == "CKPT" else str(tmp_path / a) if a in ("OUT", "missing.pt") else a
            for a in argv]
    assert main(argv) == 2
    assert re.search(message, _error_line(capsys))


def test_grid_harness_on_a_tiny_grid(tmp_path):
    spec = GridSpec(name="test", architectures=("mlp", "cnn"), batch_sizes=(128,), lrs=(1e-2,), widths=(16,),
                    weight_decays=(0.0,), label_noise=(0.0, 0.5), max_epochs=2,
                    measures=("normalized_sharpness", "log_frobenius_product", "pacbayes_flatness"),
                    measure_settings={"pacbayes_flatness": {"samples": 1, "steps": 4}}, bootstrap=20)
    summary = run_grid(out=tmp_path, spec=spec, progress=False)
    assert summary["models"] == 4
    corr = json.loads((tmp_path / "correlations.json").read_text())
    assert set(corr["correlations"]) == set(spec.measures)
    for name in spec.measures:
        c = corr["correlations"][name]
        assert c["models"] == 4 and -1 <= c["tau"] <= 1
        assert (tmp_path / f"scatter_{name}.png").stat().st_size > 0
    assert (tmp_path / "scatter.png").is_file() and (tmp_path / "correlations.png").is_file()
    records = json.loads((tmp_path / "grid.json").read_text())["records"]
    noisy = [r for r in records if r["hyperparams"]["label_noise"] == 0.5]
    assert all(r["gap"] == pytest.approx(r["train_accuracy"] - r["test_accuracy"]) for r in records)
    assert len(noisy) == 2
    # resuming reuses every stored point (the records are identical, nothing is retrained)
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "points").iterdir()}
    again = run_grid(out=tmp_path, spec=spec, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "points").iterdir()} == stamps
    assert again["correlations"] == summary["correlations"]


def test_demo_section_and_invariance(tmp_path):
    train_set = load_dataset("digits", split="train")
    test_set = load_dataset("digits", split="test")
    torch.manual_seed(0)
    model = create_model("cnn", in_shape=(1, 8, 8), num_classes=10, channels=(4, 8), width=16).eval()
    ctx = SimpleNamespace(out=Path(tmp_path), quick=True, device=torch.device("cpu"), seed=0,
                          report=Report("t"), results={}, train_set=train_set, test_set=test_set,
                          models={"standard": model}, progress=False)
    demo_section(ctx)
    res = ctx.results["flatness"]
    assert set(res["models"]) == {"standard"}
    assert res["invariance"]["model"] == "the standard CNN"
    rows = res["invariance"]["rows"]
    for variant in ("arxiv", "icml"):
        assert rows[f"normalized sharpness ({variant})"]["ratio"] == pytest.approx(1.0, rel=INVARIANCE_RTOL)
    assert rows["max |output difference|"]["rescaled"] < 1e-10
    assert res["invariance"]["samples"] == 100
    assert res["settings"]["pacbayes_flatness"]["sigma_range"] == (1e-4, 10.0)
    json.dumps(res)  # JSON-able
    # a model with BatchNorm cannot be rescaled: the section falls back to a small MLP of its own
    bn = create_model("cnn", in_shape=(1, 8, 8), num_classes=10, channels=(4, 8), width=16, batchnorm=True).eval()
    ctx.models = {"standard": bn, "lmt": model}
    demo_section(ctx)
    assert ctx.results["flatness"]["invariance"]["model"].startswith("a small ReLU MLP")
    assert set(ctx.results["flatness"]["models"]) == {"standard", "lmt"}
