"""Data-parallel training of any job: ``sturdy train --nproc N`` and ``torchrun`` for every method.

The training core runs DDP whenever a process group is initialised (:func:`sturdy.training.train`); this module
starts that group. Local runs start ``--nproc`` workers (:func:`sturdy.distributed.run_local_workers`: gloo on
CPU, NCCL with one GPU per worker, FileStore rendezvous, loopback only); under ``torchrun`` (``RANK`` and
``WORLD_SIZE`` set) this process joins the launched group. Each worker runs
:func:`sturdy.experiments.train_job.fit` with the plugins it received (pickled), so a method joins a
data-parallel run only through its plugin (e.g. compression's communication hook).

Data-parallel defaults: a job from the command line that runs in several processes trains with
:data:`sturdy.training.config.DATA_PARALLEL_DEFAULTS` for every training option the command line did not set
(``job.options["explicit_options"]`` lists what was typed; a job built in code is left as it is).

``--shard`` trains the same job sharded by FSDP2 instead of DDP (:mod:`sturdy.training.sharding`); a method joins
it through its plugin's ``shard_hook`` (e.g. compression's reduce-scatter), and a resume must keep the choice.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any, Dict, Sequence

import torch
import torch.distributed as dist

from sturdy.distributed import init_from_env, launched_by_torchrun, max_local_workers, run_local_workers
from sturdy.errors import ConfigurationError
from sturdy.experiments import train_job
from sturdy.experiments.train_job import TrainJob, TrainPlugin, check_resume, check_shardable_plugins, fit
from sturdy.training import resolve_device
from sturdy.training.config import DATA_PARALLEL_DEFAULTS
from sturdy.training.sharding import check_shardable

__all__ = ["add_train_arguments", "world_size", "apply_data_parallel_defaults", "run_job",
           "run_distributed_training", "parallel_options", "TRAIN_DEADLINE_S"]

TRAIN_DEADLINE_S = 7 * 24 * 3600.0  # a whole training run; hangs are bounded by dist_timeout per collective
DEFAULTS: Dict[str, Any] = {"nproc": 1, "dist_timeout": 300.0, "shard": False}


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """``--nproc`` and ``--dist-timeout`` of ``sturdy train`` (stored in ``job.options``)."""
    g = parser.add_argument_group("data parallelism (every method)")
    g.add_argument("--nproc", type=int, default=DEFAULTS["nproc"],
                   help=f"local worker processes (gloo on CPU, one GPU each on CUDA), at most {max_local_workers()} "
                        "here; under torchrun the launcher decides. With N > 1, training options not given default "
                        "to momentum SGD 0.9, lr 0.05, 40 epochs and a batch of 64 split over the workers")
    g.add_argument("--dist-timeout", type=float, default=DEFAULTS["dist_timeout"],
                   help="seconds a collective may wait before the run fails (a dead worker)")
    g.add_argument("--shard", action="store_true",
                   help="shard weights, gradients and optimizer state over the workers (PyTorch FSDP2 over the "
                        "model's blocks) instead of replicating the model (DDP); needs 2 or more workers")


def parallel_options(job: TrainJob) -> Dict[str, Any]:
    """``nproc``, ``dist_timeout`` and ``shard`` of ``job``, validated (before any worker starts)."""
    opts = {k: job.options.get(k, v) for k, v in DEFAULTS.items()}
    limit = max_local_workers()
    nproc = opts["nproc"]
    if not isinstance(nproc, int) or isinstance(nproc, bool) or not 1 <= nproc <= limit:
        raise ConfigurationError(f"--nproc must be a positive integer of at most {limit} (4 local workers per CPU "
                                 f"core), got {nproc!r}; to use more machines, launch with torchrun")
    timeout = opts["dist_timeout"]
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not (
            math.isfinite(timeout) and timeout > 0):
        raise ConfigurationError(f"--dist-timeout must be a finite number of seconds > 0, got {timeout!r}")
    if not isinstance(opts["shard"], bool):
        raise ConfigurationError(f"--shard is on or off (True or False), got {opts['shard']!r}")
    if opts["shard"]:
        check_shardable(int(os.environ.get("WORLD_SIZE", "1")) if launched_by_torchrun() else nproc)
    return opts


def world_size(job: TrainJob) -> int:
    """Processes the job runs in: ``WORLD_SIZE`` under torchrun, else ``--nproc``."""
    if launched_by_torchrun():
        return int(os.environ.get("WORLD_SIZE", "1"))
    return int(parallel_options(job)["nproc"])


def apply_data_parallel_defaults(job: TrainJob) -> TrainJob:
    """``job`` with :data:`DATA_PARALLEL_DEFAULTS` for the training options its command line did not set, when it
    runs in several processes (see the module doc); the batch per worker becomes ``max(1, global_batch // world)``."""
    explicit = job.options.get("explicit_options")
    world = world_size(job)
    if explicit is None or world < 2:
        return job
    changes: Dict[str, Any] = {k: DATA_PARALLEL_DEFAULTS[k] for k in ("optimizer", "lr", "momentum", "epochs")
                               if k not in explicit}
    if "batch_size" not in explicit:
        changes["batch_size"] = max(1, DATA_PARALLEL_DEFAULTS["global_batch"] // world)
    return job.replace(**changes) if changes else job


def run_job(job: TrainJob, *, plugins: Sequence[TrainPlugin] = (), resume: bool = True,
            progress: bool = True) -> Dict[str, Any]:
    """Train ``job`` in one process or data-parallel (``--nproc N > 1`` or torchrun); rank 0's results."""
    if world_size(job) > 1 or launched_by_torchrun():
        return run_distributed_training(job, plugins=plugins, resume=resume, progress=progress)
    parallel_options(job)
    return train_job.run_train_job(job, plugins=plugins, resume=resume, progress=progress)


def _local_job(job: TrainJob, rank: int) -> TrainJob:
    if job.config.device.startswith("cuda") and torch.cuda.device_count() > 1:
        return job.replace(device=f"cuda:{rank % torch.cuda.device_count()}")
    return job


def _train_worker(rank: int, world: int, job_dict: Dict[str, Any], plugins: Sequence[TrainPlugin], resume: bool,
                  progress: bool) -> Any:
    job = _local_job(TrainJob.from_dict(job_dict), rank)
    results = fit(job, plugins=plugins, resume=resume, progress=progress and rank == 0).results
    return results if rank == 0 else None


def _backend_device(job: TrainJob, nproc: int) -> str:
    if resolve_device(job.config.device).type == "cuda":
        if torch.cuda.device_count() < nproc:
            raise ConfigurationError(
                f"{nproc} local workers need {nproc} GPUs for NCCL, found {torch.cuda.device_count()}; "
                "use --device cpu (gloo) or fewer --nproc"
            )
        return "cuda"
    return "cpu"


def run_distributed_training(
    job: TrainJob,
    *,
    plugins: Sequence[TrainPlugin] = (),
    resume: bool = True,
    progress: bool = True,
) -> Dict[str, Any]:
    """Train ``job`` data-parallel with ``plugins``; rank 0's results (those written to ``results.json``).

    Under ``torchrun`` this process joins the launched group; otherwise ``job.options["nproc"]`` local workers
    are started, each receiving the plugins pickled.

    Raises:
        ConfigurationError: fewer than 2 workers without torchrun, or bad options.
        DistributedError: a worker failed or died (the others fail within ``--dist-timeout``).
    """
    opts = parallel_options(job)
    check_shardable_plugins(job, plugins)  # before any worker starts
    if launched_by_torchrun():
        if resolve_device(job.config.device).type == "cuda":  # one GPU per process: NCCL on cuda:LOCAL_RANK
            job = job.replace(device=f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        init_from_env(device=job.config.device, timeout_s=opts["dist_timeout"])
        try:
            return fit(job, plugins=plugins, resume=resume, progress=progress and dist.get_rank() == 0).results
        finally:
            dist.destroy_process_group()
    nproc = opts["nproc"]
    if nproc < 2:
        raise ConfigurationError("data-parallel training needs at least 2 workers; add --nproc 2 (or more), or "
                                 "launch with torchrun")
    device = _backend_device(job, nproc)
    if resume:  # another number of workers or other method settings: refused before any worker starts
        check_resume(job, plugins=plugins, world_size=nproc)
    results = run_local_workers(_train_worker, nproc=nproc, args=(job.to_dict(), tuple(plugins), resume, progress),
                                device=device, timeout_s=TRAIN_DEADLINE_S, collective_timeout_s=opts["dist_timeout"])
    return results[0]
