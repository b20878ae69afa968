"""``sturdy lipschitz certify`` (alias ``sturdy certify``): certified accuracy, radii and Lipschitz bounds
of a trained model, written as ``OUT/certify.json`` and two PNGs (results last). ``OUT`` may be the training
folder: its ``model.pt`` and ``results.json`` are left as they are.

Radii ``eps`` are L2 norms in pixel units (images in ``[0, 1]``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from matplotlib.figure import Figure
from torch import nn

from sturdy.datasource import data_source
from sturdy.errors import ConfigurationError
from sturdy.experiments.argtypes import positive_int
from sturdy.experiments.command_report import write_command_report
from sturdy.experiments.jsonio import results_path, write_results
from sturdy.experiments.sources import add_source_arguments, load_sources
from sturdy.lipschitz import Certificate, certify, lipschitz_bound, tightness
from sturdy.lipschitz.losses import FORMS
from sturdy.report import new_figure
from sturdy.training import resolve_device
from sturdy.utils import atomic_save_figure, eval_mode, model_device_dtype, prepare_output_dir

__all__ = ["certify_model", "plot_certified_accuracy", "plot_radius_histogram", "add_certify_arguments",
           "DEFAULT_EPS", "MAX_EPS", "CERTIFY_HELP", "CERTIFY_DESCRIPTION"]

DEFAULT_EPS = (0.1, 0.25, 0.5, 1.0)
MAX_EPS = 1e6  # far beyond any image's diameter (sqrt(C*H*W) in pixel units); larger radii overflow plots


def certify_model(
    model: nn.Module,
    x: Any,
    y: Optional[torch.Tensor] = None,
    *,
    eps: Sequence[float] = DEFAULT_EPS,
    form: str = "pairwise",
    tiered: bool = False,
) -> Tuple[Certificate, Dict[str, Any]]:
    """Bound + certificate + JSON-able summary (with timings: bound, certification).

    ``x``, ``y``: images and labels, or (without ``y``) an ``ImageDataset`` or other data of the contract of
    :mod:`sturdy.datasource`, streamed. ``eps`` are the L2 radii at which certified accuracy is reported.
    """
    shape = tuple(x.shape[1:]) if isinstance(x, torch.Tensor) else tuple(x.image_shape)
    t0 = time.perf_counter()
    bound = lipschitz_bound(model, input_shape=(1, *shape))
    t_bound = time.perf_counter() - t0
    t1 = time.perf_counter()
    cert = certify(model, x, y, bound=bound, form=form, tiered=tiered)
    t_cert = time.perf_counter() - t1
    summary = {
        **cert.to_dict(eps),
        "lipschitz_upper": bound.upper,
        "lipschitz_upper_body": bound.upper_body,
        "lipschitz_estimate": bound.estimate,
        "lipschitz_estimate_body": bound.estimate_body,
        "per_layer": [layer.to_dict() for layer in bound.per_layer],
        "seconds": {"bound": t_bound, "certify": t_cert},
    }
    return cert, summary


def plot_certified_accuracy(certs: Dict[str, Certificate], *, eps: Sequence[float] = DEFAULT_EPS,
                            title: str = "Certified accuracy (L2)") -> Figure:
    """Certified accuracy against the L2 radius for each named certificate (dots at ``eps``)."""
    top = max([max(eps, default=1.0)] + [float(c.radius.max()) if c.radius.numel() else 0.0 for c in certs.values()])
    grid = torch.linspace(0, min(top, 4 * max(eps, default=1.0)), 200).tolist()
    fig, ax = new_figure(figsize=(5.5, 3.8))
    for name, cert in certs.items():
        (line,) = ax.plot(grid, [cert.certified_accuracy(e) for e in grid], label=name)
        ax.plot(list(eps), [cert.certified_accuracy(e) for e in eps], "o", color=line.get_color())
    ax.set_xlabel("L2 radius eps (pixels in [0, 1])")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_radius_histogram(certs: Dict[str, Certificate]) -> Figure:
    """Histogram of certified radii of correctly classified points."""
    fig, ax = new_figure(figsize=(5.5, 3.8))
    top = max([float(c.radius.max()) for c in certs.values() if c.radius.numel()] + [1e-3])
    bins = torch.linspace(0, top, 41).tolist()
    for name, cert in certs.items():
        ax.hist(cert.radius[cert.correct].numpy(), bins=bins, alpha=0.55, label=name)
    ax.set_xlabel("certified L2 radius")
    ax.set_ylabel("test points")
    if any(bool(c.correct.any()) for c in certs.values()):  # no correct point: nothing to put on a log scale
        ax.set_yscale("log")
    ax.legend()
    ax.set_title("Certified radii (correct predictions)")
    fig.tight_layout()
    return fig


def _parse_eps(text: str) -> List[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise ConfigurationError(f"--eps must be comma-separated numbers like 0.1,0.25,0.5, got {text!r}") from exc
    if not values or any(not (0 <= v <= MAX_EPS) for v in values):
        raise ConfigurationError(f"--eps needs radii in [0, {MAX_EPS:g}] (L2, pixels in [0, 1]), got {text[:60]!r}")
    return values


def _cmd_certify(args: argparse.Namespace) -> int:
    import json

    eps = _parse_eps(args.eps)
    results = results_path(args.out, "lipschitz certify")  # checked before any work
    sources = load_sources(args, device=resolve_device(args.device))
    model = sources.model
    data = sources.analysis_data(args.split, args.limit)  # streamed when it is large (uint8 pixels, mapped)
    cert, summary = certify_model(model, data, eps=eps, form=args.form, tiered=args.tiered)
    device, dtype = model_device_dtype(model)
    t0 = time.perf_counter()
    with eval_mode(model), torch.no_grad():
        for xb, _ in data_source(data, batch_size=1024).batches(device=device, dtype=dtype, model=model):
            model(xb)
    summary["seconds"]["inference"] = time.perf_counter() - t0
    job = sources.job
    summary.update({"checkpoint": args.checkpoint, "split": args.split, "dataset": sources.dataset,
                    "method": job.options.get("method", "standard") if job else None,
                    "c": job.options.get("c") if job else None, "sources": sources.record})
    if args.tightness:
        points = data.subset(range(min(args.tightness_points, len(data)))).as_float()
        # raises SoundnessError (one line, exit status 2) when an attack beats a certified radius
        t = tightness(model, points.images, points.labels, bound=cert.bound, form=args.form,
                      progress=not args.no_progress)
        summary["tightness"] = t.to_dict()
    out = prepare_output_dir(args.out)
    name = (Path(args.checkpoint).parent.name if args.checkpoint else sources.name) or "model"
    atomic_save_figure(plot_certified_accuracy({name: cert}, eps=eps), out / "certified_accuracy.png", dpi=120)
    atomic_save_figure(plot_radius_histogram({name: cert}), out / "radius_histogram.png", dpi=120)
    layers = [[layer["path"], layer["kind"], layer["upper"], layer["estimate"], layer["method"]]
              for layer in summary["per_layer"]]
    write_command_report(out, "lipschitz certify", title=f"sturdy lipschitz certify: {name}", summary=summary,
                         figures=[out / "certified_accuracy.png", out / "radius_histogram.png"],
                         tables={"per-operator bounds": (["path", "kind", "upper", "estimate", "method"], layers)})
    write_results(summary, results, command="lipschitz certify")  # last: its presence means the run finished
    print(json.dumps({"clean_accuracy": summary["clean_accuracy"], "certified_accuracy": summary["certified_accuracy"],
                      "median_radius": summary["median_radius"], "lipschitz_upper": summary["lipschitz_upper"]}))
    print(f"wrote {results}, {out / 'certified_accuracy.png'} and {out / 'radius_histogram.png'}")
    return 0


CERTIFY_HELP = "certified L2 robustness of a trained model (guaranteed Lipschitz bound)"
CERTIFY_DESCRIPTION = ("Certified accuracy per eps, radius quantiles, Lipschitz bounds per layer; writes "
                        "OUT/certify.json, OUT/certified_accuracy.png and OUT/radius_histogram.png.")


def add_certify_arguments(p: argparse.ArgumentParser) -> None:
    add_source_arguments(p)
    p.add_argument("--eps", default=",".join(str(e) for e in DEFAULT_EPS), help="comma-separated L2 radii")
    p.add_argument("--form", choices=FORMS, default="pairwise")
    p.add_argument("--split", choices=("test", "train"), default="test")
    p.add_argument("--limit", type=positive_int, default=None, metavar="N", help="certify only the first N points")
    p.add_argument("--tiered", action="store_true",
                   help="also a local bound over the L2 ball around each point the global bound leaves short (ReLUs "
                        "inactive on the ball removed); certify.json keeps the global figures beside the tiered")
    p.add_argument("--tightness", action="store_true",
                   help="also report first-order (Jacobian) and attack radii on a sample (slower)")
    p.add_argument("--tightness-points", type=positive_int, default=50, metavar="N",
                   help="points (the first N certified) of the tightness chain")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--out", default="runs/certify")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_certify)
