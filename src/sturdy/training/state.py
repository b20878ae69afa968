"""What a checkpoint of a run holds, and how a run resumes from one (docs/design.md, "Training core").

A checkpoint holds the model, optimizer, scheduler, gradient scaler, global RNG state, history and every extra
state (plugins, objectives' state such as power-iteration vectors, compression residuals). State that differs
between ranks (an object with ``per_rank_state = True``) is gathered from every rank into rank 0's one file as
``{"per_rank": [rank 0, rank 1, ...]}`` and each rank resumes from its own entry; a checkpoint of another world
size is refused. A sharded model's (FSDP2) weights and optimizer state are gathered in full (:mod:`.sharding`).
Checkpoints are written atomically and read with ``weights_only=True``
(:mod:`sturdy.checkpoints`).
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch
from torch import nn

from sturdy.checkpoints import (
    CHECKPOINT_FORMAT,
    check_resumable,
    check_state_dict_shapes,
    damaged_message,
    load_checkpoint,
    save_checkpoint,
)
from sturdy.distributed import gather_to_rank0
from sturdy.errors import CheckpointError
from sturdy.training.config import EpochMetrics, TrainConfig, resume_key
from sturdy.training.plugins import Stateful
from sturdy.training.sharding import (
    load_model_state_dict,
    load_optimizer_state_dict,
    model_state_dict,
    optimizer_state_dict,
)

__all__ = ["RunState", "saved_extra_state", "rng_state", "set_rng_state"]


def _per_rank(obj: Any) -> bool:
    return bool(getattr(obj, "per_rank_state", False))


def saved_extra_state(extra_state: Mapping[str, Stateful], rank: int, world: int,
                      device: torch.device) -> Dict[str, Any]:
    """Every extra state for the checkpoint (on rank 0; a collective when some state is per rank)."""
    out: Dict[str, Any] = {}
    for name, obj in extra_state.items():
        if _per_rank(obj):
            parts = gather_to_rank0(obj.state_dict(), device=device) if world > 1 else [obj.state_dict()]
            out[name] = {"per_rank": parts}
        elif rank == 0:
            out[name] = obj.state_dict()
    return out


def _load_extra_state(obj: Stateful, saved: Any, *, name: str, rank: int, world: int, path: Any) -> None:
    if not _per_rank(obj):
        obj.load_state_dict(saved)
        return
    parts = saved.get("per_rank") if isinstance(saved, dict) else None
    if not isinstance(parts, list):
        raise CheckpointError(f"checkpoint {str(path)!r} holds one rank's {name!r} state, not every rank's (an older "
                              "version wrote it); resuming would lose the other ranks' state: use a new output folder "
                              "or --no-resume to start over")
    if len(parts) != world:
        raise CheckpointError(f"checkpoint {str(path)!r} holds the {name!r} state of {len(parts)} workers and this run "
                              f"has {world}; resume with {len(parts)} workers (e.g. --nproc {len(parts)}), or use a "
                              "new output folder or --no-resume to start over")
    obj.load_state_dict(parts[rank])


def rng_state(device: torch.device) -> Dict[str, Any]:
    state: Dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class RunState:
    """The stateful parts of one run and their checkpoint: save after an epoch, restore before the first."""

    def __init__(self, *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any,
                 config: TrainConfig, extra_state: Mapping[str, Stateful], device: torch.device, rank: int,
                 world: int, path: Optional[str | os.PathLike], extra: Optional[Mapping[str, Any]]) -> None:
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.config, self.extra_state, self.device = config, dict(extra_state), device
        self.rank, self.world, self.path, self.extra = rank, world, path, dict(extra or {})
        self.history: List[EpochMetrics] = []

    def restore(self, check_resume: Optional[Callable[[Mapping[str, Any]], None]]) -> int:
        """Load the checkpoint when there is one; the epoch to start from (0 without one)."""
        path = self.path
        if path is None or not Path(path).is_file():
            return 0
        ckpt = load_checkpoint(path, map_location=self.device)
        check_resumable(ckpt, path)
        if check_resume is not None:
            check_resume(ckpt)
        self._check_config(ckpt)
        check_state_dict_shapes(self.model, ckpt["model"], source=str(path))
        load_model_state_dict(self.model, ckpt["model"])
        for name in self.extra_state:
            if name not in ckpt["state"]:
                raise CheckpointError(f"checkpoint {str(path)!r} holds no state for {name!r}")
        try:  # the file is checked as far as the loop relies on it; what remains is the objects' own format
            load_optimizer_state_dict(self.model, self.optimizer, ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            if self.scaler is not None and ckpt.get("scaler"):
                self.scaler.load_state_dict(ckpt["scaler"])
            for name, obj in self.extra_state.items():
                _load_extra_state(obj, ckpt["state"][name], name=name, rank=self.rank, world=self.world, path=path)
            set_rng_state(ckpt["rng"], self.device)
            self.history = [EpochMetrics(**m) for m in ckpt["history"]]
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
            raise CheckpointError(damaged_message(path, f"{type(exc).__name__}: {exc}")) from exc
        return int(ckpt["epoch"])

    def _check_config(self, ckpt: Mapping[str, Any]) -> None:
        stored, wanted = resume_key(ckpt["config"]), resume_key(asdict(self.config))
        if stored != wanted:
            differ = ", ".join(f"{k}: {stored.get(k)!r} there, {wanted.get(k)!r} here"
                               for k in sorted(set(stored) | set(wanted)) if stored.get(k) != wanted.get(k))
            raise CheckpointError(
                f"checkpoint {str(self.path)!r} was made with a different training configuration ({differ}); "
                "use a new output folder or pass resume=False (--no-resume) to start over"
            )
        if int(ckpt["epoch"]) > self.config.epochs:
            raise CheckpointError(
                f"checkpoint {str(self.path)!r} is already past epoch {self.config.epochs} (it holds "
                f"{int(ckpt['epoch'])} epochs); ask for at least that many epochs, use a new output folder, or "
                "pass resume=False (--no-resume) to start over"
            )

    def save(self, epoch: int) -> None:
        """Checkpoint after ``epoch`` epochs (rank 0 writes; gathering per-rank state is a collective)."""
        if self.path is None:
            return
        saved_state = saved_extra_state(self.extra_state, self.rank, self.world, self.device)
        # sharded (FSDP2): gathering the full state is a collective
        model, optimizer = model_state_dict(self.model), optimizer_state_dict(self.model, self.optimizer)
        if self.rank != 0:
            return
        save_checkpoint(
            {
                "format": CHECKPOINT_FORMAT,
                "epoch": epoch,
                "config": asdict(self.config),
                "model": model,
                "optimizer": optimizer,
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "state": saved_state,
                "rng": rng_state(self.device),
                "history": [asdict(m) for m in self.history],
                "extra": self.extra,
            },
            self.path,
        )
