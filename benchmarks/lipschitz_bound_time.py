"""Time of the guaranteed Lipschitz bound (``lipschitz_bound``) on large networks, CPU.

For each model: wall-clock and process CPU seconds of ``lipschitz_bound`` (median of ``--repeats``), the
guaranteed bound, the power-iteration estimate and their ratio, and the share of the time spent in the
estimate (the same call with ``power_iterations=0`` gives the bound alone). With ``--reference`` the
per-frequency block norms of every convolution are also computed the previous way (a batched SVD of every
``C_out x C_in`` block, ``torch.linalg.matrix_norm(ord=2)``) in the same run: its time, the speed ratio, and
the largest relative difference between the two (the new bound must be >= the SVD value and equal to it
up to the documented safety margin).

Usage:
    python benchmarks/lipschitz_bound_time.py --threads 2 --reference --out runs/bench/lipschitz_bound_time.json
    python benchmarks/lipschitz_bound_time.py --threads 2 --models resnet50,resnet50-nobn,resnet18 --size 224
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from sturdy.experiments.jsonio import write_json
from sturdy.lipschitz import lipschitz_bound
from sturdy.lipschitz.graph import build_program
from sturdy.lipschitz.norms import FFT_SAFETY, _conv_geometry, _polyphase_axis, conv2d_fft_norm
from sturdy.models import create_model

MODELS = {
    "wrn16-4": ("wrn", {"depth": 16, "widen": 4}, 32, 10),
    "wrn16-4-nobn": ("wrn", {"depth": 16, "widen": 4, "batchnorm": False}, 32, 10),
    "resnet18": ("resnet18", {}, 224, 1000),
    "resnet50": ("resnet50", {}, 224, 1000),
    "resnet50-nobn": ("resnet50", {"batchnorm": False}, 224, 1000),
}


def _timed(fn, *args, **kwargs):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0, time.process_time() - c0


def _svd_reference(weight, hw, pads, dilation, groups, stride) -> float:
    """The previous per-frequency computation: polyphase FFT, then a batched SVD of every block."""
    w = weight.detach().to(torch.float64)
    c_out, c_in_g, kh, kw = w.shape
    (sh, sw), (dh, dw) = stride, dilation
    ph_h, off_h, _, n_h = _polyphase_axis(hw[0], kh, sh, dh, pads[0], pads[1])
    ph_w, off_w, _, n_w = _polyphase_axis(hw[1], kw, sw, dw, pads[2], pads[3])
    grid = torch.zeros((c_out, c_in_g, sh, sw, n_h, n_w), dtype=torch.float64)
    for th in range(kh):
        for tw in range(kw):
            grid[:, :, ph_h[th], ph_w[tw], off_h[th] - min(off_h), off_w[tw] - min(off_w)] = w[:, :, th, tw]
    spec = torch.fft.rfft2(grid.reshape(c_out, c_in_g * sh * sw, n_h, n_w))
    spec = spec.reshape(groups, c_out // groups, -1, n_h, spec.shape[-1]).permute(0, 3, 4, 1, 2)
    return float(torch.linalg.matrix_norm(spec, ord=2).max()) * FFT_SAFETY


def _reference(model, shape):
    """(CPU seconds of the SVD path, of the new path, largest relative difference) over the convolutions.

    CPU (process) time: on a shared machine wall-clock time mostly measures the other processes."""
    program = build_program(model, shape)
    t_ref = t_new = 0.0
    worst = 0.0
    for step in program.steps:
        geometry = _conv_geometry(step.op) if step.kind == "op" else None
        if geometry is None or geometry[-1] != "zeros":
            continue
        weight, hw, pads, dilation, groups, stride, _ = geometry
        ref, _, t = _timed(_svd_reference, weight, hw, pads, dilation, groups, stride)
        t_ref += t
        new, _, t = _timed(conv2d_fft_norm, weight, input_hw=hw, pads=pads, dilation=dilation, groups=groups,
                           stride=stride)
        t_new += t
        if new < ref * (1 - 1e-12):
            raise AssertionError(f"{step.path}: new bound {new} below the SVD value {ref}")
        worst = max(worst, new / ref - 1.0)
    return t_ref, t_new, worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="wrn16-4", help=f"comma-separated: {', '.join(MODELS)}")
    p.add_argument("--size", type=int, default=None, help="image side (default: 32 for WRN, 224 for ResNets)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--reference", action="store_true", help="also time the batched-SVD block norms")
    p.add_argument("--out", default="runs/bench/lipschitz_bound_time.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    result = {"benchmark": "lipschitz_bound_time", "hardware": "cpu", "threads": args.threads,
              "cpu_count": os.cpu_count(), "load_average_at_start": list(os.getloadavg()), "models": {}}
    for key in args.models.split(","):
        name, kwargs, size, classes = MODELS[key]
        size = args.size or size
        torch.manual_seed(0)
        model = create_model(name, in_shape=(3, size, size), num_classes=classes, **kwargs).eval()
        shape = (1, 3, size, size)
        runs = [_timed(lipschitz_bound, model, input_shape=shape) for _ in range(args.repeats)]
        bound = runs[0][0]
        bound_only = [_timed(lipschitz_bound, model, input_shape=shape, power_iterations=0)
                      for _ in range(args.repeats)]
        entry = {
            "input_shape": list(shape),
            "parameters": sum(q.numel() for q in model.parameters()),
            "seconds_wall": statistics.median(r[1] for r in runs),
            "seconds_cpu": statistics.median(r[2] for r in runs),
            "seconds_wall_without_estimate": statistics.median(r[1] for r in bound_only),
            "seconds_cpu_without_estimate": statistics.median(r[2] for r in bound_only),
            "upper": bound.upper,
            "estimate": bound.estimate,
            "estimate_over_upper": bound.estimate / bound.upper,
            "methods": sorted({layer.method for layer in bound.per_layer}),
        }
        if args.reference:
            t_ref, t_new, worst = _reference(model, shape)
            entry["conv_blocks_svd_cpu_seconds"] = t_ref
            entry["conv_blocks_new_cpu_seconds"] = t_new
            entry["speedup_vs_svd_cpu"] = t_ref / t_new
            # includes the FFT's absolute rounding allowance (FFT_ABS_SAFETY), which the reference omits
            entry["max_relative_excess_over_svd"] = worst
        result["models"][key] = entry
        print(json.dumps({key: entry}), flush=True)
    result["load_average_at_end"] = list(os.getloadavg())
    write_json(result, Path(args.out))


if __name__ == "__main__":
    main()
