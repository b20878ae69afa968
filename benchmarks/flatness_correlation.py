"""Kendall tau, granulated tau and the robustness view of every generalisation measure on the digits grid.

Runs the correlation harness (``sturdy flatness grid``) and writes a compact JSON with each measure's tau
and granulated tau with their 95% bootstrap intervals, its sign-errors (Dziugaite et al. 2020: mean and
worst environment) and the paired-bootstrap interval of tau(normalized sharpness) - tau(measure) with the
verdict (``beats`` / ``loses`` when the interval excludes 0, else ``undecided``). The paper's claim to
check: normalized sharpness correlates better than the Hessian trace and the norm products.

Usage:
    python benchmarks/flatness_correlation.py --out runs/bench/flatness_correlation.json
        [--preset quick|default|wide] [--seeds N] [--workers N] [--time-limit MINUTES]
        [--grid-dir runs/flatness-grid-default]   # reuses finished points of an earlier run
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch

from sturdy.experiments.flatness_grid import PRESETS, run_grid
from sturdy.experiments.jsonio import write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench/flatness_correlation.json")
    parser.add_argument("--grid-dir", default=None, help="grid output folder (default: next to --out)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--quick", action="store_true", help="same as --preset quick")
    parser.add_argument("--seeds", type=int, default=None, metavar="N", help="seeds 0..N-1 (default: the preset's)")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes (one thread each)")
    parser.add_argument("--time-limit", type=float, default=None, metavar="MINUTES",
                        help="start no new model after this many minutes (run again to resume)")
    parser.add_argument("--bootstrap", type=int, default=None, help="bootstrap resamples (default: the preset's)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of a serial run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = PRESETS["quick" if args.quick else args.preset]
    if args.bootstrap is not None:
        spec = replace(spec, bootstrap=args.bootstrap)
    if args.seeds is not None:
        spec = replace(spec, seeds=tuple(range(args.seeds)))
    out = Path(args.out)
    grid_dir = Path(args.grid_dir) if args.grid_dir else out.with_suffix("") / spec.name
    summary = run_grid(out=grid_dir, spec=spec, device="cpu", progress=True, workers=args.workers,
                       time_limit_s=None if args.time_limit is None else 60 * args.time_limit)
    rob = summary["robustness"]
    table = {
        name: {**{k: c[k] for k in ("tau", "tau_ci", "granulated_tau", "granulated_ci", "per_hyperparameter")},
               "sign_error": rob["sign_errors"].get(name),
               "normalized_sharpness_minus_this": rob["normalized_sharpness_vs"].get(name)}
        for name, c in summary["correlations"].items()
    }
    result = {"benchmark": "flatness_correlation", "grid": spec.name, "models": summary["models"],
              "points": summary["points"], "complete": summary["complete"], "converged": summary["converged"],
              "selection": summary["selection"], "seconds": summary["seconds"], "workers": args.workers,
              "threads": 1 if args.workers > 1 else args.threads, "gap": summary["gap"], "bootstrap": spec.bootstrap,
              "correlations": table, "verdicts": rob["verdicts"], "grid_dir": str(grid_dir)}
    write_json(result, out)
    print(f"{summary['models']}/{summary['points']} models, {summary['converged']} converged "
          f"(table over the {summary['selection']} models)")
    print(f"{'measure':28s} {'tau':>6s} {'95% CI':>16s} {'gran.':>6s} {'SE mean':>7s} {'SE worst':>8s}  "
          f"tau(NS) - tau(measure) [95% CI]")
    for name, c in table.items():
        lo, hi = c["tau_ci"]
        se = c["sign_error"] or {}
        d = c["normalized_sharpness_minus_this"]
        versus = "(reference)" if d is None else \
            f"{_f(d['difference'])} [{_f(d['interval'][0])}, {_f(d['interval'][1])}] {d['verdict']}"
        print(f"{name:28s} {_f(c['tau']):>6s} [{_f(lo)}, {_f(hi)}] {_f(c['granulated_tau']):>6s} "
              f"{_f(se.get('mean')):>7s} {_f(se.get('worst')):>8s}  {versus}")
    print(f"written to {out}")


def _f(value: object) -> str:
    return "n/a" if value is None else f"{value:+.2f}"


if __name__ == "__main__":
    main()
