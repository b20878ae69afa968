"""benchmarks/lipschitz_digits.py: one short run end to end (train, certify global and tiered, attack), and the
table built from its runs (spread over seeds, the issue's checks, markdown)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "lipschitz_digits.py"


def _bench():
    spec = importlib.util.spec_from_file_location("lipschitz_digits_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_short_run_fills_every_figure_of_the_table(tmp_path):
    bench = _bench()
    run = bench.run_one("aol", 0, epochs=1, device="cpu", threads=1, attack_steps=3, work=str(tmp_path))
    assert json.loads((tmp_path / "aol-s0.json").read_text())["model"] == "aol"
    for eps in bench.EPS:
        assert run["tiered"][str(eps)] >= run["global"][str(eps)]
    assert run["soundness"]["broken"] == 0 and set(run["seconds_per_point"]) == {"global", "tiered"}
    other = {**run, "seed": 1, "clean_accuracy": run["clean_accuracy"] - 0.1}
    table = bench.aggregate([run, other], ["aol"])
    row = table["aol"]
    assert row["seeds"] == 2 and row["clean"]["max"] - row["clean"]["min"] == pytest.approx(0.1)
    checks = bench.checks(table)
    assert checks["tiered_at_least_global"] and checks["no_certified_point_broken"]
    assert "post_within_3_points_of_cnn_at_0.25" not in checks  # needs both models
    text = bench.markdown(table, {"epochs": 1, "device": "cpu"})
    assert text.count("\n| aol | 2 |") == 1


def test_the_arguments_are_checked():
    bench = _bench()
    args = bench.parse_args(["--models", "cnn,aol", "--device", "cpu", "--seeds", "2"])
    assert args.models == ["cnn", "aol"] and args.seeds == 2
    for bad in (["--models", "vgg"], ["--epochs", "0"], ["--seeds", "0"], ["--workers", "-1"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


@pytest.mark.slow
def test_the_script_runs_every_model_for_one_epoch(tmp_path):
    out = tmp_path / "ld.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--epochs", "1", "--seeds", "1",
                           "--attack-steps", "2", "--work", str(tmp_path / "work"), "--out", str(out)],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result["table"]) == {"cnn", "resnet-pre", "resnet-post", "liresnet", "aol"}
    assert out.with_suffix(".md").read_text().count("\n| ") == 6  # header and five models


def test_the_resnet_batchnorm_scale_starts_at_bn_init_and_lowers_the_initial_bound():
    import torch
    from torch import nn

    from sturdy.errors import ConfigurationError
    from sturdy.lipschitz import lipschitz_bound
    from sturdy.models import create_model

    bounds = []
    for init in (1.0, 0.25):
        torch.manual_seed(0)
        model = create_model("resnet", in_shape=(1, 8, 8), num_classes=10, layout="post", bn_init=init).eval()
        gammas = {float(m.weight.unique()) for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
        assert gammas == {init}
        bounds.append(lipschitz_bound(model, input_shape=(1, 1, 8, 8)).upper)
    assert bounds[1] < bounds[0] * 0.25  # five BatchNorms on the longest path, each scaled by 0.25
    with pytest.raises(ConfigurationError, match="bn_init"):
        create_model("resnet", in_shape=(1, 8, 8), num_classes=10, bn_init=0.0)
