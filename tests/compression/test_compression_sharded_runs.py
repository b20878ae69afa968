"""Compression inside FSDP2 at two processes: the same numbers as DDP, and nothing lost on resume.

* FSDP2 + vgc and DDP + vgc on one small model and data: the same elements sent at every step, the same residuals
  and variances per parameter, the same weights (float tolerance: FSDP2 averages the dense first steps by a
  reduce-scatter), and the traffic counted the same way (with one sharded group, as DDP's one bucket, the bytes
  differ only by the index coding of another parameter order).
* ``--shard`` runs (none, vgc, strom, topk) interrupted after a checkpoint and rerun end bit for bit where an
  uninterrupted run ends; a DDP run of the same job, or another world size, is refused.
"""

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sturdy.compression import create_compression
from sturdy.compression.sharded import install_sharded_compression
from sturdy.data import ImageDataset
from sturdy.distributed import run_local_workers
from sturdy.errors import CheckpointError
from sturdy.experiments.compression import training_plugin
from sturdy.experiments.train_job import TrainHooks, TrainJob, check_resume, fit
from sturdy.training import TrainConfig, load_checkpoint, train
from sturdy.training.sharding import Sharding, model_state_dict

pytestmark = [pytest.mark.distributed, pytest.mark.multiprocess]

LAUNCH_TIMEOUT_S = 300.0
WEIGHT_RTOL, WEIGHT_ATOL = 1e-5, 1e-6  # dense steps averaged by reduce-scatter vs allreduce, then 4-bit updates
STATE_RTOL, STATE_ATOL = 1e-5, 1e-7
PAYLOAD_ORDER_SLACK = 0.01  # relative byte difference from the order of the parameters in a message


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))


def _compare_worker(rank, world):
    g = torch.Generator().manual_seed(1)
    data = ImageDataset(torch.rand(64, 1, 4, 4, generator=g), torch.randint(0, 3, (64,), generator=g), num_classes=3)
    config = TrainConfig(epochs=2, batch_size=8, lr=0.05, optimizer="sgd", momentum=0.9, device="cpu")
    out = {}
    for mode in ("ddp", "one_group", "blocks"):
        model = _net()
        state, hook = create_compression("vgc", model=model, alpha=1.0, gather="exact")
        if mode == "ddp":
            train(model, data, config=config, comm_hook=(state, hook), progress=False)
        else:
            blocks = (lambda m: []) if mode == "one_group" else None
            install = partial(install_sharded_compression, state=state, hook=hook)
            train(model, data, config=config, sharding=Sharding(install=install, blocks=blocks), progress=False)
        out[mode] = {"weights": model_state_dict(model), "stats": state.statistics(), "state": state.state_dict()}
    return out


@pytest.fixture(scope="module")
def compared():
    return run_local_workers(_compare_worker, nproc=2, timeout_s=LAUNCH_TIMEOUT_S)


@pytest.mark.parametrize("mode", ["one_group", "blocks"])
def test_fsdp2_and_ddp_select_the_same_elements_and_reach_the_same_weights(compared, mode):
    for rank, runs in enumerate(compared):
        ddp, fsdp = runs["ddp"], runs[mode]
        assert ddp["stats"].elements_sent_per_step == fsdp["stats"].elements_sent_per_step, rank
        sent = ddp["stats"].elements_sent_per_step[2:]  # compressed steps (start_iter 2)
        assert 0 < min(sent) and max(sent) < ddp["stats"].elements / ddp["stats"].steps  # a real selection
        for kind, named in ddp["state"]["buffers"].items():
            for name, tensor in named.items():
                other = fsdp["state"]["buffers"][kind][name]
                if kind == "ever_sent":
                    assert torch.equal(tensor, other), (rank, name)
                else:
                    torch.testing.assert_close(other, tensor, rtol=STATE_RTOL, atol=STATE_ATOL, msg=f"{kind} {name}")
    weights = compared[0]
    for name, tensor in weights["ddp"]["weights"].items():
        torch.testing.assert_close(weights[mode]["weights"][name], tensor, rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL)


def test_traffic_is_counted_the_same_way(compared):
    for runs in compared:
        ddp, one, blocks = runs["ddp"]["stats"], runs["one_group"]["stats"], runs["blocks"]["stats"]
        assert (one.dense_bytes, one.elements, one.elements_sent) == (ddp.dense_bytes, ddp.elements, ddp.elements_sent)
        # the same messages but for the Rice code of the index gaps: DDP's bucket holds the parameters in
        # gradient-ready order, the group in module order, so a few gaps differ
        assert abs(one.payload_bytes - ddp.payload_bytes) <= PAYLOAD_ORDER_SLACK * ddp.payload_bytes
        assert abs(one.wire_bytes - ddp.wire_bytes) <= PAYLOAD_ORDER_SLACK * ddp.wire_bytes
        # two groups: the same elements in two messages (one more header per step), nothing else
        assert blocks.dense_bytes == ddp.dense_bytes and blocks.elements_sent == ddp.elements_sent
        assert blocks.wire_bytes > ddp.wire_bytes


# ----------------------------------------------------------------------------- kill and resume

METHODS = {"none": {}, "vgc": {"alpha": 2.0}, "strom": {"strom_tau": 1e-3}, "topk": {"topk_ratio": 0.05}}
EPOCHS = 3
CRASH_AT = (1, 3)  # (epoch, step), 0-based: inside the second epoch, after the first epoch's checkpoint


class _SimulatedCrash(Exception):
    pass


@dataclass(frozen=True)
class CrashAt:
    """Cross-entropy objective that raises at ``CRASH_AT`` on every rank (the folder is left as a kill leaves it)."""

    crash: bool = False
    shardable = True  # a plain cross-entropy objective: nothing read outside forward and backward

    def setup(self, model, ctx):
        crash = self.crash

        def objective(net, x, y, *, epoch, step):
            if crash and (epoch, step - epoch * ctx.steps_per_epoch) == CRASH_AT:
                raise _SimulatedCrash()
            logits = net(x)
            return F.cross_entropy(logits, y), logits

        return TrainHooks(objective=objective)


def _job(out: Path, method: str, **options) -> TrainJob:
    return TrainJob.from_dict(dict(
        dataset="digits", model="mlp", model_kwargs={"width": 16, "depth": 1}, epochs=EPOCHS, batch_size=32,
        lr=0.05, optimizer="sgd", momentum=0.9, device="cpu", out=str(out / method),
        options={"nproc": 2, "shard": True, "compress": method, **METHODS[method], **options}))


def _plugins(job: TrainJob, crash: bool):
    return [p for p in (training_plugin(job), CrashAt(crash)) if p is not None]


def _fit_all(rank, world, jobs, crash, resume):
    for job_dict in jobs:
        job = TrainJob.from_dict(job_dict)
        try:
            fit(job, plugins=_plugins(job, crash), resume=resume, progress=False)
        except _SimulatedCrash:
            pass
    return None


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded-resume")
    reference = [_job(root / "reference", m).to_dict() for m in METHODS]
    crashed = [_job(root / "crashed", m).to_dict() for m in METHODS]
    run_local_workers(_fit_all, nproc=2, args=(reference, False, False), timeout_s=LAUNCH_TIMEOUT_S)
    run_local_workers(_fit_all, nproc=2, args=(crashed, True, False), timeout_s=LAUNCH_TIMEOUT_S)
    after_crash = {m: load_checkpoint(root / "crashed" / m / "model.pt")["epoch"] for m in METHODS}
    run_local_workers(_fit_all, nproc=2, args=(crashed, False, True), timeout_s=LAUNCH_TIMEOUT_S)
    return {"root": root, "after_crash": after_crash}


# Bytes on the wire depend on the one-round gather's slot sizes, exchange state that is not checkpointed (the
# first step after a resume may need a second round); what was selected and sent is compared exactly.
SLOT_DEPENDENT = {"wire_bytes"}


def _assert_equal(a, b, where: str) -> None:
    if where.rsplit(".", 1)[-1] in SLOT_DEPENDENT:
        return
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("method", list(METHODS))
def test_a_sharded_run_resumes_bit_identically(resumed, method):
    assert resumed["after_crash"][method] == CRASH_AT[0]
    ref = load_checkpoint(resumed["root"] / "reference" / method / "model.pt")
    again = load_checkpoint(resumed["root"] / "crashed" / method / "model.pt")
    assert again["epoch"] == ref["epoch"] == EPOCHS
    assert again["history"][-1]["test_accuracy"] == ref["history"][-1]["test_accuracy"]
    _assert_equal(ref["model"], again["model"], "model")
    _assert_equal(ref["optimizer"], again["optimizer"], "optimizer")
    assert set(ref["model"]) == set(ref["optimizer"]["state"])  # the full (gathered) state, by parameter name
    if method != "none":
        per_rank = ref["state"]["compression"]["per_rank"]
        assert len(per_rank) == 2
        _assert_equal(per_rank, again["state"]["compression"]["per_rank"], "compression")
        residuals = [s["buffers"]["residual"] for s in per_rank]  # both ranks' residuals, and they differ
        assert any(not torch.equal(residuals[0][k], residuals[1][k]) for k in residuals[0])


def test_a_sharded_checkpoint_is_refused_by_ddp_and_by_another_world_size(resumed):
    job = _job(resumed["root"] / "crashed", "vgc")
    plugins = _plugins(job, False)
    check_resume(job, plugins=plugins, world_size=2)  # the same run resumes
    with pytest.raises(CheckpointError, match="sharding: 'fsdp2' there, not used here"):
        check_resume(_job(resumed["root"] / "crashed", "vgc", shard=False), plugins=plugins, world_size=2)
    with pytest.raises(CheckpointError, match="world size: 2 there, 3 here"):
        check_resume(job, plugins=plugins, world_size=3)


def test_the_sharded_model_file_loads_as_a_plain_model(resumed):
    from sturdy.experiments.train_job import load_trained_model

    model, job = load_trained_model(resumed["root"] / "crashed" / "vgc" / "model.pt")
    assert job.options["shard"] is True
    assert not any(type(p).__name__ == "DTensor" for p in model.parameters())
