"""Heat-map throughput against plain inference of the same model at its *best* batch size.

Target (issue 14): ``fourier_heatmap`` with its default (automatic) batch size evaluates >= 0.8 x as many
images per second as plain batched inference of the same model on the same images at the batch size
where plain inference is fastest (a sweep over powers of two, measured in the same run). The heat map's
time includes its online batch-size probe, the clean predictions, basis generation, perturbation,
clipping and bookkeeping. Every figure is a median of ``--repeats`` interleaved repeats after a warm-up.
The old fixed default (2048) is measured beside it for reference.

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
from sturdy.fourier import fourier_heatmap, half_plane, strided_frequencies
from sturdy.models import create_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def plain_rate(model, x: torch.Tensor, *, evaluations: int, batch_size: int) -> float:
    """Images per second classifying ``evaluations`` images (``x`` repeated) in batches of ``batch_size``."""
    reps = -(-batch_size // x.shape[0])
    batch = x.repeat(reps, 1, 1, 1)[:batch_size].contiguous()
    model(batch).argmax(dim=1)  # warm-up of this shape
    _sync(x.device)
    start = time.perf_counter()
    done = 0
    while done < evaluations:
        m = min(batch_size, evaluations - done)
        model(batch[:m]).argmax(dim=1)
        done += m
    _sync(x.device)
    return evaluations / (time.perf_counter() - start)


def measure(name, model, x, y, *, eps, repeats, device, sizes, frequencies=None, plain_evaluations):
    model = model.to(device).eval()
    x, y = x.to(device), y.to(device)
    n_freq = len(half_plane(x.shape[2], x.shape[3])) if frequencies is None else len(frequencies)
    evaluations = x.shape[0] * (n_freq + 1)
    fourier_heatmap(model, x[:16], y[:16], eps=eps, frequencies=frequencies)  # warm-up
    plain = {b: [] for b in sizes}
    auto, old, chosen = [], [], []
    for _ in range(repeats):
        for b in sizes:
            plain[b].append(plain_rate(model, x, evaluations=plain_evaluations, batch_size=b))
        hm = fourier_heatmap(model, x, y, eps=eps, frequencies=frequencies)
        auto.append(evaluations / hm.seconds)
        chosen.append(hm.batch_size)
        hm2048 = fourier_heatmap(model, x, y, eps=eps, frequencies=frequencies, batch_size=2048)
        old.append(evaluations / hm2048.seconds)
    plain_med = {b: statistics.median(v) for b, v in plain.items()}
    best_b = max(plain_med, key=plain_med.get)
    best = plain_med[best_b]
    row = {
        "case": name, "images": x.shape[0], "image_shape": list(x.shape[1:]), "frequencies": n_freq,
        "evaluations": evaluations, "plain_images_per_s": {str(b): r for b, r in plain_med.items()},
        "best_plain_batch_size": best_b, "best_plain_images_per_s": best,
        "heatmap_auto_images_per_s": statistics.median(auto), "heatmap_auto_batch_sizes": chosen,
        "heatmap_2048_images_per_s": statistics.median(old),
        "ratio_auto": statistics.median(auto) / best, "ratio_2048": statistics.median(old) / best,
        "repeats": repeats,
    }
    print(f"{name:34s} best plain {best:9.0f} img/s (batch {best_b}); heat map auto {row['ratio_auto']:.3f} x "
          f"(chose {chosen}), fixed 2048 {row['ratio_2048']:.3f} x", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench/fourier_heatmap_throughput.json")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    sizes = [16, 32, 64, 128, 256, 512, 1024, 2048] + ([4096, 8192] if device.type == "cuda" else [])
    test = load_dataset("digits", split="test")
    rows = []
    cnn = create_model("cnn", in_shape=(1, 8, 8), num_classes=10)
    rows.append(measure("digits 1x8x8, demo cnn (400 images)", cnn, test.images[:400], test.labels[:400], eps=2.0,
                        repeats=args.repeats, device=device, sizes=sizes, plain_evaluations=8192))
    side = 32
    synth = load_dataset("synthetic", split="test", num_samples=64, image_shape=(3, side, side), num_classes=10)
    net = create_model("resnet", in_shape=(3, side, side), num_classes=10)
    rows.append(measure(f"3x{side}x{side}, resnet (64 images, stride 4)", net, synth.images, synth.labels, eps=2.0,
                        repeats=args.repeats, device=device, sizes=[s for s in sizes if s <= 512],
                        frequencies=strided_frequencies(side, side, 4), plain_evaluations=1024))
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
