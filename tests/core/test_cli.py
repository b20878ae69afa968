import json
import re
import sys

import pytest

from sturdy.cli import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--model", "mlp", "--epochs", "2", "--out", str(out), "--no-progress"]) == 0
    return out


def test_train_writes_model_and_results(trained):
    results = json.loads((trained / "results.json").read_text())
    assert results["job"]["model"] == "mlp" and len(results["history"]) == 2
    for key in ("train_accuracy", "test_accuracy", "test_loss", "train_loss", "seconds_per_epoch"):
        assert key in results
    assert results["test_accuracy"] > 0.5
    assert (trained / "model.pt").is_file()


def test_evaluate(trained, capsys):
    assert main(["evaluate", "--checkpoint", str(trained / "model.pt")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["test_accuracy"] == pytest.approx(json.loads((trained / "results.json").read_text())["test_accuracy"])


def _error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    return err[0]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--dataset", "imagenet"], "unknown data set 'imagenet'"),
        (["train", "--epochs", "0"], "--epochs: expected a positive integer"),
        (["train", "--lr", "-0.1", "--epochs", "1"], "--lr: expected a positive number"),
        (["train", "--label-noise", "2", "--epochs", "1"], r"label_noise must be a fraction in \[0, 1\]"),
        (["train", "--model", "vgg", "--epochs", "1"], "unknown model 'vgg'"),
        (["train", "--model-arg", "oops", "--epochs", "1"], "expected KEY=VALUE"),
        (["evaluate", "--checkpoint", "does/not/exist.pt"], "checkpoint not found"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_error_paths_print_one_line(argv, message, capsys, tmp_path):
    if argv[0] == "train":
        argv = argv + ["--out", str(tmp_path / "o"), "--no-progress"]
    assert main(argv) == 2
    assert re.search(message, _error_line(capsys))


def test_missing_torchvision(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    assert main(["train", "--dataset", "mnist", "--epochs", "1", "--out", str(tmp_path)]) == 2
    assert "pip install 'sturdy[vision]'" in _error_line(capsys)


def test_corrupt_checkpoint(tmp_path, capsys):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"garbage")
    assert main(["evaluate", "--checkpoint", str(bad)]) == 2
    assert "not a readable checkpoint" in _error_line(capsys)


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception, match="checkpoint not found"):
        main(["--debug", "evaluate", "--checkpoint", str(tmp_path / "none.pt")])
