"""Accuracy vs. compression on digits: variance-based compression against every baseline hook.

For each worker count, one launch of local gloo workers trains every (method, seed) in turn with the
same data order, model and optimiser (SGD momentum 0.9, cosine schedule, batch per worker), and
records test accuracy, compression ratio (dense float32 bytes / bytes really transmitted, and / payload
bytes), elements sent per step and the share of elements never sent. Results are written after each
worker count, so a partial run still leaves a JSON.

    python benchmarks/compression_digits.py --workers 2,4 --epochs 30 --global-batch 64 --gather exact

``--global-batch 64`` keeps the optimisation problem of every worker count the same (batch 64 per step,
20 steps per epoch); ``--batch 32`` instead gives every worker 32 samples (4 workers: batch 128, half the
steps).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

from sturdy.distributed import run_local_workers
from sturdy.experiments.compression import DEFAULTS, CompressionPlugin, compression_options
from sturdy.experiments.jsonio import write_json
from sturdy.experiments.train_job import TrainJob, fit

# name -> (options, seeds key); "many" seeds for the reference and vgc, "few" for the baselines
METHODS: Dict[str, Any] = {
    "none": ({"compress": "none"}, "many"),
    "vgc a=4": ({"compress": "vgc", "alpha": 4.0}, "many"),
    "vgc a=5": ({"compress": "vgc", "alpha": 5.0}, "many"),
    "vgc a=6": ({"compress": "vgc", "alpha": 6.0}, "many"),
    "vgc a=8": ({"compress": "vgc", "alpha": 8.0}, "many"),
    "vgc a=16": ({"compress": "vgc", "alpha": 16.0}, "many"),
    "strom tau=1e-3": ({"compress": "strom", "strom_tau": 1e-3}, "few"),
    "topk 1%": ({"compress": "topk", "topk_ratio": 0.01}, "few"),
    "fp16": ({"compress": "fp16"}, "few"),
    "powersgd r=1": ({"compress": "powersgd", "powersgd_rank": 1}, "few"),
}


def _worker(rank: int, world: int, jobs: List[Dict[str, Any]]) -> Any:
    torch.set_num_threads(1)
    out = []
    for name, job_dict in jobs:
        t0 = time.perf_counter()
        job = TrainJob.from_dict(job_dict)
        res = fit(job, plugins=[CompressionPlugin(compression_options(job))], resume=False, progress=False).results
        comp = res["compression"]
        sent = comp["elements_sent_per_step"]
        out.append({
            "method": name, "seed": job.config.seed, "test_accuracy": res["test_accuracy"],
            "compression_ratio": comp["compression_ratio"],
            "payload_compression_ratio": comp["payload_compression_ratio"],
            "bytes_sent_per_step": comp["bytes_sent_per_step"], "never_sent_fraction": comp["never_sent_fraction"],
            "elements_per_step": comp["elements_per_step"],
            "elements_sent_per_epoch": [statistics.mean(sent[i : i + res["steps_per_epoch"]])
                                        for i in range(0, len(sent), res["steps_per_epoch"])],
            "step_time_s": comp["step_time_s"], "seconds": time.perf_counter() - t0,
        })
    return out if rank == 0 else None


def summarize(runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    rows = []
    ref = [r["test_accuracy"] for r in runs if r["method"] == "none"]
    ref_mean = statistics.mean(ref) if ref else float("nan")
    for name in dict.fromkeys(r["method"] for r in runs):
        rs = [r for r in runs if r["method"] == name]
        acc = [r["test_accuracy"] for r in rs]
        rows.append({
            "method": name, "seeds": len(rs), "test_accuracy_mean": statistics.mean(acc),
            "test_accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "delta_points_vs_none": 100 * (statistics.mean(acc) - ref_mean),
            "compression_ratio_mean": statistics.mean(r["compression_ratio"] for r in rs),
            "payload_compression_ratio_mean": statistics.mean(r["payload_compression_ratio"] for r in rs),
            "never_sent_fraction_mean": statistics.mean(r["never_sent_fraction"] for r in rs),
            "elements_sent_per_epoch_seed0": rs[0]["elements_sent_per_epoch"],
        })
    return rows


def plot(report: Dict[str, Any], path: Path) -> None:
    """Elements sent per step (epoch means, seed 0) of every method and worker count, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = list(report["results"])
    fig, axes = plt.subplots(1, len(worlds), figsize=(5.2 * len(worlds), 3.8), squeeze=False)
    for ax, world in zip(axes[0], worlds):
        for row in report["results"][world]["summary"]:
            curve = row["elements_sent_per_epoch_seed0"]
            ax.plot(range(1, len(curve) + 1), curve, label=row["method"], lw=1.2)
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("elements sent per worker and step")
        ax.set_title(f"{world} workers")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="2,4")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seeds", type=int, default=5, help="seeds of the reference and vgc runs")
    ap.add_argument("--baseline-seeds", type=int, default=3)
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--batch", type=int, default=32, help="per worker")
    ap.add_argument("--global-batch", type=int, default=None,
                    help="fixed batch over all workers (each worker gets global / workers; overrides --batch)")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--gather", default=DEFAULTS["gather"], choices=("exact", "capacity", "bounded"))
    ap.add_argument("--out", default="runs/bench/compression_digits.json")
    ap.add_argument("--plot-only", action="store_true", help="only redraw the PNG from an existing --out JSON")
    args = ap.parse_args()
    if args.plot_only:
        plot(json.loads(Path(args.out).read_text()), Path(args.out).with_suffix(".png"))
        return
    out = Path(args.out)
    report: Dict[str, Any] = {"hardware": "CPU (gloo, local workers)", "settings": vars(args), "results": {}}
    seeds = {"many": args.seeds, "few": args.baseline_seeds}
    with tempfile.TemporaryDirectory(prefix="sturdy-bench-") as tmp:
        for world in [int(w) for w in args.workers.split(",")]:
            batch = args.batch
            if args.global_batch is not None:
                if args.global_batch % world:
                    raise SystemExit(f"--global-batch {args.global_batch} is not divisible by {world} workers")
                batch = args.global_batch // world
            jobs = []
            for name in args.methods.split(","):
                options, kind = METHODS[name]
                for seed in range(seeds[kind]):
                    job = TrainJob.from_dict(dict(
                        dataset="digits", model=args.model, epochs=args.epochs, batch_size=batch, lr=args.lr,
                        optimizer="sgd", momentum=0.9, schedule="cosine", seed=seed, device="cpu",
                        out=str(Path(tmp) / f"{world}-{name}-{seed}".replace(" ", "_")),
                        options={**DEFAULTS, **options, "nproc": world, "gather": args.gather}))
                    jobs.append((name, job.to_dict()))
            t0 = time.perf_counter()
            runs = run_local_workers(_worker, nproc=world, args=(jobs,), timeout_s=6 * 3600)[0]
            report["results"][str(world)] = {"runs": runs, "summary": summarize(runs), "batch_per_worker": batch,
                                             "seconds": time.perf_counter() - t0}
            write_json(report, out)
            print(f"== {world} workers, {args.epochs} epochs, model {args.model}, batch {batch}/worker")
            for row in report["results"][str(world)]["summary"]:
                print(f"{row['method']:>16}: acc {100 * row['test_accuracy_mean']:.2f} +- "
                      f"{100 * row['test_accuracy_std']:.2f} ({row['delta_points_vs_none']:+.2f} pts, "
                      f"{row['seeds']} seeds)  ratio {row['compression_ratio_mean']:.1f}x wire, "
                      f"{row['payload_compression_ratio_mean']:.1f}x payload, never sent "
                      f"{100 * row['never_sent_fraction_mean']:.1f}%", flush=True)
    plot(report, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
