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
import math
import time
from pathlib import Path

import torch

from sturdy.data import load_dataset
from sturdy.lipschitz import CWarmup, LipschitzTracker, lipschitz_bound, lmt_loss
from sturdy.models import create_model


def run(*, epochs: int, iterations: int, warmup_iterations: int, c: float, seed: int, schedule_name: str) -> dict:
    torch.manual_seed(seed)
    train = load_dataset("digits", split="train")
    model = create_model("cnn", in_shape=train.image_shape, num_classes=10, channels=(16, 32), width=64, pool="none")
    shape = (1, *train.image_shape)
    tracker = LipschitzTracker(model, input_shape=shape, iterations=iterations, warmup_iterations=warmup_iterations,
                               seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    schedule = CWarmup(c=c, warmup_epochs=epochs / 3)
    gen = torch.Generator().manual_seed(seed)
    steps = (len(train) + 63) // 64
    total = epochs * steps
    if schedule_name == "cosine":  # as `sturdy train`'s default: cosine decay to 0 per step
        lr = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    else:
        lr = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    history = []
    t0 = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(len(train), generator=gen)
        for step in range(steps):
            idx = order[step * 64 : (step + 1) * 64]
            c_now = schedule(epoch=epoch, step=step, steps_per_epoch=steps)
            loss = lmt_loss(model(train.images[idx]), train.labels[idx], c=c_now, bound=tracker(), clip_factor=True)
            opt.zero_grad()
            loss.backward()
            opt.step()
            lr.step()
        exact = lipschitz_bound(model, input_shape=shape, dense_max_entries=1 << 24)
        est = tracker.norms()
        per_layer = {layer.path: 1.0 - est[layer.path] / layer.upper for layer in exact.per_layer if layer.path in est}
        with torch.no_grad():
            glob = float(tracker().lipschitz)  # (this call also advances the vectors by one iteration)
        history.append({"epoch": epoch + 1, "per_layer_gap": per_layer, "max_layer_gap": max(per_layer.values()),
                        "global_gap": 1.0 - glob / exact.upper,
                        "methods": sorted({layer.method for layer in exact.per_layer})})
        print(json.dumps({"schedule": schedule_name, "iterations": iterations, **history[-1]}), flush=True)
    return {"iterations_per_step": iterations, "warmup_iterations": warmup_iterations, "schedule": schedule_name,
            "seconds": time.perf_counter() - t0, "history": history,
            "max_global_gap": max(h["global_gap"] for h in history),
            "max_layer_gap": max(h["max_layer_gap"] for h in history),
            "final_global_gap": history[-1]["global_gap"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--iterations", default="1,3", help="power iterations per step, comma-separated")
    p.add_argument("--warmup-iterations", type=int, default=30)
    p.add_argument("--c", type=float, default=0.5)
    p.add_argument("--schedules", default="constant,cosine", help="learning-rate schedules, comma-separated")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/bench/lipschitz_power_gap.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    runs = [run(epochs=args.epochs, iterations=int(k), warmup_iterations=args.warmup_iterations, c=args.c, seed=0,
                schedule_name=sched)
            for sched in args.schedules.split(",") for k in args.iterations.split(",")]
    result = {"benchmark": "lipschitz_power_gap", "hardware": "cpu", "threads": args.threads, "c": args.c,
              "runs": runs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({f"{r['schedule']}/{r['iterations_per_step']}": {
        k: r[k] for k in ("max_global_gap", "max_layer_gap", "final_global_gap")} for r in runs}))


if __name__ == "__main__":
    main()
