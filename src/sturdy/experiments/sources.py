"""Where an analysis command's model and data come from: ``--checkpoint`` (a ``model.pt`` of ``sturdy train``) or
your own model (``--model``, ``--model-arg``, ``--weights``, ``--normalize``, ``--input-shape``), and ``--data``
(docs/design.md, "Your own model and data"). Every command that analyses a model reads them through
:func:`load_sources` and records :attr:`Sources.record` in its results.
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
from torch import nn

from sturdy.data import MAX_IMAGE_SIDE, ImageDataset
from sturdy.errors import ConfigurationError
from sturdy.experiments.argtypes import bounded_int, model_arg, positive_int
from sturdy.experiments.job_sources import job_data
from sturdy.experiments.train_job import TrainJob, check_data_matches, load_job_data, load_trained_model
from sturdy.model_sources import SPEC_FORMS, load_model

__all__ = ["Sources", "add_source_arguments", "load_sources", "DATA_HELP", "MODEL_HELP"]

DATA_HELP = ("digits | synthetic | npz:FILE | folder:DIR | cifar10:DIR | cifar100:DIR | mnist:DIR | fashion-mnist:DIR "
             "| svhn:DIR (default: the checkpoint's data set, else digits)")
MODEL_HELP = (f"your own model instead of --checkpoint: {SPEC_FORMS} (a file or module is imported: trusted code, "
              "like any Python import)")


STREAM_BYTES = 1 << 30
"""A split stored as ``uint8`` pixels (the memory-mapped caches of :mod:`sturdy.datasets`) whose ``float32`` copy would
take more than this is handed as read to the analyses that stream (:meth:`Sources.analysis_data`)."""


@dataclass(frozen=True)
class Sources:
    """A command's model (eval mode, on its device), both splits of its data as read (``train_data``, ``test_data``:
    ``uint8`` pixels stay as the readers return them, memory-mapped), what they were made from (``record``), and the
    training job when the model comes from a checkpoint. ``train_set`` and ``test_set`` are the splits with images in
    [0, 1], converted when first asked for."""

    model: nn.Module
    train_data: ImageDataset
    test_data: ImageDataset
    dataset: str
    name: str
    record: Dict[str, Any]
    job: Optional[TrainJob] = None

    @functools.cached_property
    def train_set(self) -> ImageDataset:
        return self.train_data.as_float()

    @functools.cached_property
    def test_set(self) -> ImageDataset:
        return self.test_data.as_float()

    def split(self, name: str = "test", limit: Optional[int] = None) -> ImageDataset:
        """The ``name`` split, its first ``limit`` images (all without ``limit``)."""
        data = self.test_set if name == "test" else self.train_set
        return data if limit is None or limit >= len(data) else data.subset(range(limit))

    def analysis_data(self, name: str = "test", limit: Optional[int] = None) -> ImageDataset:
        """The first ``limit`` images of the ``name`` split for an analysis that reads the data contract of
        :mod:`sturdy.datasource`: with images in [0, 1], except a split of ``uint8`` pixels whose float copy would
        exceed :data:`STREAM_BYTES`, which is returned as read (a view; the analysis converts it batch by batch)."""
        data = self.test_data if name == "test" else self.train_data
        if limit is not None and limit < len(data):
            data = ImageDataset(data.images[:limit], data.labels[:limit], data.num_classes, data.name, data.split)
        if data.images.is_floating_point() or data.images.numel() * 4 <= STREAM_BYTES:
            return data.as_float()
        return data


def add_source_arguments(p: argparse.ArgumentParser, *, split: bool = False, limit: bool = False) -> None:
    """``--checkpoint`` or ``--model ...``, and ``--data``, ``--data-root``, ``--download``, ``--image-size``; with
    ``split`` and ``limit`` also ``--split`` and ``--limit`` (commands that choose their split or count otherwise
    keep their own options)."""
    g = p.add_argument_group("model and data")
    g.add_argument("--checkpoint", default=None, help="model.pt written by `sturdy train` (or give --model)")
    g.add_argument("--model", dest="model_spec", default=None, help=MODEL_HELP)
    g.add_argument("--model-arg", dest="model_args", type=model_arg, action="append", default=[],
                   metavar="KEY=VALUE", help="argument of your model's factory, repeatable")
    g.add_argument("--weights", default=None, help="a state_dict file or a sturdy model.pt for --model")
    g.add_argument("--normalize", default=None, help="MEAN,STD or a preset (imagenet, cifar10, mnist): the first "
                                                     "module of --model, so the analyses see images in [0, 1]")
    g.add_argument("--input-shape", default=None, metavar="C,H,W", help="input shape of --model when it cannot tell")
    g.add_argument("--data", "--dataset", dest="data_spec", default=None, help=DATA_HELP)
    g.add_argument("--data-root", default=None, help="folder of the data files of a name without a folder")
    g.add_argument("--download", action="store_true",
                   help="fetch the official files of a downloadable --data kind first (needs internet)")
    g.add_argument("--image-size", type=bounded_int(1, MAX_IMAGE_SIDE), default=None, metavar="SIDE",
                   help=f"resize images to SIDE x SIDE (at most {MAX_IMAGE_SIDE})")
    if split:
        g.add_argument("--split", choices=("test", "train"), default="test", help="the split analysed")
    if limit:
        g.add_argument("--limit", type=positive_int, default=None, metavar="N", help="only the first N images")


def load_sources(args: argparse.Namespace, *, device: torch.device) -> Sources:
    """The model and data of ``args`` (see the module doc).

    Raises:
        ConfigurationError: both or neither of ``--checkpoint`` and ``--model``, or data of another shape than
            the model takes.
    """
    checkpoint, spec = getattr(args, "checkpoint", None), getattr(args, "model_spec", None)
    if (checkpoint is None) == (spec is None):
        raise ConfigurationError("give --checkpoint (a model.pt written by `sturdy train`) or --model (your own "
                                 "model), not both and not neither")
    if checkpoint is not None:
        return _from_checkpoint(args, str(checkpoint), device)
    return _from_model_source(args, str(spec), device)


def _data(args: argparse.Namespace, spec: str) -> tuple:
    kw = dict(resize=args.image_size, data_root=args.data_root, download=bool(getattr(args, "download", False)))
    return job_data(spec, split="train", **kw), job_data(spec, split="test", **kw)


def _from_checkpoint(args: argparse.Namespace, path: str, device: torch.device) -> Sources:
    model, job = load_trained_model(path, device=device)
    if args.data_spec is None and args.image_size is None:
        job = job.replace(data_root=args.data_root or job.data_root, download=bool(getattr(args, "download", False)))
        train_set, test_set = load_job_data(job)
        dataset = job.dataset
    else:
        dataset = args.data_spec or job.dataset
        train_set, test_set = _data(args, dataset)
    check_data_matches(model, test_set, dataset)
    record = {"model": {"checkpoint": path, "job": job.to_dict()}, "data": _data_record(dataset, args, test_set)}
    return Sources(model.eval(), train_set, test_set, dataset, job.model, record, job)


def _from_model_source(args: argparse.Namespace, spec: str, device: torch.device) -> Sources:
    dataset = args.data_spec or "digits"
    train_set, test_set = _data(args, dataset)
    shape = args.input_shape if args.input_shape is not None else (1, *test_set.image_shape)
    loaded = load_model(spec, model_args=dict(args.model_args), weights=args.weights, normalize=args.normalize,
                        input_shape=shape, num_classes=test_set.num_classes, device=device)
    if tuple(loaded.input_shape[1:]) != tuple(test_set.image_shape):
        raise ConfigurationError(f"data {dataset!r} has images of shape {test_set.image_shape}, the model takes "
                                 f"{tuple(loaded.input_shape[1:])}; resize them (--image-size) or give the model's "
                                 "--input-shape")
    record = {"model": loaded.to_dict(), "data": _data_record(dataset, args, test_set)}
    return Sources(loaded.model.eval(), train_set, test_set, dataset, spec, record, None)


def _data_record(dataset: str, args: argparse.Namespace, test_set: ImageDataset) -> Dict[str, Any]:
    return {"spec": dataset, "image_size": args.image_size, "test_size": len(test_set),
            "image_shape": list(test_set.image_shape), "num_classes": test_set.num_classes}
