"""Summary, figures and HTML page of the generalisation-correlation grid (:mod:`sturdy.experiments.flatness_grid`).

:func:`summarize` turns the per-model records into ``correlations.json``: Kendall and granulated tau of every
measure against the gap (Jiang et al. 2020), the robustness view (Dziugaite et al. 2020: sign-errors over
pairs of models differing in one hyper-parameter, per environment, mean and worst case) and, for every
baseline, the paired-bootstrap interval of ``tau(normalized sharpness) - tau(baseline)`` with its verdict
(``beats`` / ``loses`` when the interval excludes 0, else ``undecided``). :func:`grid_report` lays the same
numbers out as an HTML page with PNG figures.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence

import matplotlib
import matplotlib.ticker
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from sturdy.errors import ConfigurationError
from sturdy.flatness import correlate_measures, sign_errors, tau_difference
from sturdy.report import Report, new_figure

__all__ = ["HYPERPARAMETERS", "ENVIRONMENT_AXES", "MIN_CONVERGED", "REFERENCE_MEASURE", "summarize",
           "comparison_rows", "scatter_figure", "correlation_figure", "robustness_figure", "grid_report"]

HYPERPARAMETERS = ("arch", "batch_size", "lr", "width", "depth", "weight_decay", "label_noise", "seed")
ENVIRONMENT_AXES = tuple(h for h in HYPERPARAMETERS if h != "seed")
"""Hyper-parameters of the granulated tau and of the sign-error environments. The seed is no axis of its own
(its pairs differ by chance only): in the granulated tau it tells groups apart; for the sign-errors seeds are
replicates, so an environment (one hyper-parameter changing, the others fixed) averages over every pair of
models, whatever their seeds, that differ in that hyper-parameter."""
MIN_CONVERGED = 6  # fewest models that reached the target loss for the converged-only correlation
REFERENCE_MEASURE = "normalized_sharpness"


def _table(records: Sequence[Mapping[str, Any]], names: Sequence[str]) -> tuple:
    gap = [r["gap"] for r in records]
    hps = [{k: r["hyperparams"].get(k) for k in HYPERPARAMETERS} for r in records]
    values = {n: [float(r["measures"][n]["value"]) for r in records] for n in names}
    return gap, hps, values


def _correlate(records: Sequence[Mapping[str, Any]], names: Sequence[str], bootstrap: int,
               seed: int) -> Dict[str, Any]:
    gap, hps, values = _table(records, names)
    corr = correlate_measures(values, gap, hps, bootstrap=bootstrap, seed=seed, axes=ENVIRONMENT_AXES)
    return {n: c.to_dict() for n, c in corr.items()}


def _robustness(records: Sequence[Mapping[str, Any]], names: Sequence[str], bootstrap: int,
                seed: int) -> Dict[str, Any]:
    """Sign-errors of every measure, and the reference measure against each baseline."""
    gap, hps, values = _table(records, names)
    replicates = [{k: v for k, v in h.items() if k != "seed"} for h in hps]  # seeds: replicates of a setting
    out: Dict[str, Any] = {"sign_errors": {}, "normalized_sharpness_vs": {}, "verdicts": {},
                           "environment_axes": list(ENVIRONMENT_AXES)}
    for n in names:
        try:
            out["sign_errors"][n] = sign_errors(values[n], gap, replicates, axes=ENVIRONMENT_AXES).to_dict()
        except ConfigurationError:
            out["sign_errors"][n] = None  # no pair of models differs in exactly one hyper-parameter
    if REFERENCE_MEASURE in values:
        for n in names:
            if n != REFERENCE_MEASURE:
                diff = tau_difference(values[REFERENCE_MEASURE], values[n], gap, resamples=max(bootstrap, 1),
                                      seed=seed)
                out["normalized_sharpness_vs"][n] = diff.to_dict()
                out["verdicts"][n] = diff.verdict
    return out


def summarize(records: Sequence[Mapping[str, Any]], *, spec: Any, seed: int = 0) -> Dict[str, Any]:
    """Correlations and robustness of every measure against the gap (JSON-able; module docstring).

    As in Jiang et al. (2020), the headline ``correlations`` and ``robustness`` use only the models that
    reached the target training loss when there are at least ``MIN_CONVERGED`` of them (``selection`` says
    which set was used); ``correlations_all_models`` always uses every model. ``spec`` is the
    :class:`~sturdy.experiments.flatness_grid.GridSpec` (its name, target loss and bootstrap count).
    """
    if len(records) < 3:
        raise ConfigurationError(f"a correlation needs at least 3 models, the grid has {len(records)}")
    names = list(records[0]["measures"])
    converged = [r for r in records if r["converged"]]
    use_converged = len(converged) >= MIN_CONVERGED
    chosen = converged if use_converged else records
    gap = [r["gap"] for r in records]
    every = _correlate(records, names, spec.bootstrap, seed)
    seconds = {n: float(sum(r["measures"][n]["seconds"] for r in records) / len(records)) for n in names}
    return {
        "grid": spec.name,
        "models": len(records),
        "converged": len(converged),
        "selection": "converged" if use_converged else "all",
        "target_loss": spec.target_loss,
        "gap": {"min": min(gap), "max": max(gap), "mean": sum(gap) / len(gap)},
        "gap_definition": "train accuracy (on the trained labels) - test accuracy",
        "correlations": _correlate(chosen, names, spec.bootstrap, seed) if len(chosen) < len(records) else every,
        "correlations_all_models": every,
        "robustness": _robustness(chosen, names, spec.bootstrap, seed),
        "mean_seconds_per_model": seconds,
        "mean_train_seconds": sum(r["train_seconds"] for r in records) / len(records),
        "bootstrap": spec.bootstrap,
    }


COMPARISON_HEADER = ["measure", "Kendall tau [95% CI]", "granulated tau", "sign-error mean", "sign-error worst",
                     "tau(NS) - tau(measure) [95% CI]", "normalized sharpness"]


def comparison_rows(summary: Mapping[str, Any]) -> List[List[Any]]:
    """One row per measure (columns: :data:`COMPARISON_HEADER`), strings ready for a table."""
    rob = summary["robustness"]
    rows = []
    for name, c in summary["correlations"].items():
        se = rob["sign_errors"].get(name) or {}
        diff = rob["normalized_sharpness_vs"].get(name)
        rows.append([
            name, f"{_fmt(c['tau'])} [{_fmt(c['tau_ci'][0])}, {_fmt(c['tau_ci'][1])}]", _fmt(c["granulated_tau"]),
            _fmt(se.get("mean"), signed=False), _fmt(se.get("worst"), signed=False),
            "(reference)" if diff is None else
            f"{_fmt(diff['difference'])} [{_fmt(diff['interval'][0])}, {_fmt(diff['interval'][1])}]",
            "" if diff is None else diff["verdict"],
        ])
    return rows


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
        ax.set_title(f"{name}\ntau={_fmt(tau, signed=False)}  Psi={_fmt(psi, signed=False)}", fontsize=8)
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


_VERDICT_COLOURS = {"beats": "tab:green", "loses": "tab:red", "undecided": "tab:grey"}


def robustness_figure(summary: Mapping[str, Any]) -> Figure:
    """Left: sign-error per measure (mean and worst environment). Right: tau(NS) - tau(baseline) with its
    paired-bootstrap interval, coloured by verdict (green: NS beats it, red: it beats NS, grey: undecided)."""
    rob = summary["robustness"]
    names = list(summary["correlations"])
    fig, (left, right) = new_figure(1, 2, figsize=(11, 0.45 * len(names) + 1.6))
    ys = list(range(len(names)))
    for offset, key, label in ((-0.18, "mean", "mean over environments"), (0.18, "worst", "worst environment")):
        vals = [(rob["sign_errors"].get(n) or {}).get(key, float("nan")) for n in names]
        left.barh([y + offset for y in ys], vals, height=0.34, label=label)
    left.axvline(0.5, color="black", linewidth=0.8, linestyle="--")
    left.set_yticks(ys, names, fontsize=8)
    left.set_xlim(0, 1)
    left.set_xlabel("sign-error (0 perfect, 0.5 chance)")
    left.legend(fontsize=7)
    for y, n in zip(ys, names):
        diff = rob["normalized_sharpness_vs"].get(n)
        if diff is None:
            continue
        lo, hi = diff["interval"]
        right.errorbar(diff["difference"], y, xerr=[[diff["difference"] - lo], [hi - diff["difference"]]], fmt="o",
                       color=_VERDICT_COLOURS[diff["verdict"]], capsize=3)
        right.annotate(diff["verdict"], (hi, y), xytext=(4, -3), textcoords="offset points", fontsize=7)
    right.axvline(0, color="black", linewidth=0.8)
    right.set_yticks(ys, names, fontsize=8)
    right.set_xlabel("tau(normalized sharpness) - tau(measure), 95% paired bootstrap")
    for ax in (left, right):
        ax.set_ylim(len(names) - 0.5, -0.5)  # the table's order, top to bottom
    fig.tight_layout()
    return fig


def grid_report(summary: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> Report:
    """The HTML page of a grid run: the comparison table, the robustness and correlation figures, scatters."""
    report = Report(f"Generalisation-correlation grid ({summary['grid']})")
    sec = report.section("Normalized sharpness against the baselines")
    verdicts = summary["robustness"]["verdicts"]
    said = {v: sorted(n for n, w in verdicts.items() if w == v) for v in ("beats", "loses", "undecided")}
    sec.text(
        f"{summary['models']} models, {summary['converged']} reached training cross-entropy "
        f"{summary['target_loss']:g}; the table uses the {summary['selection']} models. Sign-errors are over pairs "
        "of models that differ in one hyper-parameter (seeds are replicates), per environment. "
        f"Normalized sharpness beats: {', '.join(said['beats']) or 'none'}; is beaten by: "
        f"{', '.join(said['loses']) or 'none'}; undecided (the interval holds 0): "
        f"{', '.join(said['undecided']) or 'none'}."
    )
    sec.table(header=COMPARISON_HEADER, rows=comparison_rows(summary),
              caption=f"95% bootstrap intervals over models ({summary['bootstrap']} resamples)")
    sec.figure(robustness_figure(summary), name="robustness.png",
               caption="Sign-errors and paired tau differences against normalized sharpness")
    sec.figure(correlation_figure(summary["correlations"]), name="correlations.png",
               caption="Kendall and granulated tau with bootstrap intervals")
    sec.figure(scatter_figure(records, list(summary["correlations"]), summary["correlations"]), name="scatter.png",
               caption="Each measure against the gap (hollow: target loss not reached)")
    return report


def _fmt(value: Optional[float], *, signed: bool = True) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:+.2f}" if signed else f"{value:.2f}"
