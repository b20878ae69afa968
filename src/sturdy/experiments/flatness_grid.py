"""The generalisation-correlation harness: train a grid of digits models, measure them, rank-correlate.

Protocol (after Jiang et al., ICLR 2020): every grid point is trained with the shared training loop
until its running training cross-entropy reaches ``target_loss`` or ``max_epochs`` pass (the
``converged`` flag records which). The generalisation gap is ``train accuracy - test accuracy``, the
training accuracy being measured on the labels the model was trained on (random labels included).
Every registered measure is computed on that training set; Kendall's tau, the granulated tau and the
robustness view of each measure against the gap are reported
(:mod:`sturdy.experiments.flatness_grid_report`).

Presets (:data:`PRESETS`): ``quick`` (16 MLPs), ``default`` (64 MLPs and CNNs) and ``wide`` (MLPs varying
depth and width too, three seeds; grown for narrower intervals).

Output folder: ``points/<id>.json`` (one record per model, written atomically and reused when the run is
resumed; an unreadable record is retrained with a warning), ``grid.json`` (all records),
``correlations.json``, ``grid_report.html`` (:data:`GRID_REPORT`) with ``robustness.png``, ``correlations.png``
and ``scatter.png``, and ``scatter_<measure>.png``.

Parallel runs: ``workers=N`` trains the missing points in a pool of ``N`` spawned local processes (one torch
thread each), each taking the next point when it is free. The points are independent, so there is no
process group (the training loop would otherwise average gradients across the workers); every point is
seeded on its own, so the records are those of a serial single-threaded run whatever the number of workers.
"""

from __future__ import annotations

import itertools
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from tqdm.auto import tqdm

from sturdy.data import ImageDataset, apply_label_noise, load_dataset
from sturdy.distributed import max_local_workers
from sturdy.errors import ConfigurationError
from sturdy.experiments.flatness_grid_report import (
    HYPERPARAMETERS,
    MIN_CONVERGED,
    correlation_figure,
    grid_report,
    scatter_figure,
    summarize,
)
from sturdy.experiments.jsonio import check_results_owner, json_safe, results_path, write_results
from sturdy.flatness import available_measures, compute_measures
from sturdy.models import create_model
from sturdy.resumable import UnusableStateError, read_resumable, write_resumable
from sturdy.training import EpochMetrics, TrainConfig, evaluate, resolve_device, train
from sturdy.validation import check_count

__all__ = ["GridSpec", "GridPoint", "DEFAULT_GRID", "QUICK_GRID", "WIDE_GRID", "PRESETS", "run_grid",
           "grid_model_kwargs", "scatter_figure", "correlation_figure", "summarize", "HYPERPARAMETERS",
           "MIN_CONVERGED", "GRID_REPORT", "MAX_GRID_POINTS", "MAX_BOOTSTRAP", "max_grid_seeds"]

GRID_REPORT = "grid_report.html"  # not report.html: the demo's report, which may share the folder

# Cheaper settings of the perturbation measures for the grid (documented in the results).
GRID_MEASURE_SETTINGS: Dict[str, Dict[str, Any]] = {
    "pacbayes_flatness": {"samples": 4, "steps": 14, "sigma_range": (1e-4, 10.0)},
    "pacbayes_mag_flatness": {"samples": 4, "steps": 14, "sigma_range": (1e-4, 10.0)},
    "adaptive_average_sharpness": {"samples": 8},
    "hessian_top_eigenvalue": {"iterations": 50, "tol": 1e-3},
}

MAX_GRID_POINTS = 100_000
"""Most models one grid may hold: every record is held in memory for the correlations (and each model trains)."""
MAX_RECORD_BYTES = 4 * 2**20
"""Largest grid record read back (a record is a few kilobytes)."""
MAX_BOOTSTRAP = 100_000
"""Most bootstrap resamples: beyond this the intervals' Monte Carlo error (about 1/sqrt(B)) is below 0.3%."""

# What a stored record depends on besides its grid point: a record is reused only when these match.
_RECORD_FIELDS = ("optimizer", "target_loss", "max_epochs", "measures", "measure_settings")


@dataclass(frozen=True)
class GridPoint:
    """One model of the grid (its hyper-parameters); ``depth`` None is the architecture's default."""

    arch: str
    batch_size: int
    lr: float
    width: int
    weight_decay: float
    label_noise: float
    seed: int
    depth: Optional[int] = None

    @property
    def key(self) -> str:
        """File-name-safe identifier."""
        depth = "" if self.depth is None else f"-d{self.depth}"
        return (f"{self.arch}-w{self.width}{depth}-bs{self.batch_size}-lr{self.lr:g}-wd{self.weight_decay:g}"
                f"-noise{self.label_noise:g}-s{self.seed}")

    def hyperparams(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GridSpec:
    """A full factorial grid of training runs on digits.

    Attributes:
        name: label written to the results.
        architectures: ``"mlp"`` (``depth`` hidden layers of ``width``, default 2) and/or ``"cnn"``
            (channels ``(width/8, width/4)`` with ``depth`` convolutions per block, default 1, and a
            hidden fully connected layer of ``width``).
        batch_sizes, lrs, widths, weight_decays, label_noise, seeds, depths: the varied values.
        optimizer: ``"adam"`` or ``"sgd"`` (momentum 0.9), constant learning rate.
        target_loss: stop once the running training cross-entropy of an epoch is at most this.
        max_epochs: epoch cap.
        measures: measures computed (default: every registered one).
        measure_settings: per-measure keyword overrides (see :func:`sturdy.flatness.compute_measures`).
        bootstrap: bootstrap resamples of the confidence intervals.
    """

    name: str
    architectures: Tuple[str, ...]
    batch_sizes: Tuple[int, ...]
    lrs: Tuple[float, ...]
    widths: Tuple[int, ...]
    weight_decays: Tuple[float, ...]
    label_noise: Tuple[float, ...]
    seeds: Tuple[int, ...] = (0,)
    optimizer: str = "adam"
    target_loss: float = 0.01
    max_epochs: int = 100
    measures: Optional[Tuple[str, ...]] = None
    measure_settings: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: dict(GRID_MEASURE_SETTINGS))
    bootstrap: int = 1000
    depths: Tuple[Optional[int], ...] = (None,)

    def __post_init__(self) -> None:
        for arch in self.architectures:
            if arch not in ("mlp", "cnn"):
                raise ConfigurationError(f"grid architectures must be 'mlp' or 'cnn', got {arch!r}")
        axes = (self.architectures, self.batch_sizes, self.lrs, self.widths, self.weight_decays, self.label_noise,
                self.seeds, self.depths)
        if any(len(a) == 0 for a in axes):
            raise ConfigurationError("every grid axis needs at least one value")
        if any(d is not None and d < 1 for d in self.depths):
            raise ConfigurationError(f"grid depths must be >= 1 (or None for the default), got {self.depths}")
        if not (self.target_loss > 0 and self.max_epochs >= 1):
            raise ConfigurationError("target_loss must be > 0 and max_epochs >= 1")
        check_count(len(self.seeds), "the number of grid seeds", high=max_grid_seeds(self),
                    why=f"a grid holds at most {MAX_GRID_POINTS} models (records are held in memory)")
        check_count(self.bootstrap, "bootstrap", low=0, high=MAX_BOOTSTRAP,
                    why="beyond that the intervals' Monte Carlo error is below 0.3%")

    def models_per_seed(self) -> int:
        """Models of one seed's factorial grid (the product of the other axes' lengths)."""
        return math.prod(len(a) for a in (self.architectures, self.batch_sizes, self.lrs, self.widths,
                                          self.weight_decays, self.label_noise, self.depths))

    def points(self) -> List[GridPoint]:
        """Every combination, seeds outermost (a run cut short holds whole seeds' factorial grids first)."""
        return [GridPoint(arch, bs, lr, width, wd, noise, seed, depth) for seed, arch, bs, lr, width, depth, wd, noise
                in itertools.product(self.seeds, self.architectures, self.batch_sizes, self.lrs, self.widths,
                                     self.depths, self.weight_decays, self.label_noise)]

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["measure_settings"] = {k: dict(v) for k, v in self.measure_settings.items()}
        return d


def max_grid_seeds(spec: GridSpec) -> int:
    """Most seeds ``spec``'s grid may have within :data:`MAX_GRID_POINTS` models (at least 1)."""
    return max(1, MAX_GRID_POINTS // spec.models_per_seed())


DEFAULT_GRID = GridSpec(
    name="default",
    architectures=("mlp", "cnn"),
    batch_sizes=(32, 256),
    lrs=(1e-3, 1e-2),
    widths=(32, 128),
    weight_decays=(0.0, 1e-4),
    label_noise=(0.0, 0.2),
    max_epochs=100,
)
"""64 models (2 architectures x 2 batch sizes x 2 learning rates x 2 widths x 2 weight decays x 2 label-noise
levels); sized for <= 30 minutes on 2 CPU cores."""

QUICK_GRID = GridSpec(
    name="quick",
    architectures=("mlp",),
    batch_sizes=(32, 256),
    lrs=(1e-3, 1e-2),
    widths=(32, 128),
    weight_decays=(0.0,),
    label_noise=(0.0, 0.2),
    max_epochs=60,
    measure_settings={**GRID_MEASURE_SETTINGS, "hessian_trace": {"probes": 30},
                      "pacbayes_flatness": {"samples": 2, "steps": 10, "sigma_range": (1e-4, 10.0)},
                      "pacbayes_mag_flatness": {"samples": 2, "steps": 10, "sigma_range": (1e-4, 10.0)}},
    bootstrap=200,
)
"""16 MLPs (2 batch sizes x 2 learning rates x 2 widths x 2 label-noise levels); about 1-2 minutes on 2 CPU
cores."""

WIDE_GRID = GridSpec(
    name="wide",
    architectures=("mlp",),
    batch_sizes=(32, 128),
    lrs=(1e-3, 3e-3),
    widths=(64, 256),
    depths=(1, 2, 3),
    weight_decays=(0.0, 1e-4),
    label_noise=(0.0,),
    seeds=(0, 1, 2, 3),
    max_epochs=80,
    measure_settings={**GRID_MEASURE_SETTINGS, "hessian_trace": {"probes": 30}},
    bootstrap=1000,
)
"""192 MLPs without dropout (2 batch sizes x 2 learning rates x 2 widths x 3 depths x 2 weight decays x 4
seeds), chosen to reach the target loss cheaply (a few CPU-seconds each, measures included). No random labels:
with 10% of them these MLPs stayed far above the target loss after 80 epochs (BENCHMARKS.md), so they would
drop out of the converged-only correlation. Seeds are outermost, so a run stopped by its time
limit holds complete factorial grids of the first seeds."""

PRESETS: Dict[str, GridSpec] = {"quick": QUICK_GRID, "default": DEFAULT_GRID, "wide": WIDE_GRID}


def grid_model_kwargs(arch: str, width: int, depth: Optional[int] = None) -> Dict[str, Any]:
    """Model options of a grid architecture at a given width (and depth; None: 2 hidden layers, 1 conv per block)."""
    if arch == "mlp":
        return {"width": width, "depth": 2 if depth is None else depth}
    kwargs: Dict[str, Any] = {"channels": (max(2, width // 8), max(2, width // 4)), "width": width}
    if depth is not None:
        kwargs["convs_per_block"] = depth
    return kwargs


def _trained_labels(point: GridPoint, train_set: ImageDataset) -> ImageDataset:
    return train_set.with_labels(apply_label_noise(train_set.labels, fraction=point.label_noise,
                                                   num_classes=train_set.num_classes, seed=point.seed))


def train_point(
    point: GridPoint, spec: GridSpec, train_set: ImageDataset, test_set: ImageDataset, *, device: torch.device
) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """Train one grid model (stopping at ``spec.target_loss``); returns it (eval mode) and its record."""
    torch.manual_seed(point.seed)
    model = create_model(point.arch, in_shape=train_set.image_shape, num_classes=train_set.num_classes,
                         **grid_model_kwargs(point.arch, point.width, point.depth)).to(device)
    config = TrainConfig(epochs=spec.max_epochs, batch_size=point.batch_size, lr=point.lr, optimizer=spec.optimizer,
                         weight_decay=point.weight_decay, schedule="constant", seed=point.seed,
                         label_noise=point.label_noise, device=str(device))

    def reached_target(metrics: EpochMetrics) -> bool:
        return metrics.train_loss <= spec.target_loss  # True stops the training loop after this epoch

    t0 = time.perf_counter()
    result = train(model, train_set, config=config, progress=False, on_epoch_end=reached_target)
    converged = result.stopped_early
    history = [m.train_loss for m in result.history]
    model.eval()
    seconds = time.perf_counter() - t0
    train_loss, train_acc = evaluate(model, _trained_labels(point, train_set), device=device)
    test_loss, test_acc = evaluate(model, test_set, device=device)
    record = {
        "key": point.key, "hyperparams": point.hyperparams(), "epochs": len(history), "converged": converged,
        "final_running_loss": history[-1] if history else None, "train_loss": train_loss,
        "train_accuracy": train_acc, "test_loss": test_loss, "test_accuracy": test_acc,
        "gap": train_acc - test_acc, "loss_gap": test_loss - train_loss, "train_seconds": seconds,
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }
    return model, record


def measure_point(model: torch.nn.Module, data: ImageDataset, spec: GridSpec, *, seed: int) -> Dict[str, Any]:
    """Every measure of the grid for one trained model, with the seconds each took."""
    names = spec.measures or available_measures()
    settings = {k: v for k, v in spec.measure_settings.items() if k in names}
    out: Dict[str, Any] = {}
    for name in names:
        t0 = time.perf_counter()
        measured = compute_measures(model, data, names=[name], seed=seed,
                                    settings={name: settings[name]} if name in settings else None)
        entry = measured.to_dict()[name]
        entry["seconds"] = time.perf_counter() - t0
        out[name] = entry
    return out


def _record_fingerprint(grid: Mapping[str, Any]) -> Dict[str, Any]:
    plain = json.loads(json.dumps(json_safe(dict(grid)), default=str))
    return {k: plain.get(k) for k in _RECORD_FIELDS}


def _load_record(path: Path, spec: GridSpec, seed: int) -> Optional[Dict[str, Any]]:
    """The stored record of a point when it is usable for this grid and measure seed, else None (a
    truncated or corrupt file is reported with a warning and retrained)."""
    try:  # untrusted input: a bounded regular file, strict JSON, its checksum intact
        record = read_resumable(path, what="a grid record", max_bytes=MAX_RECORD_BYTES)
        ok = (isinstance(record, dict) and isinstance(record.get("measures"), dict)
              and isinstance(record.get("hyperparams"), dict) and "gap" in record and "converged" in record)
    except UnusableStateError as exc:
        record, ok = None, False
        reason = exc.reason
    else:
        if record is None:
            return None
        reason = "fields missing"
    if not ok:
        warnings.warn(f"grid record {path} is unreadable ({reason}); the model is trained again", stacklevel=3)
        return None
    if not isinstance(record.get("grid"), dict) or _record_fingerprint(record["grid"]) != _record_fingerprint(
            spec.to_dict()) or record.get("measure_seed", seed) != seed:
        return None
    return record


def _run_point(point: GridPoint, spec: GridSpec, train_set: ImageDataset, test_set: ImageDataset,
               device: torch.device, seed: int, path: Path) -> Dict[str, Any]:
    """Train and measure one point and write its record atomically."""
    model, record = train_point(point, spec, train_set, test_set, device=device)
    record["measures"] = measure_point(model, _trained_labels(point, train_set), spec, seed=seed)
    record["measure_seed"] = seed
    record["grid"] = spec.to_dict()
    write_resumable(path, json.loads(json.dumps(json_safe(record), default=str)))  # checksummed: read back later
    return record


_WORKER: Dict[str, Any] = {}  # the data sets and settings of a worker process, loaded once by its initializer


def _init_worker(out: str, spec: GridSpec, device: str, seed: int, deadline: Optional[float]) -> None:
    torch.set_num_threads(1)
    _WORKER.update(out=Path(out), spec=spec, device=resolve_device(device), seed=seed, deadline=deadline,
                   train_set=load_dataset("digits", split="train"), test_set=load_dataset("digits", split="test"))


def _work(point: GridPoint) -> Optional[str]:
    """Train one point in a worker process (its record goes to disk); None when the deadline has passed."""
    w = _WORKER
    if w["deadline"] is not None and time.time() >= w["deadline"]:
        return None
    _run_point(point, w["spec"], w["train_set"], w["test_set"], w["device"], w["seed"],
               w["out"] / "points" / f"{point.key}.json")
    return point.key


def run_grid(
    *,
    out: str | Path,
    spec: GridSpec = DEFAULT_GRID,
    device: str = "cpu",
    resume: bool = True,
    progress: bool = True,
    seed: int = 0,
    workers: int = 1,
    time_limit_s: Optional[float] = None,
) -> Dict[str, Any]:
    """Train and measure every grid point, then correlate measures with the generalisation gap.

    Args:
        out: output folder (see the module docstring for its files).
        spec: the grid (one of :data:`PRESETS` or your own :class:`GridSpec`).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        resume: reuse ``points/<id>.json`` records written by an earlier run (same training and measure
            settings, same ``seed``); the grid may have grown in between.
        progress: show a tqdm bar over models.
        seed: seed of the stochastic measures and of the bootstrap.
        workers: local processes training points in parallel (one torch thread each); 1 trains here.
        time_limit_s: start no new model after this many seconds; the summary covers the models done
            (``complete`` is False) and a later run resumes the rest.

    Returns:
        The content of ``correlations.json`` (plus ``records``).
    """
    check_count(workers, "workers", high=max_local_workers(),
                why="local processes: 4 per CPU core at most, as for --nproc")
    out = Path(out)
    results = results_path(out, "flatness grid")  # checked before any work, with grid.json
    check_results_owner(out / "grid.json", "flatness grid")
    dev = resolve_device(device)
    points = spec.points()
    paths = {p.key: out / "points" / f"{p.key}.json" for p in points}
    todo = [p for p in points if not (resume and _load_record(paths[p.key], spec, seed) is not None)]
    t0 = time.perf_counter()
    deadline = None if time_limit_s is None else time.time() + time_limit_s
    if todo and workers > 1:
        ctx = torch.multiprocessing.get_context("spawn")
        with ctx.Pool(min(workers, len(todo)), initializer=_init_worker,
                      initargs=(str(out), spec, str(dev), seed, deadline)) as pool:
            for _ in tqdm(pool.imap_unordered(_work, todo), total=len(todo), unit="model", disable=not progress,
                          desc=f"flatness grid ({spec.name}, {workers} workers)"):
                pass
            pool.close()
            pool.join()
    elif todo:
        train_set = load_dataset("digits", split="train")
        test_set = load_dataset("digits", split="test")
        for point in tqdm(todo, desc=f"flatness grid ({spec.name})", unit="model", disable=not progress):
            if deadline is not None and time.time() >= deadline:
                break
            _run_point(point, spec, train_set, test_set, dev, seed, paths[point.key])
    records = [r for r in (_load_record(paths[p.key], spec, seed) for p in points) if r is not None]
    if len(records) < 3:
        raise ConfigurationError(f"only {len(records)} of the grid's {len(points)} models are done (a correlation "
                                 "needs 3); run the grid again (it resumes) with a longer time limit")
    summary = summarize(records, spec=spec, seed=seed)
    summary.update(points=len(points), complete=len(records) == len(points), seconds=time.perf_counter() - t0,
                   device=str(dev), workers=workers)
    write_results({"grid": spec.to_dict(), "records": records}, out / "grid.json", command="flatness grid")
    write_results(summary, results, command="flatness grid")
    grid_report(summary, records).write(out / GRID_REPORT)
    for name in summary["correlations"]:
        scatter_figure(records, [name], summary["correlations"]).savefig(out / f"scatter_{name}.png", dpi=100)
    summary["records"] = records
    return summary
