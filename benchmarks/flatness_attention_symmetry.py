"""How far normalized sharpness moves along attention's symmetries, and what the balanced form costs.

A small attention classifier (a Linear embedding, one self-attention block, mean pooling, a Linear head;
``nn.MultiheadAttention`` or a hand-written block with four Linear projections), random weights, float64.
For ``--seeds`` random per-head transforms (``transform_attention``, condition number ``--condition``) it
reports the largest relative change of: plain normalized sharpness (attention projections outside
``nn.Linear`` not covered), the same matrices as the balanced measure but unbalanced (``balance=False``),
and the balanced normalized sharpness; and the time of the balanced measure over plain normalized sharpness
(one thread, medians of interleaved repeats).

Usage:
    python benchmarks/flatness_attention_symmetry.py [--seeds 10] [--condition 10] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Any, Callable, Dict, List

import torch
from torch import nn

from sturdy.flatness import (
    balanced_normalized_sharpness,
    linear_heads,
    normalized_sharpness,
    register_attention,
    transform_attention,
)


class HandWritten(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (self.q(x), self.k(x), self.v(x)))
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
        return self.o((att @ v).transpose(1, 2).reshape(b, t, d))


register_attention(HandWritten)(lambda m: linear_heads(m.q, m.k, m.v, m.o, m.heads))


class Classifier(nn.Module):
    def __init__(self, kind: str, dim: int, heads: int, classes: int) -> None:
        super().__init__()
        self.kind = kind
        self.embed = nn.Linear(3, dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True) if kind == "torch" else \
            HandWritten(dim, heads)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.embed(x))
        a = self.attention(h, h, h)[0] if self.kind == "torch" else self.attention(h)
        return self.head((h + a).mean(1))


def _plain(model: nn.Module, data: Any) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # in_proj_weight is listed as skipped
        return normalized_sharpness(model, data).value


def _median_time(fns: Dict[str, Callable[[], Any]], repeats: int) -> Dict[str, float]:
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--condition", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--samples", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for kind in ("torch", "hand-written"):
        torch.manual_seed(0)
        model = Classifier(kind, dim=16, heads=4, classes=5).double().eval()
        data = (torch.randn(args.samples, 6, 3, dtype=torch.float64), torch.randint(0, 5, (args.samples,)))
        base = {"plain": _plain(model, data),
                "unbalanced": balanced_normalized_sharpness(model, data, balance=False).value,
                "balanced": balanced_normalized_sharpness(model, data).value}
        worst = dict.fromkeys(base, 0.0)
        for seed in range(1, args.seeds + 1):
            moved = transform_attention(model, seed=seed, condition=args.condition)
            now = {"plain": _plain(moved, data),
                   "unbalanced": balanced_normalized_sharpness(moved, data, balance=False).value,
                   "balanced": balanced_normalized_sharpness(moved, data).value}
            for key in base:
                worst[key] = max(worst[key], abs(now[key] - base[key]) / base[key])
        times = _median_time({"plain": lambda m=model, d=data: _plain(m, d),
                              "balanced": lambda m=model, d=data: balanced_normalized_sharpness(m, d)}, args.repeats)
        print(f"{kind:13s} largest relative change over {args.seeds} transforms: plain NS {worst['plain']:.3g}, "
              f"unbalanced {worst['unbalanced']:.3g}, balanced {worst['balanced']:.2g};  time balanced / plain "
              f"{times['balanced'] / times['plain']:.2f}", flush=True)


if __name__ == "__main__":
    main()
