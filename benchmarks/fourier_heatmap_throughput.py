"""Heat-map throughput against the model's plain inference throughput on the same images.

Target (issue 4): ``fourier_heatmap`` evaluates >= 0.8 x as many images per second as plain batched
inference of the same model on the same images (so basis generation, perturbation, clipping and
bookkeeping cost <= 25%). Both are timed in the same run, after a warm-up, as medians of repeats.

Usage:
    python benchmarks/fourier_heatmap_throughput.py --out runs/bench/fourier_heatmap_throughput.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from sturdy.data import load_dataset
from sturdy.experiments.jsonio import write_json
from sturdy.fourier import fourier_heatmap, half_plane
from sturdy.models import create_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def plain_inference(model, x: torch.Tensor, *, evaluations: int, batch_size: int) -> float:
    """Seconds to classify ``evaluations`` images (``x`` repeated), in batches of ``batch_size``."""
    reps = -(-batch_size // x.shape[0])
    batch = x.repeat(reps, 1, 1, 1)[:batch_size].contiguous()
    device = x.device
    _sync(device)
    start = time.perf_counter()
    done = 0
    while done < evaluations:
        m = min(batch_size, evaluations - done)
        model(batch[:m]).argmax(dim=1)
        done += m
    _sync(device)
    return time.perf_counter() - start


def measure(name, model, x, y, *, eps, batch_size, repeats, device):
    model = model.to(device).eval()
    x, y = x.to(device), y.to(device)
    evaluations = x.shape[0] * (half_plane(x.shape[2], x.shape[3]).shape[0] + 1)
    fourier_heatmap(model, x[:64], y[:64], eps=eps, batch_size=batch_size)  # warm-up
    plain_inference(model, x, evaluations=batch_size * 2, batch_size=batch_size)
    plain, heat = [], []
    for _ in range(repeats):
        plain.append(plain_inference(model, x, evaluations=evaluations, batch_size=batch_size))
        _sync(device)
        hm = fourier_heatmap(model, x, y, eps=eps, batch_size=batch_size)
        _sync(device)
        heat.append(hm.seconds)
    p, h = statistics.median(plain), statistics.median(heat)
    row = {
        "case": name, "images": x.shape[0], "image_shape": list(x.shape[1:]),
        "frequencies": evaluations // x.shape[0] - 1,
        "evaluations": evaluations, "batch_size": batch_size, "plain_seconds": p, "heatmap_seconds": h,
        "plain_images_per_s": evaluations / p, "heatmap_images_per_s": evaluations / h, "ratio": p / h,
        "repeats": repeats,
    }
    print(f"{name:32s} plain {evaluations / p:10.0f} img/s   heatmap {evaluations / h:10.0f} img/s   "
          f"ratio {p / h:.3f}")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench/fourier_heatmap_throughput.json")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2048)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    test = load_dataset("digits", split="test")
    rows = []
    cnn = create_model("cnn", in_shape=(1, 8, 8), num_classes=10)
    rows.append(measure("digits 1x8x8, demo cnn", cnn, test.images, test.labels, eps=2.0,
                        batch_size=args.batch_size, repeats=args.repeats, device=device))
    small = create_model("cnn", in_shape=(1, 8, 8), num_classes=10, channels=(8, 16), width=32)
    rows.append(measure("digits 1x8x8, small cnn", small, test.images, test.labels, eps=2.0,
                        batch_size=args.batch_size, repeats=args.repeats, device=device))
    side = 32 if device.type == "cuda" else 16
    synth = load_dataset("synthetic", split="test", num_samples=64, image_shape=(3, side, side), num_classes=10)
    rgb = create_model("cnn", in_shape=(3, side, side), num_classes=10)
    rows.append(measure(f"synthetic 3x{side}x{side}, cnn", rgb, synth.images, synth.labels, eps=2.0,
                        batch_size=args.batch_size // 4, repeats=args.repeats, device=device))
    result = {
        "benchmark": "fourier_heatmap_throughput", "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "target_ratio": 0.8, "cases": rows,
    }
    out = Path(args.out)
    write_json(result, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
