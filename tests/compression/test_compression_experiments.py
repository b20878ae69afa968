"""The training plug-in, the costmodel command and option validation."""

import argparse
import json
import shutil

import pytest

from sturdy.compression import accel
from sturdy.errors import ConfigurationError, DataError
from sturdy.experiments import compression as exp
from sturdy.experiments.train_job import TrainJob, load_trained_model


def _parser():
    parser = argparse.ArgumentParser()
    exp.add_train_arguments(parser)
    return parser


def test_train_arguments_and_defaults():
    args = _parser().parse_args(["--nproc", "4", "--compress", "vgc", "--alpha", "2", "--topk-ratio", "0.05"])
    assert (args.nproc, args.compress, args.alpha, args.topk_ratio) == (4, "vgc", 2.0, 0.05)
    assert set(exp.DEFAULTS) <= set(vars(args))
    with pytest.raises(SystemExit):
        _parser().parse_args(["--compress", "zip"])


def test_option_validation_messages():
    job = TrainJob(model="linear", epochs=1, options={"compress": "vgc", "nproc": 1})
    with pytest.raises(ConfigurationError, match="needs at least 2 workers; add --nproc 2"):
        exp.run_distributed_training(job)
    with pytest.raises(ConfigurationError, match="unknown --compress 'zip'"):
        exp.compression_options(TrainJob(model="linear", options={"compress": "zip"}))
    with pytest.raises(ConfigurationError, match="--nproc must be a positive integer"):
        exp.compression_options(TrainJob(model="linear", options={"nproc": 0}))


@pytest.mark.distributed
def test_compressed_training_writes_results_and_feeds_the_cost_model(tmp_path, capsys):
    out = tmp_path / "vgc"
    job = TrainJob(dataset="digits", model="mlp", model_kwargs={"width": 32, "depth": 1}, epochs=2, batch_size=32,
                   lr=0.05, optimizer="sgd", device="cpu", out=str(out),
                   options={"nproc": 2, "compress": "vgc", "alpha": 2.0})
    results = exp.run_distributed_training(job, progress=False)
    comp = results["compression"]
    assert comp["method"] == "vgc" and comp["world_size"] == 2
    assert comp["kernels"] == ("numba" if accel.available() else "numpy")
    assert comp["steps"] == 2 * results["steps_per_epoch"]
    assert len(comp["elements_sent_per_step"]) == comp["steps"]
    assert comp["compression_ratio"] > 1 and comp["step_time_s"] > 0
    assert 0 <= comp["never_sent_fraction"] <= 1
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["compression"]["compression_ratio"] == pytest.approx(comp["compression_ratio"])
    model, loaded_job = load_trained_model(out / "model.pt")
    assert loaded_job.options["compress"] == "vgc"

    from sturdy.cli import main

    assert main(["compression", "costmodel", "--checkpoint", str(out / "model.pt"), "--workers", "2,8",
                 "--bandwidth-gbps", "0.1,10"]) == 0
    report = json.loads((out / "costmodel" / "costmodel.json").read_text())
    assert len(report["predictions"]) == 4 and (out / "costmodel" / "costmodel.png").is_file()
    assert report["compression_ratio"] == pytest.approx(comp["compression_ratio"])
    assert report["codec_s"] > 0
    assert "speedup" in capsys.readouterr().out

    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(out / "model.pt", plain / "model.pt")
    (plain / "results.json").write_text(json.dumps({"test_accuracy": 0.5}))
    with pytest.raises(DataError, match="no measured compression ratio"):
        exp._cmd_costmodel(argparse.Namespace(checkpoint=str(plain / "model.pt"), ratio=None, workers=[2],
                                              bandwidth_gbps=[1.0], latency_us=50.0, threads=1, out=None,
                                              codec_ms=None))


@pytest.mark.slow
@pytest.mark.distributed
def test_vgc_keeps_accuracy_at_high_compression_on_digits(tmp_path):
    """Statistical check (slow): 2 workers, 15 epochs, alpha 4 vs. plain allreduce on the same seed."""
    accuracy, ratio = {}, {}
    for method in ("none", "vgc"):
        job = TrainJob(dataset="digits", model="mlp", epochs=15, batch_size=32, lr=0.05, optimizer="sgd",
                       device="cpu", out=str(tmp_path / method), options={"nproc": 2, "compress": method})
        res = exp.run_distributed_training(job, progress=False)
        accuracy[method], ratio[method] = res["test_accuracy"], res["compression"]["compression_ratio"]
    assert ratio["vgc"] > 25
    assert accuracy["vgc"] > accuracy["none"] - 0.03
