"""``sturdy compression costmodel``: predicted step time and speedup of compressed vs. dense data
parallelism for a trained checkpoint, from the compute time measured on it and the compression ratio its
run measured (``results.json``, checked before any work), or given.
"""

from __future__ import annotations

import argparse
import io
import json
import math
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

import torch

from sturdy.compression.costmodel import MAX_MODEL_WORKERS, crossover_bandwidth_gbps, predict_step_times
from sturdy.compression.timing import measure_codec_seconds, measure_step_seconds
from sturdy.errors import DataError
from sturdy.experiments.argtypes import bounded_int, positive_float
from sturdy.experiments.jsonio import RESULTS_FILES, results_path, write_results
from sturdy.experiments.train_job import load_job_data, load_trained_model
from sturdy.training import resolve_device
from sturdy.utils import atomic_writer

__all__ = ["add_costmodel_command", "plot_speedup", "MAX_THREADS"]

MAX_THREADS = 1024


def _non_negative_float(text: str) -> float:
    """A finite number >= 0 (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text[:40]!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text[:40]!r}")
    return value


def _csv(kind: Callable[[str], Any], name: str) -> Callable[[str], List[Any]]:
    def parse(text: str) -> List[Any]:
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{name}: expected comma-separated numbers, got {text!r}") from exc

    return parse


MAX_CURVES = 64  # one curve of the figure per worker count


def _worker_counts(text: str) -> List[int]:
    """``--workers``: comma-separated worker counts, each in ``[1, MAX_MODEL_WORKERS]``, at most ``MAX_CURVES``."""
    counts = _csv(int, "--workers")(text)
    if not 1 <= len(counts) <= MAX_CURVES:
        raise argparse.ArgumentTypeError(f"expected 1 to {MAX_CURVES} worker counts (one curve each), "
                                         f"got {len(counts)}")
    bad = [n for n in counts if not 1 <= n <= MAX_MODEL_WORKERS]
    if bad:
        raise argparse.ArgumentTypeError(f"expected worker counts in [1, {MAX_MODEL_WORKERS}] (more is beyond any "
                                         f"cluster the model describes), got {str(bad[0])[:30]}")
    return counts


def _cmd_costmodel(args: argparse.Namespace) -> int:
    checkpoint = Path(args.checkpoint)
    out = Path(args.out) if args.out else checkpoint.parent / "costmodel"
    results = results_path(out, "compression costmodel")  # checked before any work
    model, job = load_trained_model(checkpoint, device=resolve_device(args.device))
    ratio = args.ratio
    source = "--ratio"
    training_results = checkpoint.parent / RESULTS_FILES["train"]
    info = _measured_compression(training_results)
    if ratio is None:
        if info:
            ratio = info.get("compression_ratio")
            source = f"{training_results} (method {info.get('method')})"
        if ratio is None:
            raise DataError(
                f"no measured compression ratio: {training_results} has no 'compression' entry (train with "
                "`sturdy train --nproc 2 --compress vgc`) ; or pass --ratio R"
            )
    torch.set_num_threads(args.threads)
    train_set, _ = load_job_data(job)
    compute_s = measure_step_seconds(model, train_set.images, train_set.labels, batch_size=job.config.batch_size)
    num_elements = sum(p.numel() for p in model.parameters() if p.requires_grad)
    dense_bytes = 4 * num_elements
    if args.codec_ms is not None:
        codec_s = args.codec_ms * 1e-3
    else:
        sent = info.get("elements_sent_per_step_mean")
        fraction = sent / num_elements if sent else 4.0 / float(ratio)
        codec_s = measure_codec_seconds(num_elements, fraction)
    preds = predict_step_times(
        compute_s=compute_s, dense_bytes=dense_bytes, compression_ratio=float(ratio), workers=args.workers,
        bandwidths_gbps=args.bandwidth_gbps, latency_s=args.latency_us * 1e-6, codec_s=codec_s,
    )
    out.mkdir(parents=True, exist_ok=True)
    header = ["workers", "Gbit/s", "allreduce ms", "compressed ms", "step ms (dense)", "step ms (compressed)",
              "speedup"]
    rows = [[p.workers, p.bandwidth_gbps, round(1e3 * p.allreduce_s, 3), round(1e3 * p.compressed_comm_s, 3),
             round(1e3 * p.dense_step_s, 3), round(1e3 * p.compressed_step_s, 3), round(p.speedup, 2)] for p in preds]
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    print(f"compute {1e3 * compute_s:.3f} ms/step and codec {1e3 * codec_s:.3f} ms/step (measured, batch "
          f"{job.config.batch_size}), gradient {dense_bytes} bytes, compression ratio {float(ratio):.1f} from {source}")
    print("  ".join(str(h).rjust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(str(c).rjust(w) for c, w in zip(r, widths)))
    crossovers = {
        p: crossover_bandwidth_gbps(compute_s=compute_s, dense_bytes=dense_bytes, compression_ratio=float(ratio),
                                    workers=p, latency_s=args.latency_us * 1e-6, codec_s=codec_s)
        for p in args.workers
    }
    fig = plot_speedup(preds)
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=120)
    with atomic_writer(out / "costmodel.png") as fh:  # a killed run leaves no partial figure
        fh.write(image.getvalue())
    write_results({"checkpoint": str(checkpoint), "compute_s": compute_s, "codec_s": codec_s,
                   "dense_bytes": dense_bytes, "compression_ratio": float(ratio), "ratio_source": source,
                   "latency_s": args.latency_us * 1e-6,
                   "crossover_bandwidth_gbps": {str(k): v for k, v in crossovers.items()},
                   "predictions": [p.to_dict() for p in preds]}, results, command="compression costmodel")
    print(f"wrote {out / 'costmodel.png'} and {out / 'costmodel.json'}")
    return 0


def _measured_compression(path: Path) -> Dict[str, Any]:
    """The ``"compression"`` entry of the ``results.json`` at ``path`` (``{}`` when there is none), checked.

    Raises:
        DataError: the file is not JSON, not an object, or its measured figures are not positive numbers.
    """
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path} is not valid JSON ({' '.join(str(exc).split())[:80]}); rerun the training or "
                        "pass --ratio R") from exc
    if not isinstance(data, dict):
        raise DataError(f"{path} holds a {type(data).__name__}, not the object `sturdy train` writes; pass --ratio R")
    info = data.get("compression") or {}
    if not isinstance(info, dict):
        raise DataError(f"{path}: its 'compression' entry is a {type(info).__name__}, not an object; pass --ratio R")
    for key in ("compression_ratio", "elements_sent_per_step_mean"):
        value = info.get(key)
        if value is None:
            continue
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or value <= 0:
            raise DataError(f"{path}: {key} must be a positive number, got {value!r}; rerun the training or pass "
                            "--ratio R")
    return info


def plot_speedup(preds: Sequence[Any]) -> Any:
    """Predicted speedup against bandwidth, one line per worker count (a ``matplotlib.figure.Figure``)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.6))
    ax = fig.add_subplot()
    for p in sorted({q.workers for q in preds}):
        pts = sorted((q.bandwidth_gbps, q.speedup) for q in preds if q.workers == p)
        ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", label=f"{p} workers")
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("link bandwidth (Gbit/s)")
    ax.set_ylabel("predicted speedup vs. allreduce")
    ax.legend()
    fig.tight_layout()
    return fig


def add_costmodel_command(sub: Any) -> None:
    """Add ``costmodel`` to the ``sturdy compression`` sub-commands ``sub``."""
    c = sub.add_parser("costmodel", help="predicted step time and speedup of compressed vs. dense data parallelism")
    c.add_argument("--checkpoint", required=True, help="DIR/model.pt written by `sturdy train`")
    c.add_argument("--workers", type=_worker_counts, default=[4, 16, 64],
                   help=f"e.g. 4,16,64 (each 1 to {MAX_MODEL_WORKERS}, at most {MAX_CURVES} values)")
    c.add_argument("--bandwidth-gbps", type=_csv(float, "--bandwidth-gbps"), default=[0.1, 1.0, 10.0, 100.0],
                   help="e.g. 0.1,1,10,100")
    c.add_argument("--latency-us", type=_non_negative_float, default=50.0, help="per-message latency in microseconds")
    c.add_argument("--ratio", type=positive_float, default=None,
                   help="compression ratio (default: the one measured in results.json next to the checkpoint)")
    c.add_argument("--codec-ms", type=_non_negative_float, default=None,
                   help="encode + decode time per step (default: measured on the checkpoint's gradient size with "
                        "the fraction of elements its run sent)")
    c.add_argument("--threads", type=bounded_int(1, MAX_THREADS), default=1,
                   help=f"torch threads for the compute measurement (1 to {MAX_THREADS})")
    c.add_argument("--device", default="auto", help="device of the compute measurement: auto, cpu, cuda, cuda:N")
    c.add_argument("--out", default=None, help="output folder (default: next to the checkpoint)")
    c.set_defaults(func=_cmd_costmodel)
