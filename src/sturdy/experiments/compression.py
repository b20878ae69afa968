"""Gradient compression in a training run (``sturdy train --nproc N --compress ...``), the cost model command
(``sturdy compression costmodel``), and the demo section.

This module only orchestrates. :func:`training_plugin` gives a data-parallel run the compression state as a DDP
communication hook and as checkpointed state (``results.json`` gains a ``"compression"`` entry); the run itself
is started by the training core's launcher (:mod:`sturdy.experiments.parallel`). Error feedback sums delayed
gradients, which momentum SGD applies as they arrive; Adam's per-element normalisation does not, so asking for
Adam with compression prints a warning. Every option is validated (:func:`compression_options`) before any
worker starts.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple

import torch.distributed as dist
from torch import nn

from sturdy.compression import METHODS, VarianceCompressionState, accel, create_compression, warm_up
from sturdy.compression.lag import LagMonitor
from sturdy.compression.sharded import install_sharded_compression
from sturdy.compression.timing import StepClock
from sturdy.distributed import run_local_workers
from sturdy.errors import ConfigurationError
from sturdy.experiments import parallel
from sturdy.experiments.compression_costmodel import add_costmodel_command, plot_speedup
from sturdy.experiments.parallel import apply_data_parallel_defaults, world_size
from sturdy.experiments.train_job import (
    TrainContext,
    TrainHooks,
    TrainJob,
    TrainPlugin,
    fit,
)
from sturdy.training.config import EpochMetrics
from sturdy.training.plugins import Plugin, RunContext
from sturdy.validation import check_count, check_number

__all__ = [
    "add_train_arguments",
    "CompressionPlugin",
    "training_plugin",
    "run_distributed_training",
    "register_cli",
    "demo_section",
    "compression_options",
    "plot_speedup",
    "SHARDED_METHODS",
]

DEFAULTS: Dict[str, Any] = {
    "compress": "none",
    "alpha": 5.0,
    "zeta": 0.999,
    "quantize": "4bit",
    "topk_ratio": 0.01,
    "strom_tau": 1e-3,
    "powersgd_rank": 1,
    "start_iter": 2,
    "gather": "capacity",
    "gather_slack": 1.25,
    "momentum_correction": "off",
    "momentum_masking": "on",
    "alpha_warmup_epochs": 0.0,
    "feedback": "unsent",
}
SHARDED_METHODS = ("vgc", "strom", "topk", "none")  # with --shard (FSDP2); none: FSDP2's own reduce-scatter
# Upper bounds of the count options (value, reason), checked with the rest before any worker starts.
_COUNT_LIMITS: Dict[str, Tuple[int, str]] = {
    "powersgd_rank": (2**16, "PowerSGD compresses an n x m gradient only when rank * (n + m) < n * m"),
    "start_iter": (2**31 - 1, "a later start never compresses: use --compress none for plain allreduce"),
}
def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``sturdy train`` for data-parallel training and gradient compression."""
    g = parser.add_argument_group("gradient compression (with --nproc N > 1 or torchrun)")
    g.add_argument("--compress", choices=METHODS, default=DEFAULTS["compress"],
                   help="DDP communication hook: vgc (variance-based), strom, topk, fp16, bf16, powersgd, none; with "
                        "--shard FSDP2's reduce-scatter: vgc, strom, topk, none")
    g.add_argument("--alpha", type=float, default=DEFAULTS["alpha"],
                   help="vgc: send an element when r^2 > alpha * v (larger sends less)")
    g.add_argument("--zeta", type=float, default=DEFAULTS["zeta"], help="vgc: decay of v for unsent elements")
    g.add_argument("--quantize", choices=("4bit", "float32"), default=DEFAULTS["quantize"],
                   help="vgc: value format on the wire")
    g.add_argument("--topk-ratio", type=float, default=DEFAULTS["topk_ratio"], help="topk: fraction sent per step")
    g.add_argument("--strom-tau", type=float, default=DEFAULTS["strom_tau"], help="strom: threshold")
    g.add_argument("--powersgd-rank", type=int, default=DEFAULTS["powersgd_rank"], help="powersgd: rank")
    g.add_argument("--start-iter", type=int, default=DEFAULTS["start_iter"],
                   help="plain allreduce before this iteration (DDP rebuilds its buckets after the first)")
    g.add_argument("--gather", choices=("exact", "capacity", "bounded"), default=DEFAULTS["gather"],
                   help="sparse methods: how payloads travel (exact: sizes then payloads; capacity: one round "
                        "with slots sized from the last step; bounded (vgc): one async round, what does not "
                        "fit stays in the residual)")
    g.add_argument("--gather-slack", type=float, default=DEFAULTS["gather_slack"],
                   help="slot size as a multiple of the last step's largest payload")
    g.add_argument("--momentum-correction", choices=("on", "off"), default=DEFAULTS["momentum_correction"],
                   help="vgc with momentum SGD: the hook accumulates the velocity and the optimizer runs without "
                        "momentum (Deep Gradient Compression)")
    g.add_argument("--momentum-masking", choices=("on", "off"), default=DEFAULTS["momentum_masking"],
                   help="vgc with momentum correction: reset the velocity of the elements sent")
    g.add_argument("--alpha-warmup-epochs", type=float, default=DEFAULTS["alpha_warmup_epochs"],
                   help="vgc: ramp alpha linearly from 0 over this many epochs")
    g.add_argument("--feedback", choices=("all", "unsent"), default=DEFAULTS["feedback"],
                   help="vgc: error feedback keeps the 4-bit rounding error of sent elements (all) or drops it")


def _option_error(key: str, message: str) -> ConfigurationError:
    return ConfigurationError(f"--{key.replace('_', '-')} {message}")


def _check_number(opts: Dict[str, Any], key: str, *, low: float, high: Optional[float] = None, low_open: bool = False,
                  hint: str = "") -> None:
    check_number(opts[key], f"--{key.replace('_', '-')}", low=low, high=high, low_open=low_open, hint=hint)


def compression_options(job: TrainJob) -> Dict[str, Any]:
    """The compression options of ``job`` with defaults filled in, every one validated (before any worker starts).

    Raises:
        ConfigurationError: one line naming the option, its value and the accepted range.
    """
    opts = {k: job.options.get(k, v) for k, v in DEFAULTS.items()}
    if opts["compress"] not in METHODS:
        raise ConfigurationError(f"unknown --compress {opts['compress']!r}; expected one of {METHODS}")
    _check_number(opts, "alpha", low=0.0, hint="larger sends less, typical values 1 to 8")
    _check_number(opts, "zeta", low=0.0, high=1.0, hint="typical value 0.999")
    _check_number(opts, "topk_ratio", low=0.0, high=1.0, low_open=True, hint="e.g. 0.01 sends 1% per step")
    _check_number(opts, "strom_tau", low=0.0, low_open=True, hint="a gradient magnitude such as 1e-3")
    _check_number(opts, "gather_slack", low=1.0, hint="e.g. 1.25")
    _check_number(opts, "alpha_warmup_epochs", low=0.0, high=1e6, hint="e.g. 0 (no ramp) or 4")
    for key, low in (("powersgd_rank", 1), ("start_iter", 2 if opts["compress"] == "powersgd" else 0)):
        value = opts[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            why = " (PowerSGD starts after DDP has rebuilt its buckets)" if key == "start_iter" and low == 2 else ""
            raise _option_error(key, f"must be an integer >= {low}{why}, got {value!r}")
        check_count(value, f"--{key.replace('_', '-')}", low=low, high=_COUNT_LIMITS[key][0], why=_COUNT_LIMITS[key][1])
    for key, choices in (("quantize", ("4bit", "float32")), ("gather", ("exact", "capacity", "bounded")),
                         ("momentum_correction", ("on", "off")), ("momentum_masking", ("on", "off")),
                         ("feedback", ("all", "unsent"))):
        if opts[key] not in choices:
            raise _option_error(key, f"must be one of {choices}, got {opts[key]!r}")
    if opts["gather"] == "bounded" and opts["compress"] != "vgc":
        raise _option_error("gather", "bounded truncates selections and is implemented for --compress vgc only")
    return opts


@dataclass(frozen=True)
class CompressionPlugin:
    """The compression part's contribution to a run: its DDP hook, its checkpointed state, its results.

    Attributes:
        options: the validated compression options (:func:`compression_options`).
    """

    options: Dict[str, Any] = field(default_factory=dict)
    shardable: ClassVar[bool] = True  # --shard: the hooks reduce FSDP2's groups (compression.sharded)

    def setup(self, model: nn.Module, ctx: TrainContext) -> TrainHooks:
        """Attach the statistics to ``model`` (the module DDP wraps) and build the state and its hook."""
        opts = self.options
        shard = bool(ctx.job.options.get("shard"))
        if shard and opts["compress"] not in SHARDED_METHODS:
            raise ConfigurationError(f"--compress {opts['compress']} has no sharded form (--shard)")
        if shard and opts["compress"] == "none":
            return TrainHooks()  # FSDP2's own reduce-scatter
        if shard and opts["compress"] == "vgc":
            _check_sharded_statistics(model)
        momentum = hook_momentum(opts, ctx.job)
        state, hook = create_compression(
            opts["compress"],
            model=model,
            alpha=opts["alpha"],
            zeta=opts["zeta"],
            quantize=None if opts["quantize"] == "float32" else opts["quantize"],
            tau=opts["strom_tau"],
            ratio=opts["topk_ratio"],
            rank=opts["powersgd_rank"],
            start_iter=opts["start_iter"],
            gather=opts["gather"],
            slack=opts["gather_slack"],
            momentum=momentum,
            momentum_masking=opts["momentum_masking"] == "on",
            warmup_steps=round(opts["alpha_warmup_epochs"] * ctx.steps_per_epoch),
            feedback=opts["feedback"],
        )
        plugins: List[Plugin] = []
        if opts["compress"] == "vgc":
            state.lag = LagMonitor(loss_window=1)  # the watch sees epoch means (EpochMetrics.train_loss)
            plugins.append(_CompressionWatch(state, momentum))
        clock = StepClock(hook)
        if shard:  # FSDP2: the same hook reduces each sharded group as one bucket
            return TrainHooks(shard_hook=partial(install_sharded_compression, state=state, hook=clock.hook),
                              extra_state={"compression": state}, plugins=plugins,
                              extra_results=lambda: _compression_results(state, opts, clock))
        return TrainHooks(comm_hook=(state, clock.hook), extra_state={"compression": state}, plugins=plugins,
                          extra_results=lambda: _compression_results(state, opts, clock))

    @property
    def resume_identity(self) -> Dict[str, Any]:
        """A resumed run keeps the compression method and its settings (:func:`resume_settings`)."""
        return {"compression": resume_settings(self.options)}


def _check_sharded_statistics(model: nn.Module) -> None:
    """vgc under FSDP2 reads per-sample statistics of registered layer rules only: the torch.func fallback needs
    the unsharded parameters, which FSDP2 has resharded when the statistics hook runs."""
    from sturdy.errors import UnsupportedModuleError
    from sturdy.persample import generic_rule
    from sturdy.persample.registry import rule_for

    for path, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)) and rule_for(module) is generic_rule:
            raise UnsupportedModuleError(
                f"module {path or '(the model)'!r} ({type(module).__name__}) has no per-sample gradient rule, "
                "which --shard --compress vgc needs; drop --shard (DDP) or use --compress strom|topk|none",
                module=module, path=path)


def hook_momentum(opts: Dict[str, Any], job: TrainJob) -> float:
    """The momentum the vgc hook applies itself (momentum correction): the job's SGD momentum when
    ``--momentum-correction on`` and the run trains with momentum SGD, else 0 (the optimizer keeps it)."""
    config = job.config
    if opts["compress"] != "vgc" or opts["momentum_correction"] != "on" or config.optimizer != "sgd":
        return 0.0
    return float(config.momentum)


class _CompressionWatch(Plugin):
    """Hands the SGD momentum to the hook (momentum correction: the optimizer runs without it) and the epochs'
    training losses to the lag monitor's loss watch."""

    name = "compression_watch"

    def __init__(self, state: Any, momentum: float) -> None:
        self.state, self.momentum = state, momentum

    def on_epoch_start(self, ctx: RunContext, epoch: int) -> None:
        if self.momentum:
            for group in ctx.optimizer.param_groups:
                group["momentum"] = 0.0

    def on_epoch_end(self, ctx: RunContext, metrics: EpochMetrics) -> Optional[bool]:
        self.state.observe_loss(metrics.train_loss)
        return None


# The options each method reads (every method but ``none`` also reads ``start_iter``).
_METHOD_SETTINGS: Dict[str, Tuple[str, ...]] = {"vgc": ("alpha", "zeta", "quantize", "gather", "gather_slack",
                                                         "momentum_correction", "momentum_masking",
                                                         "alpha_warmup_epochs", "feedback"),
                                      "strom": ("strom_tau", "gather", "gather_slack"),
                                      "topk": ("topk_ratio", "gather", "gather_slack"),
                                      "powersgd": ("powersgd_rank",), "fp16": (), "bf16": (), "none": ()}


def resume_settings(opts: Dict[str, Any]) -> Dict[str, Any]:
    """The compression method and the settings it reads: a resumed run must keep every one of them."""
    method = opts["compress"]
    keys = _METHOD_SETTINGS[method] + (("start_iter",) if method != "none" else ())
    return {"method": method, **{k: opts[k] for k in keys}}


def _compression_results(state: Any, opts: Dict[str, Any], clock: StepClock) -> Dict[str, Any]:
    """The ``"compression"`` entry of ``results.json``: traffic per rank and step, averaged over the ranks."""
    local = state.statistics()
    grouped = dist.is_available() and dist.is_initialized()
    total = local.all_reduce() if grouped else local
    step_s = clock.mean_median_step_s() if grouped else clock.median_step_s()
    world, steps = total.ranks, max(local.steps, 1)
    return {
        "compression": {
            "method": opts["compress"],
            "settings": {k: opts[k] for k in DEFAULTS},
            "kernels": "numba" if accel.available() else "numpy",
            "world_size": world,
            "steps": local.steps,
            "compression_ratio": total.compression_ratio if total.wire_bytes else None,
            "payload_compression_ratio": total.payload_compression_ratio if total.payload_bytes else None,
            "dense_bytes_per_step": total.dense_bytes / world / steps,
            "bytes_sent_per_step": total.wire_bytes / world / steps,
            "elements_per_step": total.elements / world / steps,
            "elements_sent_per_step_mean": total.elements_sent / world / steps,
            "never_sent_fraction": total.never_sent_fraction,
            "elements_sent_per_step": [x / world for x in total.elements_sent_per_step],
            "bytes_sent_per_step_history": [x / world for x in total.wire_bytes_per_step],
            "step_time_s": step_s,
            **_vgc_results(state),
        }
    }


def _vgc_results(state: Any) -> Dict[str, Any]:
    """vgc only: the momentum the hook applied, the threshold ramp, and the lag monitor (this rank's)."""
    if not isinstance(state, VarianceCompressionState):
        return {}
    return {"hook_momentum": state.momentum, "warmup_steps": state.warmup_steps, "lag": state.lag_report().to_dict()}


def training_plugin(job: TrainJob) -> Optional[CompressionPlugin]:
    """The compression plugin when ``job`` compresses (``--compress`` other than ``none``), else ``None``.

    Raises:
        ConfigurationError: invalid options, or compression with a single worker.
    """
    opts = compression_options(job)
    if opts["compress"] == "none":
        return None
    if world_size(job) < 2:
        raise ConfigurationError(f"--compress {opts['compress']} needs at least 2 workers; add --nproc 2 (or more), "
                                 "or launch with torchrun")
    if job.options.get("shard") and opts["compress"] not in SHARDED_METHODS:
        raise ConfigurationError(f"--compress {opts['compress']} has no sharded form; with --shard use one of "
                                 f"{', '.join(SHARDED_METHODS)}, or drop --shard (DDP)")
    _check_momentum_correction(opts, job)
    explicit = job.options.get("explicit_options")
    adam = job.config.optimizer == "adam" and (explicit is None or "optimizer" in explicit)
    if adam and os.environ.get("RANK", "0") == "0":
        print("sturdy: warning: Adam with gradient compression: Adam normalises each update by its running "
              "variance, so the delayed, bursty updates of error feedback are not summed as momentum SGD sums "
              "them; expect lost accuracy (omit --optimizer for momentum SGD)", file=sys.stderr)
    if opts["compress"] == "vgc":
        warm_up()  # compile the kernels once here: workers then load them from numba's cache
    return CompressionPlugin(opts)


def _check_momentum_correction(opts: Dict[str, Any], job: TrainJob) -> None:
    """``--momentum-correction on`` moves the SGD momentum into the vgc hook: refused where there is none to move
    (another method, another optimizer, a momentum of 0) instead of being silently ignored."""
    if opts["momentum_correction"] != "on":
        return
    if opts["compress"] != "vgc":
        raise _option_error("momentum_correction", f"on is implemented for --compress vgc only, not {opts['compress']}")
    if job.config.optimizer != "sgd" or not job.config.momentum:
        raise _option_error("momentum_correction", "on needs momentum SGD (--optimizer sgd with --momentum > 0), "
                            f"got --optimizer {job.config.optimizer} --momentum {job.config.momentum:g}")


def run_distributed_training(job: TrainJob, *, plugins: Optional[Sequence[TrainPlugin]] = None, resume: bool = True,
                             progress: bool = True) -> Dict[str, Any]:
    """Data-parallel training of ``job`` (:func:`sturdy.experiments.parallel.run_distributed_training`) with this
    part's plugin by default, after the data-parallel defaults; rank 0's results."""
    job = apply_data_parallel_defaults(job)
    if plugins is None:
        plugins = [p for p in (training_plugin(job),) if p is not None]
    return parallel.run_distributed_training(job, plugins=plugins, resume=resume, progress=progress)


# ----------------------------------------------------------------------------- command line


def register_cli(subparsers: Any) -> None:
    """Add ``sturdy compression costmodel`` (:mod:`sturdy.experiments.compression_costmodel`)."""
    p = subparsers.add_parser("compression", help="gradient compression tools")
    add_costmodel_command(p.add_subparsers(dest="compression_command", required=True))


# ----------------------------------------------------------------------------- demo


def _demo_worker(rank: int, world: int, job_dicts: List[Dict[str, Any]]) -> Any:
    out = []
    for job_dict in job_dicts:
        job = TrainJob.from_dict(job_dict)
        plugin = CompressionPlugin(compression_options(job))
        out.append(fit(job, plugins=[plugin], resume=False, progress=False).results)
    return out if rank == 0 else None


def demo_section(ctx: Any) -> None:
    """A compressed data-parallel run on digits next to the uncompressed one (same seed, same data)."""
    from matplotlib.figure import Figure

    nproc, epochs = (2, 1) if ctx.quick else (4, 15)
    batch = 16
    base = dict(dataset="digits", model="mlp", epochs=epochs, batch_size=batch, lr=0.05, optimizer="sgd",
                momentum=0.9, schedule="cosine", seed=ctx.seed, device="cpu")
    methods = ("none", "vgc")
    jobs = [
        TrainJob.from_dict({**base, "out": str(Path(ctx.out) / "compression" / m),
                            "options": {**DEFAULTS, "nproc": nproc, "compress": m}}).to_dict()
        for m in methods
    ]
    warm_up()
    t0 = time.perf_counter()
    runs = run_local_workers(_demo_worker, nproc=nproc, args=(jobs,), timeout_s=600.0, collective_timeout_s=120.0)[0]
    seconds = time.perf_counter() - t0
    by_method = dict(zip(methods, runs))
    summary = {}
    for m, res in by_method.items():
        comp = res["compression"]
        summary[m] = {
            "test_accuracy": res["test_accuracy"],
            "compression_ratio": comp["compression_ratio"],
            "bytes_sent_per_step": comp["bytes_sent_per_step"],
            "never_sent_fraction": comp["never_sent_fraction"],
            "step_time_s": comp["step_time_s"],
            "test_accuracy_history": [h["test_accuracy"] for h in res["history"]],
            "elements_sent_per_step": comp["elements_sent_per_step"],
        }
    ctx.results["compression"] = {"workers": nproc, "epochs": epochs, "model": "mlp", "seconds": seconds,
                                  "runs": summary}

    fig = Figure(figsize=(9, 3.4))
    ax_acc, ax_sent = fig.subplots(1, 2)
    for m, s in summary.items():
        ax_acc.plot(range(1, epochs + 1), s["test_accuracy_history"], marker="o", label=m)
        ax_sent.plot(s["elements_sent_per_step"], label=m, lw=1)
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("test accuracy")
    ax_acc.legend()
    ax_sent.set_yscale("log")
    ax_sent.set_xlabel("step")
    ax_sent.set_ylabel("elements sent per worker")
    ax_sent.legend()
    fig.tight_layout()

    sec = ctx.report.section("Gradient compression")
    vgc, plain = summary["vgc"], summary["none"]
    sec.text(
        f"{nproc} gloo workers train an MLP on digits for {epochs} epochs (SGD, momentum 0.9, batch {batch} per "
        "worker), "
        f"once with plain allreduce and once with variance-based compression (alpha {DEFAULTS['alpha']}, 4-bit "
        f"values, error feedback). Compression sends {1 / vgc['compression_ratio']:.2%} of the dense bytes "
        f"({vgc['compression_ratio']:.0f}x); {vgc['never_sent_fraction']:.1%} of the gradient elements were never "
        f"sent. Few epochs favour plain allreduce: delayed updates need steps (see BENCHMARKS.md for 30 epochs)."
    )
    sec.table(
        header=["method", "test accuracy", "compression ratio", "bytes sent / step", "step time (ms)"],
        rows=[[m, round(s["test_accuracy"], 4), round(s["compression_ratio"], 1), round(s["bytes_sent_per_step"]),
               round(1e3 * s["step_time_s"], 2) if s["step_time_s"] else "-"] for m, s in summary.items()],
    )
    sec.figure(fig, name="compression_curves.png",
               caption="Test accuracy per epoch (left) and elements sent per worker and step (right, log scale).")
    del plain
