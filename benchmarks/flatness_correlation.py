"""Kendall tau and granulated tau of every generalisation measure against the gap on the digits grid.

Runs the correlation harness (``sturdy flatness grid``) single-threaded and writes a compact JSON with
each measure's tau and granulated tau and their 95% bootstrap intervals. The paper's claim to check:
normalized sharpness correlates better than the Hessian trace and the norm products.

Usage:
    python benchmarks/flatness_correlation.py --out runs/bench/flatness_correlation.json [--quick]
        [--grid-dir runs/flatness-grid-default]   # reuses finished points of an earlier run
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from sturdy.experiments.flatness_grid import DEFAULT_GRID, QUICK_GRID, run_grid
from sturdy.experiments.jsonio import write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench/flatness_correlation.json")
    parser.add_argument("--grid-dir", default=None, help="grid output folder (default: next to --out)")
    parser.add_argument("--quick", action="store_true", help="the 16-MLP quick grid instead of the 64-model grid")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = QUICK_GRID if args.quick else DEFAULT_GRID
    out = Path(args.out)
    grid_dir = Path(args.grid_dir) if args.grid_dir else out.with_suffix("") / spec.name
    summary = run_grid(out=grid_dir, spec=spec, device="cpu", progress=True)
    table = {
        name: {k: c[k] for k in ("tau", "tau_ci", "granulated_tau", "granulated_ci", "per_hyperparameter")}
        for name, c in summary["correlations"].items()
    }
    result = {"benchmark": "flatness_correlation", "grid": spec.name, "models": summary["models"],
              "converged": summary["converged"], "seconds": summary["seconds"], "threads": args.threads,
              "gap": summary["gap"], "correlations": table, "grid_dir": str(grid_dir)}
    write_json(result, out)
    print(f"{'measure':28s} {'tau':>6s} {'95% CI':>16s} {'granulated':>10s}")
    for name, c in table.items():
        lo, hi = c["tau_ci"]
        print(f"{name:28s} {_f(c['tau']):>6s} [{_f(lo)}, {_f(hi)}] {_f(c['granulated_tau']):>10s}")
    print(f"written to {out}")


def _f(value: object) -> str:
    return "n/a" if value is None else f"{value:+.2f}"


if __name__ == "__main__":
    main()
