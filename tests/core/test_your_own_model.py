"""Your own model and data through every command: a model file with a factory, its weights, a normalisation and
an image folder (README, "Your own model")."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sturdy.cli import main

MODEL_FILE = """
import torch
from torch import nn


def make(width=16, num_classes=3):
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, width),
                         nn.ReLU(), nn.Linear(width, num_classes))
"""


def _folder(root: Path, n_per_class: int = 12) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for k, name in enumerate(("cat", "dog", "fox")):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n_per_class):
                img = rng.integers(0, 60, (8, 8, 3), dtype=np.uint8)
                img[:, :, k] += 150  # one colour per class: learnable
                Image.fromarray(img).save(d / f"{i}.png")
    return root


def test_your_own_model_and_folder_through_every_command(tmp_path, capsys):
    model_file = tmp_path / "my_model.py"
    model_file.write_text(MODEL_FILE)
    data = f"folder:{_folder(tmp_path / 'images')}"
    spec = f"{model_file}:make"
    run = tmp_path / "run"
    own = ["--model", spec, "--model-arg", "width=16", "--normalize", "0.5,0.25", "--data", data]
    assert main(["train", *own, "--epochs", "2", "--lr", "0.01", "--out", str(run), "--no-progress"]) == 0
    weights = ["--weights", str(run / "model.pt")]
    assert main(["evaluate", *own, *weights, "--device", "cpu"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["test_accuracy"] > 0.5 and evaluated["sources"]["model"]["weights_sha256"]
    assert main(["lipschitz", "certify", *own, *weights, "--out", str(run), "--no-progress"]) == 0
    cert = json.loads((run / "certify.json").read_text())
    assert cert["sources"]["model"]["normalization"] is not None and cert["sources"]["data"]["spec"] == data
    assert main(["fourier", "heatmap", *own, *weights, "--eps", "1.0", "--limit", "6", "--out", str(run),
                 "--no-progress"]) == 0
    assert main(["fourier", "attack", *own, *weights, "--eps", "1.0", "--attack-images", "12", "--out", str(run),
                 "--no-progress"]) == 0
    assert main(["flatness", "measure", *own, *weights, "--measures", "log_spectral_product", "--limit", "20",
                 "--out", str(run), "--no-progress"]) == 0
    measures = json.loads((run / "measures.json").read_text())
    assert measures["sources"]["model"]["spec"] == spec
    # the checkpoint route reads the same model with its own data
    assert main(["evaluate", "--checkpoint", str(run / "model.pt"), "--device", "cpu"]) == 0


@pytest.mark.parametrize("argv, match", [
    (["--model", "nowhere.py:make"], "nowhere.py"),
    (["--checkpoint", "x.pt", "--model", "linear"], "not both"),
    ([], "give --checkpoint"),
])
def test_bad_model_sources_are_one_line(tmp_path, capsys, argv, match):
    assert main(["evaluate", *argv, "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err


def test_every_command_writes_its_own_report_page(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--model", "linear", "--epochs", "1", "--out", str(run), "--no-progress"]) == 0
    ckpt = ["--checkpoint", str(run / "model.pt")]
    assert main(["lipschitz", "certify", *ckpt, "--limit", "20", "--out", str(run), "--no-progress"]) == 0
    assert main(["fourier", "heatmap", *ckpt, "--eps", "1", "--limit", "4", "--out", str(run), "--no-progress"]) == 0
    assert main(["flatness", "measure", *ckpt, "--measures", "log_spectral_product", "--limit", "20",
                 "--out", str(run), "--no-progress"]) == 0
    for page, figure in (("train_report.html", "train_curves.png"), ("certify_report.html", "certified_accuracy.png"),
                         ("heatmap_report.html", "heatmap.png"), ("measures_report.html", None)):
        text = (run / page).read_text()
        assert text.startswith("<!doctype html>") and "Made from" in text
        if figure is not None:
            assert f"alt='{figure}'" in text and "data:image/png;base64," in text  # readable without a server


def test_download_fetches_a_downloadable_kind_before_reading_it(tmp_path, capsys, monkeypatch):
    import sturdy.experiments.job_sources as job_sources
    from sturdy.errors import DataError

    calls = []

    def offline(kind, root):
        calls.append((kind, str(root)))
        raise DataError(f"cannot fetch {kind}: no internet")

    monkeypatch.setattr(job_sources, "fetch", offline)
    folder = tmp_path / "cifar"
    assert main(["train", "--data", f"cifar10:{folder}", "--download", "--epochs", "1",
                 "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    assert calls == [("cifar10", str(folder))] and "no internet" in capsys.readouterr().err
    assert main(["evaluate", "--model", "linear", "--data", f"mnist:{folder}", "--download", "--device", "cpu"]) == 2
    assert calls[-1] == ("mnist", str(folder)) and not (tmp_path / "run").exists()


def test_evaluate_chooses_its_split_and_limit(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--model", "linear", "--epochs", "1", "--out", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(run / "model.pt"), "--split", "train", "--limit", "30",
                 "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (out["split"], out["test_size"]) == ("train", 30)
