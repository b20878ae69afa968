"""Per-bucket CPU time of the variance hook's selection + encoding and decoding: numpy, numba and torch paths.

The three paths (the numpy reference, the numba kernels, and the torch operations of
:mod:`sturdy.compression.device_codec` that CUDA buckets take, forced here on the CPU) run in the
same process on the same buckets, interleaved; they give bit-identical results (checked here too).
Buckets are laid out like the digits MLP (26,122 elements, 6 parameter segments) and CNN (53,002
elements, 8 segments); residuals are heavy-tailed and the variances are drawn so that
about ``--sent-percent`` of the elements pass ``r^2 > alpha v`` (alpha 4).

    python benchmarks/compression_kernels.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager
from statistics import NormalDist
from unittest import mock

import numpy as np
import torch

from sturdy.compression import accel, codec, device_codec
from sturdy.compression.compressor import variance_select, warm_up

LAYOUTS = {  # parameter sizes of the digits models, in bucket order
    "mlp": [64 * 128, 128, 128 * 128, 128, 128 * 10, 10],
    "cnn": [32 * 9, 32, 64 * 32 * 9, 64, 256 * 128, 128, 128 * 10, 10],
}
ALPHA = 4.0


PATHS = ("numpy", "numba", "torch")


@contextmanager
def _path(name):
    kernels = accel.kernels()
    with mock.patch.object(accel, "kernels", (lambda: kernels) if name == "numba" else (lambda: None)), \
            device_codec.forced(name == "torch"):
        yield


def _bucket(sizes, sent_fraction, seed):
    gen = np.random.default_rng(seed)
    n = sum(sizes)
    r = (gen.standard_normal(n) * 10.0 ** gen.uniform(-3, 0, n)).astype(np.float32)
    # v = r^2 * lognormal(mu, 1) with P(v < r^2 / alpha) = sent_fraction
    mu = np.log(1 / ALPHA) - NormalDist().inv_cdf(sent_fraction)
    v = (r * r * np.exp(gen.normal(mu, 1.0, n))).astype(np.float32)
    return r, v, torch.tensor(np.cumsum([0, *sizes]))


def _time_path(name, buckets, reps):
    select_s, decode_s, outputs = [], [], []
    with _path(name):
        for i in range(reps):
            r, v, boundaries = buckets[i % len(buckets)]
            rt, vt = torch.from_numpy(r.copy()), torch.from_numpy(v.copy())
            t0 = time.perf_counter()
            sel = variance_select(rt, vt, alpha=ALPHA, zeta=0.999, quantize="4bit", boundaries=boundaries)
            t1 = time.perf_counter()
            out = torch.zeros(r.size)
            t2 = time.perf_counter()
            codec.decode_add_(out, sel.payload, boundaries=boundaries)
            t3 = time.perf_counter()
            select_s.append(t1 - t0)
            decode_s.append(t3 - t2)
            if i < len(buckets):
                outputs.append((sel.payload, sel.indices, rt, vt, out))
    return statistics.median(select_s), statistics.median(decode_s), outputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sent-percent", type=float, default=1.5)
    ap.add_argument("--reps", type=int, default=400, help="timed buckets per path and round")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if not warm_up():
        raise SystemExit("numba is not installed: pip install -e '.[fast]'")
    for model, sizes in LAYOUTS.items():
        buckets = [_bucket(sizes, args.sent_percent / 100, seed) for seed in range(10)]
        reference = _time_path("numpy", buckets, len(buckets))[2]
        times = {name: [] for name in PATHS}
        for _ in range(args.rounds):
            for name in PATHS:
                sel_s, dec_s, outputs = _time_path(name, buckets, args.reps)
                times[name].append((sel_s, dec_s))
                for got, want in zip(outputs, reference):
                    assert all(torch.equal(a, b) for a, b in zip(got, want)), f"{name} disagrees with numpy"
        sel = {c: statistics.median(t[0] for t in times[c]) * 1e6 for c in times}
        dec = {c: statistics.median(t[1] for t in times[c]) * 1e6 for c in times}
        sent = int(np.mean([indices.numel() for _, indices, *_ in reference]))
        print(f"{model}: {sum(sizes)} elements, {sent} sent | select+encode us "
              + ", ".join(f"{c} {sel[c]:.0f}" for c in PATHS)
              + " | decode+add us " + ", ".join(f"{c} {dec[c]:.0f}" for c in PATHS)
              + " | identical results")


if __name__ == "__main__":
    main()
