"""The model and the data of a training job, from any source (docs/design.md, "Your own model and data").

* data: a data set name of :func:`sturdy.data.load_dataset` (``digits``, ``synthetic``, and the torchvision names
  ``mnist``, ``cifar10``, ... read from ``data_root``), or a data spec of :func:`sturdy.datasets.load_data`
  (``npz:FILE``, ``folder:DIR``, ``cifar10:DIR``, ``mnist:DIR``, ... read by the project's own readers);
* model: a registry name (:func:`sturdy.models.create_model`) or a model source of
  :func:`sturdy.model_sources.load_model` (``file.py:FACTORY``, ``package.module:FACTORY``, ``torchvision:NAME``,
  ``timm:NAME``), with optional initial ``weights`` and a ``normalize`` put in front of the model.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence

import torch
from torch import nn

from sturdy.checkpoints import file_sha256
from sturdy.data import ImageDataset, load_dataset
from sturdy.datasets import ARCHIVES, load_data
from sturdy.datasets import download as fetch
from sturdy.model_sources import load_model
from sturdy.models import create_model

__all__ = ["job_data", "job_model", "job_record", "is_registry_model"]


def job_data(dataset: str, *, split: str, resize: Optional[int] = None, data_root: Optional[str] = None,
             download: bool = False) -> ImageDataset:
    """One split of a job's data (a name of :func:`~sturdy.data.load_dataset` or a spec with ``KIND:PATH``); with
    ``download``, a downloadable kind's official files are fetched into its folder first (checksums checked)."""
    if ":" in dataset:
        kind, _, path = dataset.partition(":")
        if download and kind in ARCHIVES:
            fetch(kind, path or data_root or "data")
        return load_data(dataset, split=split, image_size=resize, root_hint=data_root)
    return load_dataset(dataset, split=split, root=data_root, download=download, resize=resize)


def is_registry_model(spec: str) -> bool:
    """A registry name (every other model source is written ``KIND:NAME`` or ``PATH:FACTORY``)."""
    return ":" not in spec


def job_model(spec: str, model_kwargs: Mapping[str, Any], in_shape: Sequence[int], num_classes: int, *,
              weights: Optional[str] = None, normalize: Optional[str] = None) -> nn.Module:
    """The job's model for inputs ``(C, H, W)`` (built where the default device says: ``torch.device("meta")``
    inside a ``with`` block builds it without memory)."""
    if is_registry_model(spec) and weights is None and normalize is None:
        return create_model(spec, in_shape=tuple(in_shape), num_classes=num_classes, **dict(model_kwargs))
    device = torch.get_default_device()
    loaded = load_model(spec, model_args=dict(model_kwargs), weights=weights, normalize=normalize,
                        input_shape=tuple(in_shape), num_classes=num_classes,
                        device="cpu" if device.type == "meta" else device)
    return loaded.model


def job_record(job: Any, *, train_size: int, test_size: int) -> Dict[str, Any]:
    """What a training job's results were made from: the model source (spec, arguments, initial weights and their
    sha256, normalisation) and the data source (spec, resize, split sizes)."""
    sha = file_sha256(job.weights) if job.weights is not None else None
    return {"model": {"spec": job.model, "model_args": dict(job.model_kwargs), "weights": job.weights,
                      "weights_sha256": sha, "normalization": job.normalize},
            "data": {"spec": job.dataset, "image_size": job.resize, "train_size": train_size,
                     "test_size": test_size}}
