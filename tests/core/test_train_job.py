"""The job layer: TrainJob embeds TrainConfig, plugins join the one training loop, checkpoints are
self-describing (loading a model never loads a data set)."""

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import sturdy.data
from sturdy.errors import CheckpointError, ConfigurationError
from sturdy.experiments.train_job import TrainHooks, TrainJob, fit, load_trained_model
from sturdy.training import CHECKPOINT_FORMAT, TrainConfig, save_checkpoint, train


def _job(tmp_path, **config):
    cfg = dict(epochs=2, batch_size=64, lr=1e-2, device="cpu", seed=3)
    cfg.update(config)
    return TrainJob(model="linear", config=TrainConfig(**cfg), out=str(tmp_path / "run"))


class _Count:
    def __init__(self):
        self.calls = 0

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = int(state["calls"])


@dataclass(frozen=True)
class _ScaledObjective:
    """A test plugin: cross-entropy times ``scale``, counting its calls in checkpointed state."""

    scale: float = 1.0

    def setup(self, model, ctx):
        count = _Count()
        seen = {"input_shape": ctx.input_shape, "num_classes": ctx.num_classes, "steps": ctx.steps_per_epoch}

        def objective(net, x, y, *, epoch, step):
            count.calls += 1
            logits = net(x)
            return self.scale * nn.functional.cross_entropy(logits, y), logits

        return TrainHooks(objective=objective, extra_state={"count": count},
                          extra_results=lambda: {"plugin": {**seen, "calls": count.calls}})


def test_job_embeds_config_and_round_trips(tmp_path):
    job = _job(tmp_path, lr=0.5)
    assert job.config.lr == 0.5
    again = TrainJob.from_dict(job.to_dict())
    assert again == job
    flat = TrainJob.from_dict({"model": "mlp", "epochs": 4, "device": "cpu", "out": "x"})
    assert flat.config == TrainConfig(epochs=4, device="cpu") and flat.model == "mlp"
    assert job.replace(device="cuda:1").config.device == "cuda:1" and job.replace(model="mlp").model == "mlp"
    with pytest.raises(ConfigurationError, match="lr must be"):
        job.replace(lr=-1.0)


def test_plugin_objective_state_and_results(tmp_path):
    fitted = fit(_job(tmp_path), plugins=[_ScaledObjective(2.0)], progress=False)
    plugin = fitted.results["plugin"]
    assert plugin["input_shape"] == (1, 1, 8, 8) and plugin["num_classes"] == 10
    assert plugin["calls"] == 2 * plugin["steps"] == 2 * fitted.results["steps_per_epoch"]
    ckpt = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert ckpt["state"]["count"] == {"calls": plugin["calls"]}
    assert ckpt["extra"]["input_shape"] == [1, 1, 8, 8] and ckpt["extra"]["num_classes"] == 10


def test_two_objectives_are_refused(tmp_path):
    with pytest.raises(ConfigurationError, match="objective"):
        fit(_job(tmp_path), plugins=[_ScaledObjective(), _ScaledObjective(3.0)], progress=False)


def test_loading_a_trained_model_loads_no_data(tmp_path, monkeypatch):
    fitted = fit(_job(tmp_path, epochs=1), progress=False)

    def no_data(*args, **kwargs):
        raise AssertionError("load_trained_model must not load a data set")

    monkeypatch.setattr(sturdy.data, "load_dataset", no_data)
    monkeypatch.setattr("sturdy.experiments.job_sources.load_dataset", no_data)
    model, job = load_trained_model(tmp_path / "run" / "model.pt")
    assert job.config.epochs == 1 and not model.training
    x = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(model(x), fitted.model(x), rtol=0, atol=0)


def test_on_epoch_end_returning_true_stops_training(tmp_path):
    data = sturdy.data.load_dataset("digits", split="train").subset(range(256))
    seen = []

    def stop_after_two(metrics):
        seen.append(metrics.epoch)
        return metrics.epoch == 2

    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    result = train(model, data, config=TrainConfig(epochs=5, device="cpu"), checkpoint_path=tmp_path / "m.pt",
                   on_epoch_end=stop_after_two, progress=False)
    assert seen == [1, 2] and result.stopped_early and len(result.history) == 2
    assert result.to_dict()["stopped_early"] is True
    assert torch.load(tmp_path / "m.pt", weights_only=True)["epoch"] == 2


def test_rerun_into_another_architecture_names_the_difference(tmp_path):
    fit(_job(tmp_path, epochs=1), progress=False)
    other = _job(tmp_path, epochs=1).replace(model="mlp")
    with pytest.raises(CheckpointError, match="model: 'linear' there, 'mlp' here"):
        fit(other, progress=False)


def test_resume_reads_the_checkpoint_once(tmp_path, monkeypatch):
    fit(_job(tmp_path, epochs=1), progress=False)
    reads = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: reads.append(a) or real(*a, **k))
    fit(_job(tmp_path, epochs=2), progress=False)
    assert len(reads) == 1


def test_rerun_with_fewer_epochs_than_done_is_refused(tmp_path):
    fit(_job(tmp_path, epochs=2), progress=False)
    with pytest.raises(CheckpointError, match="already past epoch 1"):
        fit(_job(tmp_path, epochs=1), progress=False)


@pytest.mark.parametrize("out", ["", "   "])
def test_empty_output_folder_is_refused_before_work(out):
    with pytest.raises(ConfigurationError, match="output folder is empty"):
        fit(TrainJob(model="linear", config=TrainConfig(device="cpu"), out=out), progress=False)


def test_output_folder_that_is_a_file_is_refused_before_work(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigurationError, match="is an existing file"):
        fit(TrainJob(model="linear", config=TrainConfig(device="cpu"), out=str(tmp_path / "file")), progress=False)


def _tampered_checkpoint(tmp_path, change):
    fit(_job(tmp_path, epochs=1), progress=False)
    path = tmp_path / "run" / "model.pt"
    ckpt = torch.load(path, weights_only=True)
    change(ckpt)
    save_checkpoint(ckpt, path)
    return path


def test_checkpoint_settings_asking_for_huge_layers_allocate_nothing(tmp_path):
    def huge(ckpt):
        ckpt["extra"]["job"]["model"] = "mlp"
        ckpt["extra"]["job"]["model_kwargs"] = {"width": 10**6, "depth": 3}

    path = _tampered_checkpoint(tmp_path, huge)
    with pytest.raises(CheckpointError, match="another architecture"):
        load_trained_model(path)


def test_checkpoint_with_nan_weights_is_refused(tmp_path):
    def poison(ckpt):
        next(iter(ckpt["model"].values())).fill_(float("nan"))

    with pytest.raises(CheckpointError, match="non-finite"):
        load_trained_model(_tampered_checkpoint(tmp_path, poison))


def test_checkpoint_settings_never_choose_a_data_folder_or_download(tmp_path):
    def redirect(ckpt):
        ckpt["extra"]["job"].update(data_root="/somewhere/else", download=True)

    _, job = load_trained_model(_tampered_checkpoint(tmp_path, redirect))
    assert job.data_root is None and job.download is False


def test_save_checkpoint_failure_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "m.pt"
    save_checkpoint({"format": CHECKPOINT_FORMAT, "v": torch.ones(2)}, path)

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("sturdy.utils.os.fsync", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        save_checkpoint({"format": CHECKPOINT_FORMAT, "v": torch.zeros(2)}, path)
    monkeypatch.undo()
    torch.testing.assert_close(torch.load(path, weights_only=True)["v"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]
