"""Lipschitz-margin training and certification as jobs: ``sturdy train --method lmt``,
``sturdy lipschitz certify`` (alias ``sturdy certify``) and the demo's certification section.

Plug-ins used by the ``train`` command and the demo:

* :func:`add_train_arguments` adds ``--method``, ``--c``, ``--c-warmup-epochs``, ``--lmt-form``,
  ``--lmt-clip`` and ``--lmt-iterations`` to ``sturdy train`` (values land in ``job.options``);
* :func:`training_plugin` turns those options into an :class:`LMTPlugin`, which joins the one
  training loop with the LMT objective (:func:`sturdy.lipschitz.lmt_objective`), its tracker (checkpointed as
  ``"lipschitz"``) and the epoch-end drift check (:class:`LMTDriftCheck`);
* :func:`register_cli` adds ``sturdy lipschitz certify`` and the alias ``sturdy certify`` (the command
  itself is :mod:`sturdy.experiments.lipschitz_certify`);
* :func:`demo_section` trains the LMT digits model and certifies it beside the standard one.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from torch import nn

from sturdy.errors import ConfigurationError
from sturdy.experiments.lipschitz_certify import (
    CERTIFY_DESCRIPTION,
    CERTIFY_HELP,
    DEFAULT_EPS,
    add_certify_arguments,
    certify_model,
    plot_certified_accuracy,
    plot_radius_histogram,
)
from sturdy.experiments.train_job import (
    TrainContext,
    TrainHooks,
    TrainJob,
    fit,
)
from sturdy.lipschitz import Certificate, LipschitzTracker, lmt_objective, tightness
from sturdy.lipschitz.losses import FORMS
from sturdy.lipschitz.objective import check_lmt_settings
from sturdy.lipschitz.tracker import DRIFT_TOLERANCE
from sturdy.training import EpochMetrics, Plugin, RunContext, TrainConfig

__all__ = [
    "add_train_arguments",
    "LMTPlugin",
    "LMTDriftCheck",
    "LMTCollapseCheck",
    "LMTCollapseWarning",
    "training_plugin",
    "register_cli",
    "demo_section",
    "lmt_demo_job",
    "DEMO_C",
    "METHODS",
]

DEMO_C = 0.5  # target radius of the demo's LMT model (L2, pixels in [0, 1])
METHODS = ("standard", "lmt")


# --------------------------------------------------------------------------------------- training


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``sturdy train`` for Lipschitz-margin training (stored in ``job.options``)."""
    g = parser.add_argument_group("Lipschitz-margin training (--method lmt)")
    g.add_argument("--method", choices=METHODS, default="standard",
                   help="training objective: cross-entropy or Lipschitz-margin training")
    g.add_argument("--c", type=float, default=0.3, metavar="RADIUS",
                   help="LMT target L2 radius (input units; pixels in [0, 1])")
    g.add_argument("--c-warmup-epochs", type=float, default=0.0, metavar="EPOCHS",
                   help="raise c linearly from 0 over this many epochs")
    g.add_argument("--lmt-form", choices=FORMS, default="pairwise",
                   help="pairwise: c L_body ||w_y - w_i||; global: sqrt(2) c L")
    g.add_argument("--lmt-clip", action="store_true",
                   help="scale the added margin by clip(M / added, 0, 1) (no gradient), as the original code")
    g.add_argument("--lmt-iterations", type=int, default=1, metavar="N",
                   help="power iterations per training step")
    g.add_argument("--lmt-drift-tolerance", type=float, default=DRIFT_TOLERANCE, metavar="FRACTION",
                   help="warn (once per epoch check) when the training estimate and the guaranteed bound differ "
                        "by more than this fraction; 0 disables the check")


@dataclass
class LMTDriftCheck(Plugin):
    """At the end of epochs 1, 2, 4, 8, ... and of the last epoch, compare the training-time estimate with the
    guaranteed bound (:meth:`LipschitzTracker.check_drift`: lagging vectors are resynchronised first, a warning
    follows only for a drift that remains). It runs before the epoch's checkpoint, so a resumed run continues
    identically. Not every epoch: the guaranteed bound costs about a third of a digits CNN epoch (BENCHMARKS.md).

    Attributes:
        tracker: the LMT objective's tracker.
        tolerance: warning threshold (a fraction; 0: off).
        drift: the checks so far (``{"epoch", "estimate", "upper", "relative_gap", ...}``).
    """

    tracker: LipschitzTracker
    tolerance: float = DRIFT_TOLERANCE
    drift: List[Dict[str, Any]] = field(default_factory=list)
    name: str = "lipschitz_drift"

    def on_epoch_end(self, ctx: RunContext, metrics: EpochMetrics) -> Optional[bool]:
        epoch = metrics.epoch
        scheduled = (epoch & (epoch - 1)) == 0 or epoch >= ctx.config.epochs  # a power of two, or the last
        if self.tolerance > 0 and scheduled:
            self.drift.append(self.tracker.check_drift(ctx.model, tolerance=self.tolerance, epoch=metrics.epoch))
        return None


class LMTCollapseWarning(UserWarning):
    """An LMT run's training accuracy fell to chance: the added margin dominates the loss."""


@dataclass
class LMTCollapseCheck(Plugin):
    """Warn, once, when an LMT run's training accuracy sits at chance after ``after_epochs`` epochs (the margin
    term ``c L`` dominates the cross-entropy), naming the cause and the remedies."""

    num_classes: int
    c: float
    tracker: LipschitzTracker
    after_epochs: int = 2
    warned: bool = False
    name: str = "lipschitz_collapse"

    def on_epoch_end(self, ctx: RunContext, metrics: EpochMetrics) -> Optional[bool]:
        chance = 1.0 / max(self.num_classes, 1)
        if not self.warned and metrics.epoch >= self.after_epochs and metrics.train_accuracy <= 1.5 * chance:
            self.warned = True
            warnings.warn(
                f"LMT epoch {metrics.epoch}: training accuracy {metrics.train_accuracy:.3f} is at chance "
                f"({chance:.3f}): the added margin c * L = {self.c:g} * {self.tracker.current_estimate():.4g} "
                "dominates the loss; lower --c, raise it slowly (--c-warmup-epochs), or use a network whose BatchNorm "
                "folds (--model-arg layout=post) or none (--model-arg batchnorm=False)",
                LMTCollapseWarning, stacklevel=2)
        return None


@dataclass(frozen=True)
class LMTPlugin:
    """Lipschitz-margin training as a training plug-in (picklable: workers receive it).

    Attributes:
        c: target L2 radius (``--c``).
        warmup_epochs: linear warm-up of ``c`` (``--c-warmup-epochs``).
        form: ``"pairwise"`` or ``"global"`` (``--lmt-form``).
        clip: clipped added margin (``--lmt-clip``).
        iterations: power iterations per step (``--lmt-iterations``).
        drift_tolerance: per-epoch drift warning threshold (``--lmt-drift-tolerance``; 0: off).
    """

    c: float = 0.3
    warmup_epochs: float = 0.0
    form: str = "pairwise"
    clip: bool = False
    iterations: int = 1
    drift_tolerance: float = DRIFT_TOLERANCE

    def __post_init__(self) -> None:
        check_lmt_settings(self.c, self.warmup_epochs, self.form, self.iterations)
        if not (self.drift_tolerance >= 0 and math.isfinite(self.drift_tolerance)):
            raise ConfigurationError(
                f"drift_tolerance (--lmt-drift-tolerance) must be >= 0, got {self.drift_tolerance!r}")

    @property
    def resume_identity(self) -> Dict[str, Any]:
        """A resumed run keeps the LMT objective: its target radius, warm-up, form, clipping and iterations (the
        drift tolerance only decides warnings and may change)."""
        return {"lipschitz": {"method": "lmt", "c": self.c, "warmup_epochs": self.warmup_epochs, "form": self.form,
                              "clip": self.clip, "iterations": self.iterations}}

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> LMTPlugin:
        """The plug-in of a job's options (keys of :func:`add_train_arguments`)."""
        return cls(c=float(options.get("c", 0.3)), warmup_epochs=float(options.get("c_warmup_epochs", 0.0)),
                   form=str(options.get("lmt_form", "pairwise")), clip=bool(options.get("lmt_clip", False)),
                   iterations=int(options.get("lmt_iterations", 1)),
                   drift_tolerance=float(options.get("lmt_drift_tolerance", DRIFT_TOLERANCE)))

    def setup(self, model: nn.Module, ctx: TrainContext) -> TrainHooks:
        """The LMT objective and its tracker (checkpointed as ``"lipschitz"``) for the run of ``ctx``."""
        objective = lmt_objective(
            model, input_shape=ctx.input_shape, steps_per_epoch=ctx.steps_per_epoch, c=self.c,
            warmup_epochs=self.warmup_epochs, form=self.form, clip=self.clip, iterations=self.iterations,
            seed=int(ctx.job.config.seed),
        )
        drift = LMTDriftCheck(objective.tracker, tolerance=self.drift_tolerance)
        collapse = LMTCollapseCheck(num_classes=ctx.num_classes, c=self.c, tracker=objective.tracker)

        def results() -> Dict[str, Any]:
            return {"lipschitz_drift": list(drift.drift)}

        return TrainHooks(objective=objective, extra_state={"lipschitz": objective.tracker}, plugins=(drift, collapse),
                          extra_results=results)


def training_plugin(job: TrainJob) -> Optional[LMTPlugin]:
    """:class:`LMTPlugin` when ``job.options["method"] == "lmt"``, ``None`` for standard training.

    Raises:
        ConfigurationError: unknown method or invalid LMT options.
    """
    method = job.options.get("method", "standard")
    if method not in METHODS:
        raise ConfigurationError(f"unknown training method {method!r}; use 'standard' or 'lmt'")
    return LMTPlugin.from_options(job.options) if method == "lmt" else None


def _cmd_missing(args: argparse.Namespace) -> int:
    raise ConfigurationError("sturdy lipschitz: choose a sub-command: certify (see sturdy lipschitz -h)")


def register_cli(subparsers: Any) -> None:
    """Add ``sturdy lipschitz certify`` and its alias ``sturdy certify`` (same options)."""
    parent = subparsers.add_parser("lipschitz", help="certified L2 robustness (Lipschitz bounds)")
    sub = parent.add_subparsers(dest="lipschitz_command", metavar="SUBCOMMAND")
    parent.set_defaults(func=_cmd_missing)
    add_certify_arguments(sub.add_parser("certify", help=CERTIFY_HELP, description=CERTIFY_DESCRIPTION))
    add_certify_arguments(subparsers.add_parser(
        "certify", help=f"{CERTIFY_HELP} (alias of `sturdy lipschitz certify`)", description=CERTIFY_DESCRIPTION
    ))


# ------------------------------------------------------------------------------------------- demo


def lmt_demo_job(out: Path, *, quick: bool, seed: int, device: str) -> TrainJob:
    """The demo's LMT digits CNN: conv-ReLU blocks without pooling (max pooling caps the certifiable
    radius on 8x8 digits by its ``sqrt(n)`` window factor: BENCHMARKS.md), pairwise LMT loss."""
    config = TrainConfig(epochs=4 if quick else 30, batch_size=64, lr=3e-3, seed=seed, device=device)
    return TrainJob(
        dataset="digits", model="cnn", model_kwargs={"channels": (16, 32), "width": 64, "pool": "none"},
        config=config, out=str(out / "lmt"),
        options={"method": "lmt", "c": DEMO_C, "c_warmup_epochs": 1 if quick else 10, "lmt_form": "pairwise",
                 "lmt_clip": True, "lmt_iterations": 1},
    )


def demo_section(ctx: Any) -> None:
    """Train the LMT model, certify it and the standard model, add plots and results."""
    t0 = time.perf_counter()
    job = lmt_demo_job(ctx.out, quick=ctx.quick, seed=ctx.seed, device=str(ctx.device))
    fitted = fit(job, plugins=[LMTPlugin.from_options(job.options)], resume=False, progress=ctx.progress)
    ctx.models["lmt"] = fitted.model.eval()
    t_train = time.perf_counter() - t0
    x, y = ctx.test_set.images.to(ctx.device), ctx.test_set.labels.to(ctx.device)
    certs: Dict[str, Certificate] = {}
    summaries: Dict[str, Any] = {}
    for name in ("standard", "lmt"):
        certs[name], summaries[name] = certify_model(ctx.models[name], x, y)
    n_tight = 5 if ctx.quick else 20
    t = tightness(ctx.models["lmt"], x[:n_tight], y[:n_tight], bound=certs["lmt"].bound,
                  steps=20 if ctx.quick else 50, restarts=1 if ctx.quick else 2, bisection_steps=6)
    summaries["lmt"]["tightness"] = t.to_dict()
    ctx.results["lipschitz"] = {
        "c": DEMO_C,
        "lmt_job": job.to_dict(),
        "train_seconds": t_train,
        **summaries,
    }
    sec = ctx.report.section("Certified robustness (Lipschitz-margin training)")
    sec.text(
        "Certified L2 robustness from a guaranteed global Lipschitz bound (float64 SVD/FFT bounds per layer, "
        "composed over the traced graph) and the pairwise margin certificate "
        "radius = min_i (f_y - f_i) / (L_body ||w_y - w_i||). The LMT model was trained with the "
        f"Lipschitz-margin loss (target radius c = {DEMO_C}, pairwise form, clipped margin, one power iteration "
        f"per step) for {job.config.epochs} epochs ({t_train:.0f} s)."
    )
    rows = []
    for name in ("standard", "lmt"):
        s = summaries[name]
        rows.append([name, s["clean_accuracy"]] + [s["certified_accuracy"][str(e)] for e in DEFAULT_EPS]
                    + [s["median_radius"], s["lipschitz_upper"], s["lipschitz_estimate"]])
    sec.table(header=["model", "clean acc."] + [f"cert. acc. eps={e}" for e in DEFAULT_EPS]
              + ["median radius", "L upper", "L estimate"], rows=rows)
    sec.figure(plot_certified_accuracy(certs), name="lipschitz_certified_accuracy.png",
               caption="Certified accuracy on the 497 test digits against the L2 radius (dots: reported eps).")
    sec.figure(plot_radius_histogram(certs), name="lipschitz_radius_histogram.png",
               caption="Certified radii of correctly classified test digits (log counts).")
    ts = {k: ("n/a" if v is None else (f"{v:.3f}" if isinstance(v, float) else v))
          for k, v in summaries["lmt"]["tightness"].items()}
    sec.text(
        f"Tightness on {ts['n']} LMT test points: median certified radius A = {ts['median_A']}, first-order "
        f"radius B = {ts['median_B']}, smallest attack radius D = {ts['median_D']}; median A/B = "
        f"{ts['median_A_over_B']}, A/D = {ts['median_A_over_D']}; soundness violations (A > D): "
        f"{ts['violations']}."
    )
    layers = summaries["lmt"]["per_layer"]
    sec.table(header=["layer (LMT model)", "kind", "upper bound", "power-iteration estimate", "method"],
              rows=[[r["path"], r["kind"], r["upper"], r["estimate"], r["method"]] for r in layers])
