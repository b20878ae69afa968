"""Error of the randomised curvature estimators at equal numbers of Hessian-vector products.

Hutch++ and XTrace against plain Hutchinson (trace), Diag++ and XDiag against plain Hutchinson (diagonal), at budgets of
``--matvecs`` products, over ``--seeds`` seeds, on a small digits MLP trained for ``--epochs`` epochs, for the
Hessian or the GGN (``--curvature``). The reference is the dense matrix of the mean loss
over the training digits, built column by column from the same operator. Reported: the root mean square
over seeds of the relative error of the trace, ``|est - tr H| / |tr H|``, and of the diagonal,
``||est - diag H||_2 / ||diag H||_2``. Also: the top-5 eigenvalues by Lanczos (``--lanczos`` steps) against
``torch.linalg.eigvalsh``, and the first two moments of the SLQ density against ``tr(H^j) / P``.

Usage:
    python benchmarks/flatness_estimators.py --out runs/bench/flatness_estimators.json [--seeds 30] [--quick]
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

from sturdy.data import load_dataset
from sturdy.experiments.jsonio import write_json
from sturdy.flatness import hessian_eigenvalues, hutchpp_diagonal, hutchpp_trace, spectral_density
from sturdy.flatness.operator import CurvatureOperator
from sturdy.models import create_model
from sturdy.training import TrainConfig, train


def _dense(model: torch.nn.Module, data: Any, curvature: str) -> torch.Tensor:
    op = CurvatureOperator(model, data, curvature=curvature, batch_size=2048, loss_fn=None)
    eye = torch.eye(op.size, dtype=torch.float64)
    cols = [op.matmat(eye[:, i : i + 256]) for i in range(0, op.size, 256)]
    dense = torch.cat(cols, 1)
    return (dense + dense.t()) / 2


def _errors(model: torch.nn.Module, data: Any, dense: torch.Tensor, budgets: List[int], seeds: int,
            curvature: str) -> Dict[str, Any]:
    trace, diag = float(dense.trace()), dense.diagonal()
    rows: Dict[str, Any] = {}
    for m in budgets:
        row: Dict[str, float] = {}
        for method, diag_method in (("hutch++", "hutch++"), ("xtrace", "xdiag"), ("hutchinson", "hutchinson")):
            t_err, d_err = [], []
            for s in range(seeds):
                value = hutchpp_trace(model, data, method=method, matvecs=m, seed=s, curvature=curvature).value
                t_err.append((value - trace) / trace)
                est = hutchpp_diagonal(model, data, method=diag_method, matvecs=m, seed=s, curvature=curvature)
                flat = torch.cat([d.reshape(-1) for d in est.diagonal.values()])
                d_err.append(float((flat - diag).norm() / diag.norm()))
            row[f"{method}_trace_rel_rms"] = math.sqrt(sum(e * e for e in t_err) / seeds)
            row[f"{diag_method}_diag_rel_rms"] = math.sqrt(sum(e * e for e in d_err) / seeds)
        row["trace_error_ratio"] = row["hutchinson_trace_rel_rms"] / row["hutch++_trace_rel_rms"]
        row["diag_error_ratio"] = row["hutchinson_diag_rel_rms"] / row["hutch++_diag_rel_rms"]
        row["xdiag_to_diagpp_error_ratio"] = row["xdiag_diag_rel_rms"] / row["hutch++_diag_rel_rms"]
        rows[str(m)] = row
        print(f"matvecs {m:4d}  trace rel rms: hutch++ {row['hutch++_trace_rel_rms']:.4f}  xtrace "
              f"{row['xtrace_trace_rel_rms']:.4f}  hutchinson {row['hutchinson_trace_rel_rms']:.4f}   diag rel rms: "
              f"diag++ {row['hutch++_diag_rel_rms']:.4f}  xdiag {row['xdiag_diag_rel_rms']:.4f}  hutchinson "
              f"{row['hutchinson_diag_rel_rms']:.4f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench/flatness_estimators.json")
    parser.add_argument("--seeds", type=int, default=30)
    parser.add_argument("--matvecs", type=int, nargs="*", default=[12, 30, 60, 99])
    parser.add_argument("--lanczos", type=int, default=40)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--curvature", choices=["hessian", "ggn"], default="hessian")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="3 seeds, budgets 12 and 30, 300 samples")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds, budgets = (3, [12, 30]) if args.quick else (args.seeds, args.matvecs)
    data = load_dataset("digits", split="train")
    if args.quick:
        data = data.subset(torch.arange(300))
    torch.manual_seed(0)
    model = create_model("mlp", in_shape=data.image_shape, num_classes=data.num_classes, width=args.width)
    train(model, data, config=TrainConfig(epochs=args.epochs, batch_size=64, lr=2e-3), progress=False)
    model = model.double().eval()
    t0 = time.perf_counter()
    dense = _dense(model, data, args.curvature)
    exact = torch.linalg.eigvalsh(dense)
    print(f"{dense.shape[0]} parameters, dense {args.curvature} in {time.perf_counter() - t0:.1f} s; top eigenvalues "
          f"{exact.flip(0)[:5].tolist()}", flush=True)
    rows = _errors(model, data, dense, budgets, seeds, args.curvature)
    eig = hessian_eigenvalues(model, data, k=5, iterations=args.lanczos, tol=1e-8, curvature=args.curvature)
    eig_err = [abs(a - b) / abs(b) for a, b in zip(eig.values, exact.flip(0)[:5].tolist())]
    sd = spectral_density(model, data, iterations=min(args.lanczos, dense.shape[0]), probes=8,
                          curvature=args.curvature)
    p = dense.shape[0]
    moments = {j: (sd.moment(j), float(torch.linalg.matrix_power(dense, j).trace()) / p) for j in (1, 2)}
    print(f"lanczos {eig.iterations} steps: top-5 relative errors {[f'{e:.1e}' for e in eig_err]}; SLQ moments "
          f"(estimate, exact): {moments}", flush=True)
    result = {
        "benchmark": "flatness_estimators", "curvature": args.curvature, "epochs": args.epochs,
        "parameters": p, "samples": len(data), "seeds": seeds,
        "threads": args.threads, "torch": torch.__version__, "machine": platform.machine(),
        "processor": platform.processor(), "budgets": rows,
        "lanczos": {"steps": eig.iterations, "values": list(eig.values), "exact": exact.flip(0)[:5].tolist(),
                    "relative_errors": eig_err, "converged": eig.converged},
        "slq_moments": {str(j): {"estimate": a, "exact": b} for j, (a, b) in moments.items()},
    }
    out = Path(args.out)
    write_json(result, out)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
