"""``sturdy demo``: the main job on the embedded digits data set, written as an HTML report.

It trains a standard CNN, then lets every part add its section (Lipschitz certification, Fourier
sensitivity, flatness, gradient compression). Output: ``OUT/report.html``, ``OUT/demo.json``
and the PNG figures beside them, each written atomically; ``demo.json`` is written last, so its
presence means the report is complete. The demo's models are trained in sub-folders (``OUT/standard``, ...).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

from sturdy.data import ImageDataset
from sturdy.experiments.jsonio import remove_results, results_path, write_results
from sturdy.experiments.parts import parts as all_parts
from sturdy.experiments.train_job import TrainJob, fit, load_job_data
from sturdy.report import Report, plot_training_curves
from sturdy.training import TrainConfig, resolve_device

__all__ = ["DemoContext", "run_demo"]


@dataclass
class DemoContext:
    """What every part's ``demo_section(ctx)`` receives.

    Attributes:
        out: output folder (the report and its PNGs go here; parts may write sub-folders).
        quick: a smoke-test sized run (seconds per part instead of tens of seconds).
        device: torch device of the models.
        seed: base seed.
        report: the HTML report to add a section to.
        results: JSON-able results; each part stores its own under ``results[part]``.
        train_set, test_set: the digits splits.
        models: trained models by name, eval mode (``"standard"``; the Lipschitz part adds ``"lmt"``).
        progress: show progress bars.
    """

    out: Path
    quick: bool
    device: torch.device
    seed: int
    report: Report
    results: Dict[str, Any]
    train_set: ImageDataset
    test_set: ImageDataset
    models: Dict[str, nn.Module] = field(default_factory=dict)
    progress: bool = True


def standard_job(out: Path, *, quick: bool, seed: int, device: str) -> TrainJob:
    """The demo's standard digits CNN (Adam, cosine schedule)."""
    config = TrainConfig(epochs=3 if quick else 20, batch_size=64, lr=2e-3, seed=seed, device=device)
    return TrainJob(dataset="digits", model="cnn", config=config, out=str(out / "standard"))


def run_demo(
    *,
    out: str | Path = "runs/demo",
    quick: bool = False,
    device: str = "auto",
    seed: int = 0,
    progress: bool = True,
    parts: Optional[Sequence[Any]] = None,
) -> Path:
    """Run the demo and return the path of ``report.html``.

    ``parts`` are objects with a ``demo_section(ctx: DemoContext)`` (default: every part, in
    :data:`sturdy.experiments.parts.PART_NAMES` order); each adds its report section and its ``results[part]``
    entry.

    On the CPU the demo runs with one torch thread (restored afterwards): its digits models are so
    small that intra-op threads only add synchronisation (BENCHMARKS.md, figures moved from docstrings).
    """
    threads = torch.get_num_threads()
    if resolve_device(device).type == "cpu":
        torch.set_num_threads(1)
    try:
        sections = all_parts() if parts is None else parts
        return _run_demo(out=Path(out), quick=quick, device=device, seed=seed, progress=progress, parts=sections)
    finally:
        torch.set_num_threads(threads)


def _part_name(part: Any) -> str:
    name = part.__name__ if isinstance(part, ModuleType) else getattr(part, "name", type(part).__name__)
    return name.rsplit(".", 1)[-1]


def _run_demo(*, out: Path, quick: bool, device: str, seed: int, progress: bool, parts: Sequence[Any]) -> Path:
    t0 = time.perf_counter()
    results_file = results_path(out, "demo")  # checked before any work
    remove_results(results_file, "demo")  # an interrupted rerun must not look like a finished one
    (out / "report.html").unlink(missing_ok=True)
    job = standard_job(out, quick=quick, seed=seed, device=device)
    train_set, test_set = load_job_data(job)
    report = Report("sturdy demo: handwritten digits (scikit-learn, 8x8)")
    results: Dict[str, Any] = {"quick": quick, "seconds": {}}
    fitted = fit(job, resume=False, progress=progress)
    results["standard"] = {k: fitted.results[k] for k in ("test_accuracy", "train_accuracy", "seconds_per_epoch")}
    sec = report.section("Training")
    sec.text(
        f"A {job.model} ({fitted.results['num_parameters']} parameters) trained for {job.config.epochs} epochs "
        f"with {job.config.optimizer}, lr {job.config.lr}, batch {job.config.batch_size} on {len(train_set)} digits; "
        f"test accuracy {fitted.results['test_accuracy']:.4f} on {len(test_set)} held-out digits."
    )
    sec.figure(plot_training_curves({"standard": fitted.results["history"]}), name="training_curves.png",
               caption="Mean cross-entropy (log scale) and accuracy per epoch; dashed: test set.")
    results["seconds"]["standard"] = time.perf_counter() - t0
    ctx = DemoContext(out=out, quick=quick, device=resolve_device(device), seed=seed, report=report,
                      results=results, train_set=train_set, test_set=test_set,
                      models={"standard": fitted.model.eval()}, progress=progress)
    for part in parts:
        t_part = time.perf_counter()
        part.demo_section(ctx)
        results["seconds"][_part_name(part)] = time.perf_counter() - t_part
    results["seconds"]["total"] = time.perf_counter() - t0
    report.section("Run").table(header=["stage", "seconds"],
                                rows=[[k, round(v, 1)] for k, v in results["seconds"].items()])
    path = report.write(out / "report.html")  # figures, then the page; the results last
    write_results(results, results_file, command="demo")
    return path
