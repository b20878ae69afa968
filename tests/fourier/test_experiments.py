"""The `sturdy fourier` commands and the demo section, end to end on a tiny digits checkpoint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from sturdy.cli import main
from sturdy.experiments import fourier as fourier_experiments
from sturdy.experiments.argtypes import phase_arg
from sturdy.report import Report


@pytest.fixture(scope="package")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("fourier_train")
    argv = ["train", "--epochs", "2", "--lr", "0.01", "--out", str(out), "--no-progress", "--device", "cpu",
            "--model-arg", "channels=(4,8)", "--model-arg", "width=16"]
    assert main(argv) == 0
    return out / "model.pt"


def test_cli_group_spellings_and_defaults():
    parser = argparse.ArgumentParser()
    fourier_experiments.register_cli(parser.add_subparsers(dest="command"))
    for flag in ("--limit", "--images"):
        args = parser.parse_args(["fourier", "heatmap", "--checkpoint", "m.pt", "--eps", "1", flag, "7"])
        assert args.limit == 7 and args.device == "auto"
    args = parser.parse_args(["fourier", "attack", "--checkpoint", "m.pt", "--eps", "1"])
    assert args.device == "auto" and args.search == "staged" and args.batch_size is None


def test_heatmap_command_writes_png_and_json(checkpoint, tmp_path, capsys):
    out = tmp_path / "hm"
    argv = ["fourier", "heatmap", "--checkpoint", str(checkpoint), "--eps", "2.0", "--limit", "40",
            "--out", str(out), "--no-progress", "--device", "cpu"]
    assert main(argv) == 0
    data = json.loads((out / "heatmap.json").read_text())
    assert data["n_images"] == 40 and data["eps"] == 2.0 and len(data["fooling_map"]) == 8
    assert -1.0 <= data["gradient_rank_correlation_fooling"] <= 1.0
    assert (out / "heatmap.png").read_bytes()[:4] == b"\x89PNG" and (out / "gradient.png").is_file()
    assert "max_fooling" in capsys.readouterr().out


def test_attack_command_writes_delta_and_heldout_rates(checkpoint, tmp_path):
    out = tmp_path / "attack"
    argv = ["fourier", "attack", "--checkpoint", str(checkpoint), "--eps", "0.1", "--norm", "linf", "--wave",
            "square", "--attack-images", "50", "--shifts", "1", "--combine", "--out", str(out), "--no-progress",
            "--device", "cpu"]
    assert main(argv) == 0
    data = json.loads((out / "attack.json").read_text())
    delta = torch.load(out / "delta.pt", weights_only=True)
    assert delta.shape == (1, 8, 8) and abs(float(delta.abs().max()) - 0.1) < 1e-6
    assert data["heldout_images"] == 497 and data["attack_images"] == 50
    assert data["queries"] < data["exhaustive_queries"]
    for key in ("heldout_fooling_rate", "shifted_fooling_rate", "random_noise_fooling_rate"):
        assert 0.0 <= data[key] <= 1.0
    assert (out / "delta.png").is_file() and (out / "examples.png").is_file()
    combined = torch.load(out / "delta_combination.pt", weights_only=True)
    assert float(combined.abs().max()) <= 0.1 + 1e-6
    assert data["combination"]["attack_fooling_rate"] >= data["attack_fooling_rate"]


def test_command_errors_are_one_line(checkpoint, tmp_path, capsys):
    assert main(["fourier"]) == 2
    assert "choose a sub-command: heatmap or attack" in capsys.readouterr().err
    assert main(["fourier", "attack", "--checkpoint", str(checkpoint), "--eps", "0", "--out", str(tmp_path)]) == 2
    assert "--eps: expected a positive number" in capsys.readouterr().err
    assert main(["fourier", "heatmap", "--checkpoint", str(tmp_path / "missing.pt"), "--eps", "1"]) == 2
    assert "missing.pt" in capsys.readouterr().err
    argv = ["fourier", "attack", "--checkpoint", str(checkpoint), "--eps", "1", "--search", "exhaustive",
            "--max-queries", "10", "--out", str(tmp_path), "--device", "cpu"]
    assert main(argv) == 2
    assert "does not even cover the 300 clean predictions" in capsys.readouterr().err


def test_quick_demo_section(trained_cnn, digits, tmp_path):
    from sturdy.experiments.demo import DemoContext

    train, test = digits
    report = Report("demo")
    ctx = DemoContext(out=tmp_path, quick=True, device=torch.device("cpu"), seed=0, report=report, results={},
                      train_set=train, test_set=test, models={"standard": trained_cnn, "lmt": trained_cnn},
                      progress=False)
    fourier_experiments.demo_section(ctx)
    res = ctx.results["fourier"]
    assert set(res["models"]) == {"standard", "lmt"}
    std = res["models"]["standard"]
    assert std["heldout_fooling_rate"] > std["random_noise_fooling_rate"]
    assert std["shifted_fooling_rate"] is not None and std["queries"] < std["exhaustive_queries"]
    json.dumps(res)  # JSON-able
    page = report.write(tmp_path / "report.html").read_text()
    assert "Single Fourier Attack" in page and (tmp_path / "fourier_heatmaps.png").is_file()


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "pi"])
def test_phase_option_refuses_non_finite_values(text):
    with pytest.raises(argparse.ArgumentTypeError, match="finite phase"):
        phase_arg(text)
    assert phase_arg("random") is None and phase_arg("0.5") == 0.5


@pytest.mark.parametrize("extra, match", [
    (["--eps", "1e308"], "largest meaningful l2 budget 8: "),
    (["--eps", "1.5", "--norm", "linf"], "largest meaningful linf budget 1: "),
    (["--eps", "1", "--phase", "nan"], "finite phase"),
])
def test_heatmap_refuses_meaningless_settings_in_one_line_before_writing(checkpoint, tmp_path, capsys, extra, match):
    out = tmp_path / "hm"
    argv = ["fourier", "heatmap", "--checkpoint", str(checkpoint), *extra, "--limit", "4", "--out", str(out),
            "--no-progress", "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and "\n" not in err and "Traceback" not in err, err
    assert not out.exists() or not any(out.iterdir())


def test_heatmap_of_fewer_than_two_frequencies_notes_the_missing_correlation(checkpoint, tmp_path):
    out = tmp_path / "hm"
    argv = ["fourier", "heatmap", "--checkpoint", str(checkpoint), "--eps", "1", "--frequencies", "0,1",
            "--limit", "4", "--out", str(out), "--no-progress", "--device", "cpu"]
    assert main(argv) == 0
    data = json.loads((out / "heatmap.json").read_text())
    assert data["measured_frequencies"] == 1 and data["gradient_rank_correlation_fooling"] is None
    assert "2 measured frequencies" in data["gradient_rank_correlation_note"]
    assert (out / "heatmap.png").is_file() and (out / "gradient.png").is_file()


def test_outputs_are_written_atomically_and_the_results_last(checkpoint, tmp_path, monkeypatch):
    """Every figure and tensor goes through the atomic writer, and the results JSON comes after them."""
    from sturdy import utils

    written = []
    real = utils.atomic_write_bytes

    def record(path, data):
        written.append(Path(path).name)
        return real(path, data)

    monkeypatch.setattr(utils, "atomic_write_bytes", record)
    monkeypatch.setattr(fourier_experiments, "atomic_write_bytes", record)
    monkeypatch.setattr("sturdy.experiments.jsonio.atomic_write_bytes", record)
    base = ["--checkpoint", str(checkpoint), "--eps", "1", "--no-progress", "--device", "cpu"]
    assert main(["fourier", "heatmap", *base, "--limit", "4", "--stride", "4", "--out", str(tmp_path / "hm")]) == 0
    assert main(["fourier", "attack", *base, "--attack-images", "20", "--max-queries", "400", "--shifts", "0",
                 "--out", str(tmp_path / "sfa")]) == 0
    assert written[-1] == "attack.json" and "heatmap.json" in written
    hm = written[: written.index("heatmap.json") + 1]
    assert {"heatmap.png", "gradient.png"} <= set(hm) and hm[-1] == "heatmap.json"
    assert {"delta.pt", "delta.png", "examples.png"} <= set(written[len(hm):])
    for folder in ("hm", "sfa"):
        files = [p for p in (tmp_path / folder).iterdir() if p.is_file()]
        assert files and all(p.stat().st_size > 0 for p in files)
