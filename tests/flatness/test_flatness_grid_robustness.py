"""The grid's robustness view and verdicts on synthetic records whose answer is known."""

from __future__ import annotations

import itertools
import json
from types import SimpleNamespace

import numpy as np
import pytest

from sturdy.errors import ConfigurationError
from sturdy.experiments.flatness_grid_report import COMPARISON_HEADER, comparison_rows, grid_report, summarize
from sturdy.flatness import correlate_measures, granulated_tau, sign_errors

SPEC = SimpleNamespace(name="synthetic", target_loss=0.01, bootstrap=200)


def _records(measures_of_gap, n_seeds=4, seed=0):
    """A factorial grid (lr x width x depth x seed) with a gap growing with lr and width; ``measures_of_gap``
    maps a measure name to ``f(gap, rng) -> value``."""
    rng = np.random.default_rng(seed)
    records = []
    for lr, width, depth, s in itertools.product((1e-3, 1e-2), (32, 64, 128), (1, 2), range(n_seeds)):
        gap = 0.1 * (lr == 1e-2) + 0.05 * np.log2(width / 32) + 0.02 * depth + 0.01 * rng.normal()
        hp = {"arch": "mlp", "batch_size": 32, "lr": lr, "width": width, "depth": depth, "weight_decay": 0.0,
              "label_noise": 0.0, "seed": s}
        records.append({"hyperparams": hp, "gap": float(gap), "converged": True, "train_seconds": 1.0,
                        "measures": {n: {"value": float(f(gap, rng)), "seconds": 0.1}
                                     for n, f in measures_of_gap.items()}})
    return records


FOLLOWS = lambda gap, rng: gap  # noqa: E731 - orders the models as the gap does
RANDOM = lambda gap, rng: rng.normal()  # noqa: E731
REVERSED = lambda gap, rng: -gap  # noqa: E731


def test_verdicts_and_sign_errors_on_known_answers():
    records = _records({"normalized_sharpness": FOLLOWS, "random": RANDOM, "reversed": REVERSED,
                        "also_exact": FOLLOWS})
    summary = summarize(records, spec=SPEC)
    rob = summary["robustness"]
    assert rob["verdicts"] == {"random": "beats", "reversed": "beats", "also_exact": "undecided"}
    assert rob["normalized_sharpness_vs"]["also_exact"]["interval"] == [0.0, 0.0]
    exact, wrong = rob["sign_errors"]["normalized_sharpness"], rob["sign_errors"]["reversed"]
    assert exact["mean"] == exact["worst"] == 0.0 and wrong["mean"] == wrong["worst"] == 1.0
    assert 0.2 < rob["sign_errors"]["random"]["mean"] < 0.8
    # seeds are replicates: an environment (the other hyper-parameters' values) holds every pair of models
    # differing in its hyper-parameter, across seeds (4 x 4 seed pairs per pair of values)
    per = exact["per_hyperparameter"]
    assert set(per) == {"lr", "width", "depth"}
    assert per["lr"]["environments"] == 3 * 2 and per["lr"]["pairs"] == 6 * 16
    assert per["width"]["environments"] == 2 * 2 and per["width"]["pairs"] == 4 * 3 * 16  # 3 pairs of widths
    assert 0 < rob["sign_errors"]["random"]["worst"] < 1  # a fraction of 16 or more pairs
    assert set(summary["correlations"]["normalized_sharpness"]["per_hyperparameter"]) == {"lr", "width", "depth"}
    json.dumps(summary)


def test_normalized_sharpness_can_lose():
    summary = summarize(_records({"normalized_sharpness": RANDOM, "spectral": FOLLOWS}), spec=SPEC)
    diff = summary["robustness"]["normalized_sharpness_vs"]["spectral"]
    assert diff["verdict"] == "loses" and not diff["beats"] and diff["interval"][1] < 0


def test_report_table_and_figure(tmp_path):
    records = _records({"normalized_sharpness": FOLLOWS, "random": RANDOM})
    summary = summarize(records, spec=SPEC)
    rows = comparison_rows(summary)
    assert [r[0] for r in rows] == ["normalized_sharpness", "random"]
    assert all(len(r) == len(COMPARISON_HEADER) for r in rows)
    assert rows[0][5] == "(reference)" and rows[1][6] == "beats" and rows[0][3] == "0.00"
    page = grid_report(summary, records).write(tmp_path / "report.html").read_text()
    assert "sign-error worst" in page and "Normalized sharpness beats: random;" in page
    assert (tmp_path / "robustness.png").stat().st_size > 0 and (tmp_path / "scatter.png").is_file()


def test_axes_option_and_errors():
    records = _records({"m": FOLLOWS}, n_seeds=2)
    gap = [r["gap"] for r in records]
    hps = [r["hyperparams"] for r in records]
    values = [r["measures"]["m"]["value"] for r in records]
    with_seed = sign_errors(values, gap, hps)
    assert "seed" in with_seed.per_hyperparameter and with_seed.per_hyperparameter["seed"]["pairs"] == 12
    assert "seed" not in sign_errors(values, gap, hps, axes=["lr", "width"]).per_hyperparameter
    psi, per = granulated_tau(values, gap, hps, axes=["lr"])
    assert set(per) == {"lr"} and psi == pytest.approx(1.0)
    assert correlate_measures({"m": values}, gap, hps, bootstrap=5, axes=["width"])["m"].per_hyperparameter.keys() \
        == {"width"}
    with pytest.raises(ConfigurationError, match="axes colour are not hyper-parameters"):
        sign_errors(values, gap, hps, axes=["colour"])
    with pytest.raises(ConfigurationError, match="axes colour are not hyper-parameters"):
        granulated_tau(values, gap, hps, axes=["colour"])
