"""Distributed training with gradient compression: ``sturdy train --nproc N --compress ...``, the cost
model command, and the demo section.

Local runs start ``--nproc`` workers (gloo on CPU, FileStore rendezvous, loopback only); under
``torchrun`` (``RANK``/``WORLD_SIZE`` set) the same entry point joins the launched process group.
Each worker calls :func:`sturdy.experiments.train_job.run_train_job` with the compression state as a
DDP communication hook and as checkpointed state; ``results.json`` gains a ``"compression"`` entry.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics as pystats
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from sturdy.compression import METHODS, accel, create_compression
from sturdy.compression.costmodel import crossover_bandwidth_gbps, predict_step_times
from sturdy.compression.launch import init_from_env, launched_by_torchrun, run_local_workers
from sturdy.errors import ConfigurationError, DataError
from sturdy.experiments.jsonio import write_json
from sturdy.experiments.train_job import TrainJob, fit, load_trained_model

__all__ = [
    "add_train_arguments",
    "run_distributed_training",
    "register_cli",
    "demo_section",
    "compression_options",
    "measure_step_seconds",
]

DEFAULTS: Dict[str, Any] = {
    "nproc": 1,
    "compress": "none",
    "alpha": 4.0,
    "zeta": 0.999,
    "quantize": "4bit",
    "topk_ratio": 0.01,
    "strom_tau": 1e-3,
    "powersgd_rank": 1,
    "start_iter": 2,
    "gather": "capacity",
    "gather_slack": 1.25,
    "dist_timeout": 300.0,
}
TRAIN_DEADLINE_S = 7 * 24 * 3600.0  # a whole training run; hangs are bounded by dist_timeout per collective


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``sturdy train`` for data-parallel training and gradient compression."""
    g = parser.add_argument_group("data-parallel training and gradient compression")
    g.add_argument("--nproc", type=int, default=DEFAULTS["nproc"],
                   help="local worker processes (gloo on CPU); under torchrun the launcher decides")
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


def compression_options(job: TrainJob) -> Dict[str, Any]:
    """The compression options of ``job`` with defaults filled in, validated."""
    opts = {k: job.options.get(k, v) for k, v in DEFAULTS.items()}
    if opts["compress"] not in METHODS:
        raise ConfigurationError(f"unknown --compress {opts['compress']!r}; expected one of {METHODS}")
    if not isinstance(opts["nproc"], int) or opts["nproc"] < 1:
        raise ConfigurationError(f"--nproc must be a positive integer, got {opts['nproc']!r}")
    if not opts["dist_timeout"] > 0:
        raise ConfigurationError(f"--dist-timeout must be > 0 seconds, got {opts['dist_timeout']}")
    return opts


def _build_state(opts: Dict[str, Any]) -> Tuple[Any, Callable]:
    return create_compression(
        opts["compress"],
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


class _StepClock:
    """Wraps a hook to time steps (from one last bucket to the next)."""

    def __init__(self, hook: Callable) -> None:
        self.inner = hook
        self.marks: List[float] = []

    def hook(self, state, bucket):  # noqa: ANN001 - DDP inspects the signature; keep it unannotated
        fut = self.inner(state, bucket)
        if bucket.is_last():
            self.marks.append(time.perf_counter())
        return fut

    def median_step_s(self) -> Optional[float]:
        gaps = [b - a for a, b in zip(self.marks, self.marks[1:])]
        return pystats.median(gaps) if gaps else None


def _reduce(values: Sequence[float]) -> List[float]:
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.cpu().tolist()


def _compression_results(state: Any, opts: Dict[str, Any], clock: _StepClock) -> Dict[str, Any]:
    world = dist.get_world_size()
    s = state.statistics()
    totals = _reduce([s.dense_bytes, s.wire_bytes, s.payload_bytes, s.elements, s.elements_sent,
                      s.never_sent_fraction])
    sent_steps = _reduce(s.elements_sent_per_step)
    wire_steps = _reduce(s.wire_bytes_per_step)
    step_s = clock.median_step_s()
    step_times = _reduce([step_s if step_s is not None else 0.0])
    steps = max(s.steps, 1)
    settings = {k: opts[k] for k in DEFAULTS if k not in ("nproc", "dist_timeout")}
    return {
        "compression": {
            "method": opts["compress"],
            "settings": settings,
            "kernels": "numba" if accel.available() else "numpy",
            "world_size": world,
            "steps": s.steps,
            "compression_ratio": totals[0] / totals[1] if totals[1] else None,
            "payload_compression_ratio": totals[0] / totals[2] if totals[2] else None,
            "dense_bytes_per_step": totals[0] / world / steps,
            "bytes_sent_per_step": totals[1] / world / steps,
            "elements_per_step": totals[3] / world / steps,
            "elements_sent_per_step_mean": totals[4] / world / steps,
            "never_sent_fraction": totals[5] / world,
            "elements_sent_per_step": [x / world for x in sent_steps],
            "bytes_sent_per_step_history": [x / world for x in wire_steps],
            "step_time_s": step_times[0] / world if step_s is not None else None,
        }
    }


def _train_in_group(job: TrainJob, *, resume: bool, progress: bool) -> Dict[str, Any]:
    opts = compression_options(job)
    state, hook = _build_state(opts)
    clock = _StepClock(hook)
    return fit(
        job,
        comm_hook=(state, clock.hook),
        extra_state={"compression": state},
        extra_results=lambda: _compression_results(state, opts, clock),
        model_setup=state.bind_model,
        resume=resume,
        progress=progress,
    ).results


def _local_job(job: TrainJob, rank: int) -> TrainJob:
    if job.device.startswith("cuda") and torch.cuda.device_count() > 1:
        return job.replace(device=f"cuda:{rank % torch.cuda.device_count()}")
    return job


def _train_worker(rank: int, world: int, job_dict: Dict[str, Any], resume: bool, progress: bool) -> Any:
    job = _local_job(TrainJob.from_dict(job_dict), rank)
    results = _train_in_group(job, resume=resume, progress=progress and rank == 0)
    return results if rank == 0 else None


def _backend_device(job: TrainJob, nproc: int) -> str:
    from sturdy.training import resolve_device

    device = resolve_device(job.device)
    if device.type == "cuda":
        if torch.cuda.device_count() < nproc:
            raise ConfigurationError(
                f"{nproc} local workers need {nproc} GPUs for NCCL, found {torch.cuda.device_count()}; "
                "use --device cpu (gloo) or fewer --nproc"
            )
        return "cuda"
    return "cpu"


def run_distributed_training(job: TrainJob, *, resume: bool = True, progress: bool = True) -> Dict[str, Any]:
    """Train ``job`` data-parallel with the compression hook of ``job.options["compress"]``.

    Under ``torchrun`` this process joins the launched group; otherwise ``job.options["nproc"]``
    local workers are started. Returns rank 0's results (those written to ``results.json``).

    Raises:
        ConfigurationError: compression requested with a single worker, or bad options.
        DistributedError: a worker failed or died (the others fail within ``--dist-timeout``).
    """
    opts = compression_options(job)
    if launched_by_torchrun():
        from sturdy.training import resolve_device

        if resolve_device(job.device).type == "cuda":  # one GPU per process: NCCL on cuda:LOCAL_RANK
            job = job.replace(device=f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        init_from_env(device=job.device, timeout_s=opts["dist_timeout"])
        try:
            rank = dist.get_rank()
            return _train_in_group(job, resume=resume, progress=progress and rank == 0)
        finally:
            dist.destroy_process_group()
    nproc = opts["nproc"]
    if nproc < 2:
        raise ConfigurationError(
            f"--compress {opts['compress']} needs at least 2 workers; add --nproc 2 (or more), or launch with torchrun"
        )
    device = _backend_device(job, nproc)
    if opts["compress"] == "vgc":
        accel.warm_up()  # compile the kernels once here: the workers then load them from numba's cache
    results = run_local_workers(
        _train_worker,
        nproc=nproc,
        args=(job.to_dict(), resume, progress),
        device=device,
        timeout_s=TRAIN_DEADLINE_S,
        collective_timeout_s=opts["dist_timeout"],
    )
    return results[0]


# ----------------------------------------------------------------------------- cost model


def measure_step_seconds(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                         batch_size: int, repeats: int = 20) -> float:
    """Median wall time of forward + backward + SGD step on one batch (after 3 warm-up steps)."""
    import torch.nn.functional as F

    device = next(model.parameters()).device
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x, y = images[:batch_size].to(device), labels[:batch_size].to(device)
    times = []
    for i in range(repeats + 3):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    model.eval()
    return pystats.median(times)


def measure_codec_seconds(num_elements: int, sent_fraction: float, *, repeats: int = 30) -> float:
    """Median time of one variance selection + 4-bit encoding + one decode for a gradient of
    ``num_elements`` with ``sent_fraction`` of the elements passing the test (synthetic values)."""
    from sturdy.compression import codec
    from sturdy.compression.compressor import variance_select

    gen = torch.Generator().manual_seed(0)
    chosen = torch.rand(num_elements, generator=gen) < max(sent_fraction, 1.0 / num_elements)
    r0 = torch.randn(num_elements, generator=gen)
    v0 = torch.where(chosen, torch.zeros(()), torch.full((), 1e30))
    times = []
    for i in range(repeats + 3):
        r, v, out = r0.clone(), v0.clone(), torch.zeros(num_elements)
        t0 = time.perf_counter()
        selection = variance_select(r, v, alpha=1.0, zeta=0.999, quantize="4bit")
        codec.decode_add_(out, selection.payload)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return pystats.median(times)


def _csv(kind: Callable[[str], Any], name: str) -> Callable[[str], List[Any]]:
    def parse(text: str) -> List[Any]:
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{name}: expected comma-separated numbers, got {text!r}") from exc

    return parse


def _cmd_costmodel(args: argparse.Namespace) -> int:
    from sturdy.experiments.train_job import load_job_data

    checkpoint = Path(args.checkpoint)
    model, job = load_trained_model(checkpoint)
    ratio = args.ratio
    source = "--ratio"
    results_path = checkpoint.parent / "results.json"
    info: Dict[str, Any] = {}
    if results_path.is_file():
        info = json.loads(results_path.read_text(encoding="utf-8")).get("compression") or {}
    if ratio is None:
        if info:
            ratio = info.get("compression_ratio")
            source = f"{results_path} (method {info.get('method')})"
        if ratio is None:
            raise DataError(
                f"no measured compression ratio: {results_path} has no 'compression' entry (train with "
                "`sturdy train --nproc 2 --compress vgc`) ; or pass --ratio R"
            )
    torch.set_num_threads(max(1, args.threads))
    train_set, _ = load_job_data(job)
    compute_s = measure_step_seconds(model, train_set.images, train_set.labels, batch_size=job.batch_size)
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
          f"{job.batch_size}), gradient {dense_bytes} bytes, compression ratio {float(ratio):.1f} from {source}")
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


def plot_speedup(preds: Sequence[Any]) -> Any:
    """Predicted speedup against bandwidth, one line per worker count (a matplotlib figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for p in sorted({q.workers for q in preds}):
        pts = sorted((q.bandwidth_gbps, q.speedup) for q in preds if q.workers == p)
        ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", label=f"{p} workers")
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("link bandwidth (Gbit/s)")
    ax.set_ylabel("predicted speedup vs. allreduce")
    ax.legend()
    fig.tight_layout()
    plt.close(fig)
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
    c.add_argument("--latency-us", type=float, default=50.0, help="per-message latency in microseconds")
    c.add_argument("--ratio", type=float, default=None,
                   help="compression ratio (default: the one measured in results.json next to the checkpoint)")
    c.add_argument("--codec-ms", type=float, default=None,
                   help="encode + decode time per step (default: measured on the checkpoint's gradient size with "
                        "the fraction of elements its run sent)")
    c.add_argument("--threads", type=int, default=1, help="torch threads for the compute measurement")
    c.add_argument("--out", default=None, help="output folder (default: next to the checkpoint)")
    c.set_defaults(func=_cmd_costmodel)


# ----------------------------------------------------------------------------- demo


def _demo_worker(rank: int, world: int, job_dicts: List[Dict[str, Any]]) -> Any:
    out = []
    for job_dict in job_dicts:
        results = _train_in_group(TrainJob.from_dict(job_dict), resume=False, progress=False)
        out.append(results)
    return out if rank == 0 else None


def demo_section(ctx: Any) -> None:
    """A compressed data-parallel run on digits next to the uncompressed one (same seed, same data)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nproc, epochs = (2, 1) if ctx.quick else (4, 15)
    batch = 16
    base = dict(dataset="digits", model="mlp", epochs=epochs, batch_size=batch, lr=0.05, optimizer="sgd",
                momentum=0.9, schedule="cosine", seed=ctx.seed, device="cpu")
    methods = ("none", "vgc")
    jobs = [
        TrainJob(**base, out=str(Path(ctx.out) / "compression" / m),
                 options={**DEFAULTS, "nproc": nproc, "compress": m}).to_dict()
        for m in methods
    ]
    accel.warm_up()
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

    fig, (ax_acc, ax_sent) = plt.subplots(1, 2, figsize=(9, 3.4))
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
    plt.close(fig)

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
