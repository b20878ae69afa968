"""The training plug-in, the costmodel command and option validation."""

import argparse
import json
import pickle
import shutil

import pytest
import torch

from sturdy.compression import TopKState, accel
from sturdy.errors import ConfigurationError, DataError
from sturdy.experiments import compression as exp
from sturdy.experiments import compression_costmodel as costmodel_cmd
from sturdy.experiments import parallel
from sturdy.experiments.train_job import TrainContext, TrainJob, load_trained_model


def _parser():
    parser = argparse.ArgumentParser()
    parallel.add_train_arguments(parser)
    exp.add_train_arguments(parser)
    return parser


def test_train_arguments_and_defaults():
    args = _parser().parse_args(["--nproc", "4", "--compress", "vgc", "--alpha", "2", "--topk-ratio", "0.05"])
    assert (args.nproc, args.compress, args.alpha, args.topk_ratio) == (4, "vgc", 2.0, 0.05)
    assert set(exp.DEFAULTS) <= set(vars(args))
    with pytest.raises(SystemExit):
        _parser().parse_args(["--compress", "zip"])


def test_option_validation_messages():
    job = TrainJob.from_dict(dict(model="linear", epochs=1, options={"compress": "vgc", "nproc": 1}))
    with pytest.raises(ConfigurationError, match="needs at least 2 workers; add --nproc 2"):
        exp.run_distributed_training(job)
    with pytest.raises(ConfigurationError, match="unknown --compress 'zip'"):
        exp.compression_options(TrainJob(model="linear", options={"compress": "zip"}))
    with pytest.raises(ConfigurationError, match="--nproc must be a positive integer"):
        parallel.parallel_options(TrainJob(model="linear", options={"nproc": 0}))
    with pytest.raises(ConfigurationError, match="needs at least 2 workers; add --nproc 2"):
        exp.training_plugin(TrainJob(model="linear", options={"compress": "topk", "nproc": 1}))


def test_the_plugin_joins_only_compressed_jobs_and_data_parallelism_is_the_core_s(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    plain = TrainJob(model="linear", options={"compress": "none", "nproc": 1})
    assert exp.training_plugin(plain) is None and parallel.world_size(plain) == 1
    # --nproc 2 without compression: data-parallel through the core, no compression part involved
    two = TrainJob(model="linear", options={"compress": "none", "nproc": 2})
    assert exp.training_plugin(two) is None and parallel.world_size(two) == 2
    job = TrainJob(model="linear", options={"compress": "vgc", "nproc": 2})
    plugin = exp.training_plugin(job)
    assert pickle.loads(pickle.dumps(plugin)) == plugin  # workers receive it pickled
    assert plugin.options["compress"] == "vgc"
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert parallel.world_size(plain) == 2


def test_plugin_setup_attaches_state_hook_and_results(tmp_path):
    job = TrainJob(model="mlp", options={"compress": "topk", "nproc": 2, "topk_ratio": 0.05})
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    ctx = TrainContext(job=job, input_shape=(1, 1, 2, 2), num_classes=3, steps_per_epoch=1,
                       device=torch.device("cpu"))
    hooks = exp.training_plugin(job).setup(model, ctx)
    state, hook = hooks.comm_hook
    assert isinstance(state, TopKState) and state.ratio == 0.05
    assert hooks.extra_state == {"compression": state}
    results = hooks.extra_results()["compression"]  # no process group: this rank's own figures
    assert results["method"] == "topk" and results["world_size"] == 1 and results["steps"] == 0


@pytest.mark.distributed
def test_compressed_training_writes_results_and_feeds_the_cost_model(tmp_path, capsys):
    out = tmp_path / "vgc"
    job = TrainJob.from_dict(dict(
        dataset="digits", model="mlp", model_kwargs={"width": 32, "depth": 1}, epochs=2, batch_size=32, lr=0.05,
        optimizer="sgd", device="cpu", out=str(out), options={"nproc": 2, "compress": "vgc", "alpha": 2.0}))
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
        costmodel_cmd._cmd_costmodel(argparse.Namespace(checkpoint=str(plain / "model.pt"), ratio=None, workers=[2],
                                              bandwidth_gbps=[1.0], latency_us=50.0, threads=1, out=None,
                                              codec_ms=None, device="cpu"))


@pytest.mark.slow
@pytest.mark.distributed
def test_vgc_keeps_accuracy_at_high_compression_on_digits(tmp_path):
    """Statistical check (slow): 2 workers, 15 epochs, alpha 4 vs. plain allreduce on the same seed."""
    accuracy, ratio = {}, {}
    for method in ("none", "vgc"):
        job = TrainJob.from_dict(dict(dataset="digits", model="mlp", epochs=15, batch_size=32, lr=0.05,
                                      optimizer="sgd", device="cpu", out=str(tmp_path / method),
                                      options={"nproc": 2, "compress": method}))
        res = exp.run_distributed_training(job, progress=False)
        accuracy[method], ratio[method] = res["test_accuracy"], res["compression"]["compression_ratio"]
    assert ratio["vgc"] > 25
    assert accuracy["vgc"] > accuracy["none"] - 0.03


def _cli_job(argv):
    from sturdy.cli import _job_from_args, build_parser

    return _job_from_args(build_parser().parse_args(["train", "--out", "o", *argv]))


def test_data_parallel_defaults_fill_only_what_the_command_line_left_out(capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    job = parallel.apply_data_parallel_defaults(_cli_job(["--nproc", "2", "--compress", "vgc"]))
    c = job.config
    assert (c.optimizer, c.lr, c.momentum, c.epochs, c.batch_size) == ("sgd", 0.05, 0.9, 40, 32)
    four = parallel.apply_data_parallel_defaults(_cli_job(["--nproc", "4", "--compress", "none"]))
    assert four.config.batch_size == 16
    lmt = parallel.apply_data_parallel_defaults(_cli_job(["--nproc", "2", "--method", "lmt"]))  # every method
    assert (lmt.config.optimizer, lmt.config.batch_size) == ("sgd", 32)
    single = parallel.apply_data_parallel_defaults(_cli_job([]))
    assert (single.config.optimizer, single.config.epochs, single.config.batch_size) == ("adam", 20, 64)
    typed = parallel.apply_data_parallel_defaults(_cli_job(["--nproc", "2", "--compress", "vgc", "--lr", "0.1",
                                                            "--batch-size", "8"]))
    assert (typed.config.optimizer, typed.config.lr, typed.config.batch_size) == ("sgd", 0.1, 8)
    assert typed.options["explicit_options"] == ["batch_size", "lr"]
    exp.training_plugin(typed)
    assert capsys.readouterr().err == ""
    adam = parallel.apply_data_parallel_defaults(_cli_job(["--nproc", "2", "--compress", "vgc", "--optimizer",
                                                           "adam"]))
    assert adam.config.optimizer == "adam"
    exp.training_plugin(adam)
    assert "warning: Adam with gradient compression" in capsys.readouterr().err
    in_code = TrainJob(model="linear", options={"compress": "vgc", "nproc": 2})
    assert parallel.apply_data_parallel_defaults(in_code) == in_code
