"""Compression section of the GPU check: the device codec's bits on the GPU, its time per bucket, and the
per-step overhead of statistics + variance hook against plain DDP.

* ``codec``: :mod:`sturdy.compression.device_codec` on ``device`` against the numpy reference on the CPU
  (payload bytes, residuals, variances, decoded sums: identical or not), and the median time of
  select + encode and of decode + add for one 25 MB bucket, beside the host (numba or numpy) path on
  a CPU copy of the same bucket.
* ``overhead``: world size 1 in this process (NCCL on CUDA, gloo on the CPU), DDP with and without
  ``attach_squared_gradient_statistics`` + ``variance_hook`` (defaults: alpha 4, 4-bit values, capacity
  gather), and DDP with the statistics only (hook = plain allreduce), interleaved in rounds; medians of
  synchronised step times. Models: WRN-16-4 on 32x32 inputs, batch 128, float32; a ResNet-50-shaped
  bottleneck network on 224x224 inputs, batch 64, bf16 parameters (bf16 gradient buckets, float32
  residuals). Target: step time ratio <= 1.10.

``smoke=True`` shrinks everything (tiny widths and inputs) so that the section runs in seconds on a CPU;
its ratios say nothing about the GPU target.
"""

from __future__ import annotations

import datetime
import os
import statistics
import tempfile
import time
from contextlib import contextmanager
from typing import Dict, Iterator, List
from unittest import mock

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sturdy.compression import (
    VarianceCompressionState,
    accel,
    attach_squared_gradient_statistics,
    codec,
    device_codec,
    variance_hook,
)
from sturdy.compression.compressor import variance_select, warm_up
from sturdy.models import create_model

TARGET = 1.10


class _Bottleneck(nn.Module):
    def __init__(self, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        c_out = 4 * width
        self.conv1, self.bn1 = nn.Conv2d(c_in, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, c_out, 1, bias=False), nn.BatchNorm2d(c_out)
        self.down = None
        if stride != 1 or c_in != c_out:
            self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


def resnet50_shaped(num_classes: int = 1000, base: int = 64, blocks=(3, 4, 6, 3)) -> nn.Module:
    """ResNet-50's layout (7x7 stem, bottleneck stages 3-4-6-3, widths 64-128-256-512, 25.6M parameters)."""
    layers: List[nn.Module] = [nn.Conv2d(3, base, 7, 2, 3, bias=False), nn.BatchNorm2d(base), nn.ReLU(),
                               nn.MaxPool2d(3, 2, 1)]
    c = base
    for i, n in enumerate(blocks):
        for j in range(n):
            layers.append(_Bottleneck(c, base * 2**i, 2 if i > 0 and j == 0 else 1))
            c = 4 * base * 2**i
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes)]
    return nn.Sequential(*layers)


@contextmanager
def _process_group(device: torch.device) -> Iterator[None]:
    """A world of one in this process (NCCL on CUDA, gloo otherwise), unless one exists already."""
    if dist.is_initialized():
        yield
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    with tempfile.TemporaryDirectory(prefix="sturdy-gpu-check-") as tmp:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        store = dist.FileStore(os.path.join(tmp, "store"), 1)
        dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=120))
        try:
            yield
        finally:
            dist.destroy_process_group()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _bucket(n: int, segments: int, seed: int, sent_fraction: float = 0.015):
    gen = np.random.default_rng(seed)
    r = (gen.standard_normal(n) * 10.0 ** gen.uniform(-3, 0, n)).astype(np.float32)
    v = (r * r * np.exp(gen.normal(np.log(0.25) + 2.17, 1.0, n))).astype(np.float32)  # ~1.5 % pass alpha 4
    v[gen.random(n) < sent_fraction] = 0
    cuts = np.sort(gen.choice(np.arange(1, n), segments - 1, replace=False))
    return torch.from_numpy(r), torch.from_numpy(v), torch.tensor([0, *cuts.tolist(), n])


def _codec_section(device: torch.device, smoke: bool) -> Dict[str, object]:
    """Bit-identity of the device path on ``device`` with the numpy reference, and its time per bucket."""
    cases = {"sparse": (70_000, 3, 4.0), "dense": (5_000, 4, 0.0), "one": (1, 1, 1.0)}
    identical = {}
    for name, (n, segments, alpha) in cases.items():
        r, v, b = _bucket(n, max(1, segments), seed=n)
        with device_codec.forced(False), mock.patch.object(accel, "kernels", lambda: None):  # numpy reference
            r_ref, v_ref = r.clone(), v.clone()
            ref = variance_select(r_ref, v_ref, alpha=alpha, zeta=0.999, quantize="4bit", boundaries=b)
            out_ref = torch.zeros(n)
            codec.decode_add_(out_ref, ref.payload, boundaries=b)
        with device_codec.forced(True):
            r_dev, v_dev = r.to(device), v.to(device)
            dev = variance_select(r_dev, v_dev, alpha=alpha, zeta=0.999, quantize="4bit", boundaries=b)
            out_dev = torch.zeros(n, device=device)
            codec.decode_add_(out_dev, dev.payload, boundaries=b)
        identical[name] = bool(
            torch.equal(ref.payload, dev.payload.cpu()) and torch.equal(r_ref, r_dev.cpu())
            and torch.equal(v_ref, v_dev.cpu()) and torch.equal(out_ref, out_dev.cpu())
        )
    n, reps = (50_000, 5) if smoke else (25 * 2**20 // 4, 30)
    r, v, b = _bucket(n, 40, seed=1)
    times: Dict[str, List[float]] = {"device_select": [], "device_decode": [], "host_select": [], "host_decode": []}
    for rep in range(reps + 2):
        for where in ("device", "host"):
            target = device if where == "device" else torch.device("cpu")
            rt, vt = r.to(target), v.to(target)
            with device_codec.forced(where == "device"):
                _sync(device)
                t0 = time.perf_counter()
                sel = variance_select(rt, vt, alpha=4.0, zeta=0.999, quantize="4bit", boundaries=b)
                _sync(device)
                t1 = time.perf_counter()
                out = torch.zeros(n, device=target)
                _sync(device)
                t2 = time.perf_counter()
                codec.decode_add_(out, sel.payload, boundaries=b)
                _sync(device)
                t3 = time.perf_counter()
            if rep >= 2:
                times[f"{where}_select"].append(t1 - t0)
                times[f"{where}_decode"].append(t3 - t2)
    return {
        "identical": identical,
        "bucket_elements": n,
        "elements_sent": int(sel.count),
        "median_ms": {k: 1e3 * statistics.median(t) for k, t in times.items()},
        "host_path": "numba" if accel.available() else "numpy",
    }


def _build(model_fn, dtype, device, config):
    torch.manual_seed(0)
    model = model_fn().to(device=device, dtype=dtype)
    state = None
    if config == "vgc":
        state = VarianceCompressionState(statistics=attach_squared_gradient_statistics(model))
    elif config == "stats_only":
        attach_squared_gradient_statistics(model)  # stored, popped by nobody: the cost of the statistics only
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index or 0] if device.type == "cuda" else None)
    if state is not None:
        ddp.register_comm_hook(state, variance_hook)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    return ddp, opt, state


def _overhead(name, model_fn, input_shape, batch, dtype, device, *, rounds, steps, warmup) -> Dict[str, object]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *input_shape, generator=gen).to(device=device, dtype=dtype)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    configs = ("plain", "stats_only", "vgc")
    built = {c: _build(model_fn, dtype, device, c) for c in configs}
    times: Dict[str, List[float]] = {c: [] for c in configs}

    def step(ddp, opt):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(ddp(x).float(), y).backward()
        opt.step()

    for rnd in range(rounds + 1):
        for c in configs:
            ddp, opt, _ = built[c]
            for _ in range(warmup if rnd == 0 else steps):
                _sync(device)
                t0 = time.perf_counter()
                step(ddp, opt)
                _sync(device)
                if rnd:
                    times[c].append(time.perf_counter() - t0)
    med = {c: statistics.median(t) for c, t in times.items()}
    state = built["vgc"][2]
    return {
        "model": name,
        "batch": batch,
        "dtype": str(dtype).replace("torch.", ""),
        "parameters": sum(p.numel() for p in built["plain"][0].parameters()),
        "median_step_ms": {c: 1e3 * m for c, m in med.items()},
        "ratio_vgc": med["vgc"] / med["plain"],
        "ratio_stats_only": med["stats_only"] / med["plain"],
        "compression_ratio": state.statistics().compression_ratio,
    }


def run(*, device: torch.device, smoke: bool) -> dict:
    """The section's figures (see the module docstring); ``targets``: step-time ratios against 1.10."""
    warm_up()
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny CPU tensors: intra-op threads only contend
    try:
        return _run(device, smoke)
    finally:
        torch.set_num_threads(threads)


def _run(device: torch.device, smoke: bool) -> dict:
    result: Dict[str, object] = {"codec": _codec_section(device, smoke)}
    if smoke:
        wrn = dict(model_fn=lambda: create_model("wrn", in_shape=(3, 16, 16), num_classes=10, depth=10, widen=1),
                   input_shape=(3, 16, 16), batch=8)
        r50 = dict(model_fn=lambda: resnet50_shaped(10, base=4, blocks=(1, 1, 1, 1)), input_shape=(3, 16, 16), batch=4)
        timing = dict(rounds=2, steps=2, warmup=3)
    else:
        wrn = dict(model_fn=lambda: create_model("wrn", in_shape=(3, 32, 32), num_classes=10, depth=16, widen=4),
                   input_shape=(3, 32, 32), batch=128)
        r50 = dict(model_fn=lambda: resnet50_shaped(1000), input_shape=(3, 224, 224), batch=64)
        timing = dict(rounds=3, steps=8, warmup=6)
    with _process_group(device):
        runs = {
            "wrn16_4": _overhead("WRN-16-4" if not smoke else "WRN-10-1 (smoke)", dtype=torch.float32,
                                 device=device, **wrn, **timing),
            "resnet50_bf16": _overhead("ResNet-50-shaped" if not smoke else "bottleneck net (smoke)",
                                       dtype=torch.bfloat16, device=device, **r50, **timing),
        }
    result["overhead"] = runs
    result["targets"] = {
        f"step_ratio_{key}": {"value": round(row["ratio_vgc"], 3), "target": f"<= {TARGET:.2f}",
                              "met": row["ratio_vgc"] <= TARGET}
        for key, row in runs.items()
    }
    result["targets"]["device_codec_identical"] = {
        "value": all(result["codec"]["identical"].values()), "target": "True",
        "met": all(result["codec"]["identical"].values())}
    return result
