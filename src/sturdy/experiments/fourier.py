"""Fourier sensitivity and the Single Fourier Attack in the CLI and the demo report.

Commands (checkpoints are ``model.pt`` files written by ``sturdy train``):

* ``sturdy fourier heatmap --checkpoint M --eps E [--norm l2|linf] [--limit N] --out DIR`` writes
  ``heatmap.png``, ``gradient.png`` and ``heatmap.json`` (maps, rates, gradient rank correlation: ``null``
  with a note when fewer than two frequencies are measured).
  ``--stride S`` / ``--band LOW HIGH`` / ``--frequencies K,L ...`` measure a subset of the frequencies.
  Progress is saved atomically to ``DIR/heatmap.partial.json`` and an interrupted map resumes from it
  (``--no-resume`` starts over). Under ``torchrun`` the frequencies are split over the ranks (gloo on CPU,
  NCCL on GPU, one GPU per local rank) and rank 0 writes the files; the command is unchanged.
* ``sturdy fourier attack --checkpoint M --eps E [--search staged|halving|exhaustive|random]
  [--max-queries Q] --out DIR`` writes ``delta.pt`` (the ``(C, H, W)`` perturbation tensor), ``delta.png``,
  ``examples.png`` and ``attack.json`` (held-out and shifted fooling rates, queries, seconds).

Every file is written atomically, the results JSON last (its presence means the run finished). ``--eps``
beyond the largest meaningful budget of the images (L2: ``sqrt(C*H*W)``, L-inf: 1 for pixels in [0, 1])
is refused. Both take ``--autocast bf16|fp16``, ``--channels-last`` and ``--compile`` (run the model the way it runs
for inference; perturbations and counts stay exact) and choose their batch size online unless
``--batch-size`` is given.

The attack runs on training images (``--attack-images`` of them, seeded) and is evaluated on the whole
test split, so the reported fooling rate is held-out. The analyses, the random-noise baseline and the
figures live in :mod:`sturdy.fourier`; this module loads models and data, calls them and writes files.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from sturdy.data import ImageDataset
from sturdy.errors import ConfigurationError
from sturdy.experiments.argtypes import (
    batch_size_int,
    frequency_arg,
    non_negative_int,
    phase_arg,
    positive_float,
    positive_int,
    seed_int,
)
from sturdy.experiments.command_report import write_command_report
from sturdy.experiments.jsonio import results_path, write_results
from sturdy.experiments.parts import no_train_arguments, no_training_plugin
from sturdy.experiments.sources import Sources, add_source_arguments, load_sources
from sturdy.fourier import (
    DEFAULT_PHASE,
    SEARCHES,
    FourierHeatmap,
    PerturbationReport,
    UniversalPerturbation,
    band_frequencies,
    evaluate_perturbation,
    fourier_combination_attack,
    fourier_heatmap,
    gradient_spectrum,
    half_plane,
    plot_examples,
    plot_fourier_maps,
    plot_perturbation,
    random_noise_baseline,
    rank_correlation,
    single_fourier_attack,
    strided_frequencies,
)
from sturdy.fourier.limits import check_phases, check_save_every, check_shifts
from sturdy.utils import atomic_save_figure, atomic_write_bytes, prepare_output_dir

__all__ = ["register_cli", "add_train_arguments", "training_plugin", "demo_section", "local_sharded_heatmap"]

DEMO_EPS = 2.0  # L2 budget on 8x8 digits in [0, 1] (image norms are about 3.5)



_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _common_arguments(p: argparse.ArgumentParser) -> None:
    add_source_arguments(p)
    p.add_argument("--eps", type=positive_float, required=True, help="budget in --norm (images in [0, 1])")
    p.add_argument("--norm", choices=("l2", "linf"), default="l2")
    p.add_argument("--wave", choices=("sine", "square"), default="sine",
                   help="sinusoid, or its sign (square wave; the strongest L-inf variant)")
    p.add_argument("--batch-size", type=batch_size_int, default=None,
                   help="perturbed images per model call (default: chosen online for throughput)")
    p.add_argument("--autocast", choices=tuple(_AUTOCAST), default=None,
                   help="run the model under torch.autocast in this dtype (perturbations stay float32)")
    p.add_argument("--channels-last", action="store_true", help="hand the model channels_last images")
    p.add_argument("--compile", action="store_true", help="run torch.compile(model)")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--no-progress", action="store_true")


def register_cli(subparsers: Any) -> None:
    """Add ``sturdy fourier heatmap`` and ``sturdy fourier attack``."""
    parent = subparsers.add_parser("fourier", help="Fourier sensitivity heat maps and the Single Fourier Attack")
    sub = parent.add_subparsers(dest="fourier_command", metavar="SUBCOMMAND")
    parent.set_defaults(func=_cmd_missing)

    p = sub.add_parser("heatmap", help="error/fooling rate per Fourier direction; PNG + JSON")
    _common_arguments(p)
    p.add_argument("--limit", "--images", dest="limit", type=positive_int, default=500, metavar="N",
                   help="use the first N images of --split (at most the split)")
    p.add_argument("--split", choices=("test", "train"), default="test", help="the split measured")
    p.add_argument("--phase", type=phase_arg, default=DEFAULT_PHASE,
                   help="phase of the directions in radians, or 'random' (per image); default -pi/4")
    subset = p.add_mutually_exclusive_group()
    subset.add_argument("--stride", type=positive_int, default=None,
                        help="measure the frequencies whose centred coordinates are multiples of S")
    subset.add_argument("--band", type=float, nargs=2, metavar=("LOW", "HIGH"), default=None,
                        help="measure the frequencies of radius LOW <= r < HIGH (centred, cycles per image)")
    subset.add_argument("--frequencies", type=frequency_arg, nargs="+", metavar="K,L", default=None,
                        help="measure these frequencies (k,l pairs)")
    p.add_argument("--no-resume", action="store_true",
                   help="start over instead of resuming from OUT/heatmap.partial.json")
    p.add_argument("--save-every", type=positive_int, default=None,
                   help="frequencies per rank between saves of the partial results (default: ~20 saves)")
    p.add_argument("--out", default="runs/fourier/heatmap")
    p.set_defaults(func=_cmd_heatmap)

    p = sub.add_parser("attack", help="Single Fourier Attack: one black-box universal perturbation")
    _common_arguments(p)
    p.add_argument("--search", choices=SEARCHES, default="staged",
                   help="staged (default: frequency screen, then phases and signs of the best), halving, "
                   "exhaustive (reference) or random (baseline)")
    p.add_argument("--attack-images", type=positive_int, default=300,
                   help="training images the attack searches on (held-out: the whole test split)")
    p.add_argument("--phases", type=positive_int, default=8,
                   help="phases 2 pi j / PHASES searched (at most what the memory budget holds)")
    p.add_argument("--max-queries", type=positive_int, default=None, help="hard budget of model queries")
    p.add_argument("--shifts", type=non_negative_int, default=4,
                   help="random circular shifts of delta per held-out image (at most H*W, the distinct shifts)")
    p.add_argument("--combine", action="store_true",
                   help="also grow the SFA into a mixture of a few Fourier directions (delta_combination.pt)")
    p.add_argument("--out", default="runs/fourier/attack")
    p.set_defaults(func=_cmd_attack)


def _cmd_missing(args: argparse.Namespace) -> int:
    raise ConfigurationError("sturdy fourier: choose a sub-command: heatmap or attack (see sturdy fourier -h)")


def _load(args: argparse.Namespace, device: Optional[torch.device] = None) -> Sources:
    from sturdy.training import resolve_device

    return load_sources(args, device=device or resolve_device(args.device))


def _runtime(args: argparse.Namespace, model: Any) -> Tuple[Any, Dict[str, Any]]:
    """The model to analyse (compiled when asked) and the inference keywords of the analyses."""
    if args.compile:
        model = torch.compile(model)
    return model, dict(autocast=_AUTOCAST.get(args.autocast), channels_last=args.channels_last)


def _distributed_device(args: argparse.Namespace) -> Optional[torch.device]:
    """Under torchrun: join the process group and return this rank's device (``None`` otherwise)."""
    from sturdy.distributed import init_from_env, launched_by_torchrun
    from sturdy.training import resolve_device

    if not launched_by_torchrun():
        return None
    device = resolve_device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    init_from_env(device=device.type)
    return device


def _frequency_subset(args: argparse.Namespace, height: int, width: int) -> Optional[Tensor]:
    if args.stride is not None:
        return strided_frequencies(height, width, args.stride)
    if args.band is not None:
        return band_frequencies(height, width, args.band[0], args.band[1])
    if args.frequencies is not None:
        return torch.tensor(args.frequencies, dtype=torch.long)
    return None


def _save_figure(fig: Any, path: Path) -> None:
    atomic_save_figure(fig, path, dpi=120, bbox_inches="tight")


def _save_tensor(t: Tensor, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(t, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _gradient_correlations(grad: Any, hm: FourierHeatmap) -> Dict[str, Any]:
    """Spearman correlations of the gradient power with the measured fooling and error rates (a note when
    fewer than two frequencies were measured: a rank correlation needs two points)."""
    m = hm.measured
    if int(m.sum()) < 2:
        return {"gradient_rank_correlation_fooling": None, "gradient_rank_correlation_error": None,
                "gradient_rank_correlation_note": "needs at least 2 measured frequencies"}
    return {"gradient_rank_correlation_fooling": rank_correlation(grad.power[m], hm.fooling[m]),
            "gradient_rank_correlation_error": rank_correlation(grad.power[m], hm.error[m])}


def _cmd_heatmap(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    device = _distributed_device(args)
    try:
        return _heatmap(args, device)
    finally:  # a rank that exits with its group alive can abort in the group's teardown
        if device is not None and dist.is_initialized():
            dist.destroy_process_group()


def _heatmap(args: argparse.Namespace, device: Optional[torch.device]) -> int:
    import torch.distributed as dist

    distributed = device is not None and dist.get_world_size() > 1
    rank = dist.get_rank() if device is not None else 0
    out = Path(args.out)
    if rank == 0:
        prepare_output_dir(out)
    results = results_path(out, "fourier heatmap")  # checked before any work
    sources = _load(args, device)
    model = sources.model
    analysed, inference = _runtime(args, model)
    test = sources.analysis_data(args.split, args.limit)  # streamed when it is large (uint8 pixels, mapped)
    x, y = (test.images, test.labels) if test.images.is_floating_point() else (test, None)
    height, width = test.image_shape[1:]
    subset = _frequency_subset(args, height, width)  # every count checked before any work
    if args.save_every is not None:
        check_save_every(args.save_every, len(half_plane(height, width)))
    partial = out / "heatmap.partial.json"
    if args.no_resume and rank == 0:
        partial.unlink(missing_ok=True)
    if distributed:
        dist.barrier()
    hm = fourier_heatmap(analysed, x, y, eps=args.eps, norm=args.norm, wave=args.wave, phase=args.phase,
                         frequencies=subset, batch_size=args.batch_size,
                         seed=args.seed, distributed=distributed, partial=partial, save_every=args.save_every,
                         progress=not args.no_progress, **inference)
    if rank != 0:
        return 0
    grad = gradient_spectrum(model, x, y, batch_size=min(args.batch_size or 256, 256))
    summary = hm.to_dict()
    summary.update(checkpoint=args.checkpoint, dataset=sources.dataset, sources=sources.record,
                   **_gradient_correlations(grad, hm),
                   gradient_seconds=grad.seconds, gradient_power_map=grad.full().tolist())
    hm.plot(out / "heatmap.png", title=sources.name)
    _save_figure(plot_fourier_maps([("input-gradient power (mean)", grad.full())]), out / "gradient.png")
    write_command_report(out, "fourier heatmap", title=f"sturdy fourier heatmap: {sources.name}", summary=summary,
                         figures=[out / "heatmap.png", out / "gradient.png"])
    write_results(summary, results, command="fourier heatmap")  # last: its presence means the run finished
    keys = ("clean_error", "max_error", "mean_error", "max_fooling", "gradient_rank_correlation_fooling", "seconds",
            "batch_size", "measured_frequencies", "resumed", "world_size")
    print(json.dumps({k: summary[k] for k in keys}))
    print(f"wrote {out / 'heatmap.png'}, {out / 'gradient.png'} and {out / 'heatmap.json'}")
    return 0


def _heatmap_on_rank(rank: int, world: int, model: Any, x: Tensor, y: Tensor, kwargs: Dict[str, Any]) -> Any:
    hm = fourier_heatmap(model, x, y, distributed=True, **kwargs)
    if rank != 0:
        return None
    # Plain Python values: tensors would travel as shared-memory handles that die with the worker.
    return {f.name: (getattr(hm, f.name).tolist(), str(getattr(hm, f.name).dtype).split(".")[1])
            if isinstance(getattr(hm, f.name), Tensor) else getattr(hm, f.name) for f in dataclasses.fields(hm)}


def local_sharded_heatmap(model: Any, x: Tensor, y: Tensor, *, nproc: int, device: str = "cpu",
                          timeout_s: float = 3600.0, **kwargs: Any) -> Any:
    """:func:`~sturdy.fourier.fourier_heatmap` split over ``nproc`` local processes (core launcher).

    The processes join one group (gloo on CPU, NCCL on CUDA) and each measures a share of the
    frequencies; rank 0's :class:`~sturdy.fourier.FourierHeatmap` is returned (equal to a one-process run
    with the same seed). ``model``, ``x`` and ``y`` are pickled to the workers; ``kwargs`` go to
    ``fourier_heatmap``.
    """
    from sturdy.distributed import run_local_workers

    fields = run_local_workers(_heatmap_on_rank, nproc=nproc, args=(model, x, y, kwargs), device=device,
                               timeout_s=timeout_s)[0]
    return FourierHeatmap(**{k: torch.tensor(v[0], dtype=getattr(torch, v[1])) if isinstance(v, tuple) else v
                             for k, v in fields.items()})


def _split_attack_set(train: ImageDataset, n: int, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return train.subset(torch.randperm(len(train), generator=gen)[: min(n, len(train))]).as_float().images


def _cmd_attack(args: argparse.Namespace) -> int:
    out = prepare_output_dir(args.out)
    results = results_path(out, "fourier attack")  # checked before any work
    sources = _load(args)
    model = sources.model
    analysed, inference = _runtime(args, model)
    x_attack = _split_attack_set(sources.train_data, args.attack_images, args.seed)  # a few images, as floats
    test = sources.analysis_data("test")  # streamed when it is large (uint8 pixels, mapped)
    held_out = (test.images, test.labels) if test.images.is_floating_point() else (test,)
    check_phases(args.phases, *x_attack.shape[1:])  # every count checked before any work
    check_shifts(args.shifts, *test.image_shape[1:])
    sfa = single_fourier_attack(analysed, x_attack, eps=args.eps, norm=args.norm, wave=args.wave,
                                search=args.search, phases=args.phases, max_queries=args.max_queries,
                                batch_size=args.batch_size, seed=args.seed, progress=not args.no_progress,
                                **inference)
    eval_batch = args.batch_size or 2048
    held = evaluate_perturbation(model, sfa.delta, *held_out, shifts=args.shifts,
                                 batch_size=eval_batch, seed=args.seed)
    noise = random_noise_baseline(model, *held_out, eps=args.eps, norm=args.norm,
                                  batch_size=eval_batch, seed=args.seed)
    summary = _attack_summary(sfa, held)
    summary.update(checkpoint=args.checkpoint, dataset=sources.dataset, sources=sources.record,
                   attack_images=len(x_attack),
                   random_noise_fooling_rate=noise.fooling_rate)
    combo = None
    if args.combine:
        combo = fourier_combination_attack(model, x_attack, eps=args.eps, norm=args.norm, wave=args.wave,
                                           initial=sfa, batch_size=eval_batch, seed=args.seed,
                                           progress=not args.no_progress)
        combo_held = evaluate_perturbation(model, combo.delta, *held_out, shifts=args.shifts,
                                           batch_size=eval_batch, seed=args.seed)
        summary["combination"] = {**combo.to_dict(), "heldout_fooling_rate": combo_held.fooling_rate,
                                  "shifted_fooling_rate": combo_held.shifted_fooling_rate}
    _save_tensor(sfa.delta, out / "delta.pt")
    _save_figure(plot_perturbation(sfa.delta, title=f"SFA (k,l)={sfa.frequency}"), out / "delta.png")
    _save_figure(plot_examples(model, sfa.delta, test.subset(range(min(6, len(test)))).as_float().images),
                 out / "examples.png")
    if combo is not None:
        _save_tensor(combo.delta, out / "delta_combination.pt")
        _save_figure(plot_perturbation(combo.delta, title="Fourier combination"), out / "delta_combination.png")
    write_command_report(out, "fourier attack", title=f"sturdy fourier attack: {sources.name}", summary=summary,
                         figures=[out / "delta.png", out / "examples.png", out / "delta_combination.png"])
    write_results(summary, results, command="fourier attack")  # last: its presence means the run finished
    keys = ("heldout_fooling_rate", "shifted_fooling_rate", "attack_fooling_rate", "queries", "seconds")
    print(json.dumps({k: summary[k] for k in keys}))
    print(f"wrote {out / 'delta.pt'}, {out / 'delta.png'}, {out / 'examples.png'} and {out / 'attack.json'}")
    return 0


def _attack_summary(sfa: UniversalPerturbation, held: PerturbationReport) -> Dict[str, Any]:
    summary = sfa.to_dict()
    summary.update(
        heldout_fooling_rate=held.fooling_rate, heldout_error_rate=held.error_rate,
        heldout_clean_error_rate=held.clean_error_rate, shifted_fooling_rate=held.shifted_fooling_rate,
        shifted_error_rate=held.shifted_error_rate, heldout_images=held.n_images, shifts=held.shifts,
        mean_applied_l2=held.mean_l2, mean_applied_linf=held.mean_linf,
    )
    return summary


# ------------------------------------------------------------------------------------------------ demo


def demo_section(ctx: Any) -> None:
    """Heat maps of the standard (and LMT) model, the SFA perturbation, held-out and shifted fooling rates.

    Budget: a small share of the demo (time in BENCHMARKS.md).
    """
    quick = bool(ctx.quick)
    n_map = 120 if quick else len(ctx.test_set)
    n_attack = 100 if quick else 300
    n_held = 200 if quick else len(ctx.test_set)
    models = {"standard": ctx.models["standard"]}
    if ctx.models.get("lmt") is not None:
        models["lmt"] = ctx.models["lmt"]
    x_map, y_map = ctx.test_set.images[:n_map], ctx.test_set.labels[:n_map]
    x_attack = _split_attack_set(ctx.train_set, n_attack, ctx.seed)
    x_held, y_held = ctx.test_set.images[:n_held], ctx.test_set.labels[:n_held]
    results: Dict[str, Any] = {"eps": DEMO_EPS, "norm": "l2", "attack_images": len(x_attack),
                               "heldout_images": len(x_held), "models": {}}
    sec = ctx.report.section("Fourier sensitivity and the Single Fourier Attack")
    sec.text(
        f"Each Fourier direction of the {ctx.test_set.image_shape[1]}x{ctx.test_set.image_shape[2]} image plane "
        f"is added with L2 norm {DEMO_EPS} (images in [0, 1], clipped) to {n_map} test digits; the maps show the "
        "fraction of predictions that change (centred: frequency (0, 0) in the middle). The Single Fourier "
        f"Attack searches frequency, 8 phases and channel signs on {len(x_attack)} training images using only "
        f"predicted labels (successive halving), and is evaluated on {len(x_held)} held-out test digits, also "
        "under random circular shifts of the perturbation."
    )
    panels, rows, maps = [], [], {}
    combo_row = None
    for name, model in models.items():
        hm = fourier_heatmap(model, x_map, y_map, eps=DEMO_EPS, seed=ctx.seed, progress=ctx.progress)
        grad = gradient_spectrum(model, x_map, y_map)
        sfa = single_fourier_attack(model, x_attack, eps=DEMO_EPS, seed=ctx.seed, progress=ctx.progress)
        held = evaluate_perturbation(model, sfa.delta, x_held, y_held, shifts=2 if quick else 4, seed=ctx.seed)
        noise = random_noise_baseline(model, x_held, y_held, eps=DEMO_EPS, norm="l2", seed=ctx.seed).fooling_rate
        panels.append((f"{name}: fooling rate", hm.full("fooling")))
        maps[name] = (sfa, grad, hm)
        entry = _attack_summary(sfa, held)
        entry.update(heatmap_mean_fooling=float(hm.fooling.mean()), heatmap_max_fooling=float(hm.fooling.max()),
                     heatmap_clean_error=hm.clean_error, heatmap_top=hm.top(3),
                     gradient_rank_correlation=rank_correlation(grad.power, hm.fooling),
                     random_noise_fooling_rate=noise, heatmap_seconds=hm.seconds)
        if name == "standard" and not quick:
            ex = single_fourier_attack(model, x_attack, eps=DEMO_EPS, search="exhaustive", seed=ctx.seed)
            ex_held = evaluate_perturbation(model, ex.delta, x_held, y_held)
            entry.update(exhaustive_attack_fooling_rate=ex.fooling_rate, exhaustive_queries=ex.queries,
                         exhaustive_seconds=ex.seconds, exhaustive_heldout_fooling_rate=ex_held.fooling_rate)
            combo = fourier_combination_attack(model, x_attack, eps=DEMO_EPS, initial=sfa, seed=ctx.seed)
            combo_held = evaluate_perturbation(model, combo.delta, x_held, y_held, shifts=4, seed=ctx.seed)
            entry["combination"] = {**combo.to_dict(), "heldout_fooling_rate": combo_held.fooling_rate,
                                    "shifted_fooling_rate": combo_held.shifted_fooling_rate}
            combo_row = [f"{name} (Fourier combination)", 1.0 - held.clean_error_rate, None,
                         combo_held.fooling_rate, combo_held.shifted_fooling_rate, noise, combo.queries, None,
                         round(combo.seconds, 2), f"{len(combo.steps) + 1} directions"]
        results["models"][name] = entry
        rows.append([name, 1.0 - held.clean_error_rate, float(hm.fooling.max()), held.fooling_rate,
                     held.shifted_fooling_rate, noise, sfa.queries, sfa.exhaustive_queries,
                     round(sfa.seconds, 2), str(sfa.frequency)])
        if combo_row is not None:
            rows.append(combo_row)
            combo_row = None
    sec.figure(plot_fourier_maps(panels), name="fourier_heatmaps.png",
               caption=f"Fooling rate per Fourier direction at L2 eps {DEMO_EPS}, one phase (-pi/4), random "
               "channel signs; models side by side on one colour scale.")
    sec.table(
        header=["model", "clean accuracy", "heat-map max fooling", "SFA held-out fooling", "SFA shifted fooling",
                "random noise fooling", "SFA queries", "exhaustive queries", "SFA seconds", "SFA (k, l)"],
        rows=rows,
        caption="SFA: black-box universal perturbation (successive halving); 'shifted': the same delta "
        "circularly shifted at random per image; 'random noise': mean over 8 Gaussian perturbations of the same "
        "norm; 'Fourier combination' (beyond the paper): the SFA grown into a mixture of a few directions, "
        "still black-box; its query count includes the SFA's.",
    )
    sfa, grad, hm = maps["standard"]
    sec.figure(plot_perturbation(sfa.delta, title=f"standard SFA (k,l)={sfa.frequency}"), name="fourier_sfa_delta.png",
               caption=f"The SFA perturbation of the standard model (L2 norm {DEMO_EPS}, phase {sfa.phase:.2f}).")
    sec.figure(plot_examples(models["standard"], sfa.delta, x_held), name="fourier_sfa_examples.png",
               caption="Held-out digits before (top) and after (bottom) adding the SFA perturbation; red: "
               "prediction changed.")
    rho = results["models"]["standard"]["gradient_rank_correlation"]
    sec.figure(plot_fourier_maps([("standard: input-gradient power", grad.full())]), name="fourier_gradient.png",
               caption="Gradient fast path: mean power spectrum of input gradients (one backward pass per image); "
               f"Spearman rank correlation with the fooling map {rho:.2f}.")
    ctx.results["fourier"] = results


add_train_arguments = no_train_arguments  # this part analyses trained models: no training options
training_plugin = no_training_plugin
