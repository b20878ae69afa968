"""Where a compressed step's time goes, at the command line's defaults (CPU, gloo, local workers).

Every configuration runs in the same worker processes, interleaved in rounds so that load from other processes
hits them alike: ``plain`` (DDP allreduce), ``stats`` (the per-sample statistics routed into a variance buffer,
plain allreduce) and ``vgc`` (the hook as ``sturdy train --nproc N --compress vgc`` builds it: alpha, gather,
momentum correction from :data:`sturdy.experiments.compression.DEFAULTS`). Inside the ``vgc`` steps, timers
around the hook's parts (accumulate, statistics pop, selection + encoding, the all-gather, decoding + summing,
the lag monitor) give each part's mean per step (the all-gather's includes waiting for the other workers);
the medians of whole steps give the ratios, and the mean CPU time per step (``time.process_time``) the work
done, free of waiting. ``vgc_exact`` is the same with the two-round exact all-gather. The first
``--warmup-steps`` steps of every configuration are untimed (the start-up phase of compression sends
thousands of elements per step).

    python benchmarks/compression_profile.py --models mlp,cnn --workers 2 --rounds 10 --steps 20
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from typing import Any, Callable, Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from sturdy.compression import attach_squared_gradient_statistics, create_compression, exchange
from sturdy.compression import variance as variance_module
from sturdy.compression.lag import LagMonitor
from sturdy.data import load_dataset
from sturdy.distributed import run_local_workers
from sturdy.experiments.compression import DEFAULTS
from sturdy.experiments.jsonio import write_json
from sturdy.models import create_model

CONFIGS = ("plain", "stats", "vgc", "vgc_exact")  # vgc: the command line's settings; vgc_exact: sizes, then payloads
PARTS: Dict[str, float] = defaultdict(float)  # seconds per part, summed over the timed vgc steps
ACTIVE = [False]


def _timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if not ACTIVE[0]:
            return fn(*args, **kwargs)
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            PARTS[name] += time.perf_counter() - t0

    return wrapped


def _instrument() -> None:
    """Timers around the hook's parts (module attributes the exchange and the state look up at call time)."""
    exchange.all_gather_variable = _timed("gather (size round + payload round issued)", exchange.all_gather_variable)
    exchange.all_gather_with_capacity = _timed("gather (capacity round)", exchange.all_gather_with_capacity)
    exchange._sum_updates = _timed("decode + sum", exchange._sum_updates)
    variance_module.variance_select = _timed("select + encode", variance_module.variance_select)
    state_cls = variance_module.VarianceCompressionState
    state_cls.accumulate = _timed("accumulate (r += g or velocity)", state_cls.accumulate)
    LagMonitor.observe = _timed("lag monitor", LagMonitor.observe)
    stats_cls = variance_module.SquaredGradientStatistics
    stats_cls.pop_add_ = _timed("statistics pop", stats_cls.pop_add_)


def _build(config: str, model_name: str, momentum: float):
    torch.manual_seed(0)
    train = load_dataset("digits")
    model = create_model(model_name, in_shape=train.image_shape, num_classes=train.num_classes)
    state = hook = None
    if config.startswith("vgc"):
        gather = "exact" if config == "vgc_exact" else DEFAULTS["gather"]
        state, hook = create_compression("vgc", model=model, alpha=DEFAULTS["alpha"], zeta=DEFAULTS["zeta"],
                                         gather=gather, slack=DEFAULTS["gather_slack"], feedback=DEFAULTS["feedback"],
                                         momentum=momentum, momentum_masking=DEFAULTS["momentum_masking"] == "on")
    elif config == "stats":
        stats = attach_squared_gradient_statistics(model)
        variance = torch.zeros(sum(p.numel() for p in model.parameters()))
        offset = 0
        for p in model.parameters():
            stats.route(p, variance[offset : offset + p.numel()])
            offset += p.numel()
    ddp = nn.parallel.DistributedDataParallel(model)
    if hook is not None:
        ddp.register_comm_hook(state, hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.0 if momentum else 0.9)
    return ddp, opt, train


def _worker(rank: int, world: int, settings: Dict[str, Any]) -> Any:
    import torch.distributed as dist

    torch.set_num_threads(1)
    _instrument()
    momentum = 0.9 if DEFAULTS["momentum_correction"] == "on" else 0.0
    built = {c: _build(c, settings["model"], momentum) for c in CONFIGS}
    g = torch.Generator().manual_seed(rank)
    batch = settings["global_batch"] // world
    times: Dict[str, List[float]] = {c: [] for c in CONFIGS}
    cpu: Dict[str, List[float]] = {c: [] for c in CONFIGS}

    def step(config: str) -> float:
        ddp, opt, train = built[config]
        idx = torch.randint(0, len(train), (batch,), generator=g)
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        opt.zero_grad()
        F.cross_entropy(ddp(train.images[idx]), train.labels[idx]).backward()
        opt.step()
        cpu[config].append(time.process_time() - c0)
        return time.perf_counter() - t0

    for c in CONFIGS:
        for _ in range(settings["warmup_steps"]):
            step(c)
    for _ in range(settings["rounds"]):
        for c in CONFIGS:
            for _ in range(settings["steps"]):
                ACTIVE[0] = c == "vgc"  # parts timed in the command line's configuration only
                times[c].append(step(c))
                ACTIVE[0] = False
    n = len(times["vgc"])
    return {"median_step_s": {c: statistics.median(v) for c, v in times.items()},
            "mean_step_cpu_s": {c: statistics.mean(v[-len(times[c]):]) for c, v in cpu.items()},
            "parts_s_per_step": {k: v / n for k, v in PARTS.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--global-batch", type=int, default=64, help="the data-parallel default")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup-steps", type=int, default=100)
    ap.add_argument("--out", default="runs/bench/compression_profile.json")
    args = ap.parse_args()
    report: Dict[str, Any] = {"hardware": "CPU, one thread per worker", "settings": vars(args),
                              "defaults": dict(DEFAULTS), "models": {}}
    for name in args.models.split(","):
        settings = {"model": name, "global_batch": args.global_batch, "rounds": args.rounds, "steps": args.steps,
                    "warmup_steps": args.warmup_steps}
        res = run_local_workers(_worker, nproc=args.workers, args=(settings,), timeout_s=3600)
        med = {c: statistics.mean(r["median_step_s"][c] for r in res) for c in CONFIGS}
        parts = {k: statistics.mean(r["parts_s_per_step"].get(k, 0.0) for r in res) for k in res[0]["parts_s_per_step"]}
        cpu = {c: statistics.mean(r["mean_step_cpu_s"][c] for r in res) for c in CONFIGS}
        report["models"][name] = {"median_step_ms": {c: 1e3 * v for c, v in med.items()},
                                  "parts_ms_per_step": {k: 1e3 * v for k, v in parts.items()},
                                  "mean_step_cpu_ms": {c: 1e3 * v for c, v in cpu.items()},
                                  "cpu_vgc_over_plain": cpu["vgc"] / cpu["plain"],
                                  "cpu_stats_over_plain": cpu["stats"] / cpu["plain"],
                                  "vgc_over_plain": med["vgc"] / med["plain"],
                                  "stats_over_plain": med["stats"] / med["plain"]}
        report["models"][name]["vgc_exact_over_plain"] = med["vgc_exact"] / med["plain"]
        print(f"{name}: plain {1e3 * med['plain']:.2f} ms, stats {1e3 * med['stats']:.2f} ms "
              f"({med['stats'] / med['plain']:.2f}x), vgc {1e3 * med['vgc']:.2f} ms "
              f"({med['vgc'] / med['plain']:.2f}x), "
              f"vgc with the exact gather {1e3 * med['vgc_exact']:.2f} ms ({med['vgc_exact'] / med['plain']:.2f}x); "
              f"CPU time per step: stats {cpu['stats'] / cpu['plain']:.2f}x, vgc {cpu['vgc'] / cpu['plain']:.2f}x; "
              "parts of the vgc steps:")
        for k, v in sorted(parts.items(), key=lambda kv: -kv[1]):
            print(f"    {k:40s} {1e3 * v:7.3f} ms per step")
    write_json(report, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
