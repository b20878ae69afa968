"""A training job: data set + model + hyper-parameters -> ``model.pt`` and ``results.json``.

This is what ``sturdy train`` runs. Method parts plug in here: a job whose options say
``method="lmt"`` trains with the Lipschitz-margin objective of :mod:`sturdy.experiments.lipschitz`;
distributed/compressed runs call :func:`run_train_job` inside each worker with a communication hook.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from sturdy.data import ImageDataset, load_dataset
from sturdy.errors import CheckpointError, ConfigurationError
from sturdy.experiments.jsonio import write_json
from sturdy.models import create_model
from sturdy.training import (
    LossFn,
    Stateful,
    TrainConfig,
    config_from_dict,
    load_checkpoint,
    resolve_device,
    train,
)

__all__ = ["TrainJob", "FitResult", "fit", "run_train_job", "load_trained_model", "load_job_data"]


@dataclass(frozen=True)
class TrainJob:
    """Everything that defines a training run (stored in every checkpoint and ``results.json``).

    ``options`` holds method-specific settings added by part modules (e.g. ``method``, ``c``,
    ``nproc``, ``compress``); core fields mirror :class:`sturdy.training.TrainConfig`.
    """

    dataset: str = "digits"
    model: str = "cnn"
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    resize: Optional[int] = None
    data_root: Optional[str] = None
    download: bool = False
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"
    seed: int = 0
    label_noise: float = 0.0
    device: str = "auto"
    out: str = "runs/train"
    options: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.train_config()  # validates the hyper-parameters early, with TrainConfig's messages

    def train_config(self) -> TrainConfig:
        return config_from_dict(asdict(self))

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainJob:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def replace(self, **changes: Any) -> TrainJob:
        return TrainJob.from_dict({**asdict(self), **changes})


@dataclass(frozen=True)
class FitResult:
    """A trained model (eval mode) and the JSON-able results written to ``results.json``."""

    model: nn.Module
    results: Dict[str, Any]


def load_job_data(job: TrainJob) -> Tuple[ImageDataset, ImageDataset]:
    """Train and test split of the job's data set."""
    kw = dict(root=job.data_root, download=job.download, resize=job.resize)
    return load_dataset(job.dataset, split="train", **kw), load_dataset(job.dataset, split="test", **kw)


def _is_rank_zero() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )


def fit(
    job: TrainJob,
    *,
    loss_fn: Optional[LossFn] = None,
    extra_state: Optional[Mapping[str, Stateful]] = None,
    comm_hook: Optional[Tuple[Any, Callable[..., Any]]] = None,
    extra_results: Optional[Callable[[], Mapping[str, Any]]] = None,
    model_setup: Optional[Callable[[nn.Module], None]] = None,
    resume: bool = True,
    progress: bool = True,
) -> FitResult:
    """Run a training job; rank 0 writes ``job.out/model.pt`` (every epoch) and ``results.json``.

    Args:
        job: the job.
        loss_fn: overrides the objective (by default cross-entropy, or LMT when ``job.options["method"]
            == "lmt"``).
        extra_state: additional checkpointed state (e.g. a compression state).
        comm_hook: ``(state, hook)`` registered on DDP when a process group is initialised.
        extra_results: called after training; its dict is merged into ``results.json``.
        model_setup: called with the model right after it is built and moved to its device.
        resume: continue from ``job.out/model.pt`` when it exists.
        progress: progress bar.
    """
    train_set, test_set = load_job_data(job)
    torch.manual_seed(job.seed)
    model = create_model(job.model, in_shape=train_set.image_shape, num_classes=train_set.num_classes,
                         **job.model_kwargs)
    device = resolve_device(job.device)
    model.to(device)
    if model_setup is not None:
        model_setup(model)
    state: Dict[str, Stateful] = dict(extra_state or {})
    method = job.options.get("method", "standard")
    if loss_fn is None and method == "lmt":
        from sturdy.experiments.lipschitz import build_lmt_objective

        loss_fn, method_state = build_lmt_objective(model, job, input_shape=(1, *train_set.image_shape))
        state.update(method_state)
    elif method not in ("standard", "lmt"):
        raise ConfigurationError(f"unknown training method {method!r}; use 'standard' or 'lmt'")
    out = Path(job.out)
    result = train(
        model,
        train_set,
        config=job.train_config(),
        test_set=test_set,
        loss_fn=loss_fn,
        extra_state=state,
        comm_hook=comm_hook,
        checkpoint_path=out / "model.pt",
        checkpoint_extra={"job": job.to_dict()},
        resume=resume,
        progress=progress,
    )
    results: Dict[str, Any] = {
        "job": job.to_dict(),
        "device": str(device),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "train_size": len(train_set),
        "test_size": len(test_set),
        **result.to_dict(),
    }
    if extra_results is not None:
        results.update(extra_results())
    if _is_rank_zero():
        write_json(results, out / "results.json")
    return FitResult(model=model, results=results)


def run_train_job(job: TrainJob, **kwargs: Any) -> Dict[str, Any]:
    """:func:`fit` returning only the results dict (keywords as for :func:`fit`)."""
    return fit(job, **kwargs).results


def load_trained_model(
    path: str | os.PathLike, *, device: str | torch.device = "cpu"
) -> Tuple[nn.Module, TrainJob]:
    """Rebuild the model saved by ``sturdy train`` (``DIR/model.pt``) in eval mode, with its job.

    Raises:
        CheckpointError: missing/corrupt/unsafe file, or a checkpoint without a job description.
    """
    ckpt = load_checkpoint(path, map_location="cpu")
    job_dict = ckpt.get("extra", {}).get("job")
    if not isinstance(job_dict, dict):
        raise CheckpointError(f"{str(path)!r} holds no job description; was it written by `sturdy train`?")
    job = TrainJob.from_dict(job_dict)
    train_shape, num_classes = _data_signature(job)
    model = create_model(job.model, in_shape=train_shape, num_classes=num_classes, **job.model_kwargs)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{str(path)!r}: weights do not match model {job.model!r}: {exc}") from exc
    model.to(resolve_device(device)).eval()
    return model, job


def _data_signature(job: TrainJob) -> Tuple[Tuple[int, int, int], int]:
    ds = load_dataset(job.dataset, split="test", root=job.data_root, download=job.download, resize=job.resize)
    return ds.image_shape, ds.num_classes
