"""Data-parallel training with gradient compression: ``sturdy train --nproc N --compress ...``, the cost
model command (``sturdy compression costmodel``), and the demo section.

This module only orchestrates. :func:`training_plugin` gives the training loop the compression state as
a DDP communication hook and as checkpointed state (``results.json`` gains a ``"compression"`` entry);
:func:`train_launcher` claims jobs that run in several processes: local runs start ``--nproc`` workers
(:func:`sturdy.distributed.run_local_workers`: gloo on CPU, FileStore rendezvous, loopback only), and
under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) the same entry point joins the launched process group.
Each worker calls :func:`sturdy.experiments.train_job.fit` with the plugins it received.

Data-parallel defaults (:data:`DATA_PARALLEL_DEFAULTS`): a job this part launches (``--nproc N > 1``,
``--compress``, or ``torchrun``) trains with momentum SGD 0.9, lr 0.05, 40 epochs and the single-process
default batch of 64 split over the workers, for every one of ``--optimizer``, ``--lr``, ``--momentum``,
``--epochs`` and ``--batch-size`` that the command line did not set (:func:`apply_data_parallel_defaults`;
the options typed are recorded in ``job.options["explicit_options"]``; jobs built in code are left as
they are).
Error feedback sums delayed gradients, which momentum SGD applies as they arrive; Adam's per-element
normalisation does not, so asking for Adam with compression prints a warning. Every option is
validated (:func:`compression_options`) before any worker starts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from sturdy.compression import METHODS, accel, create_compression, warm_up
from sturdy.compression.costmodel import crossover_bandwidth_gbps, predict_step_times
from sturdy.compression.timing import StepClock, measure_codec_seconds, measure_step_seconds
from sturdy.distributed import init_from_env, launched_by_torchrun, max_local_workers, run_local_workers
from sturdy.errors import ConfigurationError, DataError
from sturdy.experiments.argtypes import bounded_int, positive_float
from sturdy.experiments.jsonio import write_json
from sturdy.experiments.train_job import (
    TrainContext,
    TrainHooks,
    TrainJob,
    TrainPlugin,
    fit,
    load_job_data,
    load_trained_model,
)
from sturdy.training import resolve_device

__all__ = [
    "add_train_arguments",
    "CompressionPlugin",
    "training_plugin",
    "train_launcher",
    "run_distributed_training",
    "register_cli",
    "demo_section",
    "compression_options",
    "apply_data_parallel_defaults",
    "DATA_PARALLEL_DEFAULTS",
    "plot_speedup",
]

DEFAULTS: Dict[str, Any] = {
    "nproc": 1,
    "compress": "none",
    "alpha": 5.0,
    "zeta": 0.999,
    "quantize": "4bit",
    "topk_ratio": 0.01,
    "strom_tau": 1e-3,
    "powersgd_rank": 1,
    "start_iter": 2,
    "gather": "exact",
    "gather_slack": 1.25,
    "dist_timeout": 300.0,
}
TRAIN_DEADLINE_S = 7 * 24 * 3600.0  # a whole training run; hangs are bounded by dist_timeout per collective
# Training settings of a data-parallel job where the command line did not set them (module docstring).
DATA_PARALLEL_DEFAULTS: Dict[str, Any] = {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "epochs": 40,
                                          "global_batch": 64}
_TUNED = ("optimizer", "lr", "momentum", "epochs", "batch_size")
MAX_THREADS = 1024


def _recording(action: argparse.Action) -> None:
    """Make ``action`` add its dest to ``namespace.explicit_options`` when the option is given."""
    base = type(action)

    class Recorded(base):  # type: ignore[valid-type, misc]
        def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None) -> None:
            super().__call__(parser, namespace, values, option_string)
            namespace.explicit_options = sorted(set(getattr(namespace, "explicit_options", None) or ()) | {self.dest})

    action.__class__ = Recorded


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``sturdy train`` for data-parallel training and gradient compression."""
    g = parser.add_argument_group("data-parallel training and gradient compression")
    g.add_argument("--nproc", type=int, default=DEFAULTS["nproc"],
                   help=f"local worker processes (gloo on CPU), 1 to 4 per CPU core ({max_local_workers()} here); "
                        "under torchrun the launcher decides. With N > 1 (or --compress), options not given "
                        "default to momentum SGD 0.9, lr 0.05, 40 epochs and a batch of 64 split over the workers")
    g.add_argument("--compress", choices=METHODS, default=DEFAULTS["compress"],
                   help="DDP communication hook: vgc (variance-based), strom, topk, fp16, powersgd, none")
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
    g.add_argument("--dist-timeout", type=float, default=DEFAULTS["dist_timeout"],
                   help="seconds a collective may wait before the run fails (a dead worker)")
    for action in parser._actions:  # data-parallel defaults apply to the training options not typed
        if action.dest in _TUNED:
            _recording(action)
    parser.set_defaults(explicit_options=[])


def _option_error(key: str, message: str) -> ConfigurationError:
    return ConfigurationError(f"--{key.replace('_', '-')} {message}")


def _check_number(opts: Dict[str, Any], key: str, *, low: float, high: float = math.inf, low_open: bool = False,
                  hint: str = "") -> None:
    value = opts[key]
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise _option_error(key, f"must be a finite number, got {value!r}{hint}")
    if value < low or (low_open and value == low) or value > high:
        span = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise _option_error(key, f"must lie in {span}, got {value}{hint}")


def compression_options(job: TrainJob) -> Dict[str, Any]:
    """The compression options of ``job`` with defaults filled in, every one validated (before any worker starts).

    Raises:
        ConfigurationError: one line naming the option, its value and the accepted range.
    """
    opts = {k: job.options.get(k, v) for k, v in DEFAULTS.items()}
    if opts["compress"] not in METHODS:
        raise ConfigurationError(f"unknown --compress {opts['compress']!r}; expected one of {METHODS}")
    limit = max_local_workers()
    nproc = opts["nproc"]
    if not isinstance(nproc, int) or isinstance(nproc, bool) or not 1 <= nproc <= limit:
        raise ConfigurationError(f"--nproc must be a positive integer of at most {limit} (4 local workers per CPU "
                                 f"core), got {nproc!r}; to use more machines, launch with torchrun")
    _check_number(opts, "dist_timeout", low=0.0, low_open=True, hint=" seconds")
    _check_number(opts, "alpha", low=0.0, hint="; larger sends less, typical values 1 to 8")
    _check_number(opts, "zeta", low=0.0, high=1.0, hint="; typical value 0.999")
    _check_number(opts, "topk_ratio", low=0.0, high=1.0, low_open=True, hint="; e.g. 0.01 sends 1% per step")
    _check_number(opts, "strom_tau", low=0.0, low_open=True, hint="; a gradient magnitude such as 1e-3")
    _check_number(opts, "gather_slack", low=1.0, hint="; e.g. 1.25")
    for key, low in (("powersgd_rank", 1), ("start_iter", 2 if opts["compress"] == "powersgd" else 0)):
        value = opts[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            why = " (PowerSGD starts after DDP has rebuilt its buckets)" if key == "start_iter" and low == 2 else ""
            raise _option_error(key, f"must be an integer >= {low}{why}, got {value!r}")
    for key, choices in (("quantize", ("4bit", "float32")), ("gather", ("exact", "capacity", "bounded"))):
        if opts[key] not in choices:
            raise _option_error(key, f"must be one of {choices}, got {opts[key]!r}")
    if opts["gather"] == "bounded" and opts["compress"] != "vgc":
        raise _option_error("gather", "bounded truncates selections and is implemented for --compress vgc only")
    return opts


def _world_size(opts: Dict[str, Any]) -> int:
    return int(os.environ.get("WORLD_SIZE", "1")) if launched_by_torchrun() else opts["nproc"]


def apply_data_parallel_defaults(job: TrainJob, *, warn: bool = True) -> TrainJob:
    """``job`` with :data:`DATA_PARALLEL_DEFAULTS` for the training options its command line did not set.

    Applies only to jobs from the command line (``job.options["explicit_options"]`` lists what was
    typed); a job built in code is returned unchanged. The batch per worker becomes
    ``max(1, global_batch // world size)``. Warns on stderr when Adam is asked for with compression.
    """
    explicit = job.options.get("explicit_options")
    opts = compression_options(job)
    adam = job.config.optimizer == "adam" and (explicit is None or "optimizer" in explicit)
    if warn and adam and opts["compress"] != "none":
        print("sturdy: warning: Adam with gradient compression: Adam normalises each update by its running "
              "variance, so the delayed, bursty updates of error feedback are not summed as momentum SGD sums "
              "them; expect lost accuracy (omit --optimizer for momentum SGD)", file=sys.stderr)
    if explicit is None:
        return job
    changes: Dict[str, Any] = {k: DATA_PARALLEL_DEFAULTS[k] for k in ("optimizer", "lr", "momentum", "epochs")
                               if k not in explicit}
    if "batch_size" not in explicit:
        changes["batch_size"] = max(1, DATA_PARALLEL_DEFAULTS["global_batch"] // _world_size(opts))
    return job.replace(**changes) if changes else job


def _claims(opts: Dict[str, Any]) -> bool:
    """Whether the run compresses or runs in several processes (``--nproc`` or ``torchrun``)."""
    return opts["compress"] != "none" or _world_size(opts) > 1


@dataclass(frozen=True)
class CompressionPlugin:
    """The compression part's contribution to a run: its DDP hook, its checkpointed state, its results.

    Attributes:
        options: the validated compression options (:func:`compression_options`).
    """

    options: Dict[str, Any] = field(default_factory=dict)

    def setup(self, model: nn.Module, ctx: TrainContext) -> TrainHooks:
        """Attach the statistics to ``model`` (the module DDP wraps) and build the state and its hook."""
        opts = self.options
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
        )
        clock = StepClock(hook)
        return TrainHooks(comm_hook=(state, clock.hook), extra_state={"compression": state},
                          extra_results=lambda: _compression_results(state, opts, clock))


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
            "settings": {k: opts[k] for k in DEFAULTS if k not in ("nproc", "dist_timeout")},
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
        }
    }


def training_plugin(job: TrainJob) -> Optional[CompressionPlugin]:
    """The compression plugin when ``job`` compresses or runs in several processes (traffic is then
    counted with plain allreduce too), else ``None``."""
    opts = compression_options(job)
    return CompressionPlugin(opts) if _claims(opts) else None


def train_launcher(job: TrainJob) -> Optional[Callable[..., Dict[str, Any]]]:
    """:func:`run_distributed_training` when ``job`` needs several processes or compresses, else ``None``."""
    return run_distributed_training if _claims(compression_options(job)) else None


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
    plugins: Optional[Sequence[TrainPlugin]] = None,
    resume: bool = True,
    progress: bool = True,
) -> Dict[str, Any]:
    """Train ``job`` data-parallel with ``plugins`` (default: this part's :func:`training_plugin`).

    Under ``torchrun`` this process joins the launched group; otherwise ``job.options["nproc"]``
    local workers are started, each receiving the plugins pickled. The data-parallel defaults apply first
    (:func:`apply_data_parallel_defaults`). Returns rank 0's results (those written to ``results.json``).

    Raises:
        ConfigurationError: compression requested with a single worker, or bad options.
        DistributedError: a worker failed or died (the others fail within ``--dist-timeout``).
    """
    opts = compression_options(job)
    job = apply_data_parallel_defaults(job, warn=os.environ.get("RANK", "0") == "0")
    if plugins is None:
        plugins = [p for p in (training_plugin(job),) if p is not None]
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
        raise ConfigurationError(
            f"--compress {opts['compress']} needs at least 2 workers; add --nproc 2 (or more), or launch with torchrun"
        )
    device = _backend_device(job, nproc)
    if opts["compress"] == "vgc":
        warm_up()  # compile the kernels once here: the workers then load them from numba's cache
    results = run_local_workers(
        _train_worker,
        nproc=nproc,
        args=(job.to_dict(), tuple(plugins), resume, progress),
        device=device,
        timeout_s=TRAIN_DEADLINE_S,
        collective_timeout_s=opts["dist_timeout"],
    )
    return results[0]


# ----------------------------------------------------------------------------- cost model


def _non_negative_float(text: str) -> float:
    """A finite number >= 0 (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text[:40]!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text[:40]!r}")
    return value


def _csv(kind: Callable[[str], Any], name: str) -> Callable[[str], List[Any]]:
    def parse(text: str) -> List[Any]:
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{name}: expected comma-separated numbers, got {text!r}") from exc

    return parse


def _cmd_costmodel(args: argparse.Namespace) -> int:
    checkpoint = Path(args.checkpoint)
    model, job = load_trained_model(checkpoint, device=resolve_device(args.device))
    ratio = args.ratio
    source = "--ratio"
    results_path = checkpoint.parent / "results.json"
    info = _measured_compression(results_path)
    if ratio is None:
        if info:
            ratio = info.get("compression_ratio")
            source = f"{results_path} (method {info.get('method')})"
        if ratio is None:
            raise DataError(
                f"no measured compression ratio: {results_path} has no 'compression' entry (train with "
                "`sturdy train --nproc 2 --compress vgc`) ; or pass --ratio R"
            )
    torch.set_num_threads(args.threads)
    train_set, _ = load_job_data(job)
    compute_s = measure_step_seconds(model, train_set.images, train_set.labels, batch_size=job.config.batch_size)
    num_elements = sum(p.numel() for p in model.parameters() if p.requires_grad)
    dense_bytes = 4 * num_elements
    if args.codec_ms is not None:
        codec_s = args.codec_ms * 1e-3
    else:
        sent = info.get("elements_sent_per_step_mean")
        fraction = sent / num_elements if sent else 4.0 / float(ratio)
        codec_s = measure_codec_seconds(num_elements, fraction)
    preds = predict_step_times(
        compute_s=compute_s, dense_bytes=dense_bytes, compression_ratio=float(ratio), workers=args.workers,
        bandwidths_gbps=args.bandwidth_gbps, latency_s=args.latency_us * 1e-6, codec_s=codec_s,
    )
    out = Path(args.out) if args.out else checkpoint.parent / "costmodel"
    out.mkdir(parents=True, exist_ok=True)
    header = ["workers", "Gbit/s", "allreduce ms", "compressed ms", "step ms (dense)", "step ms (compressed)",
              "speedup"]
    rows = [[p.workers, p.bandwidth_gbps, round(1e3 * p.allreduce_s, 3), round(1e3 * p.compressed_comm_s, 3),
             round(1e3 * p.dense_step_s, 3), round(1e3 * p.compressed_step_s, 3), round(p.speedup, 2)] for p in preds]
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    print(f"compute {1e3 * compute_s:.3f} ms/step and codec {1e3 * codec_s:.3f} ms/step (measured, batch "
          f"{job.config.batch_size}), gradient {dense_bytes} bytes, compression ratio {float(ratio):.1f} from {source}")
    print("  ".join(str(h).rjust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(str(c).rjust(w) for c, w in zip(r, widths)))
    crossovers = {
        p: crossover_bandwidth_gbps(compute_s=compute_s, dense_bytes=dense_bytes, compression_ratio=float(ratio),
                                    workers=p, latency_s=args.latency_us * 1e-6, codec_s=codec_s)
        for p in args.workers
    }
    fig = plot_speedup(preds)
    fig.savefig(out / "costmodel.png", dpi=120)
    write_json({"checkpoint": str(checkpoint), "compute_s": compute_s, "codec_s": codec_s, "dense_bytes": dense_bytes,
                "compression_ratio": float(ratio), "ratio_source": source, "latency_s": args.latency_us * 1e-6,
                "crossover_bandwidth_gbps": {str(k): v for k, v in crossovers.items()},
                "predictions": [p.to_dict() for p in preds]}, out / "costmodel.json")
    print(f"wrote {out / 'costmodel.png'} and {out / 'costmodel.json'}")
    return 0


def _measured_compression(path: Path) -> Dict[str, Any]:
    """The ``"compression"`` entry of the ``results.json`` at ``path`` (``{}`` when there is none), checked.

    Raises:
        DataError: the file is not JSON, not an object, or its measured figures are not positive numbers.
    """
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path} is not valid JSON ({' '.join(str(exc).split())[:80]}); rerun the training or "
                        "pass --ratio R") from exc
    if not isinstance(data, dict):
        raise DataError(f"{path} holds a {type(data).__name__}, not the object `sturdy train` writes; pass --ratio R")
    info = data.get("compression") or {}
    if not isinstance(info, dict):
        raise DataError(f"{path}: its 'compression' entry is a {type(info).__name__}, not an object; pass --ratio R")
    for key in ("compression_ratio", "elements_sent_per_step_mean"):
        value = info.get(key)
        if value is None:
            continue
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or value <= 0:
            raise DataError(f"{path}: {key} must be a positive number, got {value!r}; rerun the training or pass "
                            "--ratio R")
    return info


def plot_speedup(preds: Sequence[Any]) -> Any:
    """Predicted speedup against bandwidth, one line per worker count (a ``matplotlib.figure.Figure``)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.6))
    ax = fig.add_subplot()
    for p in sorted({q.workers for q in preds}):
        pts = sorted((q.bandwidth_gbps, q.speedup) for q in preds if q.workers == p)
        ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", label=f"{p} workers")
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("link bandwidth (Gbit/s)")
    ax.set_ylabel("predicted speedup vs. allreduce")
    ax.legend()
    fig.tight_layout()
    return fig


def register_cli(subparsers: Any) -> None:
    """Add ``sturdy compression costmodel``."""
    p = subparsers.add_parser("compression", help="gradient compression tools")
    sub = p.add_subparsers(dest="compression_command", required=True)
    c = sub.add_parser("costmodel", help="predicted step time and speedup of compressed vs. dense data parallelism")
    c.add_argument("--checkpoint", required=True, help="DIR/model.pt written by `sturdy train`")
    c.add_argument("--workers", type=_csv(int, "--workers"), default=[4, 16, 64], help="e.g. 4,16,64")
    c.add_argument("--bandwidth-gbps", type=_csv(float, "--bandwidth-gbps"), default=[0.1, 1.0, 10.0, 100.0],
                   help="e.g. 0.1,1,10,100")
    c.add_argument("--latency-us", type=_non_negative_float, default=50.0, help="per-message latency in microseconds")
    c.add_argument("--ratio", type=positive_float, default=None,
                   help="compression ratio (default: the one measured in results.json next to the checkpoint)")
    c.add_argument("--codec-ms", type=_non_negative_float, default=None,
                   help="encode + decode time per step (default: measured on the checkpoint's gradient size with "
                        "the fraction of elements its run sent)")
    c.add_argument("--threads", type=bounded_int(1, MAX_THREADS), default=1,
                   help=f"torch threads for the compute measurement (1 to {MAX_THREADS})")
    c.add_argument("--device", default="auto", help="device of the compute measurement: auto, cpu, cuda, cuda:N")
    c.add_argument("--out", default=None, help="output folder (default: next to the checkpoint)")
    c.set_defaults(func=_cmd_costmodel)


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
