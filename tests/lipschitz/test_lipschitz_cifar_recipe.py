"""The CIFAR-10 recipe of the README ("Certified robustness: a recipe for CIFAR-10") runs as one command, on
files generated here in the CIFAR-10 binary format (a smoke test: one epoch of a narrow network, a few images)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from sturdy.cli import main

README = Path(__file__).resolve().parents[2] / "README.md"


def _cifar10(folder: Path, per_file: int = 8) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        labels = rng.integers(0, 10, per_file, dtype=np.uint8)
        pixels = rng.integers(0, 256, (per_file, 3 * 32 * 32), dtype=np.uint8)
        np.concatenate([labels[:, None], pixels], axis=1).tofile(folder / name)
    return folder


def _recipe() -> list:
    """The recipe's `sturdy train` line from the README (continuation lines joined)."""
    text = README.read_text()
    block = text[text.index("### Certified robustness: a recipe for CIFAR-10"):]
    block = block[block.index("```sh") + 5 : block.index("```", block.index("```sh") + 5)]
    line = " ".join(part.strip().rstrip("\\") for part in block.strip().splitlines() if part.strip())
    return re.sub(r"\s+", " ", line).split()


def test_the_cifar10_recipe_runs_on_cifar_binary_files(tmp_path):
    argv = _recipe()
    assert argv[:2] == ["sturdy", "train"]
    folder = _cifar10(tmp_path / "cifar")
    argv = [a.replace("DIR", str(folder)) for a in argv[2:]]
    at = argv.index("--epochs")
    argv[at + 1] = "1"  # smoke test: the recipe's settings, one epoch of a narrow, shallow network
    argv = [{"width=128": "width=8", "depth=12": "depth=1"}.get(a, a) for a in argv]
    out = tmp_path / "run"
    argv[argv.index("--out") + 1] = str(out)
    assert main(["train", *argv, "--no-progress", "--device", "cpu"]) == 0
    job = json.loads((out / "results.json").read_text())["job"]
    assert job["dataset"].startswith("cifar10:") and job["config"]["augment"] == "crop-flip"
    assert main(["lipschitz", "certify", "--checkpoint", str(out / "model.pt"), "--out", str(out),
                 "--no-progress"]) == 0
