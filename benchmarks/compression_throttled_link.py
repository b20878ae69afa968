"""Step times of plain DDP and variance-based compression under a throttled link, against the cost model.

Linux only, needs ``unshare`` and ``tc`` (iproute2) with the ``tbf`` queueing discipline. The script
re-runs itself in a private network namespace (``unshare --net``; ``--user --map-root-user`` as well
when not root), whose loopback interface belongs to nothing else; the host's interfaces are never
touched. There the loopback MTU is set to 1500 bytes and ``tc ... tbf`` limits it to each rate in turn.
Every byte between the local workers crosses that one shaped queue, so ``P`` workers share the rate:
the prediction uses the cost model (:mod:`sturdy.compression.costmodel`, latency 0) with ``rate / P``
per worker, the measured unthrottled step time of plain DDP as compute, the extra unthrottled time of
the compressed step as codec time, and the compression ratio measured in the same window.

The compressed model first trains ``--warmup-steps`` unthrottled steps, so that its traffic is past the
start-up phase (docs/design.md section 4); then, for each rate, both methods run ``--steps`` steps in interleaved
rounds.

    python benchmarks/compression_throttled_link.py --workers 2 --rates-mbit 10,30,100,300,1000

``--time-to-accuracy`` instead trains whole runs (the job ``sturdy train --nproc P --compress M`` builds, every
method with its defaults, seed 0) of none, fp16, PowerSGD, top-k and vgc, unthrottled and at each rate, one
after another in one launch, and reports the wall-clock time each needs to reach the uncompressed run's final
test accuracy minus one point, next to the cost model's prediction
(:func:`sturdy.compression.costmodel.predict_time_to_accuracy`: the epochs each method needed, times its
unthrottled step plus its predicted communication at ``rate / P``, plus its unthrottled per-epoch overhead):

    python benchmarks/compression_throttled_link.py --time-to-accuracy --workers 4 --rates-mbit 100,1000

The table of every method (none, fp16, bf16, PowerSGD, top-k, vgc), worker count and model, with the cost
model's prediction beside each measurement and the rate below which the cost model puts vgc ahead of each
other method (the crossover, from the unthrottled runs' epochs, ratios and steps). The first run of each seed
(uncompressed, unthrottled) sets that seed's target; every later run stops once it reaches the target:

    python benchmarks/compression_throttled_link.py --time-to-accuracy --models mlp,cnn --workers 2,4 \
        --rates-mbit 30,100,300,1000 --seeds 3
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from sturdy.compression import create_compression
from sturdy.compression.costmodel import method_comm_seconds, predict_step_times, predict_time_to_accuracy
from sturdy.data import load_dataset
from sturdy.distributed import run_local_workers
from sturdy.experiments.jsonio import write_json
from sturdy.models import create_model

INSIDE_FLAG = "--inside-namespace"
MTU = 1500


def _tc(*args: str) -> None:
    subprocess.run(["tc", *args], check=True, capture_output=True, text=True)


def shape_loopback(rate_mbit: Optional[float]) -> None:
    """Limit ``lo`` to ``rate_mbit`` (token bucket; ``None``: no limit). Only inside the private namespace."""
    subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], capture_output=True)
    if rate_mbit is None:
        return
    rate_bytes = rate_mbit * 1e6 / 8
    burst = max(4 * MTU, int(rate_bytes / 10000))  # 0.1 ms of traffic, at least a few packets
    limit = max(256 * 1024, int(rate_bytes / 2))  # half a second of queue
    _tc("qdisc", "add", "dev", "lo", "root", "tbf", "rate", f"{rate_mbit}mbit", "burst", str(burst),
        "limit", str(limit))


def _build(method: str, model_name: str, alpha: float, gather: str = "exact", feedback: str = "all"):
    torch.manual_seed(0)
    train = load_dataset("digits")
    model = create_model(model_name, in_shape=train.image_shape, num_classes=train.num_classes)
    state = hook = None
    if method == "vgc":
        state, hook = create_compression("vgc", model=model, alpha=alpha, gather=gather, feedback=feedback)
    ddp = nn.parallel.DistributedDataParallel(model)
    if hook is not None:
        ddp.register_comm_hook(state, hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return ddp, opt, train, state


def _worker(rank: int, world: int, settings: Dict[str, Any]) -> Any:
    import torch.distributed as dist

    torch.set_num_threads(1)
    batch = settings["global_batch"] // world
    built = {m: _build(m, settings["model"], settings["alpha"], settings["gather"], settings["feedback"])
             for m in ("none", "vgc")}
    g = torch.Generator().manual_seed(rank)

    def step(method: str) -> float:
        ddp, opt, train, _ = built[method]
        idx = torch.randint(0, len(train), (batch,), generator=g)
        dist.barrier()
        t0 = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(ddp(train.images[idx]), train.labels[idx]).backward()
        opt.step()
        return time.perf_counter() - t0

    for _ in range(settings["warmup_steps"]):
        step("vgc")
    for _ in range(20):
        step("none")
    results = []
    for rate in [None] + settings["rates_mbit"]:
        if rank == 0:
            shape_loopback(rate)
        dist.barrier()
        times: Dict[str, List[float]] = {"none": [], "vgc": []}
        vgc_state = built["vgc"][3]
        before = vgc_state.statistics()
        rounds = 3
        for _ in range(rounds):
            for method in ("none", "vgc"):
                times[method] += [step(method) for _ in range(max(1, settings["steps"] // rounds))]
        after = vgc_state.statistics()
        ratio = (after.dense_bytes - before.dense_bytes) / max(1, after.wire_bytes - before.wire_bytes)
        results.append({"rate_mbit": rate, "median_step_s": {m: statistics.median(t) for m, t in times.items()},
                        "vgc_compression_ratio": ratio})
    if rank == 0:
        shape_loopback(None)
    return results if rank == 0 else None


def predict(rows: List[Dict[str, Any]], *, workers: int, dense_bytes: int) -> None:
    """Add the cost model's predictions to the measured ``rows`` (in place)."""
    base = rows[0]["median_step_s"]
    for row in rows[1:]:
        pred = predict_step_times(
            compute_s=base["none"], dense_bytes=dense_bytes, compression_ratio=row["vgc_compression_ratio"],
            workers=[workers], bandwidths_gbps=[row["rate_mbit"] / 1000 / workers], latency_s=0.0,
            codec_s=max(0.0, base["vgc"] - base["none"]),
        )[0]
        row["predicted_step_s"] = {"none": pred.dense_step_s, "vgc": pred.compressed_step_s}
        row["measured_speedup"] = row["median_step_s"]["none"] / row["median_step_s"]["vgc"]
        row["predicted_speedup"] = pred.speedup


TTA_METHODS: Dict[str, Dict[str, Any]] = {
    "none": {"compress": "none"}, "fp16": {"compress": "fp16"}, "bf16": {"compress": "bf16"},
    "powersgd r=1": {"compress": "powersgd"}, "topk 1%": {"compress": "topk"}, "vgc": {"compress": "vgc"},
}
TARGET_DROP = 0.01  # time to reach (uncompressed final accuracy - 1 point)


@dataclass(frozen=True)
class StopAtAccuracy:
    """A training plugin that ends a run at the first epoch whose test accuracy reaches ``target`` (every rank
    evaluates the same replica, so every rank stops at the same epoch)."""

    target: float

    def setup(self, model: Any, ctx: Any) -> Any:
        from sturdy.experiments.train_job import TrainHooks
        from sturdy.training.plugins import Plugin

        target = self.target

        class _Stop(Plugin):
            name = "stop_at_accuracy"

            def on_epoch_end(self, ctx: Any, metrics: Any) -> Optional[bool]:
                return metrics.test_accuracy is not None and metrics.test_accuracy >= target

        return TrainHooks(plugins=[_Stop()])


def _tta_worker(rank: int, world: int, plan: List[Dict[str, Any]]) -> Any:
    """Runs the plan in order; the unthrottled uncompressed run of a seed (first in the plan) sets that seed's
    target, and every later run of the seed stops once it reaches it."""
    import torch.distributed as dist

    from sturdy.experiments.compression import CompressionPlugin, compression_options
    from sturdy.experiments.train_job import TrainJob, fit

    torch.set_num_threads(1)
    out = []
    targets: Dict[int, float] = {}
    for item in plan:
        if rank == 0:
            shape_loopback(item["rate_mbit"])
        dist.barrier()
        job = TrainJob.from_dict(item["job"])
        plugins: List[Any] = [CompressionPlugin(compression_options(job))]
        if item["seed"] in targets:
            plugins.append(StopAtAccuracy(targets[item["seed"]]))
        res = fit(job, plugins=plugins, resume=False, progress=False).results
        history = [h["test_accuracy"] for h in res["history"]]
        if item["seed"] not in targets:
            targets[item["seed"]] = history[-1] - TARGET_DROP
        out.append({"method": item["method"], "rate_mbit": item["rate_mbit"], "seed": item["seed"],
                    "steps_per_epoch": res["steps_per_epoch"], "test_accuracy": history,
                    "target_accuracy": targets[item["seed"]],
                    "epoch_seconds": [h["seconds"] for h in res["history"]],
                    "step_time_s": res["compression"]["step_time_s"],
                    "compression_ratio": res["compression"]["compression_ratio"]})
    if rank == 0:
        shape_loopback(None)
    return out if rank == 0 else None


def _predict_seconds(method: str, *, epochs: float, base: Dict[str, Any], rate_mbit: Optional[float], workers: int,
                     dense_bytes: int, compression_ratio: float) -> float:
    """The cost model's time to the target: measured epochs and unthrottled step, predicted communication."""
    overhead = statistics.mean(base["epoch_seconds"]) - base["steps_per_epoch"] * base["step_time_s"]
    comm = 0.0 if rate_mbit is None else method_comm_seconds(
        method.split()[0], dense_bytes=dense_bytes, compression_ratio=compression_ratio, workers=workers,
        bandwidth_gbps=rate_mbit / 1000 / workers, latency_s=0.0)
    return predict_time_to_accuracy(epochs=epochs, steps_per_epoch=base["steps_per_epoch"],
                                    compute_codec_s=base["step_time_s"], comm_s=comm,
                                    epoch_overhead_s=max(0.0, overhead))


def crossover_mbit(predict: Any, other: Any, *, low: float = 1.0, high: float = 1e5) -> Optional[float]:
    """The rate (Mbit/s) where ``predict(rate) == other(rate)`` on a log scale (bisection), or ``None`` when one
    method is ahead over the whole range."""
    def diff(rate: float) -> float:
        return predict(rate) - other(rate)

    lo, hi = math.log(low), math.log(high)
    if diff(low) * diff(high) > 0 or not (math.isfinite(diff(low)) and math.isfinite(diff(high))):
        return None
    for _ in range(60):
        mid = (lo + hi) / 2
        if diff(math.exp(lo)) * diff(math.exp(mid)) <= 0:
            hi = mid
        else:
            lo = mid
    return math.exp((lo + hi) / 2)


def _summarise(runs: List[Dict[str, Any]], *, workers: int, dense_bytes: int) -> Dict[str, Any]:
    base = {(r["method"], r["seed"]): r for r in runs if r["rate_mbit"] is None}
    rows = []
    for r in runs:
        target = r["target_accuracy"]
        reached = [i for i, acc in enumerate(r["test_accuracy"]) if acc >= target]
        epochs = reached[0] + 1 if reached else math.inf
        b = base[(r["method"], r["seed"])]
        rows.append({**r, "epochs_to_target": epochs,
                     "seconds_to_target": sum(r["epoch_seconds"][:epochs]) if reached else math.inf,
                     "predicted_seconds_to_target": _predict_seconds(
                         r["method"], epochs=epochs, base=b, rate_mbit=r["rate_mbit"], workers=workers,
                         dense_bytes=dense_bytes, compression_ratio=r["compression_ratio"])})
    keys = ("seconds_to_target", "predicted_seconds_to_target", "epochs_to_target", "compression_ratio")
    table: Dict[str, Dict[str, Dict[str, float]]] = {}
    for rate in dict.fromkeys(str(r["rate_mbit"]) for r in rows):
        for method in dict.fromkeys(r["method"] for r in rows):
            mine = [r for r in rows if str(r["rate_mbit"]) == rate and r["method"] == method]
            table.setdefault(rate, {})[method] = {k: statistics.mean(r[k] for r in mine) for k in keys}
    crossovers = {}
    unthrottled = [r for r in rows if r["rate_mbit"] is None]

    def model_of(method: str) -> Any:
        mine = [r for r in unthrottled if r["method"] == method]
        epochs = statistics.mean(r["epochs_to_target"] for r in mine)
        ratio = statistics.mean(r["compression_ratio"] for r in mine)
        return lambda rate: statistics.mean(
            _predict_seconds(method, epochs=epochs, base=r, rate_mbit=rate, workers=workers, dense_bytes=dense_bytes,
                             compression_ratio=ratio) for r in mine)

    vgc = model_of("vgc")
    for method in dict.fromkeys(r["method"] for r in unthrottled):
        if method != "vgc":
            crossovers[method] = crossover_mbit(vgc, model_of(method))
    return {"rows": rows, "table": table, "crossover_mbit": crossovers}


def time_to_accuracy(args: argparse.Namespace) -> None:
    """Whole runs of every method at every rate; time to the target accuracy, measured and predicted."""
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from compression_digits import cli_job

    rates: List[Optional[float]] = [None] + [float(r) for r in args.rates_mbit.split(",")]
    methods = {name: TTA_METHODS[name] for name in args.methods.split(",")}
    out = Path(args.out).with_name(Path(args.out).stem + "_tta.json")
    report: Dict[str, Any] = {
        "hardware": "2-core CPU shared with other jobs, loopback shaped by tc tbf in a private network namespace",
        "settings": {"target_drop": TARGET_DROP, "seeds": args.seeds, "rates_mbit": rates}, "results": {}}
    for model_name in args.models.split(","):
        for workers in [int(w) for w in str(args.workers).split(",")]:
            with tempfile.TemporaryDirectory(prefix="sturdy-tta-") as tmp:
                plan = [{"method": name, "rate_mbit": rate, "seed": seed,
                         "job": cli_job(workers, model_name, seed, options,
                                        f"{tmp}/{name}-{rate}-{seed}".replace(" ", "_"), None).to_dict()}
                        for seed in range(args.seeds) for rate in rates for name, options in methods.items()]
                runs = run_local_workers(_tta_worker, nproc=workers, args=(plan,), timeout_s=6 * 3600)[0]
            train = load_dataset("digits")
            model = create_model(model_name, in_shape=train.image_shape, num_classes=train.num_classes)
            dense_bytes = 4 * sum(p.numel() for p in model.parameters())
            summary = _summarise(runs, workers=workers, dense_bytes=dense_bytes)
            report["results"][f"{model_name} {workers}"] = {"dense_bytes": dense_bytes, **summary}
            write_json(report, out)
            _print_table(model_name, workers, summary)
    print(f"wrote {out}")


def _print_table(model_name: str, workers: int, summary: Dict[str, Any]) -> None:
    table = summary["table"]
    methods = list(next(iter(table.values())))
    print(f"== {model_name}, {workers} workers: seconds to target, measured / predicted (epochs; ratio)")
    print("| link | " + " | ".join(methods) + " |")
    for rate, cells in table.items():
        label = "unlimited" if rate == "None" else f"{float(rate):.0f} Mbit/s"
        print(f"| {label} | " + " | ".join(
            f"{c['seconds_to_target']:.1f} / {c['predicted_seconds_to_target']:.1f} ({c['epochs_to_target']:.1f}; "
            f"{c['compression_ratio']:.0f}x)" for c in cells.values()) + " |")
    print("vgc faster below (Mbit/s, cost model): " + ", ".join(
        f"{m} {'-' if x is None else f'{x:.0f}'}" for m, x in summary["crossover_mbit"].items()))


def _reexec_in_namespace() -> int:
    missing = [tool for tool in ("unshare", "tc", "ip") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"this benchmark needs {', '.join(missing)} (util-linux, iproute2) on Linux")
    flags = ["--net"] if os.geteuid() == 0 else ["--user", "--map-root-user", "--net"]
    cmd = ["unshare", *flags, sys.executable, os.path.abspath(__file__), INSIDE_FLAG, *sys.argv[1:]]
    return subprocess.call(cmd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="2", help="worker counts, comma-separated (--time-to-accuracy: several)")
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--models", default="mlp", help="--time-to-accuracy: models, comma-separated")
    ap.add_argument("--methods", default=",".join(TTA_METHODS), help="--time-to-accuracy: methods")
    ap.add_argument("--seeds", type=int, default=1, help="--time-to-accuracy: seeds 0..N-1")
    ap.add_argument("--global-batch", type=int, default=64)
    ap.add_argument("--alpha", type=float, default=4.0)
    ap.add_argument("--rates-mbit", default="10,30,100,300,1000")
    ap.add_argument("--warmup-steps", type=int, default=400, help="unthrottled compressed steps before measuring")
    ap.add_argument("--gather", default="exact", choices=("exact", "capacity", "bounded"), help="vgc's all-gather")
    ap.add_argument("--feedback", default="all", choices=("all", "unsent"), help="vgc's error feedback")
    ap.add_argument("--steps", type=int, default=30, help="measured steps per method and rate")
    ap.add_argument("--out", default="runs/bench/compression_throttled_link.json")
    ap.add_argument("--time-to-accuracy", action="store_true",
                    help="whole runs of none, fp16, PowerSGD, top-k and vgc at each rate (see the docstring)")
    ap.add_argument(INSIDE_FLAG, action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not getattr(args, INSIDE_FLAG[2:].replace("-", "_")):
        raise SystemExit(_reexec_in_namespace())
    if not args.time_to_accuracy:
        args.workers = int(args.workers)
        if args.global_batch % args.workers:
            raise SystemExit(f"--global-batch {args.global_batch} is not divisible by {args.workers} workers")
    try:
        subprocess.run(["ip", "link", "set", "lo", "up", "mtu", str(MTU)], check=True, capture_output=True, text=True)
        shape_loopback(1000.0)
        shape_loopback(None)
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"cannot set up the shaped loopback here ({' '.join(exc.cmd)}: {exc.stderr.strip()}); "
                         "the kernel needs network namespaces and the tbf queueing discipline") from None
    torch.set_num_threads(1)
    if args.time_to_accuracy:
        time_to_accuracy(args)
        return
    settings = {"model": args.model, "global_batch": args.global_batch, "alpha": args.alpha,
                "rates_mbit": [float(r) for r in args.rates_mbit.split(",")], "warmup_steps": args.warmup_steps,
                "steps": args.steps, "gather": args.gather, "feedback": args.feedback}
    rows = run_local_workers(_worker, nproc=args.workers, args=(settings,), timeout_s=3 * 3600)[0]
    train = load_dataset("digits")
    model = create_model(args.model, in_shape=train.image_shape, num_classes=train.num_classes)
    dense_bytes = 4 * sum(p.numel() for p in model.parameters())
    predict(rows, workers=args.workers, dense_bytes=dense_bytes)
    report = {"hardware": "CPU, loopback shaped by tc tbf in a private network namespace",
              "settings": {**settings, "workers": args.workers, "dense_bytes": dense_bytes}, "rows": rows}
    out = Path(args.out)
    write_json(report, out)
    print(f"{args.workers} workers, model {args.model}, global batch {args.global_batch}, vgc alpha {args.alpha}")
    print("rate Mbit/s | plain ms meas / pred | vgc ms meas / pred | vgc ratio | speedup meas / pred")
    base = rows[0]
    print(f"  unlimited | {1e3 * base['median_step_s']['none']:7.2f}         | "
          f"{1e3 * base['median_step_s']['vgc']:7.2f}       | {base['vgc_compression_ratio']:6.1f}x |")
    for row in rows[1:]:
        m, p = row["median_step_s"], row["predicted_step_s"]
        print(f"{row['rate_mbit']:11.0f} | {1e3 * m['none']:7.2f} / {1e3 * p['none']:7.2f} | "
              f"{1e3 * m['vgc']:7.2f} / {1e3 * p['vgc']:7.2f} | {row['vgc_compression_ratio']:6.1f}x | "
              f"{row['measured_speedup']:5.2f} / {row['predicted_speedup']:5.2f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
