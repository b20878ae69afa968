"""Step times of plain DDP and variance-based compression under a throttled link, against the cost model.

Linux only, needs ``unshare`` and ``tc`` (iproute2) with the ``tbf`` queueing discipline. The script
re-runs itself in a private network namespace (``unshare --net``; ``--user --map-root-user`` as well
when not root), whose loopback interface belongs to nothing else; the host's interfaces are never
touched. There the loopback MTU is set to 1500 bytes and ``tc ... tbf`` limits it to each rate in turn.
Every byte between the local workers crosses that one shaped queue, so ``P`` workers share the rate:
the prediction uses the cost model (:mod:`sturdy.compression.costmodel`, latency 0) with ``rate / P``
per worker, the measured unthrottled step time of plain DDP as compute, the extra unthrottled time of
the compressed step as codec time, and the compression ratio measured in the same window.

The compressed model first trains ``--warmup-steps`` unthrottled steps, so that its traffic is past the
start-up phase (DESIGN section 4); then, for each rate, both methods run ``--steps`` steps in interleaved
rounds.

    python benchmarks/compression_throttled_link.py --workers 2 --rates-mbit 10,30,100,300,1000
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from sturdy.compression import create_compression
from sturdy.compression.costmodel import predict_step_times
from sturdy.data import load_dataset
from sturdy.distributed import run_local_workers
from sturdy.experiments.jsonio import write_json
from sturdy.models import create_model

INSIDE_FLAG = "--inside-namespace"
MTU = 1500


def _tc(*args: str) -> None:
    subprocess.run(["tc", *args], check=True, capture_output=True, text=True)


def shape_loopback(rate_mbit: Optional[float]) -> None:
    """Limit ``lo`` to ``rate_mbit`` (token bucket; ``None``: no limit). Only inside the private namespace."""
    subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], capture_output=True)
    if rate_mbit is None:
        return
    rate_bytes = rate_mbit * 1e6 / 8
    burst = max(4 * MTU, int(rate_bytes / 10000))  # 0.1 ms of traffic, at least a few packets
    limit = max(256 * 1024, int(rate_bytes / 2))  # half a second of queue
    _tc("qdisc", "add", "dev", "lo", "root", "tbf", "rate", f"{rate_mbit}mbit", "burst", str(burst),
        "limit", str(limit))


def _build(method: str, model_name: str, alpha: float):
    torch.manual_seed(0)
    train = load_dataset("digits")
    model = create_model(model_name, in_shape=train.image_shape, num_classes=train.num_classes)
    state = hook = None
    if method == "vgc":
        state, hook = create_compression("vgc", model=model, alpha=alpha, gather="exact")
    ddp = nn.parallel.DistributedDataParallel(model)
    if hook is not None:
        ddp.register_comm_hook(state, hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return ddp, opt, train, state


def _worker(rank: int, world: int, settings: Dict[str, Any]) -> Any:
    import torch.distributed as dist

    torch.set_num_threads(1)
    batch = settings["global_batch"] // world
    built = {m: _build(m, settings["model"], settings["alpha"]) for m in ("none", "vgc")}
    g = torch.Generator().manual_seed(rank)

    def step(method: str) -> float:
        ddp, opt, train, _ = built[method]
        idx = torch.randint(0, len(train), (batch,), generator=g)
        dist.barrier()
        t0 = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(ddp(train.images[idx]), train.labels[idx]).backward()
        opt.step()
        return time.perf_counter() - t0

    for _ in range(settings["warmup_steps"]):
        step("vgc")
    for _ in range(20):
        step("none")
    results = []
    for rate in [None] + settings["rates_mbit"]:
        if rank == 0:
            shape_loopback(rate)
        dist.barrier()
        times: Dict[str, List[float]] = {"none": [], "vgc": []}
        vgc_state = built["vgc"][3]
        before = vgc_state.statistics()
        rounds = 3
        for _ in range(rounds):
            for method in ("none", "vgc"):
                times[method] += [step(method) for _ in range(max(1, settings["steps"] // rounds))]
        after = vgc_state.statistics()
        ratio = (after.dense_bytes - before.dense_bytes) / max(1, after.wire_bytes - before.wire_bytes)
        results.append({"rate_mbit": rate, "median_step_s": {m: statistics.median(t) for m, t in times.items()},
                        "vgc_compression_ratio": ratio})
    if rank == 0:
        shape_loopback(None)
    return results if rank == 0 else None


def predict(rows: List[Dict[str, Any]], *, workers: int, dense_bytes: int) -> None:
    """Add the cost model's predictions to the measured ``rows`` (in place)."""
    base = rows[0]["median_step_s"]
    for row in rows[1:]:
        pred = predict_step_times(
            compute_s=base["none"], dense_bytes=dense_bytes, compression_ratio=row["vgc_compression_ratio"],
            workers=[workers], bandwidths_gbps=[row["rate_mbit"] / 1000 / workers], latency_s=0.0,
            codec_s=max(0.0, base["vgc"] - base["none"]),
        )[0]
        row["predicted_step_s"] = {"none": pred.dense_step_s, "vgc": pred.compressed_step_s}
        row["measured_speedup"] = row["median_step_s"]["none"] / row["median_step_s"]["vgc"]
        row["predicted_speedup"] = pred.speedup


def _reexec_in_namespace() -> int:
    missing = [tool for tool in ("unshare", "tc", "ip") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"this benchmark needs {', '.join(missing)} (util-linux, iproute2) on Linux")
    flags = ["--net"] if os.geteuid() == 0 else ["--user", "--map-root-user", "--net"]
    cmd = ["unshare", *flags, sys.executable, os.path.abspath(__file__), INSIDE_FLAG, *sys.argv[1:]]
    return subprocess.call(cmd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--global-batch", type=int, default=64)
    ap.add_argument("--alpha", type=float, default=4.0)
    ap.add_argument("--rates-mbit", default="10,30,100,300,1000")
    ap.add_argument("--warmup-steps", type=int, default=400, help="unthrottled compressed steps before measuring")
    ap.add_argument("--steps", type=int, default=30, help="measured steps per method and rate")
    ap.add_argument("--out", default="runs/bench/compression_throttled_link.json")
    ap.add_argument(INSIDE_FLAG, action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not getattr(args, INSIDE_FLAG[2:].replace("-", "_")):
        raise SystemExit(_reexec_in_namespace())
    if args.global_batch % args.workers:
        raise SystemExit(f"--global-batch {args.global_batch} is not divisible by {args.workers} workers")
    try:
        subprocess.run(["ip", "link", "set", "lo", "up", "mtu", str(MTU)], check=True, capture_output=True, text=True)
        shape_loopback(1000.0)
        shape_loopback(None)
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"cannot set up the shaped loopback here ({' '.join(exc.cmd)}: {exc.stderr.strip()}); "
                         "the kernel needs network namespaces and the tbf queueing discipline") from None
    torch.set_num_threads(1)
    settings = {"model": args.model, "global_batch": args.global_batch, "alpha": args.alpha,
                "rates_mbit": [float(r) for r in args.rates_mbit.split(",")], "warmup_steps": args.warmup_steps,
                "steps": args.steps}
    rows = run_local_workers(_worker, nproc=args.workers, args=(settings,), timeout_s=3 * 3600)[0]
    train = load_dataset("digits")
    model = create_model(args.model, in_shape=train.image_shape, num_classes=train.num_classes)
    dense_bytes = 4 * sum(p.numel() for p in model.parameters())
    predict(rows, workers=args.workers, dense_bytes=dense_bytes)
    report = {"hardware": "CPU, loopback shaped by tc tbf in a private network namespace",
              "settings": {**settings, "workers": args.workers, "dense_bytes": dense_bytes}, "rows": rows}
    out = Path(args.out)
    write_json(report, out)
    print(f"{args.workers} workers, model {args.model}, global batch {args.global_batch}, vgc alpha {args.alpha}")
    print("rate Mbit/s | plain ms meas / pred | vgc ms meas / pred | vgc ratio | speedup meas / pred")
    base = rows[0]
    print(f"  unlimited | {1e3 * base['median_step_s']['none']:7.2f}         | "
          f"{1e3 * base['median_step_s']['vgc']:7.2f}       | {base['vgc_compression_ratio']:6.1f}x |")
    for row in rows[1:]:
        m, p = row["median_step_s"], row["predicted_step_s"]
        print(f"{row['rate_mbit']:11.0f} | {1e3 * m['none']:7.2f} / {1e3 * p['none']:7.2f} | "
              f"{1e3 * m['vgc']:7.2f} / {1e3 * p['vgc']:7.2f} | {row['vgc_compression_ratio']:6.1f}x | "
              f"{row['measured_speedup']:5.2f} / {row['predicted_speedup']:5.2f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
