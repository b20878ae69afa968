"""`sturdy lipschitz certify`, `sturdy fourier heatmap` and `sturdy fourier attack` (its held-out set) stream a large
data set (uint8 pixels as the readers map them) through the data contract instead of converting it whole; their
results equal those of the in-memory run."""

import json
from pathlib import Path

import numpy as np
from PIL import Image

from sturdy.cli import main
from sturdy.experiments import sources

MODEL_FILE = """
import torch
from torch import nn


def make(num_classes=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, num_classes))
"""


def _folder(root: Path, n_per_class: int = 5) -> Path:
    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for k, name in enumerate(("a", "b", "c")):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n_per_class):
                img = rng.integers(0, 200, (8, 8, 3), dtype=np.uint8)
                img[:, :, k] += 50
                Image.fromarray(img).save(d / f"{i}.png")
    return root


def test_large_data_is_streamed_with_the_results_of_the_in_memory_run(tmp_path, monkeypatch):
    model_file = tmp_path / "net.py"
    model_file.write_text(MODEL_FILE)
    own = ["--model", f"{model_file}:make", "--data", f"folder:{_folder(tmp_path / 'images')}", "--no-progress"]
    seen = []
    analysis_data = sources.Sources.analysis_data

    def spy(self, *args, **kwargs):
        data = analysis_data(self, *args, **kwargs)
        seen.append(data.images.dtype)
        return data

    monkeypatch.setattr(sources.Sources, "analysis_data", spy)
    runs = {}
    for name, limit in (("memory", sources.STREAM_BYTES), ("streamed", 0)):
        monkeypatch.setattr(sources, "STREAM_BYTES", limit)
        out = tmp_path / name
        assert main(["lipschitz", "certify", *own, "--out", str(out)]) == 0
        assert main(["fourier", "heatmap", *own, "--eps", "1.0", "--out", str(out)]) == 0
        assert main(["fourier", "attack", *own, "--eps", "1.0", "--attack-images", "6", "--shifts", "2", "--out",
                     str(out)]) == 0
        runs[name] = tuple(json.loads((out / f"{f}.json").read_text()) for f in ("certify", "heatmap", "attack"))
    assert [str(d) for d in seen] == ["torch.float32"] * 3 + ["torch.uint8"] * 3
    (cert_mem, map_mem, attack_mem), (cert_stream, map_stream, attack_stream) = runs["memory"], runs["streamed"]
    for key in ("heldout_fooling_rate", "shifted_fooling_rate", "random_noise_fooling_rate", "attack_fooling_rate"):
        assert attack_stream[key] == attack_mem[key], key
    for key in ("n", "clean_accuracy", "certified_accuracy", "radius_quantiles", "median_radius", "lipschitz_upper"):
        assert cert_stream[key] == cert_mem[key], key
    for key in ("n_images", "clean_error", "error_map", "fooling_map", "gradient_power_map"):
        assert map_stream[key] == map_mem[key], key
