"""A training job: data set + model + hyper-parameters -> ``model.pt`` and ``results.json``.

This is what ``sturdy train`` runs. The job knows no method: parts plug in through :class:`TrainPlugin` objects
(Lipschitz-margin training supplies an objective, its tracker and a drift check; gradient compression a DDP
communication hook and its state), which :func:`fit` sets up on the freshly built model and hands to the one
training loop (:func:`sturdy.training.train`). Data-parallel runs (:mod:`sturdy.experiments.parallel`) call
:func:`fit` inside each worker.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Protocol, Sequence, Tuple

import torch
from torch import nn

from sturdy.data import ImageDataset, check_fits_in_memory
from sturdy.errors import CheckpointError, ConfigurationError
from sturdy.experiments.command_report import write_command_report
from sturdy.experiments.job_sources import is_registry_model, job_data, job_model, job_record
from sturdy.experiments.jsonio import remove_results, results_path, write_results
from sturdy.experiments.resume_identity import JOB_IDENTITY, check_same_run, plain
from sturdy.report import plot_training_curves
from sturdy.training import (
    Objective,
    Plugin,
    Stateful,
    TrainConfig,
    check_state_dict_shapes,
    config_from_dict,
    load_checkpoint,
    resolve_device,
    steps_per_epoch,
    train,
    world,
)
from sturdy.training.sharding import ShardGroup, Sharding
from sturdy.utils import atomic_save_figure, prepare_output_dir
from sturdy.validation import check_input_shape

__all__ = [
    "TrainJob",
    "TrainContext",
    "TrainHooks",
    "TrainPlugin",
    "FitResult",
    "fit",
    "run_train_job",
    "load_trained_model",
    "load_job_data",
    "check_data_matches",
    "build_model",
    "run_identity",
    "check_same_run",
    "check_resume",
    "check_shardable_plugins",
]

_CONFIG_FIELDS = frozenset(f.name for f in fields(TrainConfig))


@dataclass(frozen=True)
class TrainJob:
    """Everything that defines a training run (stored in every checkpoint and ``results.json``).

    Attributes:
        dataset, model, model_kwargs, resize, data_root, download, weights, normalize: what is trained on what
            (sources of :mod:`sturdy.experiments.job_sources`: a registry model or your own, initial weights, a
            normalisation in front of the model; a data set name or a data spec).
        config: the training hyper-parameters (:class:`sturdy.training.TrainConfig`).
        out: output folder (``model.pt``, ``results.json``).
        options: method-specific settings added by part modules (e.g. ``method``, ``c``, ``nproc``,
            ``compress``); plain JSON-able values.
    """

    dataset: str = "digits"
    model: str = "cnn"
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    resize: Optional[int] = None
    data_root: Optional[str] = None
    download: bool = False
    weights: Optional[str] = None
    normalize: Optional[str] = None
    config: TrainConfig = field(default_factory=TrainConfig)
    out: str = "runs/train"
    options: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.config, TrainConfig):
            raise ConfigurationError(f"TrainJob.config must be a TrainConfig, got {type(self.config).__name__}")

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainJob:
        """Build a job from :meth:`to_dict`'s output; flat training fields (``epochs=...``) are accepted too."""
        names = {f.name for f in fields(cls)} - {"config"}
        config = dict(values.get("config") or {})
        config.update({k: v for k, v in values.items() if k in _CONFIG_FIELDS})
        return cls(**{k: v for k, v in values.items() if k in names}, config=config_from_dict(config))

    def replace(self, **changes: Any) -> TrainJob:
        """A copy with ``changes``; training fields (``device=...``) go into :attr:`config`."""
        return TrainJob.from_dict({**asdict(self), **changes})


@dataclass(frozen=True)
class TrainContext:
    """What a :class:`TrainPlugin` learns about the run it joins.

    Attributes:
        job: the job.
        input_shape: shape of one input batch of size 1, ``(1, C, H, W)``.
        num_classes: number of logits.
        steps_per_epoch: optimizer steps per epoch on this worker.
        device: the model's device.
    """

    job: TrainJob
    input_shape: Tuple[int, ...]
    num_classes: int
    steps_per_epoch: int
    device: torch.device


@dataclass(frozen=True)
class TrainHooks:
    """What a plugin adds to the training loop (every field optional).

    Attributes:
        objective: replaces mean cross-entropy (at most one plugin of a run may set it).
        extra_state: checkpointed objects (``state_dict()``/``load_state_dict()``), by unique name.
        comm_hook: ``(state, hook)`` registered on DDP when a process group is initialised.
        shard_hook: called with the model's FSDP2 groups when the run shards (``--shard``; see
            :class:`sturdy.training.sharding.Sharding`), e.g. to install a custom reduce-scatter.
        plugins: hooks around the step and the epoch (:class:`sturdy.training.Plugin`).
        extra_results: called after training; its dict is merged into ``results.json``.
    """

    objective: Optional[Objective] = None
    extra_state: Mapping[str, Stateful] = field(default_factory=dict)
    comm_hook: Optional[Tuple[Any, Callable[..., Any]]] = None
    shard_hook: Optional[Callable[[Sequence[ShardGroup]], None]] = None
    plugins: Sequence[Plugin] = ()
    extra_results: Optional[Callable[[], Mapping[str, Any]]] = None


class TrainPlugin(Protocol):
    """A method's contribution to a run; picklable (a frozen dataclass), so workers can receive it.

    A plugin joins a sharded run (``--shard``, FSDP2) only when it says it can, with ``shardable = True``: outside
    the forward and backward passes FSDP2 holds the weights as shards, which a method reading them there (e.g.
    a Lipschitz bound) cannot use (:func:`check_shardable_plugins`).

    A plugin may also have a ``resume_identity`` mapping: settings a resumed run must share with its
    checkpoint, by unique name (e.g. ``{"compression": {"method": "vgc", "alpha": 5.0, ...}}``). They are
    stored in the checkpoint, and resuming with other values, or without the plugin, is refused
    (:func:`check_same_run`).
    """

    def setup(self, model: nn.Module, ctx: TrainContext) -> TrainHooks: ...


@dataclass(frozen=True)
class FitResult:
    """A trained model (eval mode) and the JSON-able results written to ``results.json``."""

    model: nn.Module
    results: Dict[str, Any]


def load_job_data(job: TrainJob) -> Tuple[ImageDataset, ImageDataset]:
    """Train and test split of the job's data set (:func:`~sturdy.experiments.job_sources.job_data`)."""
    kw = dict(resize=job.resize, data_root=job.data_root, download=job.download)
    return job_data(job.dataset, split="train", **kw), job_data(job.dataset, split="test", **kw)


def check_data_matches(model: nn.Module, data: ImageDataset, dataset: str) -> None:
    """Refuse ``data`` (named ``dataset``) when its images differ in shape from those ``model`` (from
    :func:`load_trained_model`, which records the checkpoint's input shape on it) was trained on.

    Raises:
        ConfigurationError: naming both shapes.
    """
    expected = tuple(getattr(model, "input_shape", data.image_shape))
    if data.image_shape != expected:
        raise ConfigurationError(f"data set {dataset!r} has images of shape {data.image_shape}, the model "
                                 f"was trained on {expected}; choose a data set of the same shape")


def build_model(job: TrainJob, in_shape: Sequence[int], num_classes: int, *, seed: Optional[int] = None) -> nn.Module:
    """The job's model for inputs ``(C, H, W)``, checked on the meta device before any memory is used.

    ``seed`` seeds torch's generator right before the weights are drawn.

    Raises:
        ConfigurationError: settings the model refuses (a wrong type included), or a model too large
            for this machine's memory.
    """
    count = sum(p.numel() for p in _meta_model(job, in_shape, num_classes).parameters())
    check_fits_in_memory((count,), what=f"model {job.model!r} with {job.model_kwargs} ({count:,} parameters)",
                         fix="choose smaller --model-arg values")
    if seed is not None:
        torch.manual_seed(seed)
    return job_model(job.model, job.model_kwargs, in_shape, num_classes, weights=job.weights, normalize=job.normalize)


def _meta_model(job: TrainJob, in_shape: Sequence[int], num_classes: int) -> nn.Module:
    """The job's model on the meta device: settings that ask for huge layers allocate nothing."""
    try:
        if not is_registry_model(job.model):  # your own model: load_model checks it on the meta device itself
            return job_model(job.model, job.model_kwargs, in_shape, num_classes, normalize=job.normalize)
        with torch.device("meta"):
            return job_model(job.model, job.model_kwargs, in_shape, num_classes, normalize=job.normalize)
    except ConfigurationError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"model {job.model!r} cannot be built with {job.model_kwargs}: {_one_line(exc)}; "
                                 "check the --model-arg values (sizes are whole numbers)") from exc


def _combine(hooks: Sequence[TrainHooks]) -> TrainHooks:
    objectives = [h.objective for h in hooks if h.objective is not None]
    comm_hooks = [h.comm_hook for h in hooks if h.comm_hook is not None]
    shard_hooks = [h.shard_hook for h in hooks if h.shard_hook is not None]
    if len(objectives) > 1 or len(comm_hooks) > 1 or len(shard_hooks) > 1:
        raise ConfigurationError("two methods of this run both replace the training objective or the DDP "
                                 "communication hook; combine at most one of each")
    state: Dict[str, Stateful] = {}
    for h in hooks:
        clash = set(state) & set(h.extra_state)
        if clash:
            raise ConfigurationError(f"two methods of this run checkpoint state under the same name {sorted(clash)}")
        state.update(h.extra_state)
    extras = [h.extra_results for h in hooks if h.extra_results is not None]

    def extra_results() -> Dict[str, Any]:
        merged: Dict[str, Any] = {}
        for extra in extras:
            merged.update(extra())
        return merged

    return TrainHooks(objective=objectives[0] if objectives else None, extra_state=state,
                      comm_hook=comm_hooks[0] if comm_hooks else None,
                      shard_hook=shard_hooks[0] if shard_hooks else None,
                      plugins=tuple(p for h in hooks for p in h.plugins),
                      extra_results=extra_results if extras else None)


def fit(
    job: TrainJob,
    *,
    plugins: Sequence[TrainPlugin] = (),
    resume: bool = True,
    progress: bool = True,
) -> FitResult:
    """Run a training job; rank 0 writes ``job.out/model.pt`` (every epoch) and ``results.json``.

    Args:
        job: the job.
        plugins: methods joining the run (see :class:`TrainPlugin`); each is set up on the model
            right after it is built and moved to its device.
        resume: continue from ``job.out/model.pt`` when it exists.
        progress: progress bar.
    """
    check_shardable_plugins(job, plugins)
    out = prepare_output_dir(job.out)
    results_file = results_path(out, "train")  # refused before any work when another command's results are there
    train_set, test_set = load_job_data(job)
    config = job.config
    model = build_model(job, train_set.image_shape, train_set.num_classes, seed=config.seed)
    device = resolve_device(config.device)
    model.to(device)
    ctx = TrainContext(job=job, input_shape=(1, *train_set.image_shape), num_classes=train_set.num_classes,
                       steps_per_epoch=steps_per_epoch(len(train_set), config.batch_size, world()[1]),
                       device=device)
    hooks = _combine([plugin.setup(model, ctx) for plugin in plugins])
    identity = run_identity(job, world_size=world()[1], plugins=plugins)
    result = train(
        model,
        train_set,
        config=config,
        test_set=test_set,
        objective=hooks.objective,
        plugins=hooks.plugins,
        extra_state=hooks.extra_state,
        comm_hook=hooks.comm_hook,
        sharding=Sharding(install=hooks.shard_hook) if job.options.get("shard") else None,
        checkpoint_path=out / "model.pt",
        checkpoint_extra={"job": job.to_dict(), "input_shape": list(ctx.input_shape),
                          "num_classes": ctx.num_classes, "identity": identity},
        resume=resume,
        on_epoch_end=lambda metrics: _drop_stale_results(out),
        check_resume=lambda ckpt: check_same_run(ckpt, out / "model.pt", identity),
        progress=progress,
    )
    results: Dict[str, Any] = {
        "job": job.to_dict(),
        "device": str(device),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "train_size": len(train_set),
        "test_size": len(test_set),
        "sources": job_record(job, train_size=len(train_set), test_size=len(test_set)),
        **result.to_dict(),
    }
    if hooks.extra_results is not None:
        results.update(hooks.extra_results())
    if world()[0] == 0:
        curves = out / "train_curves.png"
        atomic_save_figure(plot_training_curves({job.model: results["history"]}), curves)
        write_command_report(out, "train", title=f"sturdy train: {job.model} on {job.dataset}", summary=results,
                             figures=[curves])
        write_results(results, results_file, command="train")
    return FitResult(model=model, results=results)


def _drop_stale_results(out: Path) -> None:
    """Once a new epoch's checkpoint is written, an older ``results.json`` describes another model: remove it,
    so an interrupted rerun never leaves results that look complete (they are written again at the end)."""
    if world()[0] == 0:
        remove_results(out / "results.json", "train")




def check_shardable_plugins(job: TrainJob, plugins: Sequence[TrainPlugin]) -> None:
    """Refuse a sharded job (``--shard``) with a plugin that does not declare ``shardable = True``.

    Raises:
        ConfigurationError: one line naming the plugin.
    """
    if not job.options.get("shard"):
        return
    for plugin in plugins:
        if not getattr(plugin, "shardable", False):
            raise ConfigurationError(f"--shard: {type(plugin).__name__} (a method of this run) has no sharded form "
                                     "(FSDP2 holds the weights as shards outside the forward and backward passes); "
                                     "drop --shard to train it data-parallel with DDP")


def run_identity(job: TrainJob, *, world_size: int, plugins: Sequence[TrainPlugin] = ()) -> Dict[str, Any]:
    """What a resumed run must share with its checkpoint besides the training configuration: the data set and
    architecture, the number of workers, whether the model is sharded (``--shard``), and the settings of every
    method joining it (the plugins' ``resume_identity``, see :class:`TrainPlugin`)."""
    job_dict = job.to_dict()
    identity: Dict[str, Any] = {**{k: job_dict[k] for k in JOB_IDENTITY}, "world_size": world_size}
    if job.options.get("shard"):  # absent for DDP, as in the checkpoints written before sharding existed
        identity["sharding"] = "fsdp2"
    for plugin in plugins:
        own = dict(getattr(plugin, "resume_identity", None) or {})
        clash = set(identity) & set(own)
        if clash:
            raise ConfigurationError(f"two methods of this run record resume settings under the same name "
                                     f"{sorted(clash)}")
        identity.update(own)
    return plain(identity)


def check_resume(job: TrainJob, *, plugins: Sequence[TrainPlugin] = (), world_size: int = 1) -> None:
    """:func:`check_same_run` for ``job.out/model.pt`` when it exists, before any worker starts (a launcher
    calls it; :func:`fit` checks again when it loads the checkpoint)."""
    path = Path(job.out) / "model.pt"
    if path.is_file():
        check_same_run(load_checkpoint(path, map_location="cpu"), path,
                       run_identity(job, world_size=world_size, plugins=plugins))


def run_train_job(job: TrainJob, *, plugins: Sequence[TrainPlugin] = (), resume: bool = True,
                  progress: bool = True) -> Dict[str, Any]:
    """:func:`fit` in this process, returning only the results dict."""
    return fit(job, plugins=plugins, resume=resume, progress=progress).results


def load_trained_model(
    path: str | os.PathLike, *, device: str | torch.device = "cpu"
) -> Tuple[nn.Module, TrainJob]:
    """Rebuild the model saved by ``sturdy train`` (``DIR/model.pt``) in eval mode, with its job.

    The input shape and class count come from the checkpoint (checkpoints of older versions, which
    lack them, fall back to the job's data set).

    Raises:
        CheckpointError: missing/corrupt/unsafe file, or a checkpoint without a job description.
    """
    ckpt = load_checkpoint(path, map_location="cpu")
    extra = ckpt.get("extra", {})
    job_dict = extra.get("job")
    if not isinstance(job_dict, dict) or not isinstance(ckpt.get("model"), dict):
        raise CheckpointError(f"{str(path)!r} holds no job description; was it written by `sturdy train`?")
    try:
        # stored settings are data from whoever made the file: they never choose a data folder or download
        job = TrainJob.from_dict(job_dict).replace(data_root=None, download=False)
    except (ConfigurationError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{str(path)!r} holds an invalid job description: {_one_line(exc)}") from exc
    if "input_shape" in extra and "num_classes" in extra:
        try:
            in_shape = check_input_shape(extra["input_shape"])[1:]
            num_classes = int(extra["num_classes"])
            if num_classes < 1 or num_classes != extra["num_classes"]:
                raise ValueError(f"class count {extra['num_classes']!r}")
        except (ConfigurationError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{str(path)!r} holds an invalid input shape or class count ({_one_line(exc)}); "
                                  "was it written by `sturdy train`?") from exc
        if job.resize is not None and in_shape[1:] != (job.resize, job.resize):
            raise CheckpointError(f"{str(path)!r} is inconsistent: its images are {in_shape[1]}x{in_shape[2]} but "
                                  f"its job resizes them to {job.resize}x{job.resize}; the file is damaged or was "
                                  "edited: retrain the model")
    else:
        test_set = load_job_data(job)[1]
        in_shape, num_classes = test_set.image_shape, test_set.num_classes
    try:
        shell = _meta_model(job, in_shape, num_classes)
    except ConfigurationError as exc:
        raise CheckpointError(f"{str(path)!r} describes a model that cannot be built: {_one_line(exc)}") from exc
    check_state_dict_shapes(shell, ckpt["model"], source=str(path),
                            advice="its stored settings do not match its weights: the file is damaged or was "
                                   "edited; retrain the model")
    bad = [k for k, v in ckpt["model"].items() if isinstance(v, torch.Tensor) and v.is_floating_point()
           and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{str(path)!r} holds non-finite (NaN or infinite) weights in {', '.join(bad[:3])}"
                              f"{' and more' if len(bad) > 3 else ''}; the run that wrote it diverged")
    model = job_model(job.model, job.model_kwargs, in_shape, num_classes, normalize=job.normalize)
    model.load_state_dict(ckpt["model"])
    model.input_shape = tuple(in_shape)  # (C, H, W) it was trained on: check_data_matches reads it, no second load
    model.to(resolve_device(device)).eval()
    return model, job


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
