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
import warnings
from typing import Any, Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from sturdy.compression import (
    CompressionLagWarning,
    VarianceCompressionState,
    attach_squared_gradient_statistics,
    variance_hook,
)
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
# name -> VarianceCompressionState settings ("momentum": True takes over the SGD momentum); None: plain DDP
METHODS: Dict[str, Any] = {
    "none": None,
    "vgc a=5": {"alpha": 5.0, "quantize": "4bit"},
    "f32 a=5": {"alpha": 5.0, "quantize": None},
    "vgc a=1": {"alpha": 1.0, "quantize": "4bit"},
    "mc a=5": {"alpha": 5.0, "quantize": "4bit", "momentum": True},
    "mc nomask a=5": {"alpha": 5.0, "quantize": "4bit", "momentum": True, "momentum_masking": False},
    "warm a=5": {"alpha": 5.0, "quantize": "4bit", "warmup_epochs": 4},
    "mc warm a=5": {"alpha": 5.0, "quantize": "4bit", "momentum": True, "warmup_epochs": 4},
    "unsent a=5": {"alpha": 5.0, "quantize": "4bit", "feedback": "unsent"},
    "mc unsent a=5": {"alpha": 5.0, "quantize": "4bit", "momentum": True, "feedback": "unsent"},
    "unsent warm a=5": {"alpha": 5.0, "quantize": "4bit", "warmup_epochs": 4, "feedback": "unsent"},
    "mc a=25": {"alpha": 25.0, "quantize": "4bit", "momentum": True},
    "mc a=100": {"alpha": 100.0, "quantize": "4bit", "momentum": True},
    "mc a=500": {"alpha": 500.0, "quantize": "4bit", "momentum": True},
}
MOMENTUM = 0.9


def _state(model: nn.Module, method: Dict[str, Any], *, sgd: bool, steps_per_epoch: int) -> VarianceCompressionState:
    return VarianceCompressionState(
        statistics=attach_squared_gradient_statistics(model), alpha=method["alpha"], quantize=method["quantize"],
        momentum=MOMENTUM if method.get("momentum") and sgd else 0.0,
        momentum_masking=method.get("momentum_masking", True),
        warmup_steps=int(method.get("warmup_epochs", 0) * steps_per_epoch), feedback=method.get("feedback", "all"))


def _worker(rank: int, world: int, jobs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    torch.set_num_threads(1)
    train, test = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    out = []
    for job in jobs:
        torch.manual_seed(job["seed"])
        model = MODELS[job["model"]]()
        method = METHODS[job["method"]]
        b = job["batch"]
        steps_per_epoch = (train.images.shape[0] // world) // b
        state = None if method is None else _state(model, method, sgd=job["opt"] == "sgd",
                                                   steps_per_epoch=steps_per_epoch)
        ddp = nn.parallel.DistributedDataParallel(model)
        if state is not None:
            ddp.register_comm_hook(state, variance_hook)
        opt: torch.optim.Optimizer
        if job["opt"] == "adam":
            opt = torch.optim.Adam(model.parameters(), lr=job["lr"])
        else:  # momentum correction applies the momentum in the hook
            opt = torch.optim.SGD(model.parameters(), lr=job["lr"],
                                  momentum=0.0 if state is not None and state.momentum else MOMENTUM)
        g = torch.Generator().manual_seed(job["seed"])
        losses = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", CompressionLagWarning)
            for _ in range(job["epochs"]):
                mine = torch.randperm(train.images.shape[0], generator=g)[rank::world]
                total = torch.zeros(())
                for i in range(0, len(mine) - b + 1, b):
                    idx = mine[i:i + b]
                    opt.zero_grad()
                    loss = F.cross_entropy(ddp(train.images[idx]), train.labels[idx])
                    loss.backward()
                    total += loss.detach()
                    if state is not None:
                        state.observe_loss(loss.detach())
                    opt.step()
                losses.append(float(total) / steps_per_epoch)
        with torch.no_grad():
            acc = float((model(test.images).argmax(1) == test.labels).float().mean())
        row = dict(job, accuracy=acc, train_loss=losses)
        if state is not None:
            row["compression_ratio"] = state.statistics().compression_ratio
            row["residual_lag"] = state.lag_report().residual_lag
            row["warnings"] = [str(w.message)[:60] for w in caught if issubclass(w.category, CompressionLagWarning)]
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tokens,rowbin,tokmlp,mlp")
    ap.add_argument("--methods", default="none,vgc a=5,f32 a=5,vgc a=1")
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
            extra = (f"  {row['compression_ratio']:.1f}x  lag {row['residual_lag']:.1f}  "
                     f"warned {'yes' if row['warnings'] else 'no'}")
        curve = " ".join(f"{x:.2f}" for x in row["train_loss"])
        print(f"{row['model']:8s} {row['method']:14s} seed {row['seed']}: {100 * row['accuracy']:.1f}%{extra}  "
              f"loss {curve}", flush=True)
    write_json({"rows": rows, "seconds": time.perf_counter() - start, "args": vars(args)}, args.out)


if __name__ == "__main__":
    main()
