"""The correlation grid in parallel (same records as a serial run), resumed, cut short, and with corrupt records."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest

from sturdy.cli import main
from sturdy.errors import ConfigurationError
from sturdy.experiments.flatness_grid import PRESETS, WIDE_GRID, GridPoint, GridSpec, run_grid

TINY = GridSpec(name="tiny", architectures=("mlp",), batch_sizes=(128,), lrs=(1e-2,), widths=(8, 16),
                depths=(1, 2), weight_decays=(0.0,), label_noise=(0.0,), seeds=(0,), max_epochs=2,
                measures=("normalized_sharpness", "log_frobenius_product", "log_spectral_product"), bootstrap=20)


def _without_timings(record):
    record = dict(record)
    record.pop("train_seconds")
    record["measures"] = {k: {f: v for f, v in m.items() if f != "seconds"} for k, m in record["measures"].items()}
    return record


def _records(folder):
    return {p.name: _without_timings(json.loads(p.read_text())["content"]) for p in (folder / "points").glob("*.json")}


@pytest.mark.multiprocess
def test_parallel_records_equal_serial_records(tmp_path):
    serial = run_grid(out=tmp_path / "serial", spec=TINY, progress=False)
    parallel = run_grid(out=tmp_path / "parallel", spec=TINY, progress=False, workers=2)
    assert serial["models"] == parallel["models"] == 4 and parallel["complete"] and parallel["workers"] == 2
    assert _records(tmp_path / "serial") == _records(tmp_path / "parallel")
    assert serial["correlations"] == parallel["correlations"]
    assert serial["robustness"] == parallel["robustness"]
    assert (tmp_path / "parallel" / "grid_report.html").stat().st_size > 0


def test_corrupt_record_is_retrained_with_a_warning(tmp_path):
    run_grid(out=tmp_path, spec=TINY, progress=False)
    points = sorted((tmp_path / "points").glob("*.json"))
    before = _records(tmp_path)
    stamps = {p.name: p.stat().st_mtime_ns for p in points}
    points[0].write_text(points[0].read_text()[:57])  # truncated mid-way, as after a crash of a non-atomic writer
    points[1].write_text("[1, 2]")  # valid JSON, not a record
    with pytest.warns(UserWarning, match="unreadable") as caught:
        summary = run_grid(out=tmp_path, spec=TINY, progress=False)
    assert {str(w.message).split()[2] for w in caught} >= {str(points[0]), str(points[1])}
    assert summary["models"] == 4 and _records(tmp_path) == before
    after = {p.name: p.stat().st_mtime_ns for p in points}
    assert [n for n in stamps if stamps[n] != after[n]] == [points[0].name, points[1].name]


def test_time_limit_and_growing_the_grid(tmp_path):
    with pytest.raises(ConfigurationError, match="only 0 of the grid's 4 models are done"):
        run_grid(out=tmp_path / "none", spec=TINY, progress=False, time_limit_s=0.0)
    # a limit of 0 s trains nothing new: the summary covers the stored models only
    run_grid(out=tmp_path, spec=TINY, progress=False)
    grown_spec = replace(TINY, seeds=(0, 1))  # one more seed
    grown = run_grid(out=tmp_path, spec=grown_spec, progress=False, time_limit_s=0.0)
    assert grown["models"] == 4 and grown["points"] == 8 and not grown["complete"]
    # the grown grid reuses the four stored models and trains the four new ones
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "points").glob("*.json")}
    full = run_grid(out=tmp_path, spec=grown_spec, progress=False)
    assert full["complete"] and full["models"] == 8
    assert all((tmp_path / "points" / n).stat().st_mtime_ns == t for n, t in stamps.items())


def test_wide_preset_and_points():
    assert PRESETS["wide"] is WIDE_GRID
    points = WIDE_GRID.points()
    assert len(points) == 192 == len({p.key for p in points})
    assert [p.seed for p in points[:48]] == [0] * 48  # seeds outermost
    assert {p.depth for p in points} == {1, 2, 3}
    # keys of the earlier grids do not change (their stored records stay usable)
    assert GridPoint("mlp", 32, 0.01, 128, 0.0, 0.2, 0).key == "mlp-w128-bs32-lr0.01-wd0-noise0.2-s0"
    assert GridPoint("mlp", 32, 0.01, 128, 0.0, 0.2, 0, 3).key == "mlp-w128-d3-bs32-lr0.01-wd0-noise0.2-s0"


@pytest.mark.parametrize("argv, message", [
    (["--quick", "--preset", "wide"], "--quick contradicts --preset wide"),
    (["--workers", "0"], "expected a positive integer"),
    (["--time-limit", "-1"], "expected"),
])
def test_grid_cli_errors(argv, message, tmp_path, capsys):
    assert main(["flatness", "grid", "--out", str(tmp_path)] + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_hand_edited_record_is_retrained_not_used(tmp_path):
    """A record is read back as untrusted input: an edit (a plausible gap) breaks its checksum; a FIFO in its
    place does not block the run."""
    run_grid(out=tmp_path, spec=TINY, progress=False)
    points = sorted((tmp_path / "points").glob("*.json"))
    before = _records(tmp_path)
    payload = json.loads(points[0].read_text())
    payload["content"]["gap"] = 0.5
    points[0].write_text(json.dumps(payload))
    points[1].unlink()
    os.mkfifo(points[1])
    with pytest.warns(UserWarning, match="unreadable") as caught:
        summary = run_grid(out=tmp_path, spec=TINY, progress=False)
    reasons = " ".join(str(w.message) for w in caught)
    assert "content does not match its checksum" in reasons and "not a regular file" in reasons, reasons
    assert summary["models"] == 4 and _records(tmp_path) == before
