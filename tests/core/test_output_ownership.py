"""One command never destroys another's results, and a resumed run is the run it resumes.

Every command writes its results under its own name, recording which command wrote it
(:mod:`sturdy.experiments.jsonio`), so commands share a folder: each command is run into a folder holding
every other command's results, in both orders, and every file another command wrote must stay
byte-identical. A run resumed with another number of workers or another compression method or setting
is refused, naming the difference, and leaves ``model.pt`` and ``results.json`` as they were.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict

import pytest
import torch

from sturdy.cli import main
from sturdy.errors import CheckpointError, ConfigurationError
from sturdy.experiments import demo
from sturdy.experiments.flatness_grid import GridSpec, run_grid
from sturdy.experiments.jsonio import (
    RESULTS_FILES,
    UNKNOWN_OWNER,
    remove_results,
    results_owner,
    results_path,
    write_results,
)
from sturdy.experiments.train_job import TrainHooks, TrainJob, check_same_run, fit, run_identity
from sturdy.training import TrainConfig

LINEAR = ["--model", "linear", "--epochs", "1", "--device", "cpu", "--no-progress"]
TINY_GRID = GridSpec(name="tiny", architectures=("mlp",), batch_sizes=(128,), lrs=(1e-2,), widths=(8, 16),
                     depths=(1, 2), weight_decays=(0.0,), label_noise=(0.0,), seeds=(0,), max_epochs=1,
                     measures=("log_frobenius_product", "log_spectral_product"), bootstrap=10)


def _hashes(folder: Path) -> Dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("sturdy: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def _run_demo(out: Path, monkeypatch) -> None:
    """The demo's own writing (report, figures, results, its trained model) with a 1-epoch linear model."""
    monkeypatch.setattr(demo, "standard_job", lambda out, **kw: TrainJob(
        dataset="digits", model="linear", config=TrainConfig(epochs=1, device="cpu"), out=str(out / "standard")))
    demo.run_demo(out=out, quick=True, device="cpu", progress=False, parts=())


def _commands(folder: Path, monkeypatch):
    """Every command that writes files, by name, run into ``folder`` (the model is ``folder/model.pt``)."""
    ckpt = str(folder / "model.pt")
    cli = {
        "train": ["train", *LINEAR],
        "lipschitz certify": ["lipschitz", "certify", "--checkpoint", ckpt, "--limit", "20", "--device", "cpu",
                              "--no-progress"],
        "fourier heatmap": ["fourier", "heatmap", "--checkpoint", ckpt, "--eps", "1", "--limit", "4", "--stride", "2",
                            "--device", "cpu", "--no-progress"],
        "fourier attack": ["fourier", "attack", "--checkpoint", ckpt, "--eps", "1", "--attack-images", "20",
                           "--shifts", "1", "--device", "cpu", "--no-progress"],
        "flatness measure": ["flatness", "measure", "--checkpoint", ckpt, "--limit", "30", "--measures",
                             "log_spectral_product", "--device", "cpu", "--no-progress"],
        "compression costmodel": ["compression", "costmodel", "--checkpoint", ckpt, "--ratio", "10", "--workers",
                                  "2", "--bandwidth-gbps", "1", "--device", "cpu"],
    }
    runs = {name: (lambda argv=argv: main([*argv, "--out", str(folder)])) for name, argv in cli.items()}
    runs["flatness grid"] = lambda: run_grid(out=folder, spec=TINY_GRID, device="cpu", progress=False) and 0
    runs["demo"] = lambda: _run_demo(folder, monkeypatch) or 0
    return runs


def test_every_command_keeps_every_other_commands_files(tmp_path, monkeypatch, capsys):
    """Each command runs into a folder holding every other command's results (forwards, then backwards, so
    every pair meets in both orders); every file another command wrote stays byte-identical."""
    folder = tmp_path / "shared"
    runs = _commands(folder, monkeypatch)
    assert set(runs) == set(RESULTS_FILES)  # every command with a results file takes part
    owner: Dict[str, str] = {}
    for name in [*runs, *reversed(runs)]:
        before = _hashes(folder) if folder.exists() else {}
        assert runs[name]() == 0, (name, capsys.readouterr().err)
        after = _hashes(folder)
        for path, digest in before.items():
            if owner[path] != name:
                assert after.get(path) == digest, f"`sturdy {name}` changed or removed {path} of {owner[path]}"
        for path in after:
            owner.setdefault(path, name)
        assert results_owner(folder / RESULTS_FILES[name]) == name
    assert {owner[name] for name in RESULTS_FILES.values()} == set(RESULTS_FILES)
    results = json.loads((folder / "results.json").read_text())
    assert results["command"] == "train" and results["job"]["model"] == "linear" and "history" in results
    capsys.readouterr()


def test_certify_into_the_training_folder_keeps_the_training_results(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *LINEAR, "--out", str(run)]) == 0
    before = _hashes(run)
    assert main(["lipschitz", "certify", "--checkpoint", str(run / "model.pt"), "--limit", "20", "--device", "cpu",
                 "--no-progress", "--out", str(run)]) == 0
    after = _hashes(run)
    assert {k: after[k] for k in before} == before
    assert set(after) - set(before) == {"certify.json", "certified_accuracy.png", "radius_histogram.png",
                                        "certify_report.html"}
    assert json.loads((run / "certify.json").read_text())["command"] == "lipschitz certify"
    assert main(["evaluate", "--checkpoint", str(run / "model.pt"), "--device", "cpu"]) == 0
    capsys.readouterr()


@pytest.mark.parametrize("name, content", [
    ("results.json", json.dumps({"clean_accuracy": 0.9, "certified_accuracy": {"0.1": 0.5}})),  # an older certify's
    ("results.json", "my own notes, not JSON"),
    ("certify.json", json.dumps({"command": "train", "job": {}})),
    ("results.json", json.dumps({"command": "lipschitz certify"})),
])
def test_a_file_another_command_wrote_is_refused_before_any_work(tmp_path, capsys, name, content):
    run = tmp_path / "run"
    assert main(["train", *LINEAR, "--out", str(run)]) == 0
    capsys.readouterr()
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.pt").write_bytes((run / "model.pt").read_bytes())
    (other / name).write_text(content)
    before = _hashes(other)
    argv = (["train", *LINEAR] if name == "results.json" else
            ["lipschitz", "certify", "--checkpoint", str(run / "model.pt"), "--limit", "20", "--no-progress"])
    assert main([*argv, "--out", str(other)]) == 2
    err = _one_line_error(capsys)
    assert f"{name}' holds the results of" in err and "choose another --out folder" in err
    assert _hashes(other) == before


def test_results_files_record_and_check_their_writer(tmp_path):
    path = tmp_path / "certify.json"
    assert results_owner(path) is None
    write_results({"n": 1, "command": "ignored"}, path, command="lipschitz certify")
    assert json.loads(path.read_text()) == {"command": "lipschitz certify", "n": 1}
    with pytest.raises(ConfigurationError, match=r"holds the results of `sturdy lipschitz certify`, which `sturdy "
                                                 r"demo` never replaces"):
        write_results({}, path, command="demo")
    remove_results(path, "train")  # not train's: stays
    assert path.exists()
    remove_results(path, "lipschitz certify")
    assert not path.exists()
    (tmp_path / "heatmap.json").write_text(json.dumps({"clean_error": 0.1}))  # an earlier version's: no record
    assert results_owner(tmp_path / "heatmap.json") == "fourier heatmap"
    (tmp_path / "results.json").write_text(json.dumps({"job": {}, "history": []}))
    assert results_owner(tmp_path / "results.json") == "train"
    (tmp_path / "sub" / "results.json").mkdir(parents=True)
    assert results_owner(tmp_path / "sub" / "results.json") == UNKNOWN_OWNER
    with pytest.raises(ConfigurationError, match="unknown command"):
        results_path(tmp_path, "nonsense")


def _job(out: Path, **options) -> TrainJob:
    return TrainJob(dataset="digits", model="linear", config=TrainConfig(epochs=1, device="cpu"), out=str(out),
                    options=options)


class _Method:
    """A stand-in method plugin that declares settings a resumed run must keep."""

    def __init__(self, **settings) -> None:
        self.resume_identity = {"compression": {"method": "vgc", **settings}}

    def setup(self, model, ctx) -> TrainHooks:
        return TrainHooks()


def test_resume_with_other_method_settings_or_without_the_method_is_refused(tmp_path):
    out = tmp_path / "run"
    fit(_job(out), plugins=[_Method(alpha=5.0)], progress=False)
    before = _hashes(out)
    with pytest.raises(CheckpointError, match=r"other settings \(compression alpha: 5.0 there, 8.0 here\)"):
        fit(_job(out).replace(epochs=2), plugins=[_Method(alpha=8.0)], progress=False)
    with pytest.raises(CheckpointError, match=r"other settings \(compression: vgc there, not used here\); resume with"):
        fit(_job(out).replace(epochs=2), progress=False)
    assert _hashes(out) == before
    fit(_job(out).replace(epochs=2), plugins=[_Method(alpha=5.0)], progress=False)  # the same run resumes


def test_resume_with_another_world_size_is_refused_by_the_one_resume_check(tmp_path):
    job = _job(tmp_path)
    two = run_identity(job, world_size=2, plugins=[_Method()])
    stored = {"extra": {"job": job.to_dict(), "identity": two}}
    here = run_identity(job, world_size=1)
    with pytest.raises(CheckpointError, match=r"world size: 2 there, 1 here; compression: vgc there, not used here"):
        check_same_run(stored, tmp_path / "model.pt", here)
    check_same_run(stored, tmp_path / "model.pt", two)
    legacy = {"extra": {"job": job.to_dict()}}  # earlier versions stored only the job
    check_same_run(legacy, tmp_path / "model.pt", here)
    with pytest.raises(CheckpointError, match=r"model: 'mlp' there, 'linear' here"):
        check_same_run({"extra": {"job": {**job.to_dict(), "model": "mlp"}}}, tmp_path / "model.pt", here)


@pytest.fixture(scope="module")
def compressed_run(tmp_path_factory):
    """A finished 2-worker ``--compress vgc`` run (1 epoch, tiny MLP), then certified into its own folder."""
    run = tmp_path_factory.mktemp("vgc") / "run"
    assert main(["train", "--model", "mlp", "--model-arg", "width=16", "--model-arg", "depth=1", "--nproc", "2",
                 "--compress", "vgc", "--epochs", "1", "--device", "cpu", "--no-progress", "--out", str(run)]) == 0
    trained = _hashes(run)
    assert main(["lipschitz", "certify", "--checkpoint", str(run / "model.pt"), "--limit", "20", "--device", "cpu",
                 "--no-progress", "--out", str(run)]) == 0
    return run, trained


@pytest.mark.distributed
@pytest.mark.multiprocess  # 2 training workers: about 20 s
def test_certify_keeps_the_compression_statistics_the_cost_model_reads(compressed_run, capsys):
    run, trained = compressed_run
    assert {k: v for k, v in _hashes(run).items() if k in trained} == trained
    assert json.loads((run / "results.json").read_text())["compression"]["compression_ratio"] > 1
    assert main(["compression", "costmodel", "--checkpoint", str(run / "model.pt"), "--workers", "2",
                 "--bandwidth-gbps", "1", "--device", "cpu"]) == 0
    assert "results.json (method vgc)" in capsys.readouterr().out
    assert json.loads((run / "costmodel" / "costmodel.json").read_text())["compression_ratio"] > 1


@pytest.mark.distributed
@pytest.mark.multiprocess  # 2 training workers: about 20 s
@pytest.mark.parametrize("change, differences", [
    (["--nproc", "1", "--compress", "none", "--optimizer", "sgd", "--lr", "0.05", "--batch-size", "32"],
     "world size: 2 there, 1 here; compression: vgc there, not used here"),
    (["--nproc", "1", "--compress", "none"], "world size: 2 there, 1 here; compression: vgc there, not used here"),
    (["--nproc", "2", "--compress", "vgc", "--alpha", "8"], "compression alpha: 5.0 there, 8.0 here"),
    (["--nproc", "2", "--compress", "topk"], "compression: vgc there, topk here"),
])
def test_resume_that_changes_workers_or_compression_is_refused(compressed_run, capsys, change, differences):
    run, _ = compressed_run
    before = _hashes(run)
    argv = ["train", "--model", "mlp", "--model-arg", "width=16", "--model-arg", "depth=1", "--epochs", "2",
            "--device", "cpu", "--no-progress", *change, "--out", str(run)]
    assert main(argv) == 2
    err = _one_line_error(capsys)
    assert f"was trained with other settings ({differences}" in err and "--no-resume" in err
    assert _hashes(run) == before


def test_checkpoints_record_what_a_resume_must_keep(tmp_path):
    fit(_job(tmp_path / "run"), progress=False)
    ckpt = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert ckpt["extra"]["identity"] == {"dataset": "digits", "model": "linear", "model_kwargs": {}, "resize": None,
                                         "normalize": None, "world_size": 1}
