"""GPU section of the Fourier part: heat-map throughput against plain inference for a ResNet-50 at 224 x 224.

Both run the model the way it runs for inference: bf16 autocast, channels_last. Plain inference is timed
at every batch size of a sweep and the best is the reference; the heat map (default automatic batch
size, a strided frequency subset, its probe and clean predictions included) must reach >= 0.8 x of it.
``smoke`` shrinks everything (a narrow ResNet-50-shaped net at 32 x 32) so that the section runs on a
CPU in seconds.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from sturdy.fourier import fourier_heatmap, strided_frequencies

TARGET = 0.8


class _Bottleneck(nn.Module):
    def __init__(self, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        c_out = 4 * width
        self.body = nn.Sequential(
            nn.Conv2d(c_in, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(width),
            nn.ReLU(inplace=True), nn.Conv2d(width, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.down = (nn.Identity() if stride == 1 and c_in == c_out else
                     nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.down(x))


def resnet50(num_classes: int = 1000, base: int = 64) -> nn.Module:
    """The ResNet-50 architecture (bottleneck blocks 3-4-6-3, torchvision's layout), random weights."""
    layers = [nn.Conv2d(3, base, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(base), nn.ReLU(inplace=True),
              nn.MaxPool2d(3, stride=2, padding=1)]
    c = base
    for i, blocks in enumerate((3, 4, 6, 3)):
        width = base * 2**i
        for j in range(blocks):
            layers.append(_Bottleneck(c, width, 2 if (j == 0 and i > 0) else 1))
            c = 4 * width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes)]
    return nn.Sequential(*layers)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _plain(model: nn.Module, x: torch.Tensor, batch: int, evaluations: int, device: torch.device) -> float:
    xb = x.repeat(-(-batch // x.shape[0]), 1, 1, 1)[:batch].contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        model(xb)
        _sync(device)
        t0 = time.perf_counter()
        done = 0
        while done < evaluations:
            model(xb).argmax(1)
            done += batch
        _sync(device)
    return done / (time.perf_counter() - t0)


def run(*, device: torch.device, smoke: bool) -> dict:
    torch.manual_seed(0)
    side, base, n, stride = (16, 4, 4, 8) if smoke else (224, 64, 256, 16)
    sizes = [4, 8] if smoke else [64, 128, 256, 512, 1024]
    model = resnet50(base=base).to(device).eval().to(memory_format=torch.channels_last)
    x = torch.rand(n, 3, side, side, device=device)
    y = torch.randint(0, 1000, (n,), device=device)
    freqs = strided_frequencies(side, side, stride)
    evaluations = n * (len(freqs) + 1)
    kw = dict(eps=4.0, frequencies=freqs, autocast=torch.bfloat16, channels_last=True)
    fourier_heatmap(model, x[: min(n, 16)], y[: min(n, 16)], **kw)  # warm-up (cuDNN plans, probe shapes)
    plain = {b: [] for b in sizes}
    heat, chosen = [], []
    for _ in range(1 if smoke else 3):
        for b in sizes:
            plain[b].append(_plain(model, x, b, max(b * 2, min(evaluations, 8 * b)), device))
        hm = fourier_heatmap(model, x, y, **kw)
        heat.append(evaluations / hm.seconds)
        chosen.append(hm.batch_size)
    best_b = max(sizes, key=lambda b: statistics.median(plain[b]))
    best = statistics.median(plain[best_b])
    ratio = statistics.median(heat) / best
    return {
        "model": f"ResNet-50 layout (base width {base}), {side}x{side}, bf16 autocast, channels_last",
        "images": n, "frequencies": len(freqs), "evaluations": evaluations,
        "plain_images_per_s": {str(b): statistics.median(v) for b, v in plain.items()},
        "best_plain_batch_size": best_b, "heatmap_images_per_s": statistics.median(heat),
        "heatmap_batch_sizes": chosen,
        "targets": {"heatmap_over_best_plain_bf16": {"value": ratio, "target": f">= {TARGET}",
                                                     "met": bool(ratio >= TARGET)}},
    }
