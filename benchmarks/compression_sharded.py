"""Variance-based compression inside FSDP2 (``sturdy train --nproc N --shard --compress vgc``) against FSDP2's own
reduce-scatter, on digits.

Three measurements (each prints its table and writes a JSON next to ``--out``):

``--accuracy``: for each worker count and model, one launch trains every (method, seed) with the job the command
line builds (``sturdy train --nproc N --shard --compress none|vgc --model M --seed S``: the data-parallel
defaults, 40 epochs); test accuracy, compression ratio on the wire and in payload, seconds per epoch. Target:
>= 100x within 1 point of ``--compress none`` (mean over seeds). ``--concurrent K`` runs K launches at once
(on a machine with cores to spare).

    python benchmarks/compression_sharded.py --accuracy --workers 2,4 --models mlp,cnn --seeds 3

``--overhead``: per worker count and model, one launch runs ``--repeats`` rounds of FSDP2 float32 reduce-scatter,
FSDP2 bf16 reduce-scatter and vgc (``--epochs`` epochs each, interleaved so that the machine's load hits all
alike): median step time (optimizer step to optimizer step, after the first epoch); then a fresh launch per
method gives each rank's peak resident memory (``VmHWM``) and the bytes of its training state:
parameter, gradient and optimizer shards and, for vgc, the compression state (residual, accumulated variance,
ever-sent flags: whole-model size on every rank). Targets: step time and peak memory with the compressor at
most 1.5x FSDP2 without it.

    python benchmarks/compression_sharded.py --overhead --workers 2,4 --models mlp,cnn --epochs 3

``--time-to-accuracy`` (Linux, ``unshare`` and ``tc``: the throttled-link emulation of
``compression_throttled_link.py``, rerun inside a private network namespace): whole runs of FSDP2 float32, FSDP2
bf16 and vgc at each rate, each stopping at the target (FSDP2 float32's final unthrottled accuracy minus one
point); seconds of training until the target.

    python benchmarks/compression_sharded.py --time-to-accuracy --workers 2 --model mlp --rates-mbit 100,1000
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sturdy.distributed import run_local_workers  # noqa: E402
from sturdy.experiments.jsonio import write_json  # noqa: E402
from sturdy.training import Plugin  # noqa: E402

TARGET_DROP = 0.01
METHODS = {"none": [], "vgc": ["--compress", "vgc"]}


def cli_job(world: int, model: str, seed: int, flags: List[str], out: str, epochs: Optional[int]) -> Any:
    """The job ``sturdy train --nproc WORLD --shard --model MODEL --seed SEED <flags>`` runs."""
    from sturdy.cli import _job_from_args, build_parser  # the command line's own job builder
    from sturdy.experiments.parallel import apply_data_parallel_defaults

    argv = ["train", "--nproc", str(world), "--shard", "--model", model, "--seed", str(seed), "--device", "cpu",
            "--out", out, *flags, *(["--epochs", str(epochs)] if epochs is not None else [])]
    return apply_data_parallel_defaults(_job_from_args(build_parser().parse_args(argv)))


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------- accuracy and ratio


def _accuracy_worker(rank: int, world: int, jobs: List[Tuple[str, int, Dict[str, Any]]]) -> Any:
    from sturdy.experiments.compression import training_plugin
    from sturdy.experiments.train_job import TrainJob, fit

    torch.set_num_threads(1)
    out = []
    for method, seed, job_dict in jobs:
        job = TrainJob.from_dict(job_dict)
        plugins = [p for p in (training_plugin(job),) if p is not None]
        res = fit(job, plugins=plugins, resume=False, progress=False).results
        comp = res.get("compression", {})
        out.append({"method": method, "seed": seed, "test_accuracy": res["test_accuracy"],
                    "history": [h["test_accuracy"] for h in res["history"]],
                    "seconds_per_epoch": res["seconds_per_epoch"],
                    "compression_ratio": comp.get("compression_ratio"),
                    "payload_compression_ratio": comp.get("payload_compression_ratio")})
    return out if rank == 0 else None


def accuracy(args: argparse.Namespace, tmp: str, out: Path) -> Dict[str, Any]:
    combos = [(w, m) for w in args.workers for m in args.models]

    def launch(combo: Tuple[int, str]) -> List[Dict[str, Any]]:
        world, model = combo
        runs: List[Dict[str, Any]] = []
        for seed in range(args.seeds):  # one launch per seed: a partial run still leaves its seeds
            jobs = [(name, seed, cli_job(world, model, seed, opts, f"{tmp}/{model}-{world}-{name}-{seed}",
                                         args.epochs).to_dict()) for name, opts in METHODS.items()]
            t0 = time.perf_counter()
            runs += run_local_workers(_accuracy_worker, nproc=world, args=(jobs,), timeout_s=6 * 3600.0,
                                      collective_timeout_s=600.0)[0]
            print(f"{model} x {world}, seed {seed}: {time.perf_counter() - t0:.0f} s "
                  f"{[(r['method'], r['test_accuracy'], r['compression_ratio']) for r in runs[-2:]]}", flush=True)
            write_json({"runs": runs}, out.with_name(f"{out.stem}_accuracy_{model}_{world}.json"))
        return runs

    with ThreadPoolExecutor(max_workers=args.concurrent) as pool:
        all_runs = list(pool.map(launch, combos))
    rows = []
    for (world, model), runs in zip(combos, all_runs):
        by = {name: [r for r in runs if r["method"] == name] for name in METHODS}
        ref = statistics.mean(r["test_accuracy"] for r in by["none"])
        for name, rs in by.items():
            acc = [r["test_accuracy"] for r in rs]
            ratios = [r["compression_ratio"] for r in rs if r["compression_ratio"]]
            payload = [r["payload_compression_ratio"] for r in rs if r["payload_compression_ratio"]]
            rows.append({"model": model, "workers": world, "method": name, "seeds": len(rs),
                         "test_accuracy_mean": statistics.mean(acc),
                         "test_accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                         "delta_points": 100 * (statistics.mean(acc) - ref),
                         "compression_ratio": statistics.mean(ratios) if ratios else None,
                         "payload_ratio": statistics.mean(payload) if payload else None,
                         "seconds_per_epoch": statistics.mean(r["seconds_per_epoch"] for r in rs), "runs": rs})
    print("model | workers | method | acc mean (std) | delta points | ratio wire / payload | s/epoch")
    for r in rows:
        ratio = f"{r['compression_ratio']:.1f}x / {r['payload_ratio']:.1f}x" if r["compression_ratio"] else "-"
        print(f"{r['model']} | {r['workers']} | {r['method']} | {100 * r['test_accuracy_mean']:.2f} "
              f"({100 * r['test_accuracy_std']:.2f}) | {r['delta_points']:+.2f} | {ratio} | "
              f"{r['seconds_per_epoch']:.2f}")
    return {"rows": rows}


# ----------------------------------------------------------------------------- step time and memory


class _StepTimes(Plugin):
    """Notes the time of every optimizer step, and keeps the run's optimizer."""

    name = "step_times"

    def __init__(self) -> None:
        self.marks: List[Tuple[int, float]] = []
        self.epoch = 0
        self.optimizer: Any = None

    def on_epoch_start(self, ctx: Any, epoch: int) -> None:
        self.epoch, self.optimizer = epoch, ctx.optimizer

    def after_step(self, ctx: Any, step: int) -> None:
        self.marks.append((self.epoch, time.perf_counter()))

    def median_step_s(self) -> float:
        gaps = [b - a for (ea, a), (eb, b) in zip(self.marks, self.marks[1:]) if ea == eb]
        later = [b - a for (ea, a), (eb, b) in zip(self.marks, self.marks[1:]) if ea == eb and ea > 0]
        return statistics.median(later or gaps)


def _state_bytes(model: torch.nn.Module, optimizer_state: Dict[str, Any], compression: Any) -> Dict[str, int]:
    from sturdy.training.sharding import local_tensor

    params = sum(local_tensor(p).numel() * local_tensor(p).element_size() for p in model.parameters())
    moments = sum(local_tensor(t).numel() * local_tensor(t).element_size() for s in optimizer_state.values()
                  for t in s.values() if isinstance(t, torch.Tensor))
    comp = 0
    if compression is not None:
        comp = sum(t.numel() * t.element_size() for kind in compression._buffers.values() for t in kind.values())
    return {"parameters": params, "gradients": params, "optimizer": moments, "compression": comp}


def _overhead_worker(rank: int, world: int, methods: List[str], model_name: str, epochs: int) -> Any:
    """Each of ``methods`` in turn (one fresh model each); the step times, the peak memory of the process."""
    runs = [_overhead_run(rank, world, method, model_name, epochs) for method in methods]
    return {"runs": runs, "peak_rss_mb": _peak_rss_mb()}


def _overhead_run(rank: int, world: int, method: str, model_name: str, epochs: int) -> Any:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from sturdy.compression import create_compression
    from sturdy.compression.sharded import install_sharded_compression
    from sturdy.data import load_dataset
    from sturdy.models import create_model
    from sturdy.training import TrainConfig, train
    from sturdy.training.sharding import Sharding

    torch.set_num_threads(1)
    data = load_dataset("digits", split="train")
    torch.manual_seed(0)
    model = create_model(model_name, in_shape=data.image_shape, num_classes=data.num_classes)
    config = TrainConfig(epochs=epochs, batch_size=64 // world, lr=0.05, optimizer="sgd", momentum=0.9, device="cpu")
    state = None
    install = None
    if method == "vgc":
        state, hook = create_compression("vgc", model=model, alpha=5.0, gather="exact")

        def install(groups: Any) -> None:
            install_sharded_compression(groups, state=state, hook=hook)
    mp = MixedPrecisionPolicy(reduce_dtype=torch.bfloat16) if method == "none-bf16" else None
    timer = _StepTimes()
    train(model, data, config=config, sharding=Sharding(install=install, mixed_precision=mp), plugins=[timer],
          progress=False)
    optimizer_state = {id(k): v for k, v in timer.optimizer.state.items()}
    return {"method": method, "step_s": timer.median_step_s(), "state_bytes": _state_bytes(model, optimizer_state,
                                                                                              state)}


def overhead(args: argparse.Namespace) -> Dict[str, Any]:
    """Step times interleaved in one launch (rounds of none, none-bf16, vgc: the machine's load hits all alike);
    peak memory from one fresh launch per method."""
    methods = ("none", "none-bf16", "vgc")
    summary = []
    for world in args.workers:
        for model in args.models:
            per_rank = run_local_workers(_overhead_worker, nproc=world, args=(list(methods) * args.repeats, model,
                                                                              args.epochs),
                                         timeout_s=3600.0, collective_timeout_s=600.0)
            runs = per_rank[0]["runs"]
            steps = {m: [statistics.mean(p["runs"][i]["step_s"] for p in per_rank) for i, r in enumerate(runs)
                         if r["method"] == m] for m in methods}
            rss, state = {}, {}
            for m in methods:
                fresh = run_local_workers(_overhead_worker, nproc=world, args=([m], model, 1), timeout_s=3600.0,
                                          collective_timeout_s=600.0)
                rss[m] = max(p["peak_rss_mb"] for p in fresh)
                state[m] = fresh[0]["runs"][0]["state_bytes"]
            row = {"workers": world, "model": model, "step_s": steps, "peak_rss_mb": rss, "state_bytes": state,
                   "step_ratio_vs_fp32": [v / n for v, n in zip(steps["vgc"], steps["none"])],
                   "step_ratio_vs_bf16": [v / n for v, n in zip(steps["vgc"], steps["none-bf16"])],
                   "rss_ratio": rss["vgc"] / rss["none"],
                   "state_ratio": sum(state["vgc"].values()) / sum(state["none"].values())}
            summary.append(row)
            print(row, flush=True)
    print("model | workers | step vgc / fp32 (rounds) | step vgc / bf16 | peak RSS MB none, vgc | state bytes ratio")
    for r in summary:
        print(f"{r['model']} | {r['workers']} | {', '.join(f'{x:.2f}' for x in r['step_ratio_vs_fp32'])} | "
              f"{', '.join(f'{x:.2f}' for x in r['step_ratio_vs_bf16'])} | {r['peak_rss_mb']['none']:.0f}, "
              f"{r['peak_rss_mb']['vgc']:.0f} | {r['state_ratio']:.2f}")
    return {"summary": summary}


# ----------------------------------------------------------------------------- time to accuracy


def _tta_worker(rank: int, world: int, plan: List[Dict[str, Any]], model_name: str, epochs: int) -> Any:
    import torch.distributed as dist
    from compression_throttled_link import shape_loopback
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from sturdy.compression import create_compression
    from sturdy.compression.sharded import install_sharded_compression
    from sturdy.data import load_dataset
    from sturdy.models import create_model
    from sturdy.training import TrainConfig, train
    from sturdy.training.sharding import Sharding

    torch.set_num_threads(1)
    train_set, test_set = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    out = []
    target: Optional[float] = None
    for item in plan:
        if rank == 0:
            shape_loopback(item["rate_mbit"])
        dist.barrier()
        torch.manual_seed(0)
        model = create_model(model_name, in_shape=train_set.image_shape, num_classes=train_set.num_classes)
        config = TrainConfig(epochs=epochs, batch_size=64 // world, lr=0.05, optimizer="sgd", momentum=0.9,
                             device="cpu")
        install, mp = None, None
        if item["method"] == "vgc":
            state, hook = create_compression("vgc", model=model, alpha=5.0, gather="exact")

            def install(groups: Any, s: Any = state, h: Any = hook) -> None:
                install_sharded_compression(groups, state=s, hook=h)
        if item["method"] == "none-bf16":
            mp = MixedPrecisionPolicy(reduce_dtype=torch.bfloat16)
        goal = target

        def stop(metrics: Any, goal: Optional[float] = goal) -> bool:
            return goal is not None and metrics.test_accuracy >= goal

        res = train(model, train_set, test_set=test_set, config=config,
                    sharding=Sharding(install=install, mixed_precision=mp), on_epoch_end=stop, progress=False)
        history = [(m.test_accuracy, m.seconds) for m in res.history]
        if target is None:
            target = history[-1][0] - TARGET_DROP
        out.append({**item, "history": history})
    if rank == 0:
        shape_loopback(None)
    return out if rank == 0 else None


def time_to_accuracy(args: argparse.Namespace) -> Dict[str, Any]:
    rates: List[Optional[float]] = [None] + [float(r) for r in args.rates_mbit.split(",")]
    results = {}
    for world in args.workers:
        plan = [{"method": "none", "rate_mbit": None}]  # first: it sets the target
        plan += [{"method": m, "rate_mbit": r} for r in rates for m in ("none", "none-bf16", "vgc")
                 if (m, r) != ("none", None)]
        runs = run_local_workers(_tta_worker, nproc=world, args=(plan, args.model, args.epochs),
                                 timeout_s=6 * 3600.0, collective_timeout_s=600.0)[0]
        target = runs[0]["history"][-1][0] - TARGET_DROP
        rows = []
        for r in runs[1:] + runs[:1]:
            reached = [i for i, (acc, _) in enumerate(r["history"]) if acc >= target]
            seconds = sum(s for _, s in r["history"][: reached[0] + 1]) if reached else math.inf
            rows.append({"method": r["method"], "rate_mbit": r["rate_mbit"], "epochs_to_target":
                         reached[0] + 1 if reached else None, "seconds_to_target": seconds})
        print(f"{world} workers, {args.model}, target {100 * target:.2f}%")
        print("rate Mbit/s | method | epochs to target | seconds to target")
        for row in rows:
            rate = "unlimited" if row["rate_mbit"] is None else f"{row['rate_mbit']:.0f}"
            print(f"{rate} | {row['method']} | {row['epochs_to_target']} | {row['seconds_to_target']:.1f}")
        results[str(world)] = {"target": target, "rows": rows, "raw": runs}
    return results


def _reexec_in_namespace() -> int:
    """Rerun this command in a private network namespace, whose loopback the throttled link may shape."""
    import os
    import subprocess

    flags = ["--net"] if os.geteuid() == 0 else ["--user", "--map-root-user", "--net"]
    return subprocess.call(["unshare", *flags, sys.executable, os.path.abspath(__file__), *sys.argv[1:],
                            "--inside-namespace"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--accuracy", action="store_true")
    ap.add_argument("--overhead", action="store_true")
    ap.add_argument("--time-to-accuracy", action="store_true")
    ap.add_argument("--workers", default="2,4")
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--model", default="mlp", help="--time-to-accuracy: the model")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=None, help="default: 40 (the data-parallel default); "
                                                               "--overhead: 3")
    ap.add_argument("--repeats", type=int, default=2, help="--overhead: repeats of each launch")
    ap.add_argument("--concurrent", type=int, default=1, help="--accuracy: launches at once")
    ap.add_argument("--rates-mbit", default="100,1000")
    ap.add_argument("--out", default="runs/bench/compression_sharded.json")
    ap.add_argument("--inside-namespace", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.workers = [int(w) for w in args.workers.split(",")]
    args.models = args.models.split(",")
    out = Path(args.out)
    report: Dict[str, Any] = {"hardware": "CPU, gloo workers with one torch thread each",
                              "command": " ".join(sys.argv)}
    if args.time_to_accuracy and not args.inside_namespace:
        raise SystemExit(_reexec_in_namespace())
    if args.accuracy:
        with tempfile.TemporaryDirectory(prefix="sturdy-sharded-") as tmp:
            report["accuracy"] = accuracy(args, tmp, out)
        write_json(report, out.with_name(out.stem + "_accuracy.json"))
    if args.overhead:
        args.epochs = args.epochs or 3
        report["overhead"] = overhead(args)
        write_json(report, out.with_name(out.stem + "_overhead.json"))
    if args.time_to_accuracy:
        import subprocess

        import compression_throttled_link as link

        subprocess.run(["ip", "link", "set", "lo", "up", "mtu", str(link.MTU)], check=True, capture_output=True)
        args.epochs = args.epochs or 40
        report["time_to_accuracy"] = time_to_accuracy(args)
        write_json(report, out.with_name(out.stem + "_tta.json"))
    print(json.dumps({k: v for k, v in report.items() if k in ("hardware", "command")}))


if __name__ == "__main__":
    main()
