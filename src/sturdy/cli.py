"""The ``sturdy`` command line: a thin layer over the library and :mod:`sturdy.experiments`.

Errors a user can fix (bad arguments, missing files, unknown names) print one line on stderr and
exit with status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from sturdy import __version__
from sturdy.errors import ConfigurationError, SturdyError
from sturdy.experiments.argtypes import (
    batch_size_int,
    bounded_int,
    finite_float,
    model_arg,
    positive_float,
    seed_int,
)
from sturdy.experiments.parts import parts
from sturdy.experiments.sources import add_source_arguments
from sturdy.utils import prepare_output_dir

__all__ = ["main", "build_parser"]

EXIT_USAGE = 2
MAX_IMAGE_SIDE = 4096
MAX_EPOCHS = 1_000_000


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so every error goes through one handler.

    Every ``type=float`` option of every command (the parts' included) accepts finite numbers only:
    ``nan``, ``inf`` and overflowing literals are refused at parse time with one line.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register("type", float, finite_float)  # argument groups share this registry

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigurationError(f"{self.prog}: {message}")


# command-line types of TrainConfig fields that need more than int/float (bounds checked at parse time)
_FIELD_TYPES = {"epochs": bounded_int(1, MAX_EPOCHS), "batch_size": batch_size_int, "eval_batch_size": batch_size_int,
                "seed": seed_int, "lr": positive_float, "sync_every": bounded_int(1, 2**31 - 1)}
_JOB_OPTIONS = ("dataset", "data_root", "download", "resize", "model", "model_arg", "weights", "normalize", "out",
                "no_resume", "no_progress")


def _add_config_options(p: argparse.ArgumentParser) -> None:
    """One option per :class:`~sturdy.training.TrainConfig` field, help and default from the field; an option not
    typed stays out of the namespace, so the job knows what was typed (data-parallel defaults fill the rest)."""
    from dataclasses import MISSING, fields

    from sturdy.training import TrainConfig
    from sturdy.training.config import MAX_WORKERS

    g = p.add_argument_group("training (every method)")
    types = {**_FIELD_TYPES, "workers": bounded_int(0, MAX_WORKERS)}
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        text = f"{f.metadata.get('help', '')} (default: {default})"
        if isinstance(default, bool):
            g.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=text)
            continue
        kind = types.get(f.name, type(default))
        g.add_argument(flag, type=kind, choices=f.metadata.get("choices"), default=argparse.SUPPRESS, help=text)


def _add_train(subparsers: Any, parts: Sequence[Any]) -> None:
    from sturdy.experiments import parallel

    p = subparsers.add_parser("train", help="train a model; writes OUT/model.pt and OUT/results.json")
    p.add_argument("--data", "--dataset", dest="dataset", default="digits",
                   help="digits (embedded), synthetic, npz:FILE, folder:DIR, cifar10:DIR, cifar100:DIR, mnist:DIR, "
                        "fashion-mnist:DIR, svhn:DIR (or mnist, fashion-mnist, cifar10, svhn through torchvision)")
    p.add_argument("--data-root", default=None, help="folder holding torchvision data files")
    p.add_argument("--download", action="store_true",
                   help="fetch the official files of --data KIND:DIR (checksums checked), or let torchvision download "
                        "a name without a folder (needs internet)")
    p.add_argument("--resize", "--image-size", dest="resize", type=bounded_int(1, MAX_IMAGE_SIDE), default=None,
                   help=f"resize images to SIDE x SIDE (at most {MAX_IMAGE_SIDE})")
    p.add_argument("--model", default="cnn",
                   help="linear, mlp, cnn, resnet, wrn, aol, liresnet, resnet18, resnet50, or your own: "
                        "path/file.py:FACTORY, package.module:FACTORY, torchvision:NAME, timm:NAME (trusted code)")
    p.add_argument("--weights", default=None, help="initial weights: a state_dict file or a sturdy model.pt")
    p.add_argument("--normalize", default=None, help="MEAN,STD or a preset (imagenet, cifar10, mnist), put in front "
                                                     "of the model so every analysis sees images in [0, 1]")
    p.add_argument("--model-arg", type=model_arg, action="append", default=[], metavar="KEY=VALUE",
                   help="architecture option, repeatable (e.g. --model-arg width=256)")
    p.add_argument("--out", default="runs/train")
    p.add_argument("--no-resume", action="store_true", help="start over even if OUT/model.pt exists")
    p.add_argument("--no-progress", action="store_true")
    _add_config_options(p)
    parallel.add_train_arguments(p)
    for part in parts:
        part.add_train_arguments(p)
    p.set_defaults(func=_cmd_train)


def _job_from_args(args: argparse.Namespace) -> Any:
    from dataclasses import fields

    from sturdy.experiments.train_job import TrainJob
    from sturdy.training import TrainConfig

    values = vars(args)
    config_names = {f.name for f in fields(TrainConfig)}
    typed = {k: v for k, v in values.items() if k in config_names}
    skip = config_names | set(_JOB_OPTIONS) | {"func", "command", "debug", "help"}
    options = {k: v for k, v in values.items() if k not in skip}
    options["explicit_options"] = sorted(typed)
    return TrainJob(
        dataset=args.dataset, model=args.model, model_kwargs=dict(args.model_arg), resize=args.resize,
        data_root=args.data_root, download=args.download, weights=args.weights, normalize=args.normalize,
        config=TrainConfig(**typed), out=args.out, options=options,
    )


def _cmd_train(args: argparse.Namespace) -> int:
    """Every part may join the run with a plugin; the core runs it in one process or data-parallel."""
    from sturdy.experiments.jsonio import results_path
    from sturdy.experiments.parallel import apply_data_parallel_defaults, run_job

    job = apply_data_parallel_defaults(_job_from_args(args))
    results_path(job.out, "train")  # before any worker starts: refused when another command's results are there
    plugins = [p for p in (part.training_plugin(job) for part in parts()) if p is not None]
    results = run_job(job, plugins=plugins, resume=not args.no_resume, progress=not args.no_progress)
    if os.environ.get("RANK", "0") == "0":
        summary = {k: results.get(k) for k in ("train_accuracy", "test_accuracy", "seconds_per_epoch")}
        print(json.dumps(summary))
        print(f"wrote {Path(job.out) / 'model.pt'} and {Path(job.out) / 'results.json'}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from sturdy.experiments.sources import load_sources
    from sturdy.training import evaluate, resolve_device

    sources = load_sources(args, device=resolve_device(args.device))
    test_set = sources.split(args.split, args.limit)
    logits = _num_logits(sources.model, test_set)
    if test_set.num_classes != logits:
        raise ConfigurationError(f"data set {sources.dataset!r} has {test_set.num_classes} classes, the model "
                                 f"predicts {logits}; choose a data set with the same classes")
    loss, acc = evaluate(sources.model, test_set)
    if not math.isfinite(loss):
        raise ConfigurationError(f"the model's test loss is not finite ({loss}); its outputs overflow")
    print(json.dumps({"checkpoint": args.checkpoint, "dataset": sources.dataset, "split": args.split,
                      "test_loss": loss, "test_accuracy": acc, "test_size": len(test_set), "sources": sources.record},
                     allow_nan=False))
    return 0


def _num_logits(model: Any, data: Any) -> int:
    import torch

    with torch.no_grad():
        return int(model(data.images[:1].to(next(model.parameters()).device)).shape[-1])


def _cmd_demo(args: argparse.Namespace) -> int:
    from sturdy.experiments.demo import run_demo

    path = run_demo(out=args.out, quick=args.quick, device=args.device, seed=args.seed,
                    progress=not args.no_progress)
    print(f"report written to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The full ``sturdy`` argument parser (parts register their own sub-commands)."""
    parser = _ArgumentParser(prog="sturdy", description="Certified robustness, Fourier sensitivity, "
                             "normalized flatness and gradient compression for PyTorch.")
    parser.add_argument("--version", action="version", version=f"sturdy {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_ArgumentParser)
    all_parts = parts()
    _add_train(sub, all_parts)
    p = sub.add_parser("evaluate", help="test accuracy of a trained model or of your own")
    add_source_arguments(p, split=True, limit=True)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.set_defaults(func=_cmd_evaluate)
    p = sub.add_parser("demo", help="the main job on the embedded digits data; writes an HTML report")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="smoke-test sized run (about a minute)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_demo)
    for part in all_parts:
        part.register_cli(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``sturdy`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    created: Optional[Path] = None
    try:
        args = build_parser().parse_args(argv)
        if getattr(args, "func", None) is None:
            build_parser().print_help(sys.stderr)
            return EXIT_USAGE
        if getattr(args, "out", None) is not None:  # checked before any work; removed again if left empty
            created = None if Path(args.out).exists() else Path(args.out)
            prepare_output_dir(args.out)
        return int(args.func(args) or 0)
    except (SturdyError, OSError) as exc:
        _remove_if_empty(created)
        if debug:
            raise
        print(f"sturdy: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        _remove_if_empty(created)
        print("sturdy: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug or not _out_of_memory(exc):
            raise
        _remove_if_empty(created)
        message = (f"out of memory ({_one_line(exc)[:120]}); use smaller sizes (--batch-size, --limit, --model-arg) "
                   "or another device")
        print(f"sturdy: error: {_one_line(message)}", file=sys.stderr)
        return EXIT_USAGE


def _out_of_memory(exc: BaseException) -> bool:
    """A failed allocation: Python's MemoryError or torch's (CUDA) out-of-memory error, by type only."""
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    return isinstance(exc, MemoryError) or (oom is not None and isinstance(exc, oom))


def _remove_if_empty(folder: Optional[Path]) -> None:
    if folder is not None and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


MAX_ERROR_CHARS = 280


def _one_line(exc: BaseException) -> str:
    """The error as one line of at most :data:`MAX_ERROR_CHARS` characters (``--debug`` shows all of it)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) > MAX_ERROR_CHARS:
        text = text[: MAX_ERROR_CHARS - 30].rstrip() + " ... (--debug shows all)"
    return text


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
