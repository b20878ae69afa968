"""The generalisation-correlation harness: train a grid of digits models, measure them, rank-correlate.

Protocol (after Jiang et al., ICLR 2020): every grid point is trained with the shared training loop
until its running training cross-entropy reaches ``target_loss`` or ``max_epochs`` pass (the
``converged`` flag records which). The generalisation gap is ``train accuracy - test accuracy``, the
training accuracy being measured on the labels the model was trained on (random labels included).
Every registered measure is computed on that training set; Kendall's tau and the granulated tau of
each measure against the gap are reported with bootstrap confidence intervals.

Output folder: ``points/<id>.json`` (one record per model, reused when the run is resumed),
``grid.json`` (all records), ``correlations.json``, ``scatter.png`` and ``scatter_<measure>.png``,
``correlations.png``.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import matplotlib
import matplotlib.ticker
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from tqdm.auto import tqdm

from sturdy.data import ImageDataset, apply_label_noise, load_dataset
from sturdy.errors import ConfigurationError
from sturdy.experiments.jsonio import json_safe, write_json
from sturdy.flatness import available_measures, compute_measures, correlate_measures, sign_errors, tau_difference
from sturdy.models import create_model
from sturdy.report import new_figure
from sturdy.training import EpochMetrics, TrainConfig, evaluate, resolve_device, train

__all__ = ["GridSpec", "GridPoint", "DEFAULT_GRID", "QUICK_GRID", "run_grid", "grid_model_kwargs", "scatter_figure",
           "correlation_figure", "HYPERPARAMETERS"]

HYPERPARAMETERS = ("arch", "batch_size", "lr", "width", "weight_decay", "label_noise", "seed")

# Cheaper settings of the perturbation measures for the grid (documented in the results).
GRID_MEASURE_SETTINGS: Dict[str, Dict[str, Any]] = {
    "pacbayes_flatness": {"samples": 4, "steps": 14, "sigma_range": (1e-4, 10.0)},
    "pacbayes_mag_flatness": {"samples": 4, "steps": 14, "sigma_range": (1e-4, 10.0)},
    "adaptive_average_sharpness": {"samples": 8},
    "hessian_top_eigenvalue": {"iterations": 50, "tol": 1e-3},
}


@dataclass(frozen=True)
class GridPoint:
    """One model of the grid (its hyper-parameters)."""

    arch: str
    batch_size: int
    lr: float
    width: int
    weight_decay: float
    label_noise: float
    seed: int

    @property
    def key(self) -> str:
        """File-name-safe identifier."""
        return (f"{self.arch}-w{self.width}-bs{self.batch_size}-lr{self.lr:g}-wd{self.weight_decay:g}"
                f"-noise{self.label_noise:g}-s{self.seed}")

    def hyperparams(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GridSpec:
    """A full factorial grid of training runs on digits.

    Attributes:
        name: label written to the results.
        architectures: ``"mlp"`` (2 hidden layers of ``width``) and/or ``"cnn"`` (channels
            ``(width/8, width/4)``, hidden fully connected layer of ``width``).
        batch_sizes, lrs, widths, weight_decays, label_noise, seeds: the varied values.
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

    def __post_init__(self) -> None:
        for arch in self.architectures:
            if arch not in ("mlp", "cnn"):
                raise ConfigurationError(f"grid architectures must be 'mlp' or 'cnn', got {arch!r}")
        axes = (self.architectures, self.batch_sizes, self.lrs, self.widths, self.weight_decays, self.label_noise,
                self.seeds)
        if any(len(a) == 0 for a in axes):
            raise ConfigurationError("every grid axis needs at least one value")
        if not (self.target_loss > 0 and self.max_epochs >= 1):
            raise ConfigurationError("target_loss must be > 0 and max_epochs >= 1")

    def points(self) -> List[GridPoint]:
        """Every combination, in a fixed order."""
        return [GridPoint(*combo) for combo in itertools.product(
            self.architectures, self.batch_sizes, self.lrs, self.widths, self.weight_decays, self.label_noise,
            self.seeds)]

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["measure_settings"] = {k: dict(v) for k, v in self.measure_settings.items()}
        return d


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


def grid_model_kwargs(arch: str, width: int) -> Dict[str, Any]:
    """Model options of a grid architecture at a given width."""
    if arch == "mlp":
        return {"width": width, "depth": 2}
    return {"channels": (max(2, width // 8), max(2, width // 4)), "width": width}


def train_point(
    point: GridPoint, spec: GridSpec, train_set: ImageDataset, test_set: ImageDataset, *, device: torch.device
) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """Train one grid model (stopping at ``spec.target_loss``); returns it (eval mode) and its record."""
    torch.manual_seed(point.seed)
    model = create_model(point.arch, in_shape=train_set.image_shape, num_classes=train_set.num_classes,
                         **grid_model_kwargs(point.arch, point.width)).to(device)
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
    noisy = train_set.with_labels(apply_label_noise(train_set.labels, fraction=point.label_noise,
                                                    num_classes=train_set.num_classes, seed=point.seed))
    train_loss, train_acc = evaluate(model, noisy, device=device)
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


def run_grid(
    *,
    out: str | Path,
    spec: GridSpec = DEFAULT_GRID,
    device: str = "cpu",
    resume: bool = True,
    progress: bool = True,
    seed: int = 0,
) -> Dict[str, Any]:
    """Train and measure every grid point, then correlate measures with the generalisation gap.

    Args:
        out: output folder (see the module docstring for its files).
        spec: the grid (:data:`DEFAULT_GRID`, :data:`QUICK_GRID` or your own :class:`GridSpec`).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        resume: reuse ``points/<id>.json`` records written by an earlier run with the same grid.
        progress: show a tqdm bar over models.
        seed: seed of the stochastic measures and of the bootstrap.

    Returns:
        The content of ``correlations.json`` (plus ``records``).
    """
    out = Path(out)
    dev = resolve_device(device)
    train_set = load_dataset("digits", split="train")
    test_set = load_dataset("digits", split="test")
    records: List[Dict[str, Any]] = []
    grid_json = json.loads(json.dumps(json_safe(spec.to_dict())))
    t0 = time.perf_counter()
    for point in tqdm(spec.points(), desc=f"flatness grid ({spec.name})", unit="model", disable=not progress):
        path = out / "points" / f"{point.key}.json"
        if resume and path.is_file():
            record = json.loads(path.read_text(encoding="utf-8"))
            if record.get("grid") == grid_json:
                records.append(record)
                continue
        model, record = train_point(point, spec, train_set, test_set, device=dev)
        noisy = train_set.with_labels(apply_label_noise(train_set.labels, fraction=point.label_noise,
                                                        num_classes=train_set.num_classes, seed=point.seed))
        record["measures"] = measure_point(model, noisy, spec, seed=seed)
        record["grid"] = spec.to_dict()
        write_json(record, path)
        records.append(record)
    summary = summarize(records, spec=spec, seed=seed)
    summary["seconds"] = time.perf_counter() - t0
    summary["device"] = str(dev)
    write_json({"grid": spec.to_dict(), "records": records}, out / "grid.json")
    write_json(summary, out / "correlations.json")
    names = list(summary["correlations"])
    figures = {"scatter.png": scatter_figure(records, names, summary["correlations"]),
               "correlations.png": correlation_figure(summary["correlations"])}
    figures.update({f"scatter_{n}.png": scatter_figure(records, [n], summary["correlations"]) for n in names})
    for file_name, fig in figures.items():
        fig.savefig(out / file_name, dpi=100)
    summary["records"] = records
    return summary


MIN_CONVERGED = 6  # fewest models that reached the target loss for the converged-only correlation


def _correlate(records: Sequence[Mapping[str, Any]], names: Sequence[str], spec: GridSpec,
               seed: int) -> Dict[str, Any]:
    gap = [r["gap"] for r in records]
    hps = [{k: r["hyperparams"][k] for k in HYPERPARAMETERS} for r in records]
    values = {n: [float(r["measures"][n]["value"]) for r in records] for n in names}
    corr = correlate_measures(values, gap, hps, bootstrap=spec.bootstrap, seed=seed)
    return {n: c.to_dict() for n, c in corr.items()}


def _robustness(records: Sequence[Mapping[str, Any]], names: Sequence[str], spec: GridSpec,
                seed: int) -> Dict[str, Any]:
    """Dziugaite et al.'s sign-errors of every measure, and normalized sharpness against each baseline."""
    gap = [r["gap"] for r in records]
    hps = [{k: r["hyperparams"][k] for k in HYPERPARAMETERS} for r in records]
    values = {n: [float(r["measures"][n]["value"]) for r in records] for n in names}
    out: Dict[str, Any] = {"sign_errors": {}, "normalized_sharpness_vs": {}}
    for n in names:
        try:
            out["sign_errors"][n] = sign_errors(values[n], gap, hps).to_dict()
        except ConfigurationError:
            out["sign_errors"][n] = None  # no pair of models differs in exactly one hyper-parameter
    if "normalized_sharpness" in values:
        for n in names:
            if n != "normalized_sharpness":
                out["normalized_sharpness_vs"][n] = tau_difference(
                    values["normalized_sharpness"], values[n], gap, resamples=max(spec.bootstrap, 1), seed=seed
                ).to_dict()
    return out


def summarize(records: Sequence[Mapping[str, Any]], *, spec: GridSpec, seed: int = 0) -> Dict[str, Any]:
    """Kendall and granulated tau of every measure against the gap (JSON-able).

    As in Jiang et al. (2020), the headline ``correlations`` use only the models that reached the target
    training loss when there are at least ``MIN_CONVERGED`` of them (``selection`` says which set was used);
    ``correlations_all_models`` always uses every model.
    """
    if len(records) < 3:
        raise ConfigurationError(f"a correlation needs at least 3 models, the grid has {len(records)}")
    names = list(records[0]["measures"])
    converged = [r for r in records if r["converged"]]
    use_converged = len(converged) >= MIN_CONVERGED
    gap = [r["gap"] for r in records]
    every = _correlate(records, names, spec, seed)
    seconds = {n: float(sum(r["measures"][n]["seconds"] for r in records) / len(records)) for n in names}
    return {
        "grid": spec.name,
        "models": len(records),
        "converged": len(converged),
        "selection": "converged" if use_converged else "all",
        "target_loss": spec.target_loss,
        "gap": {"min": min(gap), "max": max(gap), "mean": sum(gap) / len(gap)},
        "gap_definition": "train accuracy (on the trained labels) - test accuracy",
        "correlations": _correlate(converged, names, spec, seed) if use_converged else every,
        "correlations_all_models": every,
        "robustness": _robustness(converged if use_converged else records, names, spec, seed),
        "mean_seconds_per_model": seconds,
        "mean_train_seconds": sum(r["train_seconds"] for r in records) / len(records),
        "bootstrap": spec.bootstrap,
    }


def scatter_figure(records: Sequence[Mapping[str, Any]], names: Sequence[str],
                   correlations: Mapping[str, Mapping[str, Any]]) -> Figure:
    """Measure (x, log scale when positive) against generalisation gap (y); colour = label noise, marker = arch."""
    cols = min(len(names), 4)
    rows = math.ceil(len(names) / cols)
    fig, axes = new_figure(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
    noise_levels = sorted({r["hyperparams"]["label_noise"] for r in records})
    colours = matplotlib.colormaps["viridis"](torch.linspace(0, 0.9, max(len(noise_levels), 1)).tolist())
    markers = {"mlp": "o", "cnn": "s"}
    for ax, name in zip(axes.flat, names):
        xs = [float(r["measures"][name]["value"]) for r in records]
        for r, x in zip(records, xs):
            hp = r["hyperparams"]
            colour = colours[noise_levels.index(hp["label_noise"])]
            ax.scatter(x, r["gap"], s=18, marker=markers.get(hp["arch"], "^"), alpha=0.8,
                       facecolors=colour if r["converged"] else "none", edgecolors=colour)
        if all(x > 0 for x in xs):
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        c = correlations.get(name, {})
        tau, psi = c.get("tau"), c.get("granulated_tau")
        ax.set_title(f"{name}\ntau={_fmt(tau)}  Psi={_fmt(psi)}", fontsize=8)
        ax.set_ylabel("gap (train - test acc)", fontsize=7)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    handles = [Line2D([], [], linestyle="", marker="o", color=colours[i], label=f"noise {lvl:g}")
               for i, lvl in enumerate(noise_levels)]
    handles += [Line2D([], [], linestyle="", marker=m, color="grey", label=a) for a, m in markers.items()]
    handles.append(Line2D([], [], linestyle="", marker="o", markerfacecolor="none", color="grey",
                              label="target loss not reached"))
    if len(names) == 1:
        axes.flat[0].legend(handles=handles, loc="best", fontsize=6)
    else:
        fig.legend(handles=handles, loc="lower right", fontsize=7)
    fig.tight_layout()
    return fig


def correlation_figure(correlations: Mapping[str, Mapping[str, Any]]) -> Figure:
    """Horizontal bars of Kendall tau and granulated tau per measure with their bootstrap intervals."""
    names = list(correlations)
    fig, ax = new_figure(figsize=(7, 0.45 * len(names) + 1.2))
    for offset, key, ci_key, label in ((-0.18, "tau", "tau_ci", "Kendall tau"),
                                       (0.18, "granulated_tau", "granulated_ci", "granulated tau")):
        vals = [correlations[n][key] if correlations[n][key] is not None else float("nan") for n in names]
        lo = [v - (correlations[n][ci_key][0] if correlations[n][ci_key][0] is not None else v)
              for v, n in zip(vals, names)]
        hi = [(correlations[n][ci_key][1] if correlations[n][ci_key][1] is not None else v) - v
              for v, n in zip(vals, names)]
        ax.barh([i + offset for i in range(len(names))], vals, height=0.34, xerr=[lo, hi], label=label, capsize=2)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("rank correlation with the generalisation gap (95% bootstrap interval)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.2f}"
