"""Flatness section of the GPU check: normalized sharpness with its exact GGN diagonal vs a Hutchinson trace.

Full run: a ResNet-18 (pre-activation, widths 64-128-256-512, two blocks per stage, 11.2 M parameters) at
32x32 with 10 classes over 1000 samples; the time of ``normalized_sharpness`` (its exact GGN diagonal
included) divided by the time of a 100-probe ``hutchinson_trace`` on the same model and data, in the same
run (one warm-up each, medians of ``repeats``). Target: <= 0.1. Inputs are random and the network is
untrained (the cost does not depend on the weights); the section also reports ``is_hessian`` and the
peak GPU memory of the diagonal. ``smoke``: a tiny ResNet at 16x16, 8 samples, 2 probes, no warm-up, any device.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Dict

import torch

from sturdy.flatness import hessian_diagonal, hutchinson_trace, normalized_sharpness
from sturdy.models import create_model

TARGET = 0.1


def _median_seconds(fn: Callable[[], Any], repeats: int, device: torch.device, warm_up: bool = True) -> float:
    if warm_up:
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(*, device: torch.device, smoke: bool) -> Dict[str, Any]:
    """Time normalized sharpness and a Hutchinson trace on one model and data set; see the module docstring."""
    samples, probes, repeats = (8, 2, 1) if smoke else (1000, 100, 3)
    size = 16 if smoke else 32
    widths, blocks = ((8, 16), 1) if smoke else ((64, 128, 256, 512), 2)
    torch.manual_seed(0)
    model = create_model("resnet", in_shape=(3, size, size), num_classes=10, widths=widths,
                         blocks_per_stage=blocks).to(device).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(samples, 3, size, size, generator=gen).to(device)
    y = torch.randint(0, 10, (samples,), generator=gen).to(device)
    data = (x, y)
    batch = 250 if not smoke else samples
    t_trace = _median_seconds(lambda: hutchinson_trace(model, data, probes=probes, batch_size=batch), repeats, device,
                              warm_up=not smoke)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_ns = _median_seconds(lambda: normalized_sharpness(model, data, method="ggn-exact"), repeats, device,
                           warm_up=not smoke)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    hd = hessian_diagonal(model, data, method="ggn-exact")
    ns = normalized_sharpness(model, hessian=hd)
    ratio = t_ns / t_trace
    return {
        "model": f"resnet widths {list(widths)} x {blocks} blocks", "samples": samples, "probes": probes,
        "parameters": sum(p.numel() for p in model.parameters()),
        "normalized_sharpness_s": t_ns, "hutchinson_trace_s": t_trace, "ratio": ratio,
        "normalized_sharpness": ns.value, "is_hessian": hd.is_hessian, "quantity": hd.quantity,
        "peak_gpu_memory_mib": peak,
        "targets": {"normalized_sharpness_over_trace": {"value": ratio, "target": f"<= {TARGET}",
                                                        "met": ratio <= TARGET}},
    }
