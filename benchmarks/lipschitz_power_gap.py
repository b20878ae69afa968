"""Gap between the training-time power-iteration estimate and the exact operator norms, over LMT training.

Trains the demo's LMT digits CNN (no pooling, pairwise loss, one power iteration per step) and,
after every epoch, compares the tracker's current per-layer estimates ``||A u||`` and its global
estimate with the exact norms (dense float64 SVD; every operator of this model is small enough)
and the guaranteed bound. A positive gap means the loss enforced a smaller margin than ``c`` asks
for; certification never uses the estimate. Runs once per learning-rate schedule and ``--iterations`` value.

Usage:
    python benchmarks/lipschitz_power_gap.py --out runs/bench/lipschitz_power_gap.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sturdy.data import load_dataset
from sturdy.experiments.jsonio import write_json
from sturdy.lipschitz import lipschitz_bound, lmt_objective
from sturdy.models import create_model
from sturdy.training import TrainConfig, steps_per_epoch, train


def run(*, epochs: int, iterations: int, c: float, seed: int, schedule_name: str) -> dict:
    config = TrainConfig(epochs=epochs, batch_size=64, lr=3e-3, optimizer="adam", schedule=schedule_name, seed=seed,
                         device="cpu")
    train_set = load_dataset("digits", split="train")
    shape = (1, *train_set.image_shape)
    torch.manual_seed(seed)
    model = create_model("cnn", in_shape=train_set.image_shape, num_classes=10, channels=(16, 32), width=64,
                         pool="none")
    objective = lmt_objective(
        model, input_shape=shape, steps_per_epoch=steps_per_epoch(len(train_set), config.batch_size),
        c=c, warmup_epochs=epochs / 3, clip=True, iterations=iterations, seed=seed,
    )
    tracker = objective.tracker
    history = []
    t0 = time.perf_counter()

    def measure_gap(metrics) -> None:
        epoch = metrics.epoch - 1
        exact = lipschitz_bound(model, input_shape=shape, dense_max_entries=1 << 24)
        est = tracker.norms()
        per_layer = {layer.path: 1.0 - est[layer.path] / layer.upper for layer in exact.per_layer if layer.path in est}
        with torch.no_grad():
            glob = float(tracker().lipschitz)  # (this call also advances the vectors by one iteration)
        history.append({"epoch": epoch + 1, "per_layer_gap": per_layer, "max_layer_gap": max(per_layer.values()),
                        "global_gap": 1.0 - glob / exact.upper,
                        "methods": sorted({layer.method for layer in exact.per_layer})})
        print(json.dumps({"schedule": schedule_name, "iterations": iterations, **history[-1]}), flush=True)

    train(model, train_set, config=config, objective=objective, on_epoch_end=measure_gap, progress=False)
    return {"iterations_per_step": iterations, "schedule": schedule_name,
            "seconds": time.perf_counter() - t0, "history": history,
            "max_global_gap": max(h["global_gap"] for h in history),
            "max_layer_gap": max(h["max_layer_gap"] for h in history),
            "final_global_gap": history[-1]["global_gap"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--iterations", default="1,3", help="power iterations per step, comma-separated")
    p.add_argument("--c", type=float, default=0.5)
    p.add_argument("--schedules", default="constant,cosine", help="learning-rate schedules, comma-separated")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/bench/lipschitz_power_gap.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    runs = [run(epochs=args.epochs, iterations=int(k), c=args.c, seed=0,
                schedule_name=sched)
            for sched in args.schedules.split(",") for k in args.iterations.split(",")]
    result = {"benchmark": "lipschitz_power_gap", "hardware": "cpu", "threads": args.threads, "c": args.c,
              "runs": runs}
    out = Path(args.out)
    write_json(result, out)
    print(json.dumps({f"{r['schedule']}/{r['iterations_per_step']}": {
        k: r[k] for k in ("max_global_gap", "max_layer_gap", "final_global_gap")} for r in runs}))


if __name__ == "__main__":
    main()
