"""Nothing lost on resume: a 2-worker run killed after a checkpoint (every process, SIGKILL, as a crashed
machine) and rerun into the same folder ends bit for bit where an uninterrupted run ends, for every
error-feedback method and PowerSGD. Three launches cover all four methods: the uninterrupted runs, the
crashed ones (three stop at the crash point by an exception, which leaves the folder as a kill would; the
last one kills the launcher's whole process group), and the resumed ones."""

import math
import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

from sturdy.compression import TopKState
from sturdy.distributed import run_local_workers
from sturdy.errors import CheckpointError
from sturdy.experiments.compression import CompressionPlugin, compression_options
from sturdy.experiments.train_job import TrainHooks, TrainJob, fit, load_job_data
from sturdy.models import create_model
from sturdy.training import load_checkpoint, train

pytestmark = [pytest.mark.distributed, pytest.mark.multiprocess]  # the crash test's fixture serves the module

METHODS = {"vgc": {"alpha": 2.0}, "strom": {"strom_tau": 1e-3}, "topk": {"topk_ratio": 0.05},
           "powersgd": {"powersgd_rank": 1}}
EPOCHS = 4
CRASH_AT = (2, 3)  # (epoch, step), 0-based: inside the third epoch, after the second epoch's checkpoint
LAUNCH_TIMEOUT_S = 300.0
REPO = Path(__file__).resolve().parents[2]


class _SimulatedCrash(Exception):
    pass


@dataclass(frozen=True)
class CrashAt:
    """Cross-entropy objective that crashes at ``CRASH_AT``: ``"raise"`` on every rank, or ``"kill"``: rank 1
    SIGKILLs its process group (the launcher and every worker)."""

    mode: Optional[str] = None

    def setup(self, model, ctx):
        mode = self.mode

        def objective(net, x, y, *, epoch, step):
            if mode is not None and (epoch, step - epoch * ctx.steps_per_epoch) == CRASH_AT:
                if mode == "kill":
                    if torch.distributed.get_rank() == 1:
                        os.killpg(os.getpgid(0), signal.SIGKILL)
                    else:
                        torch.distributed.barrier()  # rank 1 kills everyone meanwhile
                raise _SimulatedCrash()
            logits = net(x)
            return F.cross_entropy(logits, y), logits

        return TrainHooks(objective=objective)


def _job(out: Path, method: str) -> dict:
    return TrainJob.from_dict(dict(
        dataset="digits", model="mlp", model_kwargs={"width": 16, "depth": 1}, epochs=EPOCHS, batch_size=32,
        lr=0.05, optimizer="sgd", momentum=0.9, device="cpu", out=str(out / method),
        options={"nproc": 2, "compress": method, **METHODS[method]})).to_dict()


def _fit_all(rank, world, jobs, modes, resume):
    for job_dict, mode in zip(jobs, modes):
        job = TrainJob.from_dict(job_dict)
        try:
            fit(job, plugins=[CompressionPlugin(compression_options(job)), CrashAt(mode)], resume=resume,
                progress=False)
        except _SimulatedCrash:
            pass
    return None


CRASH_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from test_compression_resume import _fit_all
    from sturdy.distributed import run_local_workers
    run_local_workers(_fit_all, nproc=2, args=({jobs!r}, {modes!r}, False), timeout_s=300)
    print("finished without a crash")
""")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    names = list(METHODS)
    reference = [_job(root / "reference", m) for m in names]
    crashed = [_job(root / "crashed", m) for m in names]
    run_local_workers(_fit_all, nproc=2, args=(reference, [None] * len(names), False), timeout_s=LAUNCH_TIMEOUT_S)
    modes = ["raise"] * (len(names) - 1) + ["kill"]
    script = CRASH_SCRIPT.format(tests=str(Path(__file__).parent), jobs=crashed, modes=modes)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, start_new_session=True, capture_output=True,
                          text=True, timeout=LAUNCH_TIMEOUT_S)
    killed = {"returncode": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr[-2000:]}
    after_crash = {m: load_checkpoint(root / "crashed" / m / "model.pt")["epoch"] for m in names}
    results_after_crash = {m: (root / "crashed" / m / "results.json").exists() for m in names}
    run_local_workers(_fit_all, nproc=2, args=(crashed, [None] * len(names), True), timeout_s=LAUNCH_TIMEOUT_S)
    return {"root": root, "killed": killed, "after_crash": after_crash, "results_after_crash": results_after_crash}


def test_the_crash_kills_every_process_after_a_checkpoint(runs):
    assert runs["killed"]["returncode"] == -signal.SIGKILL, runs["killed"]
    assert "finished" not in runs["killed"]["stdout"]
    assert runs["after_crash"] == {m: CRASH_AT[0] for m in METHODS}
    assert not any(runs["results_after_crash"].values())


@pytest.mark.parametrize("method", list(METHODS))
def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(runs, method):
    ref = load_checkpoint(runs["root"] / "reference" / method / "model.pt")
    resumed = load_checkpoint(runs["root"] / "crashed" / method / "model.pt")
    assert resumed["epoch"] == ref["epoch"] == EPOCHS
    assert resumed["history"][-1]["test_accuracy"] == ref["history"][-1]["test_accuracy"]
    for name, tensor in ref["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), (method, name)
    per_rank = ref["state"]["compression"]["per_rank"]
    assert len(per_rank) == 2 and len(resumed["state"]["compression"]["per_rank"]) == 2
    for rank, (a, b) in enumerate(zip(per_rank, resumed["state"]["compression"]["per_rank"])):
        _assert_same(a, b, f"{method} rank {rank}")
    if method != "powersgd":  # the two ranks' residuals differ: both were saved
        buffers = [s["buffers"]["residual"] for s in per_rank]
        assert any(not torch.equal(buffers[0][k], buffers[1][k]) for k in buffers[0])


# Bytes depend on the bucket layout (one header per bucket), and a fresh DDP's first step has other buckets.
LAYOUT_DEPENDENT = {"payload_bytes", "wire_bytes"}
# The lag monitor's averages sum per-bucket squared norms: the same elements, rounded per bucket (that first step).
LAYOUT_ROUNDED = {"avg_r2", "avg_g2"}
ROUNDING = 1e-6  # relative


def _assert_same(a, b, where):
    key = where.rsplit(".", 1)[-1]
    if key in LAYOUT_DEPENDENT:
        return
    if key in LAYOUT_ROUNDED:
        assert math.isclose(a, b, rel_tol=ROUNDING), where
        return
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_resuming_with_another_world_size_is_refused(runs):
    ckpt = runs["root"] / "crashed" / "topk" / "model.pt"
    job = TrainJob.from_dict(_job(runs["root"], "topk"))
    train_set, _ = load_job_data(job)
    model = create_model("mlp", in_shape=train_set.image_shape, num_classes=10, width=16, depth=1)
    state = TopKState(ratio=0.05, named_parameters=model.named_parameters())
    with pytest.raises(CheckpointError, match=r"state of 2 workers and this run has 1; resume with 2 workers"):
        train(model, train_set, config=job.config, extra_state={"compression": state}, checkpoint_path=ckpt,
              progress=False)
