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

``--cli-defaults`` instead builds every job exactly as ``sturdy train --nproc N --compress M --model X
--seed S`` does (the command line's defaults, then the data-parallel defaults of
:func:`sturdy.experiments.compression.apply_data_parallel_defaults`); a method's extra options become its
flags:

    python benchmarks/compression_digits.py --cli-defaults --workers 2,4 --models mlp,cnn --methods none,vgc
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import torch
from torch import nn

from sturdy.distributed import run_local_workers
from sturdy.experiments.compression import (
    DEFAULTS,
    CompressionPlugin,
    apply_data_parallel_defaults,
    compression_options,
)
from sturdy.experiments.jsonio import write_json
from sturdy.experiments.train_job import TrainJob, fit
from sturdy.models import available_models, register_model

PIXEL_LEVELS = 8  # digits pixels 0..16 quantised to this many values


class RowTokens(nn.Module):
    """A small sequence model: each image row is a token, the sum of embeddings of its quantised pixels
    (one table row per (column, level)), plus a row-position embedding; LayerNorm, one pre-norm attention
    block (single head, its projections as Linear modules) with an MLP, mean over tokens, a linear
    classifier. (Kept here, not in the model registry.)

    Every parameter is used through its own module's forward, so the per-sample statistics see it:
    ``nn.MultiheadAttention`` reads ``out_proj.weight`` without calling ``out_proj``, and an embedding's
    ``.weight`` read directly bypasses its module; parameters used that way got no statistics (``v = 0``)
    and were sent at every step.
    """

    def __init__(self, *, in_shape: Any, num_classes: int, dim: int = 32) -> None:
        super().__init__()
        _, rows, cols = in_shape
        self.rows, self.cols = rows, cols
        self.pixels = nn.Embedding(cols * PIXEL_LEVELS, dim)
        self.position = nn.Embedding(rows, dim)
        self.norm0 = nn.LayerNorm(dim)
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images = x[:, 0]  # (B, rows, cols), pixel values scaled to [0, 1]
        levels = (images.clamp(0, 1) * (PIXEL_LEVELS - 1)).round().long()
        ids = levels + PIXEL_LEVELS * torch.arange(self.cols, device=x.device)
        rows = torch.arange(self.rows, device=x.device).expand(x.shape[0], self.rows)
        h = self.norm0(self.pixels(ids).sum(2) + self.position(rows))  # (B, rows, dim)
        q, k, v = self.q(h), self.k(h), self.v(h)
        weights = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)
        h = h + self.out(weights @ v)
        h = h + self.mlp(self.norm1(h))
        return self.head(h.mean(1))


if "rowtokens" not in available_models():
    register_model("rowtokens")(RowTokens)

# name -> (options, seeds key); "many" seeds for the reference and vgc, "few" for the baselines
METHODS: Dict[str, Any] = {
    "none": ({"compress": "none"}, "many"),
    "vgc": ({"compress": "vgc"}, "many"),
    "vgc a=1": ({"compress": "vgc", "alpha": 1.0}, "many"),
    "vgc a=2": ({"compress": "vgc", "alpha": 2.0}, "many"),
    "vgc a=3": ({"compress": "vgc", "alpha": 3.0}, "many"),
    "vgc a=4": ({"compress": "vgc", "alpha": 4.0}, "many"),
    "vgc a=5": ({"compress": "vgc", "alpha": 5.0}, "many"),
    "vgc a=6": ({"compress": "vgc", "alpha": 6.0}, "many"),
    "vgc a=8": ({"compress": "vgc", "alpha": 8.0}, "many"),
    "vgc a=16": ({"compress": "vgc", "alpha": 16.0}, "many"),
    "strom tau=1e-3": ({"compress": "strom", "strom_tau": 1e-3}, "few"),
    "topk 1%": ({"compress": "topk", "topk_ratio": 0.01}, "few"),
    "fp16": ({"compress": "fp16"}, "few"),
    "powersgd r=1": ({"compress": "powersgd", "powersgd_rank": 1}, "few"),
    # convergence remedies (Deep Gradient Compression), each alone and combined
    "vgc mc off": ({"compress": "vgc", "momentum_correction": "off"}, "many"),
    "vgc mc": ({"compress": "vgc", "momentum_correction": "on"}, "many"),
    "vgc mc nomask": ({"compress": "vgc", "momentum_correction": "on", "momentum_masking": "off"}, "many"),
    "vgc warm4": ({"compress": "vgc", "alpha_warmup_epochs": 4.0}, "many"),
    "vgc unsent": ({"compress": "vgc", "feedback": "unsent"}, "many"),
    "vgc mc warm4": ({"compress": "vgc", "momentum_correction": "on", "alpha_warmup_epochs": 4.0}, "many"),
    "vgc mc unsent": ({"compress": "vgc", "momentum_correction": "on", "feedback": "unsent"}, "many"),
    "vgc warm4 unsent": ({"compress": "vgc", "alpha_warmup_epochs": 4.0, "feedback": "unsent"}, "many"),
    "vgc mc warm4 unsent": ({"compress": "vgc", "momentum_correction": "on", "alpha_warmup_epochs": 4.0,
                             "feedback": "unsent"}, "many"),
    "vgc unsent capacity": ({"compress": "vgc", "feedback": "unsent", "gather": "capacity"}, "many"),
    "vgc capacity": ({"compress": "vgc", "gather": "capacity"}, "many"),
    "vgc mc a=25": ({"compress": "vgc", "momentum_correction": "on", "alpha": 25.0}, "many"),
    "vgc mc a=100": ({"compress": "vgc", "momentum_correction": "on", "alpha": 100.0}, "many"),
    "vgc mc a=500": ({"compress": "vgc", "momentum_correction": "on", "alpha": 500.0}, "many"),
    "vgc mc unsent a=100": ({"compress": "vgc", "momentum_correction": "on", "feedback": "unsent", "alpha": 100.0},
                            "many"),
}
TARGET_DROP = 0.01  # epochs to reach the uncompressed runs' mean final accuracy minus one point


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
            "test_accuracy_history": [h["test_accuracy"] for h in res["history"]],
            "train_loss_history": [h["train_loss"] for h in res["history"]],
            "lag_warned": bool(comp.get("lag", {}).get("loss_warned")),
        })
    return out if rank == 0 else None


def epochs_to_target(history: List[float], target: float) -> float:
    """1-based epoch at which ``history`` first reaches ``target`` (inf: never)."""
    return next((i + 1 for i, acc in enumerate(history) if acc >= target), math.inf)


def cli_job(world: int, model: str, seed: int, options: Dict[str, Any], out: str, epochs: Any) -> TrainJob:
    """The job ``sturdy train --nproc WORLD --model MODEL --seed SEED <options as flags>`` runs."""
    from sturdy.cli import _job_from_args, build_parser  # the command line's own job builder

    argv = ["train", "--nproc", str(world), "--model", model, "--seed", str(seed), "--device", "cpu", "--out", out]
    if epochs is not None:
        argv += ["--epochs", str(epochs)]
    for key, value in options.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return apply_data_parallel_defaults(_job_from_args(build_parser().parse_args(argv)))


def summarize(runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    rows = []
    ref = [r["test_accuracy"] for r in runs if r["method"] == "none"]
    ref_mean = statistics.mean(ref) if ref else float("nan")
    target = ref_mean - TARGET_DROP
    ref_epochs = [epochs_to_target(r["test_accuracy_history"], target) for r in runs if r["method"] == "none"]
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
            "epochs_to_target": [epochs_to_target(r["test_accuracy_history"], target) for r in rs],
            "epochs_ratio_vs_none": (statistics.mean(epochs_to_target(r["test_accuracy_history"], target) for r in rs)
                                     / statistics.mean(ref_epochs)) if ref_epochs else float("nan"),
            "loss_warned": sum(bool(r.get("lag_warned")) for r in rs),
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
    ap.add_argument("--epochs", type=int, default=None, help="default 30 (with --cli-defaults: the CLI's)")
    ap.add_argument("--seeds", type=int, default=5, help="seeds of the reference and vgc runs")
    ap.add_argument("--baseline-seeds", type=int, default=3)
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--models", default=None, help="comma-separated models (overrides --model), e.g. mlp,cnn")
    ap.add_argument("--cli-defaults", action="store_true",
                    help="jobs exactly as `sturdy train --nproc N --compress M` builds them (only --epochs, if given, "
                         "and each method's own options are passed as flags)")
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
    models = (args.models or args.model).split(",")
    epochs = args.epochs if args.epochs is not None or args.cli_defaults else 30
    with tempfile.TemporaryDirectory(prefix="sturdy-bench-") as tmp:
        for model in models:
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
                        out_dir = str(Path(tmp) / f"{model}-{world}-{name}-{seed}".replace(" ", "_"))
                        if args.cli_defaults:
                            job = cli_job(world, model, seed, options, out_dir, args.epochs)
                        else:
                            job = TrainJob.from_dict(dict(
                                dataset="digits", model=model, epochs=epochs, batch_size=batch, lr=args.lr,
                                optimizer="sgd", momentum=0.9, schedule="cosine", seed=seed, device="cpu",
                                out=out_dir, options={**DEFAULTS, **options, "nproc": world, "gather": args.gather}))
                        jobs.append((name, job.to_dict()))
                t0 = time.perf_counter()
                runs = run_local_workers(_worker, nproc=world, args=(jobs,), timeout_s=6 * 3600)[0]
                key = str(world) if len(models) == 1 else f"{model} {world}"
                first = TrainJob.from_dict(jobs[0][1]).config
                report["results"][key] = {"runs": runs, "summary": summarize(runs), "model": model,
                                          "batch_per_worker": first.batch_size, "config": first.__dict__,
                                          "seconds": time.perf_counter() - t0}
                write_json(report, out)
                print(f"== {model}, {world} workers, {first.epochs} epochs, batch {first.batch_size}/worker, "
                      f"{first.optimizer} lr {first.lr}")
                for row in report["results"][key]["summary"]:
                    print(f"{row['method']:>16}: acc {100 * row['test_accuracy_mean']:.2f} +- "
                          f"{100 * row['test_accuracy_std']:.2f} ({row['delta_points_vs_none']:+.2f} pts, "
                          f"{row['seeds']} seeds)  ratio {row['compression_ratio_mean']:.1f}x wire, "
                          f"{row['payload_compression_ratio_mean']:.1f}x payload, never sent "
                          f"{100 * row['never_sent_fraction_mean']:.1f}%, epochs to target {row['epochs_to_target']} "
                          f"({row['epochs_ratio_vs_none']:.2f}x none), loss warnings {row['loss_warned']}", flush=True)
    plot(report, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
