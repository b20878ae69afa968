"""Steps per second of ``sturdy.training.train`` against a plain hand-written PyTorch loop, and the digits CNN epoch.

Both loops train the same model (the digits ``cnn``, 32-64 channels) from the same initial weights on the same
data (digits, 1300 training images), batch 64, Adam lr 1e-3 with the same per-step cosine schedule, in the same
order: each epoch's permutation is ``torch.randperm`` of a generator seeded with ``seed * 100003 + epoch`` (the
order ``train`` uses), so both end with bit-identical weights (checked, ``identical_weights``). The hand loop does
nothing else: no metrics, no checks, no host reads. Two data paths:

* ``in_memory``: an :class:`~sturdy.data.ImageDataset` (``train`` indexes its tensors; the hand loop too);
* ``streamed``: a plain map-style ``Dataset`` of ``(image, label)`` pairs through a ``DataLoader`` (no worker
  processes; ``train`` builds one per epoch, so does the hand loop).

Each timing is one whole call (set-up included) of ``--epochs`` epochs; the two loops alternate (which goes first
alternates too) after ``--warmup`` pairs, and the ratio of the median steps per second is reported
(``train / hand``, target >= 0.97).

``ops_per_step``: tensor operations (ATen calls) per step of each loop on the in-memory data, the overhead of
``train`` in a unit the machine's load does not change.

``digits_cnn_epoch``: seconds per epoch of the digits CNN with a test-set evaluation per epoch (what
``sturdy train --dataset digits --model cnn`` runs), this version against the loop before the training core was
rewritten (``--before``, a git revision whose ``src/sturdy/training.py`` is loaded; skipped when git cannot read
it), alternated the same way (target: within 5%).

One torch thread on the CPU. ``--clock thread`` times the CPU time of that thread instead of the wall time (the loops
run in it: one torch thread, no loader workers), which a machine busy with other processes disturbs far less.

Usage:
    python benchmarks/training_loop.py --out runs/bench/training_loop.json
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sturdy.data import load_dataset
from sturdy.experiments.jsonio import write_json
from sturdy.models import create_model
from sturdy.training import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
SEED_STRIDE = 100_003  # the order of ``train``: epoch e of seed s permutes with seed s * stride + e
LOOP_TARGET = 0.97
EPOCH_TARGET = 1.05


class Pairs(Dataset):
    """A plain map-style data set of ``(image, label)`` pairs."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self._images, self._labels = images, labels  # no ``images`` attribute: streamed, never indexed whole

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, i: int):
        return self._images[i], self._labels[i]


def _cosine(total: int) -> Callable[[int], float]:
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def hand_loop(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, epochs: int, batch: int, lr: float,
              seed: int, streamed: bool) -> None:
    """The plain PyTorch loop (see the module doc)."""
    n = len(labels)
    steps = math.ceil(n / batch)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _cosine(epochs * steps))
    data = Pairs(images, labels)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * SEED_STRIDE + epoch))
        if streamed:
            batches = DataLoader(data, batch_size=batch, sampler=order.tolist())
        else:
            batches = ((images[idx], labels[idx]) for idx in order.split(batch))
        for x, y in batches:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


def _alternate(fns: Dict[str, Callable[[], Any]], *, warmup: int, repeats: int,
               clock: Callable[[], float] = time.perf_counter) -> Dict[str, List[float]]:
    """Seconds of each function per repeat, the order of the functions reversed every other repeat."""
    times: Dict[str, List[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(warmup + repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = clock()
            fns[name]()
            if r >= warmup:
                times[name].append(clock() - t0)
    return times


def loop_ratio(data: Any, init: nn.Module, *, streamed: bool, args: argparse.Namespace) -> Dict[str, Any]:
    """``train`` against the hand loop on one data path."""
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch, lr=1e-3, optimizer="adam", schedule="cosine",
                         seed=args.seed, device="cpu")
    train_data = Pairs(data.images, data.labels) if streamed else data
    models: Dict[str, nn.Module] = {}

    def run_train() -> None:
        models["train"] = copy.deepcopy(init)
        train(models["train"], train_data, config=config, progress=False)

    def run_hand() -> None:
        models["hand"] = copy.deepcopy(init)
        hand_loop(models["hand"], data.images, data.labels, epochs=args.epochs, batch=args.batch, lr=1e-3,
                  seed=args.seed, streamed=streamed)

    times = _alternate({"hand": run_hand, "train": run_train}, warmup=args.warmup, repeats=args.repeats,
                       clock=CLOCKS[args.clock])
    steps = args.epochs * math.ceil(len(data) / args.batch)
    rate = {k: steps / statistics.median(v) for k, v in times.items()}
    pair_ratios = [h / t for h, t in zip(times["hand"], times["train"])]
    return {
        "steps_per_call": steps,
        "hand_steps_per_second": rate["hand"],
        "train_steps_per_second": rate["train"],
        "ratio_train_over_hand": rate["train"] / rate["hand"],
        "median_of_pair_ratios": statistics.median(pair_ratios),
        "identical_weights": _same(models["train"], models["hand"]),
        "seconds": times,
    }


def ops_per_step(data: Any, init: nn.Module, args: argparse.Namespace) -> Dict[str, Any]:
    """Tensor operations (ATen calls, counted by a dispatch mode) per step of each loop on the in-memory data: the
    overhead of ``train`` over the hand loop in a unit the machine's load does not change."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.calls: Counter = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            self.calls[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    steps = args.epochs * math.ceil(len(data) / args.batch)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch, lr=1e-3, optimizer="adam", schedule="cosine",
                         seed=args.seed, device="cpu")  # the settings of loop_ratio
    runs = {"train": lambda: train(copy.deepcopy(init), data, config=config, progress=False),
            "hand": lambda: hand_loop(copy.deepcopy(init), data.images, data.labels, epochs=args.epochs,
                                      batch=args.batch, lr=config.lr, seed=args.seed, streamed=False)}
    counts = {}
    for name, run in runs.items():
        with Count() as count:
            run()
        counts[name] = count.calls
    extra = counts["train"] - counts["hand"]
    return {"train": sum(counts["train"].values()) / steps, "hand": sum(counts["hand"].values()) / steps,
            "extra_per_step": {k: v / steps for k, v in extra.most_common()}}


def _load_before(rev: str) -> Optional[Any]:
    """``sturdy/training.py`` of git revision ``rev`` as a module, or ``None`` when git cannot give it."""
    try:
        source = subprocess.run(["git", "show", f"{rev}:src/sturdy/training.py"], cwd=ROOT, capture_output=True,
                                text=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    folder = Path(tempfile.mkdtemp(prefix="training_before_"))
    path = folder / "training_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("training_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["training_before"] = module
    spec.loader.exec_module(module)
    path.unlink()
    folder.rmdir()
    return module


def epoch_time(data: Any, test: Any, init: nn.Module, args: argparse.Namespace) -> Dict[str, Any]:
    """Seconds per epoch of the digits CNN with evaluation, now and before the rewrite."""
    before = _load_before(args.before)
    kwargs = dict(epochs=args.epochs, batch_size=args.batch, seed=args.seed, device="cpu")
    fns = {"now": lambda: train(copy.deepcopy(init), data, config=TrainConfig(**kwargs), test_set=test,
                                progress=False)}
    if before is not None:
        fns["before"] = lambda: before.train(copy.deepcopy(init), data, config=before.TrainConfig(**kwargs),
                                             test_set=test, progress=False)
    times = _alternate(fns, warmup=args.warmup, repeats=args.repeats)
    per_epoch = {k: statistics.median(v) / args.epochs for k, v in times.items()}
    out: Dict[str, Any] = {"seconds_per_epoch": per_epoch, "before_revision": args.before if before else None}
    if before is not None:
        out["ratio_now_over_before"] = per_epoch["now"] / per_epoch["before"]
    return out


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=2, help="epochs per timed call")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=2, help="untimed pairs first")
    p.add_argument("--repeats", type=int, default=15, help="timed pairs")
    p.add_argument("--before", default="67b0a64^", help="git revision of the loop before the training core")
    p.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                   help="wall time, or the CPU time of the (one) computing thread: steadier on a loaded machine")
    p.add_argument("--out", default="runs/bench/training_loop.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    data, test = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    torch.manual_seed(args.seed)
    init = create_model("cnn", in_shape=data.image_shape, num_classes=data.num_classes)
    results: Dict[str, Any] = {
        "settings": {**vars(args), "threads": torch.get_num_threads(), "torch": torch.__version__,
                     "model": "cnn (32-64 channels)", "data": f"digits, {len(data)} training images"},
        "in_memory": loop_ratio(data, init, streamed=False, args=args),
        "streamed": loop_ratio(data, init, streamed=True, args=args),
        "digits_cnn_epoch": epoch_time(data, test, init, args),
        "ops_per_step": ops_per_step(data, init, args),
    }
    targets = {f"{k}_train_over_hand": {"value": results[k]["ratio_train_over_hand"], "target": f">= {LOOP_TARGET}",
                                        "met": results[k]["ratio_train_over_hand"] >= LOOP_TARGET}
               for k in ("in_memory", "streamed")}
    ratio = results["digits_cnn_epoch"].get("ratio_now_over_before")
    if ratio is not None:
        targets["digits_cnn_epoch_now_over_before"] = {"value": ratio, "target": f"<= {EPOCH_TARGET}",
                                                       "met": ratio <= EPOCH_TARGET}
    results["targets"] = targets
    for name, row in targets.items():
        print(f"{name}: {row['value']:.3f} (target {row['target']}, met={row['met']})")
    for k in ("in_memory", "streamed"):
        r = results[k]
        print(f"{k}: hand {r['hand_steps_per_second']:.0f} steps/s, train {r['train_steps_per_second']:.0f} steps/s, "
              f"identical weights {r['identical_weights']}")
    print("digits cnn seconds per epoch:", results["digits_cnn_epoch"]["seconds_per_epoch"])
    ops = results["ops_per_step"]
    print(f"tensor operations per step (in memory): train {ops['train']:.1f}, hand {ops['hand']:.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(results, Path(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
