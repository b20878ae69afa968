"""Curvature diagonals side by side with optional peer libraries: the Monte-Carlo and exact GGN diagonal.

Targets (issue 25): ``hessian_diagonal(method="ggn-mc")`` at or below BackPACK's ``DiagGGNMC`` time at the
same number of sampled labels, and at most the time of the exact diagonal of ``mc_samples`` classes (the
cost the docstring promises), measured two ways: a network with the same body and a ``mc_samples``-class
head, and the same network with ``mc_samples`` columns of its exact factor (``ggn_columns``: the same
backward passes through the same head). Also reported: the exact diagonal against BackPACK's
``DiagGGNExact`` and the largest relative difference of the values.

Peers are optional and never required by ``sturdy``: a peer that is not installed is skipped and recorded
as such (BackPACK: ``pip install --no-deps backpack-for-pytorch einops unfoldNd``). A model a peer cannot
take (BackPACK needs ``use_converter=True`` for residual networks) is recorded with the peer's error.

Models (random initialisation; timing does not depend on training): digits-shaped inputs (1 x 8 x 8);
an MLP (width 128, 2 hidden layers) with 10 and 100 classes, a wide MLP (width 1024, 10 classes), the
default CNN (32, 64 channels) and the small ResNet with BatchNorm (16, 32, 64 channels). One thread, the
methods interleaved within each repeat, medians after one warm-up; ratios are taken from medians of the
same run.

Usage:
    python benchmarks/flatness_peers.py --out runs/bench/flatness_peers.json [--repeats 7] [--samples 512] [--quick]
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from sturdy.experiments.jsonio import write_json
from sturdy.flatness import hessian_diagonal
from sturdy.flatness._data import trainable_parameters
from sturdy.flatness.ggn import exact_columns, ggn_columns
from sturdy.models import create_model

MODELS: Dict[str, Tuple[str, Dict[str, Any], int]] = {
    "mlp-10": ("mlp", {}, 10),
    "mlp-100": ("mlp", {}, 100),
    "mlp-wide-10": ("mlp", {"width": 1024}, 10),
    "cnn-10": ("cnn", {}, 10),
    "resnet-bn-10": ("resnet", {}, 10),
}
IN_SHAPE = (1, 8, 8)


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _build(arch: str, kwargs: Dict[str, Any], classes: int) -> nn.Module:
    torch.manual_seed(0)
    return create_model(arch, in_shape=IN_SHAPE, num_classes=classes, **kwargs).eval()


def _backpack_runner(model: nn.Module, x: Tensor, y: Tensor, extension: str, samples: int) -> Callable[[], Any]:
    """A closure running BackPACK's ``extension`` on a converted copy of ``model`` (raises if unsupported)."""
    import copy

    from backpack import backpack, extend
    from backpack.extensions import DiagGGNExact, DiagGGNMC

    residual = any(isinstance(m, nn.Module) and type(m).__name__ == "BasicBlock" for m in model.modules())
    net = extend(copy.deepcopy(model), use_converter=residual).eval()
    loss_fn = extend(nn.CrossEntropyLoss())
    ext = DiagGGNMC(mc_samples=samples) if extension == "mc" else DiagGGNExact()
    attr = "diag_ggn_mc" if extension == "mc" else "diag_ggn_exact"

    def run() -> Dict[str, Tensor]:
        net.zero_grad()
        with backpack(ext):
            loss_fn(net(x), y).backward()
        return {n: getattr(p, attr) for n, p in net.named_parameters()}

    run()  # fails here when BackPACK cannot take the model
    return run


def _first_columns_runner(model: nn.Module, x: Tensor, y: Tensor, columns: int) -> Callable[[], Any]:
    """The GGN accumulation of the first ``columns`` columns of the exact factor of ``model`` (same network,
    same backward passes as ``columns`` sampled labels; at most ``classes`` columns)."""
    params = trainable_parameters(model)

    def run() -> Any:
        return ggn_columns(model, [(x, y)], params, lambda p, i: exact_columns(p, i)[:columns],
                           memory_budget=2**30, chunk_size=None, progress=False)

    return run


def _interleaved(fns: Dict[str, Callable[[], Any]], repeats: int) -> Dict[str, float]:
    for fn in fns.values():
        fn()  # warm-up
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _max_rel_diff(ours: Dict[str, Tensor], theirs: Dict[str, Tensor]) -> Optional[float]:
    worst = 0.0
    for name, d in ours.items():
        if name not in theirs:
            return None
        other = theirs[name].reshape(d.shape).to(d.dtype)
        worst = max(worst, float((d - other).abs().max() / d.abs().max().clamp_min(1e-300)))
    return worst


def _measure(label: str, arch: str, kwargs: Dict[str, Any], classes: int, x: Tensor, mc: int, repeats: int,
             peers: Dict[str, bool]) -> Dict[str, Any]:
    model = _build(arch, kwargs, classes)
    head = _build(arch, kwargs, mc)  # same body, mc_samples classes: the documented cost of "ggn-mc"
    gen = torch.Generator().manual_seed(1)
    y = torch.randint(0, classes, (x.shape[0],), generator=gen)
    y_head = torch.randint(0, mc, (x.shape[0],), generator=gen)
    fns: Dict[str, Callable[[], Any]] = {
        "sturdy_mc": lambda: hessian_diagonal(model, (x, y), method="ggn-mc", mc_samples=mc, batch_size=len(x)),
        "sturdy_exact": lambda: hessian_diagonal(model, (x, y), method="ggn-exact", batch_size=len(x)),
        "sturdy_exact_mc_classes": lambda: hessian_diagonal(head, (x, y_head), method="ggn-exact",
                                                             batch_size=len(x)),
    }
    if classes >= mc:  # (fewer classes: the exact diagonal itself, cheaper than mc_samples columns)
        fns["sturdy_exact_mc_columns"] = _first_columns_runner(model, x, y, mc)
    row: Dict[str, Any] = {"classes": classes, "parameters": sum(p.numel() for p in model.parameters())}
    if peers["backpack"]:
        try:
            fns["backpack_mc"] = _backpack_runner(model, x, y, "mc", mc)
            fns["backpack_exact"] = _backpack_runner(model, x, y, "exact", mc)
        except Exception as exc:  # noqa: BLE001 - a peer's refusal is a result to record
            row["backpack_error"] = f"{type(exc).__name__}: {exc}"[:300]
            fns.pop("backpack_mc", None)
    times = _interleaved(fns, repeats)
    row.update({f"{k}_s": v for k, v in times.items()})
    row["ratio_mc_to_exact_mc_classes"] = times["sturdy_mc"] / times["sturdy_exact_mc_classes"]
    if "sturdy_exact_mc_columns" in times:
        row["ratio_mc_to_exact_mc_columns"] = times["sturdy_mc"] / times["sturdy_exact_mc_columns"]
    if "backpack_mc" in times:
        row["ratio_mc_to_backpack_mc"] = times["sturdy_mc"] / times["backpack_mc"]
        row["ratio_exact_to_backpack_exact"] = times["sturdy_exact"] / times["backpack_exact"]
        ours = hessian_diagonal(model, (x, y), method="ggn-exact", batch_size=len(x)).diagonal
        row["exact_max_rel_diff_backpack"] = _max_rel_diff(ours, fns["backpack_exact"]())
    shown = "  ".join(f"{k} {v:.4f}s" for k, v in times.items())
    print(f"{label:14s} {shown}  mc/exact({mc} classes) {row['ratio_mc_to_exact_mc_classes']:.2f}"
          + (f"  mc/exact({mc} columns) {row['ratio_mc_to_exact_mc_columns']:.2f}"
             if "ratio_mc_to_exact_mc_columns" in row else "")
          + (f"  mc/backpack {row['ratio_mc_to_backpack_mc']:.2f}" if "ratio_mc_to_backpack_mc" in row else ""),
          flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench/flatness_peers.json")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--mc-samples", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--quick", action="store_true", help="one repeat, 64 samples (smoke test)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats, samples = (1, 64) if args.quick else (args.repeats, args.samples)
    peers = {"backpack": _installed("backpack"), "curvlinops": _installed("curvlinops"),
             "pyhessian": _installed("pyhessian"), "opacus": _installed("opacus")}
    print("peers installed:", ", ".join(k for k, v in peers.items() if v) or "none", flush=True)
    x = torch.rand((samples, *IN_SHAPE), generator=torch.Generator().manual_seed(0))
    rows = {label: _measure(label, arch, kw, classes, x, args.mc_samples, repeats, peers)
            for label, (arch, kw, classes) in MODELS.items() if label in args.models}
    result = {
        "benchmark": "flatness_peers", "samples": samples, "mc_samples": args.mc_samples, "repeats": repeats,
        "threads": args.threads, "torch": torch.__version__, "machine": platform.machine(),
        "processor": platform.processor(), "peers_installed": peers, "models": rows,
    }
    out = Path(args.out)
    write_json(result, out)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
