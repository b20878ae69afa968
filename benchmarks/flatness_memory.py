"""Peak extra memory and time of the exact GGN diagonal on WRN-16-4 at 32x32 (CPU), against its memory budget.

The GGN methods bound their peak extra memory by ``memory_budget`` (forward graph of one chunk of
samples plus one block of output gradients) + 16 MiB (one chunk of per-sample tensors of a rule) + the
accumulators (the parameters' size), whatever the number of samples. This script measures the peak
resident memory above the level before the call (``ru_maxrss`` against ``/proc/self/statm``), one budget
per process so that each peak is its own. Random inputs and an untrained network: memory and time do
not depend on the weights.

    python benchmarks/flatness_memory.py --samples 1000 --out runs/bench/flatness_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


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
    before = _rss_mib()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 <= before + 64  # no earlier, higher peak
    t0 = time.perf_counter()
    hd = hessian_diagonal(model, (x, y), method="ggn-exact", memory_budget=budget_mib * 2**20)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = sum(p.numel() for p in model.parameters())
    return {"memory_budget_mib": budget_mib, "samples": samples, "seconds": seconds,
            "peak_extra_mib": peak - before, "parameters": params, "parameter_mib": params * 4 / 2**20,
            "trace": hd.trace(), "is_hessian": hd.is_hessian}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--budgets", default="128,512", help="memory budgets in MiB, comma-separated")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/bench/flatness_memory.json")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(_one(args.child, args.samples, args.threads)))
        return
    rows = []
    for budget in (int(b) for b in args.budgets.split(",")):
        out = subprocess.run([sys.executable, __file__, "--child", str(budget), "--samples", str(args.samples),
                              "--threads", str(args.threads)], check=True, capture_output=True, text=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"WRN-16-4, {row['samples']} samples, budget {budget} MiB: peak extra {row['peak_extra_mib']:.0f} MiB "
              f"(bound {budget + 16 + row['parameter_mib']:.0f} MiB), {row['seconds']:.0f} s", flush=True)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": "flatness_memory", "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
