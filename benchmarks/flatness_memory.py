"""Peak extra memory and time of the exact GGN diagonal on WRN-16-4 at 32x32 (CPU), against its memory budget.

The GGN methods bound the live tensor memory they add by ``memory_budget`` (forward graph of one chunk
of samples plus one block of output gradients) + 16 MiB (one chunk of per-sample tensors of a rule) +
the accumulators (the parameters' size), whatever the number of samples. One budget per process, so that
each peak is its own; two figures per run, both above the level just before the call:

* live heap: bytes glibc's ``malloc`` has handed out and not taken back (``mallinfo2``: ``uordblks`` +
  ``hblkhd``), sampled every 0.5 ms by a thread: the memory the computation holds;
* resident set: the process's high-water mark (``ru_maxrss``), which adds memory ``free`` kept for
  reuse and the libraries' one-time start-up (thread pools, kernel caches).

``--allocators`` runs each budget with glibc's default (its mmap threshold grows with freed blocks, so
large freed buffers stay resident) and with ``MALLOC_MMAP_THRESHOLD_=131072`` (large buffers go back to
the system at once). Random inputs and an untrained network: memory and time do not depend on the weights.

    python benchmarks/flatness_memory.py --samples 1000 --out runs/bench/flatness_memory.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

ALLOCATORS = {"default": {}, "mmap-threshold-128k": {"MALLOC_MMAP_THRESHOLD_": "131072"}}


class _MallInfo2(ctypes.Structure):
    _fields_ = [(f, ctypes.c_size_t) for f in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _heap_probe():
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2

    def live_mib() -> float:
        info = libc.mallinfo2()
        return (info.uordblks + info.hblkhd) / 2**20

    return live_mib


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _one(budget_mib: int, samples: int, threads: int) -> dict:
    import torch

    from sturdy.flatness import hessian_diagonal
    from sturdy.models import create_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_model("wrn", in_shape=(3, 32, 32), num_classes=10, depth=16, widen=4).eval()
    x = torch.rand(samples, 3, 32, 32)
    y = torch.randint(0, 10, (samples,))
    live_mib = _heap_probe()
    rss_before, live_before = _rss_mib(), live_mib()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 <= rss_before + 64  # no earlier, higher peak
    live_peak, stop = [live_before], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            live_peak[0] = max(live_peak[0], live_mib())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    hd = hessian_diagonal(model, (x, y), method="ggn-exact", memory_budget=budget_mib * 2**20, progress=False)
    seconds = time.perf_counter() - t0
    stop.set()
    sampler.join()
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = sum(p.numel() for p in model.parameters())
    return {"memory_budget_mib": budget_mib, "samples": samples, "seconds": seconds,
            "live_heap_peak_extra_mib": live_peak[0] - live_before, "rss_peak_extra_mib": rss_peak - rss_before,
            "parameters": params, "parameter_mib": params * 4 / 2**20,
            "bound_mib": budget_mib + 16 + params * 4 / 2**20, "trace": hd.trace(), "is_hessian": hd.is_hessian}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--budgets", default="128,512", help="memory budgets in MiB, comma-separated")
    parser.add_argument("--allocators", default=",".join(ALLOCATORS), help=f"comma-separated: {', '.join(ALLOCATORS)}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/bench/flatness_memory.json")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(_one(args.child, args.samples, args.threads)))
        return
    rows = []
    for allocator in args.allocators.split(","):
        for budget in (int(b) for b in args.budgets.split(",")):
            env = {**os.environ, **ALLOCATORS[allocator]}
            out = subprocess.run([sys.executable, __file__, "--child", str(budget), "--samples", str(args.samples),
                                  "--threads", str(args.threads)], check=True, capture_output=True, text=True, env=env)
            row = {"allocator": allocator, **json.loads(out.stdout.strip().splitlines()[-1])}
            rows.append(row)
            print(f"WRN-16-4, {row['samples']} samples, budget {budget} MiB, {allocator} allocator: "
                  f"peak extra live heap {row['live_heap_peak_extra_mib']:.0f} MiB, "
                  f"resident {row['rss_peak_extra_mib']:.0f} MiB "
                  f"(bound {row['bound_mib']:.0f} MiB), {row['seconds']:.0f} s", flush=True)
    from sturdy.experiments.jsonio import write_json  # here: the measured children import nothing of it

    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json({"benchmark": "flatness_memory", "threads": args.threads, "rows": rows}, path)


if __name__ == "__main__":
    main()
