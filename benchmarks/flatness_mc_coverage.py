"""Coverage of the Monte-Carlo normalized sharpness interval over seeds, against the exact value.

For each class count and sample count, ``--seeds`` independent Monte-Carlo GGN diagonals (``"ggn-mc"``,
8 groups) of a small MLP on 24 random inputs give a normalized sharpness each. Reported per setting:

* ``plug_in``: the minimum at the mean diagonal with ``-+ 1.96`` jackknife standard errors (before);
* ``corrected``: the jackknife bias-corrected value with ``-+ t_{G-1}`` standard errors (what
  :func:`sturdy.flatness.normalized_sharpness` reports);

each with its coverage of the exact value (from ``"ggn-exact"``), bias, spread over seeds, mean reported
standard error, and the fraction of diagonal entries farther than 3 reported standard errors from the
exact entry. Single-threaded.

Usage:
    python benchmarks/flatness_mc_coverage.py --out runs/bench/flatness_mc_coverage.json [--seeds 40]
"""

from __future__ import annotations

import argparse
import math
from typing import Any, Dict, List

import torch
from torch import nn

from sturdy.experiments.jsonio import write_json
from sturdy.flatness import hessian_diagonal, normalized_sharpness

NAMES = ["1.weight", "3.weight"]


def problem(classes: int, n: int = 24):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, classes)).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.rand((n, 1, 3, 4), generator=gen, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=gen)
    return model, (x, y)


def summary(errors: List[float], covered: int, stderrs: List[float]) -> Dict[str, float]:
    e = torch.tensor(errors, dtype=torch.float64)
    se = sum(stderrs) / len(stderrs)
    return {"coverage": covered / len(errors), "bias": float(e.mean()), "spread": float(e.std()),
            "mean_stderr": se, "bias_over_stderr": float(e.mean()) / se}


def measure(classes: int, samples: int, seeds: int) -> Dict[str, Any]:
    model, data = problem(classes)
    exact_diag = hessian_diagonal(model, data, method="ggn-exact", parameters=NAMES)
    exact = normalized_sharpness(model, hessian=exact_diag).value
    plug_err: List[float] = []
    corr_err: List[float] = []
    stderrs: List[float] = []
    plug_cov = corr_cov = 0
    far = total = 0
    for seed in range(seeds):
        hd = hessian_diagonal(model, data, method="ggn-mc", mc_samples=samples, seed=seed, parameters=NAMES)
        ns = normalized_sharpness(model, hessian=hd)
        assert ns.stderr is not None and ns.interval is not None and ns.plug_in_value is not None
        plug_err.append(ns.plug_in_value - exact)
        corr_err.append(ns.value - exact)
        stderrs.append(ns.stderr)
        plug_cov += abs(ns.plug_in_value - exact) <= 1.96 * ns.stderr
        corr_cov += ns.interval[0] <= exact <= ns.interval[1]
        for name, d in exact_diag.diagonal.items():
            err = hd.stderr[name]
            live = err > 0
            far += int(((hd.diagonal[name] - d).abs()[live] > 3 * err[live]).sum())
            total += int(live.sum())
    return {"classes": classes, "mc_samples": samples, "seeds": seeds, "exact": exact,
            "plug_in": summary(plug_err, plug_cov, stderrs), "corrected": summary(corr_err, corr_cov, stderrs),
            "entries_beyond_3_stderr": far / max(1, total)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench/flatness_mc_coverage.json")
    parser.add_argument("--seeds", type=int, default=40)
    parser.add_argument("--classes", type=int, nargs="+", default=[60, 200])
    parser.add_argument("--samples", type=int, nargs="+", default=[8, 16, 32])
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for classes in args.classes:
        for samples in args.samples:
            row = measure(classes, samples, args.seeds)
            rows.append(row)
            p, c = row["plug_in"], row["corrected"]
            print(f"classes {classes:4d} samples {samples:3d}: plug-in coverage {p['coverage']:.2f} "
                  f"(bias {p['bias_over_stderr']:+.2f} se) -> corrected {c['coverage']:.2f} "
                  f"(bias {c['bias_over_stderr']:+.2f} se); entries beyond 3 se "
                  f"{row['entries_beyond_3_stderr']:.3f}", flush=True)
    write_json({"rows": rows, "seeds": args.seeds, "threads": 1, "nominal": 0.95,
                "z": 1.96, "note": "t quantile with groups - 1 dof for the corrected interval"}, args.out)
    print(f"written to {args.out}; binomial sd of a 95% coverage over {args.seeds} seeds: "
          f"{math.sqrt(0.95 * 0.05 / args.seeds):.3f}")


if __name__ == "__main__":
    main()
