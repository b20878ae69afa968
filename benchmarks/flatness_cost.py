"""Cost of normalized sharpness (with its exact Hessian diagonal) relative to a 100-probe Hutchinson trace.

Target (issue 6): normalized sharpness, including the exact GGN diagonal of its weights, costs at most
0.1x a 100-probe Hutchinson trace of the Hessian on the same model and data. Also reported: the
exact diagonal computed with torch.func per-sample gradients for every parameter (the generic path).

Models are digits networks trained briefly (Adam, 3 epochs) and measured on the 1300 training digits,
single-threaded, median of ``--repeats`` runs after one warm-up; ratios are measured in the same run.

Usage:
    python benchmarks/flatness_cost.py --out runs/bench/flatness_cost.json [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Callable, Dict

import torch

from sturdy.data import load_dataset
from sturdy.experiments.jsonio import write_json
from sturdy.flatness import hessian_diagonal, hutchinson_trace, normalized_sharpness
from sturdy.models import create_model
from sturdy.training import TrainConfig, train

TARGET_RATIO = 0.1


def _median_seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench/flatness_cost.json")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--probes", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="one repeat, 300 samples (smoke test)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    repeats = 1 if args.quick else args.repeats
    data = load_dataset("digits", split="train")
    if args.quick:
        data = data.subset(torch.arange(300))
    models = {
        "mlp (width 128, 2 hidden)": ("mlp", {}),
        "small cnn (8, 16 channels, fc 32)": ("cnn", {"channels": (8, 16), "width": 32}),
        "cnn (32, 64 channels, fc 128)": ("cnn", {}),
    }
    rows: Dict[str, Dict[str, float]] = {}
    for label, (arch, kw) in models.items():
        torch.manual_seed(0)
        model = create_model(arch, in_shape=data.image_shape, num_classes=data.num_classes, **kw)
        train(model, data, config=TrainConfig(epochs=3, batch_size=64, lr=2e-3, device=str(device)), progress=False)
        model.to(device).eval()
        t_ns = _median_seconds(lambda m=model: normalized_sharpness(m, data), repeats, device)
        t_icml = _median_seconds(lambda m=model: normalized_sharpness(m, data, variant="icml"), repeats, device)
        t_trace = _median_seconds(lambda m=model: hutchinson_trace(m, data, probes=args.probes), repeats, device)
        t_func = _median_seconds(lambda m=model: hessian_diagonal(m, data, backend="func"), 1, device)
        t_diag = _median_seconds(lambda m=model: hessian_diagonal(m, data), repeats, device)
        rows[label] = {
            "parameters": sum(p.numel() for p in model.parameters()),
            "normalized_sharpness_s": t_ns,
            "normalized_sharpness_icml_s": t_icml,
            "exact_diagonal_hooks_s": t_diag,
            "exact_diagonal_torch_func_s": t_func,
            "hutchinson_trace_s": t_trace,
            "ratio_ns_to_trace": t_ns / t_trace,
            "ratio_ns_icml_to_trace": t_icml / t_trace,
            "ratio_func_diagonal_to_trace": t_func / t_trace,
        }
        print(f"{label:36s} NS {t_ns:7.3f} s  NS-icml {t_icml:7.3f} s  trace({args.probes}) {t_trace:7.3f} s  "
              f"ratio {t_ns / t_trace:.3f} (target <= {TARGET_RATIO})  torch.func diag {t_func / t_trace:.2f}x",
              flush=True)
    result = {
        "benchmark": "flatness_cost", "target_ratio": TARGET_RATIO, "probes": args.probes,
        "samples": len(data), "repeats": repeats, "threads": args.threads, "device": str(device),
        "torch": torch.__version__, "machine": platform.machine(), "processor": platform.processor(),
        "models": rows, "all_within_target": all(r["ratio_ns_to_trace"] <= TARGET_RATIO for r in rows.values()),
        # whole-process peak (training and every method included): an upper bound of the diagonal's peak memory
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    out = Path(args.out)
    write_json(result, out)
    print(f"peak RSS of the whole process {result['peak_rss_mib']:.0f} MiB; written to {out}")


if __name__ == "__main__":
    main()
