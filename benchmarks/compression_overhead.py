"""Per-step time of DDP with the variance-compression hook + statistics vs. plain DDP allreduce (CPU, gloo).

All configurations run in the same worker processes, interleaved in rounds (plain, vgc, plain, ...)
so that load from other processes hits them alike; medians over all timed steps. ``vgc`` uses the
default one-round "capacity" gather (synchronous), ``vgc_bounded`` the asynchronous "bounded" one. Also
reports the cost of the statistics alone (hook = plain allreduce) and of the torch.func per-sample
fallback that the cheap statistics replace, and the peak extra memory of the statistics (live tensor bytes
tracked with a dispatch mode). Wall-clock medians suffer from other processes on a shared machine;
mean CPU time per step (time.process_time, all threads of the worker) is reported beside them.

    python benchmarks/compression_overhead.py --out runs/bench/compression_overhead.json
"""

from __future__ import annotations

import argparse
import statistics
import time
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from sturdy.compression import attach_squared_gradient_statistics, create_compression
from sturdy.data import load_dataset
from sturdy.distributed import run_local_workers
from sturdy.experiments.jsonio import write_json
from sturdy.models import create_model
from sturdy.persample import generic_rule as _generic_rule
from sturdy.persample.registry import _RULES

CONFIGS = ("plain", "stats_only", "vgc", "vgc_bounded", "vgc_vmap")


def _route_to_buffer(stats, model):
    """Route the statistics into one flat variance buffer (what VarianceCompressionState does per bucket)."""
    variance = torch.zeros(sum(p.numel() for p in model.parameters()))
    offset = 0
    for p in model.parameters():
        stats.route(p, variance[offset : offset + p.numel()])
        offset += p.numel()
    return variance


def _build(config, model_name, alpha):
    torch.manual_seed(0)
    train = load_dataset("digits")
    model = create_model(model_name, in_shape=train.image_shape, num_classes=train.num_classes)
    state = hook = None
    saved_rules = dict(_RULES)
    if config == "vgc_vmap":  # the per-sample torch.func path for every layer
        for k in list(_RULES):
            _RULES[k] = _generic_rule
    try:
        if config in ("vgc", "vgc_vmap", "vgc_bounded"):
            state, hook = create_compression("vgc", model=model, alpha=alpha,
                                             gather="bounded" if config == "vgc_bounded" else "capacity")
        elif config == "stats_only":  # routed into a variance buffer, as the compression state does
            _route_to_buffer(attach_squared_gradient_statistics(model), model)
    finally:
        _RULES.clear()
        _RULES.update(saved_rules)
    ddp = nn.parallel.DistributedDataParallel(model)
    if hook is not None:
        ddp.register_comm_hook(state, hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return ddp, opt, train, state


def _worker(rank, world, model_name, batch, rounds, steps, alpha, warmup_steps):
    import torch.distributed as dist

    built = {c: _build(c, model_name, alpha) for c in CONFIGS}
    times = {c: [] for c in CONFIGS}
    cpu = {c: [] for c in CONFIGS}
    g = torch.Generator().manual_seed(rank)

    def step(config):
        ddp, opt, train, _ = built[config]
        idx = torch.randint(0, len(train), (batch,), generator=g)
        x, y = train.images[idx], train.labels[idx]
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        opt.step()
        return time.perf_counter() - t0, time.process_time() - c0

    for c in CONFIGS:  # untimed training first: the traffic of the hooks falls as training goes on
        for _ in range(warmup_steps if c != "vgc_vmap" else 0):
            step(c)
    for r in range(rounds + 1):
        for c in CONFIGS:
            for _ in range(steps if c != "vgc_vmap" else max(2, steps // 5)):
                dt, dc = step(c)
                if r > 0:  # round 0 warms up (bucket rebuild, compression start, allocator)
                    times[c].append(dt)
                    cpu[c].append(dc)
    med = {c: statistics.median(v) for c, v in times.items()}
    med_cpu = {c: statistics.mean(v) for c, v in cpu.items()}
    return {"median_step_s": med, "mean_step_cpu_s": med_cpu,
            "vgc_ratio": built["vgc"][3].statistics().compression_ratio,
            "vgc_bounded_ratio": built["vgc_bounded"][3].statistics().compression_ratio}


class _LiveBytes(TorchDispatchMode):
    """Tracks bytes of live tensor storages allocated inside the mode (views excluded); remembers the peak.

    ``scope``: with ``scope[0]`` a bool toggled by the caller, count only storages allocated while it is True.
    """

    def __init__(self, scope=None):
        super().__init__()
        self.scope = scope
        self.live = {}
        self.current = self.peak = 0

    def _release(self, key):
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.scope is not None and not self.scope[0]:
            return out
        # views and in-place results share an input's storage: not an allocation (a view of a dataset or
        # of a parameter would otherwise count that whole storage)
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live and key not in inputs:
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._release, key)
        return out


def _scoped(rule, scope):
    def wrapped(*args):
        scope[0] = True
        try:
            return rule(*args)
        finally:
            scope[0] = False

    return wrapped


def _peak_step_bytes(model, x, y, with_stats, *, own_only=False):
    """Peak live bytes of one forward/backward; ``own_only``: only what the statistics rules allocate.

    The statistics go straight into a variance buffer allocated beforehand, as the compression state's is.
    """
    stats = attach_squared_gradient_statistics(model) if with_stats else None
    if stats is not None:
        _route_to_buffer(stats, model)
    scope = [False] if own_only else None
    if own_only:
        for tracked in stats._hooks.tracked:
            tracked.rule = _scoped(tracked.rule, scope)
    for p in model.parameters():
        p.grad = None
    with _LiveBytes(scope) as mode:
        F.cross_entropy(model(x), y).backward()
    if stats is not None:
        stats.remove()
    return mode.peak


def memory_report(model_name, batch):
    """Peak memory of a step with statistics over the gradient size, two ways.

    ``peak_extra_over_gradient``: peak of a step with statistics minus the peak of a plain step (the
    plain peak comes early in the backward pass, before the statistics exist, so this can hide them).
    ``statistics_peak_over_gradient`` (stricter): peak of the bytes the statistics allocate themselves,
    the accumulated statistics (one gradient's size) and the transient per-sample tensors together.
    """
    torch.manual_seed(0)
    train = load_dataset("digits")
    model = create_model(model_name, in_shape=train.image_shape, num_classes=train.num_classes)
    x, y = train.images[:batch], train.labels[:batch]
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    base = _peak_step_bytes(model, x, y, False)
    with_stats = _peak_step_bytes(model, x, y, True)
    own = _peak_step_bytes(model, x, y, True, own_only=True)
    extra = with_stats - base
    return {
        "model": model_name, "batch": batch, "gradient_bytes": grad_bytes, "peak_step_bytes_plain": base,
        "peak_step_bytes_with_statistics": with_stats, "peak_extra_bytes": extra,
        "peak_extra_over_gradient": extra / grad_bytes,
        "statistics_peak_bytes": own, "statistics_peak_over_gradient": own / grad_bytes,
        "state_bytes": 2 * grad_bytes + grad_bytes // 4,  # residual + variance float32, ever_sent bool
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32, help="per worker")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=40, help="steps per configuration and round")
    ap.add_argument("--alpha", type=float, default=4.0)
    ap.add_argument("--warmup-steps", type=int, default=0,
                    help="untimed training steps first (0: measure the first steps, the heaviest traffic)")
    ap.add_argument("--out", default="runs/bench/compression_overhead.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    report = {"hardware": "CPU", "threads_per_worker": 1, "workers": args.workers, "batch_per_worker": args.batch,
              "warmup_steps": args.warmup_steps, "models": {}}
    for name in args.models.split(","):
        res = run_local_workers(_worker, nproc=args.workers,
                                args=(name, args.batch, args.rounds, args.steps, args.alpha, args.warmup_steps),
                                timeout_s=3600)
        med = {c: statistics.mean(r["median_step_s"][c] for r in res) for c in CONFIGS}
        cpu = {c: statistics.mean(r["mean_step_cpu_s"][c] for r in res) for c in CONFIGS}
        entry = {
            "median_step_ms": {c: 1e3 * v for c, v in med.items()},
            "mean_step_cpu_ms": {c: 1e3 * v for c, v in cpu.items()},
            "cpu_vgc_over_plain": cpu["vgc"] / cpu["plain"],
            "cpu_vgc_bounded_over_plain": cpu["vgc_bounded"] / cpu["plain"],
            "cpu_statistics_only_over_plain": cpu["stats_only"] / cpu["plain"],
            "vgc_over_plain": med["vgc"] / med["plain"],
            "statistics_only_over_plain": med["stats_only"] / med["plain"],
            "vgc_bounded_over_plain": med["vgc_bounded"] / med["plain"],
            "vgc_vmap_over_plain": med["vgc_vmap"] / med["plain"],
            "compression_ratio_during_benchmark": {"vgc": res[0]["vgc_ratio"],
                                                   "vgc_bounded": res[0]["vgc_bounded_ratio"]},
            "memory": memory_report(name, args.batch),
        }
        report["models"][name] = entry
        print(f"{name}: step ms " + ", ".join(f"{c} {1e3 * v:.2f}" for c, v in med.items())
              + f" | vgc/plain {entry['vgc_over_plain']:.2f}x (bounded {entry['vgc_bounded_over_plain']:.2f}x),"
              f" stats/plain {entry['statistics_only_over_plain']:.2f}x,"
              f" CPU time vgc/plain {entry['cpu_vgc_over_plain']:.2f}x"
              f" (bounded {entry['cpu_vgc_bounded_over_plain']:.2f}x,"
              f" stats {entry['cpu_statistics_only_over_plain']:.2f}x),"
              f" vmap-vgc/plain {entry['vgc_vmap_over_plain']:.2f}x | statistics peak extra memory "
              f"{entry['memory']['peak_extra_bytes']} B = {entry['memory']['peak_extra_over_gradient']:.2f} x gradient"
              f" (own allocations {entry['memory']['statistics_peak_over_gradient']:.2f} x)")
    out = Path(args.out)
    write_json(report, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
