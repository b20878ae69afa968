"""LMT training step time / standard step time on the same model and batch.

Both steps: forward, loss, backward, Adam step. The LMT step is the objective of ``sturdy train --method
lmt``: the forward inside ``LipschitzTracker.batch_statistics`` (BatchNorm batch variances recorded), one
power iteration per weight operator (same-shape convolutions batched into one grouped convolution) and the
pairwise LMT loss; ``lmt_unbatched`` is the same with one power iteration per layer (``batch_shapes=False``).
Steps are interleaved (standard, LMT, LMT unbatched, standard, ...) after a warm-up, so all see the same
machine load; the ratio of medians and the median of the per-pair ratios are reported.

Usage:
    python benchmarks/lipschitz_step_time.py --out runs/bench/lipschitz_step_time.json
    python benchmarks/lipschitz_step_time.py --model wrn --size 32 --device cuda   # WRN-16-4 on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sturdy.experiments.jsonio import write_json
from sturdy.lipschitz import LipschitzTracker, lmt_loss
from sturdy.models import create_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="cnn", help="cnn (digits-sized) or wrn (WRN-16-4)")
    p.add_argument("--size", type=int, default=8, help="image side (8: digits)")
    p.add_argument("--pool", default=None, help="cnn pooling: max (default), avg or none")
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=60, help="timed steps per method")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="runs/bench/lipschitz_step_time.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    shape = (args.channels, args.size, args.size)
    kwargs = {"depth": 16, "widen": 4} if args.model == "wrn" else {}
    if args.pool is not None:
        kwargs["pool"] = args.pool
    model = create_model(args.model, in_shape=shape, num_classes=10, **kwargs).to(device)
    model.train()
    x = torch.rand(args.batch, *shape, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    trackers = {"lmt": LipschitzTracker(model, input_shape=(1, *shape)),
                "lmt_unbatched": LipschitzTracker(model, input_shape=(1, *shape), batch_shapes=False)}

    def standard() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def lmt_step(tracker: LipschitzTracker):
        def step() -> None:
            with tracker.batch_statistics(model):
                logits = model(x)
            loss = lmt_loss(logits, y, c=0.3, bound=tracker(), form="pairwise")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    fns = (("standard", standard), ("lmt", lmt_step(trackers["lmt"])),
           ("lmt_unbatched", lmt_step(trackers["lmt_unbatched"])))
    times = {name: [] for name, _ in fns}
    for i in range(args.warmup + args.steps):
        for name, fn in fns:
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "benchmark": "lipschitz_step_time",
        "model": args.model,
        "model_kwargs": kwargs,
        "input_shape": list(shape),
        "batch": args.batch,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": args.threads,
        "steps": args.steps,
        "median_seconds": med,
        "ratio_lmt_over_standard": med["lmt"] / med["standard"],
        "ratio_lmt_unbatched_over_standard": med["lmt_unbatched"] / med["standard"],
        # each LMT step over the standard step just before it: robust to load drifting during the run
        "median_paired_ratio": statistics.median(b / a for a, b in zip(times["standard"], times["lmt"])),
        "power_iteration_operators": len(list(trackers["lmt"].buffers())),
        "power_iteration_groups": len(trackers["lmt"]._groups),
        "load_average": list(os.getloadavg()),
    }
    out = Path(args.out)
    write_json(result, out)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
