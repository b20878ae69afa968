"""Flatness part of the ``sturdy`` command and of the demo report.

Commands:
    ``sturdy flatness grid --out DIR [--preset quick|default|wide] [--workers N] [--time-limit MIN]``: the
    generalisation-correlation harness (:mod:`sturdy.experiments.flatness_grid`).
    ``sturdy flatness measure --checkpoint M --out DIR``: every measure of one trained model, on the
    training data it was trained on (label noise of its job included), written to ``DIR/measures.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from sturdy.errors import ConfigurationError, UnsupportedModuleError
from sturdy.experiments.argtypes import non_negative_int, positive_float, positive_int, seed_int
from sturdy.experiments.command_report import write_command_report
from sturdy.experiments.parts import no_train_arguments, no_training_plugin
from sturdy.experiments.sources import add_source_arguments, load_sources
from sturdy.flatness import available_measures, check_rescaling_invariance, compute_measures, rescale_nodes
from sturdy.flatness.sketching import TRACE_METHODS
from sturdy.validation import check_count

__all__ = ["register_cli", "add_train_arguments", "training_plugin", "demo_section", "measure_checkpoint",
           "measure_model"]

DEMO_SAMPLES = (150, 500)  # training samples the demo measures on (quick, normal)
DEMO_SETTINGS = {
    True: {
        "hessian_trace": {"probes": 20},
        "hessian_top_eigenvalue": {"iterations": 20, "tol": 1e-3},
        "pacbayes_flatness": {"samples": 2, "steps": 8, "sigma_range": (1e-4, 10.0)},
        "pacbayes_mag_flatness": {"samples": 2, "steps": 8, "sigma_range": (1e-4, 10.0)},
        "adaptive_average_sharpness": {"samples": 4},
    },
    False: {
        "hessian_trace": {"probes": 100},
        "hessian_top_eigenvalue": {"iterations": 50, "tol": 1e-3},
        "pacbayes_flatness": {"samples": 4, "steps": 12, "sigma_range": (1e-4, 10.0)},
        "pacbayes_mag_flatness": {"samples": 4, "steps": 12, "sigma_range": (1e-4, 10.0)},
        "adaptive_average_sharpness": {"samples": 8},
    },
}


# ----------------------------------------------------------------------------- CLI


def register_cli(subparsers: Any) -> None:
    """Add ``sturdy flatness grid`` and ``sturdy flatness measure``."""
    parent = subparsers.add_parser("flatness", help="normalized sharpness, generalisation measures, correlation grid")
    sub = parent.add_subparsers(dest="flatness_command", metavar="SUBCOMMAND")
    parent.set_defaults(func=_cmd_missing)

    p = sub.add_parser("grid", help="train a grid of digits models, compute every measure, rank-correlate with the gap")
    p.add_argument("--out", required=True, help="output folder (correlations.json, grid.json, PNGs)")
    p.add_argument("--preset", choices=("quick", "default", "wide"), default=None,
                   help="quick: 16 MLPs (1-2 minutes); default: 64 MLPs and CNNs (about 30 minutes on 2 cores); "
                        "wide: 288 MLPs varying depth too, 3 seeds (resumable, run it in chunks with --time-limit)")
    p.add_argument("--quick", action="store_true", help="same as --preset quick")
    p.add_argument("--seeds", type=positive_int, default=None, metavar="N",
                   help="train every setting with seeds 0..N-1 (default: the preset's seeds); grows a grid in place")
    p.add_argument("--workers", type=positive_int, default=1,
                   help="local processes training grid points in parallel, one torch thread each (default 1)")
    p.add_argument("--time-limit", type=positive_float, default=None, metavar="MINUTES",
                   help="start no new model after this many minutes; summarise the models done (resume later)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when available)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the stochastic measures and of the bootstrap")
    p.add_argument("--bootstrap", type=non_negative_int, default=None, help="bootstrap resamples (default: grid's)")
    p.add_argument("--no-resume", action="store_true", help="retrain points whose records already exist")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_grid)

    p = sub.add_parser("measure", help="every generalisation measure of one trained model (or your own)")
    add_source_arguments(p)
    p.add_argument("--out", required=True, help="output folder (measures.json)")
    p.add_argument("--measures", default=None,
                   help=f"comma-separated subset of: {', '.join(available_measures())} (default: all)")
    p.add_argument("--limit", "--samples", dest="limit", type=positive_int, default=None, metavar="N",
                   help="measure on the first N training samples only (default: the whole training split)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when available)")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--trace-method", choices=TRACE_METHODS, default=None,
                   help="estimator of the hessian_trace measure at its 100 Hessian-vector products: plain "
                        "Hutchinson probes (default), Hutch++ or XTrace (variance-reduced)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_measure)


def _cmd_missing(args: argparse.Namespace) -> int:
    raise ConfigurationError("sturdy flatness: choose a sub-command: grid or measure (see sturdy flatness -h)")


def _cmd_grid(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from sturdy.experiments.flatness_grid import GRID_REPORT, MAX_GRID_POINTS, PRESETS, max_grid_seeds, run_grid

    if args.quick and args.preset not in (None, "quick"):
        raise ConfigurationError(f"--quick contradicts --preset {args.preset}; give one of them")
    spec = PRESETS["quick" if args.quick else args.preset or "default"]
    if args.bootstrap is not None:
        spec = replace(spec, bootstrap=args.bootstrap)
    if args.seeds is not None:  # checked before the seeds' tuple is built
        check_count(args.seeds, "--seeds", high=max_grid_seeds(spec),
                    why=f"a grid holds at most {MAX_GRID_POINTS} models, {spec.models_per_seed()} per seed here")
        spec = replace(spec, seeds=tuple(range(args.seeds)))
    summary = run_grid(out=args.out, spec=spec, device=args.device, resume=not args.no_resume,
                       progress=not args.no_progress, seed=args.seed, workers=args.workers,
                       time_limit_s=None if args.time_limit is None else 60 * args.time_limit)
    done = "" if summary["complete"] else f" of {summary['points']} (time limit: run again to resume)"
    print(f"{summary['models']} models{done} ({summary['converged']} reached the target loss) in "
          f"{summary['seconds']:.0f} s; Kendall tau against the generalisation gap "
          f"({summary['selection']} models), sign-error mean/worst, normalized sharpness vs the measure:")
    rob = summary["robustness"]
    for name, c in summary["correlations"].items():
        se = rob["sign_errors"].get(name) or {}
        diff = rob["normalized_sharpness_vs"].get(name)
        versus = "" if diff is None else (f"  NS-minus {_fmt(diff['difference'])} [{_fmt(diff['interval'][0])}, "
                                          f"{_fmt(diff['interval'][1])}] {diff['verdict']}")
        print(f"  {name:28s} tau {_fmt(c['tau'])} [{_fmt(c['tau_ci'][0])}, {_fmt(c['tau_ci'][1])}]  "
              f"granulated {_fmt(c['granulated_tau'])}  sign-error {_fmt(se.get('mean'))}/{_fmt(se.get('worst'))}"
              f"{versus}")
    print(f"written to {Path(args.out) / 'correlations.json'} and {Path(args.out) / GRID_REPORT}")
    return 0


def _fmt(value: Optional[float]) -> str:
    return "  n/a" if value is None else f"{value:+.2f}"


def measure_checkpoint(
    checkpoint: str | Path,
    *,
    out: str | Path,
    measures: Optional[List[str]] = None,
    limit: Optional[int] = None,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
) -> Dict[str, Any]:
    """Compute measures of the model in ``checkpoint`` (``sturdy train`` output); writes ``out/measures.json``.

    The measures use the training split with the job's label noise, or its first ``limit`` samples.
    """
    from sturdy.experiments.jsonio import results_path
    from sturdy.experiments.train_job import check_data_matches, load_job_data, load_trained_model
    from sturdy.training import resolve_device

    results_path(out, "flatness measure")  # checked before any work
    model, job = load_trained_model(checkpoint, device=resolve_device(device))
    train_set, test_set = load_job_data(job)
    check_data_matches(model, train_set, job.dataset)
    record = {"model": {"checkpoint": str(checkpoint), "job": job.to_dict()}, "data": {"spec": job.dataset}}
    return measure_model(model, train_set, test_set, job=job, record=record, out=out, measures=measures, limit=limit,
                         device=device, seed=seed, progress=progress)


def measure_model(model: Any, train_set: Any, test_set: Any, *, job: Any, record: Dict[str, Any], out: str | Path,
                  measures: Optional[List[str]] = None, limit: Optional[int] = None, device: str = "cpu",
                  seed: int = 0, progress: bool = True,
                  settings: Optional[Dict[str, Dict[str, Any]]] = None) -> Dict[str, Any]:
    """Every measure (or ``measures``) of ``model`` on its training data (with the job's label noise when it
    comes from a checkpoint, the first ``limit`` samples; ``settings`` per measure, for those computed);
    writes ``out/measures.json``."""
    from sturdy.data import apply_label_noise
    from sturdy.experiments.jsonio import results_path, write_results
    from sturdy.training import evaluate, resolve_device

    results = results_path(out, "flatness measure")  # checked before any work
    dev = resolve_device(device)
    if job is not None:
        labels = apply_label_noise(train_set.labels, fraction=job.config.label_noise,
                                   num_classes=train_set.num_classes, seed=job.config.seed)
        train_set = train_set.with_labels(labels)
    if limit is not None:
        train_set = train_set.subset(torch.arange(min(limit, len(train_set))))
    names = measures if measures else list(available_measures())
    t0 = time.perf_counter()
    chosen = {k: v for k, v in (settings or {}).items() if k in names}
    measured = compute_measures(model, train_set, names=names, seed=seed, progress=progress, settings=chosen)
    train_loss, train_acc = evaluate(model, train_set, device=dev)
    test_loss, test_acc = evaluate(model, test_set, device=dev)
    result = {
        "checkpoint": record["model"].get("checkpoint"), "job": job.to_dict() if job is not None else None,
        "sources": record, "samples": len(train_set),
        "train_loss": train_loss, "train_accuracy": train_acc, "test_loss": test_loss, "test_accuracy": test_acc,
        "gap": train_acc - test_acc, "measures": measured.to_dict(), "seconds": time.perf_counter() - t0,
    }
    rows = [[name, m["value"]] for name, m in result["measures"].items()]
    write_command_report(out, "flatness measure", title="sturdy flatness measure",
                         summary={k: v for k, v in result.items() if k != "measures"},
                         tables={"measures": (["measure", "value"], rows)})
    write_results(result, results, command="flatness measure")
    return result


def _cmd_measure(args: argparse.Namespace) -> int:
    names = [n.strip() for n in args.measures.split(",") if n.strip()] if args.measures else None
    if names:
        unknown = [n for n in names if n not in available_measures()]
        if unknown:
            raise ConfigurationError(
                f"unknown measure(s) {', '.join(unknown)}; choose from: {', '.join(available_measures())}"
            )
        if args.trace_method is not None and "hessian_trace" not in names:
            raise ConfigurationError(f"--trace-method {args.trace_method} is the estimator of the hessian_trace "
                                     "measure, which --measures leaves out; add it or drop --trace-method")
    from sturdy.experiments.jsonio import results_path
    from sturdy.training import resolve_device

    results_path(args.out, "flatness measure")  # checked before any work
    sources = load_sources(args, device=resolve_device(args.device))
    result = measure_model(sources.model, sources.train_set, sources.test_set, job=sources.job,
                           record=sources.record, out=args.out, measures=names, limit=args.limit,
                           device=args.device, seed=args.seed, progress=not args.no_progress,
                           settings={"hessian_trace": {"method": args.trace_method or "hutchinson"}})
    print(f"gap (train - test accuracy) {result['gap']:.4f}")
    for name, m in result["measures"].items():
        print(f"  {name:30s} {m['value']:.6g}")
    print(f"written to {Path(args.out) / 'measures.json'}")
    return 0


# ----------------------------------------------------------------------------- demo


def _tiny_mlp(ctx: Any, x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    """A small ReLU MLP trained for a few seconds (when the demo's model cannot be rescaled)."""
    from sturdy.models import create_model

    torch.manual_seed(ctx.seed)
    model = create_model("mlp", in_shape=ctx.train_set.image_shape, num_classes=ctx.train_set.num_classes, width=64)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60 if not ctx.quick else 20):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def demo_section(ctx: Any) -> None:
    """Measures of the standard (and LMT) model and the rescaling-invariance table.

    Budget: a small share of the demo (time in BENCHMARKS.md): measures use the first 500 (150 with
    ``ctx.quick``) training digits and reduced Monte-Carlo settings.
    """
    from sturdy.training import evaluate

    t0 = time.perf_counter()
    quick = bool(ctx.quick)
    n = min(DEMO_SAMPLES[0] if quick else DEMO_SAMPLES[1], len(ctx.train_set))
    subset = ctx.train_set.subset(torch.arange(n))
    settings = DEMO_SETTINGS[quick]
    models = {"standard": ctx.models["standard"]}
    if ctx.models.get("lmt") is not None:
        models["lmt"] = ctx.models["lmt"]
    names = list(available_measures())
    results: Dict[str, Any] = {"samples": n, "settings": settings, "models": {}}
    for label, model in models.items():
        measured = compute_measures(model, subset, names=names, seed=ctx.seed, settings=settings)
        train_acc = evaluate(model, ctx.train_set)[1]
        test_acc = evaluate(model, ctx.test_set)[1]
        results["models"][label] = {"train_accuracy": train_acc, "test_accuracy": test_acc,
                                    "gap": train_acc - test_acc, "measures": measured.to_dict()}

    sec = ctx.report.section("Normalized flatness and generalisation measures")
    sec.text(
        "Normalized sharpness (Tsuzuku et al., ICML 2020) minimises, per layer, "
        "sum_ij H_ij alpha_i beta_j + W_ij^2 / (alpha_i beta_j) over row and column scales, with H the exact "
        "Hessian diagonal of the mean training cross-entropy (generalised Gauss-Newton, one backward pass per "
        f"class). All measures below are computed on the first {n} training digits; larger means sharper / more "
        "complex. Perturbation measures are Monte-Carlo estimates with reduced sample counts in the demo."
    )
    header = ["measure"] + list(models)
    rows: List[List[Any]] = [[name] + [results["models"][m]["measures"][name]["value"] for m in models]
                             for name in names]
    rows.append(["generalisation gap (train - test accuracy)"] + [results["models"][m]["gap"] for m in models])
    sec.table(header=header, rows=rows, caption="Generalisation measures of the demo models")

    # Invariance: rescale the demo model itself when it is a ReLU chain, else a tiny MLP trained here.
    x, y = subset.images, subset.labels
    try:
        rescale_nodes(models["standard"], seed=ctx.seed)
        inv_model, inv_label = models["standard"], "the standard CNN"
    except (UnsupportedModuleError, ConfigurationError):
        inv_model, inv_label = _tiny_mlp(ctx, x, y), "a small ReLU MLP trained for this check"
    inv_n = 100 if quick else 300
    inv = check_rescaling_invariance(inv_model, (x[:inv_n], y[:inv_n]), seed=ctx.seed)
    results["invariance"] = {"model": inv_label, **inv.to_dict()}
    sec.text(
        f"Reparametrisation check on {inv_label} (float64, {inv_n} samples): every hidden unit is multiplied by a "
        "random factor in [0.1, 10] and the next layer's matching weights divided by it. The network function is "
        "unchanged; normalized sharpness is unchanged, while the Hessian trace and norm products move."
    )
    sec.table(header=["quantity", "original", "rescaled", "rescaled / original"],
              rows=inv.table(),
              caption="Node-wise rescaling: invariance of normalized sharpness")
    results["seconds"] = time.perf_counter() - t0
    ctx.results["flatness"] = results


add_train_arguments = no_train_arguments  # this part analyses trained models: no training options
training_plugin = no_training_plugin
