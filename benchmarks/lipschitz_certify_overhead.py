"""Certification time / plain inference time on the same data, once the bound is computed.

Certification = the model's forward pass plus the pairwise radius of every point; plain inference =
the forward pass alone (both in eval mode, no gradient, same batch size). The bound itself is
computed once per model and reported separately. Runs are interleaved and the ratio of medians is
reported.

Usage:
    python benchmarks/lipschitz_certify_overhead.py --out runs/bench/lipschitz_certify_overhead.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from sturdy.data import load_dataset
from sturdy.experiments.jsonio import write_json
from sturdy.lipschitz import certify, eval_mode, lipschitz_bound
from sturdy.models import create_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeat-data", type=int, default=20, help="tile the 497 test digits this many times")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--runs", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/bench/lipschitz_certify_overhead.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    test = load_dataset("digits", split="test")
    x = test.images.repeat(args.repeat_data, 1, 1, 1)
    y = test.labels.repeat(args.repeat_data)
    model = create_model("cnn", in_shape=test.image_shape, num_classes=10).eval()
    t0 = time.perf_counter()
    bound = lipschitz_bound(model, input_shape=(1, *test.image_shape))
    t_bound = time.perf_counter() - t0

    def plain() -> None:
        with eval_mode(model), torch.no_grad():
            for start in range(0, x.shape[0], args.batch):
                model(x[start : start + args.batch]).argmax(1)

    def cert() -> None:
        certify(model, x, y, bound=bound, batch_size=args.batch)

    times = {"plain": [], "certify": []}
    for i in range(args.runs + 2):
        for name, fn in (("plain", plain), ("certify", cert)):
            t = time.perf_counter()
            fn()
            if i >= 2:
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "benchmark": "lipschitz_certify_overhead",
        "points": int(x.shape[0]),
        "batch": args.batch,
        "threads": args.threads,
        "bound_seconds": t_bound,
        "median_seconds": med,
        "ratio_certify_over_inference": med["certify"] / med["plain"],
    }
    out = Path(args.out)
    write_json(result, out)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
