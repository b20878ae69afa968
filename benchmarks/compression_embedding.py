"""Variance compression on Embedding + LayerNorm models in a user's own 2-process DDP loop (digits).

Each job trains one model in a plain loop of its own (2 gloo workers, data split by rank, batch 32 per
worker, SGD momentum 0.9 lr 0.05 or Adam, seed 0) with ``variance_hook`` and reports test accuracy, the
compression ratio and the lag monitor's residual lag (:mod:`sturdy.compression.lag`), beside the same loop
with plain DDP.

    python benchmarks/compression_embedding.py --models tokens,rowbin,tokmlp,mlp --epochs 12

Models: ``tokens`` (64 pixel tokens of 17 levels, a positional embedding called with broadcast indices,
LayerNorm, a Linear head on the flattened tokens), ``rowbin`` (8 row tokens, each row's binarised pixels a
256-row table, positional embedding, LayerNorm, Linear head), ``tokmlp`` (the pixel tokens, LayerNorm, a
per-token Linear + ReLU, mean over tokens, LayerNorm, head: a model that starts on a plateau), ``mlp``.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from sturdy.compression import VarianceCompressionState, attach_squared_gradient_statistics, variance_hook
from sturdy.data import load_dataset
from sturdy.distributed import run_local_workers
from sturdy.experiments.jsonio import write_json

LEVELS = 17  # digits pixels take the values 0..16


def _pixel_ids(x: torch.Tensor) -> torch.Tensor:
    return (x.flatten(1) * (LEVELS - 1)).round().long()


class Tokens(nn.Module):
    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.tok, self.pos, self.norm = nn.Embedding(LEVELS, dim), nn.Embedding(64, dim), nn.LayerNorm(dim)
        self.head = nn.Linear(64 * dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = _pixel_ids(x)
        h = self.norm(self.tok(ids) + self.pos(torch.arange(ids.shape[1]))[None])
        return self.head(h.flatten(1))


class RowBin(nn.Module):
    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.tok, self.pos, self.norm = nn.Embedding(256, dim), nn.Embedding(8, dim), nn.LayerNorm(dim)
        self.head = nn.Linear(8 * dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = ((x[:, 0] > 0.5).long() * (2 ** torch.arange(8))).sum(-1)
        h = self.norm(self.tok(ids) + self.pos(torch.arange(8))[None])
        return self.head(h.flatten(1))


class TokMLP(nn.Module):
    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.tok, self.pos, self.norm = nn.Embedding(LEVELS, dim), nn.Embedding(64, dim), nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU())
        self.norm2, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = _pixel_ids(x)
        h = self.norm(self.tok(ids) + self.pos(torch.arange(ids.shape[1]))[None])
        return self.head(self.norm2(self.mlp(h).mean(1)))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                         nn.Linear(128, 10))


MODELS = {"tokens": Tokens, "rowbin": RowBin, "tokmlp": TokMLP, "mlp": _mlp}
# name -> (alpha, quantize); None: plain DDP
METHODS: Dict[str, Any] = {"none": None, "vgc a=5": (5.0, "4bit"), "f32 a=5": (5.0, None),
                           "vgc a=1": (1.0, "4bit")}


def _worker(rank: int, world: int, jobs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    torch.set_num_threads(1)
    train, test = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    out = []
    for job in jobs:
        torch.manual_seed(job["seed"])
        model = MODELS[job["model"]]()
        method = METHODS[job["method"]]
        state = None
        if method is not None:
            state = VarianceCompressionState(statistics=attach_squared_gradient_statistics(model), alpha=method[0],
                                             quantize=method[1])
        ddp = nn.parallel.DistributedDataParallel(model)
        if state is not None:
            ddp.register_comm_hook(state, variance_hook)
        opt: torch.optim.Optimizer
        if job["opt"] == "adam":
            opt = torch.optim.Adam(model.parameters(), lr=job["lr"])
        else:
            opt = torch.optim.SGD(model.parameters(), lr=job["lr"], momentum=0.9)
        g = torch.Generator().manual_seed(job["seed"])
        b = job["batch"]
        for _ in range(job["epochs"]):
            mine = torch.randperm(train.images.shape[0], generator=g)[rank::world]
            for i in range(0, len(mine) - b + 1, b):
                idx = mine[i:i + b]
                opt.zero_grad()
                F.cross_entropy(ddp(train.images[idx]), train.labels[idx]).backward()
                opt.step()
        with torch.no_grad():
            acc = float((model(test.images).argmax(1) == test.labels).float().mean())
        row = dict(job, accuracy=acc)
        if state is not None:
            row["compression_ratio"] = state.statistics().compression_ratio
            row["residual_lag"] = state.lag_report().residual_lag
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tokens,rowbin,tokmlp,mlp")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--opt", choices=("sgd", "adam"), default="sgd")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--batch", type=int, default=32, help="per worker")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--out", default="runs/bench/compression_embedding.json")
    args = ap.parse_args()
    jobs = [dict(model=m, method=k, seed=int(s), epochs=args.epochs, opt=args.opt, lr=args.lr, batch=args.batch)
            for m in args.models.split(",") for k in args.methods.split(",") for s in args.seeds.split(",")]
    start = time.perf_counter()
    rows = run_local_workers(_worker, nproc=2, args=(jobs,), timeout_s=6 * 3600.0)[0]
    for row in rows:
        extra = ""
        if "compression_ratio" in row:
            extra = f"  {row['compression_ratio']:.1f}x  lag {row['residual_lag']:.1f}"
        print(f"{row['model']:8s} {row['method']:8s} seed {row['seed']}: {100 * row['accuracy']:.1f}%{extra}")
    write_json({"rows": rows, "seconds": time.perf_counter() - start, "args": vars(args)}, args.out)


if __name__ == "__main__":
    main()
