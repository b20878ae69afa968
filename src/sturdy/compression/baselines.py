"""Baselines in the same hook family: Strom's threshold method, top-k, and PyTorch's own hooks.

* :class:`StromState` / :func:`strom_hook` (Strom 2015): send ``+-tau`` where ``|r_i| > tau``, error feedback.
* :class:`TopKState` / :func:`topk_hook`: send the ``ceil(ratio * n)`` largest ``|r_i|`` per bucket,
  error feedback.
* :class:`TorchHookState` / :func:`torch_hook`: PyTorch's allreduce, fp16 and PowerSGD hooks, with
  their traffic counted.

The error-feedback baselines share the variance method's residual state and exchange
(:mod:`sturdy.compression.residual`, :mod:`sturdy.compression.exchange`).
"""

import logging
import math
from contextlib import contextmanager
from typing import Any, Dict, Iterable, Iterator, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from sturdy.compression.compressor import Selection, strom_select, topk_select, validate_rate
from sturdy.compression.exchange import sparse_exchange
from sturdy.compression.residual import BucketView, ResidualState
from sturdy.compression.traffic import TrafficMeter
from sturdy.errors import CheckpointError, ConfigurationError

__all__ = ["StromState", "TopKState", "TorchHookState", "strom_hook", "topk_hook", "torch_hook", "TORCH_METHODS"]

TORCH_METHODS = ("none", "fp16", "powersgd")


class StromState(ResidualState):
    """State of :func:`strom_hook`: send ``+-tau`` where ``|r_i| > tau`` (Strom 2015), error feedback.

    Args:
        tau: threshold and sent magnitude, ``> 0``.
        process_group, start_iter, named_parameters, gather, slack: as in :class:`VarianceCompressionState`
            (``gather="bounded"`` is for ``vgc`` only).
    """

    kind = "strom"
    value_format = "sign"

    def __init__(
        self,
        *,
        process_group: Optional[dist.ProcessGroup] = None,
        tau: float = 1e-3,
        start_iter: int = 2,
        named_parameters: Optional[Iterable[Tuple[str, Tensor]]] = None,
        gather: str = "capacity",
        slack: float = 1.25,
    ) -> None:
        self.tau = validate_rate("tau", tau, low=0.0, high=math.inf, hint="a gradient magnitude such as 1e-3")
        if self.tau == 0:
            raise ConfigurationError("tau must be > 0; a zero threshold would send every element as +-0")
        super().__init__(
            process_group=process_group, start_iter=start_iter, named_parameters=named_parameters, gather=gather,
            slack=slack,
        )

    def config(self) -> Dict[str, Any]:
        return {"start_iter": self.start_iter, "tau": self.tau}

    def select(self, view: BucketView, *, max_bytes: Optional[int] = None) -> Selection:
        """Send ``sign(r_i) * tau`` where ``|r_i| > tau``."""
        return strom_select(view.buffers["residual"], tau=self.tau)


def strom_hook(state: StromState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Strom threshold hook with error feedback."""
    return sparse_exchange(state, bucket)


class TopKState(ResidualState):
    """State of :func:`topk_hook`: send the ``ceil(ratio * n)`` largest ``|r_i|`` per bucket, error feedback.

    Args:
        ratio: fraction of each bucket sent per step, in ``(0, 1]``.
        process_group, start_iter, named_parameters, gather, slack: as in :class:`VarianceCompressionState`
            (``gather="bounded"`` is for ``vgc`` only).
    """

    kind = "topk"

    def __init__(
        self,
        *,
        process_group: Optional[dist.ProcessGroup] = None,
        ratio: float = 0.01,
        start_iter: int = 2,
        named_parameters: Optional[Iterable[Tuple[str, Tensor]]] = None,
        gather: str = "capacity",
        slack: float = 1.25,
    ) -> None:
        self.ratio = validate_rate("ratio", ratio, low=0.0, high=1.0, hint="e.g. 0.01 sends 1% per step")
        if self.ratio == 0:
            raise ConfigurationError("ratio must be > 0; use e.g. 0.01 to send 1% of each bucket per step")
        super().__init__(
            process_group=process_group, start_iter=start_iter, named_parameters=named_parameters, gather=gather,
            slack=slack,
        )

    def config(self) -> Dict[str, Any]:
        return {"start_iter": self.start_iter, "ratio": self.ratio}

    def select(self, view: BucketView, *, max_bytes: Optional[int] = None) -> Selection:
        """Send the ``ceil(ratio * n)`` largest ``|r_i|`` exactly."""
        return topk_select(view.buffers["residual"], ratio=self.ratio)


def topk_hook(state: TopKState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Top-k hook with error feedback."""
    return sparse_exchange(state, bucket)


_POWERSGD_MIN_COMPRESSION_RATE = 2
# The part of PowerSGDState.__getstate__() a checkpoint holds: its error feedback, warm-start matrices,
# random generator and counters. The hyper-parameters come from the constructor; the process group is
# never saved (PyTorch's own rule).
_POWERSGD_SAVED = ("iter", "error_dict", "p_memory_dict", "q_memory_dict", "rng", "total_numel_before_compression",
                   "total_numel_after_compression", "next_stats_report")


@contextmanager
def _quiet_powersgd() -> Iterator[None]:
    """Silence PowerSGDState's warnings about process groups while it is (un)pickled for a checkpoint."""
    logger = logging.getLogger("torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _to_saved(value: Any) -> Any:
    """A ``PowerSGDState`` field as ``torch.load(weights_only=True)``-safe values (tensors on the CPU)."""
    if isinstance(value, Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _to_saved(v) for k, v in value.items()}
    if isinstance(value, np.random.RandomState):
        name, keys, pos, has_gauss, cached = value.get_state()
        return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    return value


def _from_saved(field: str, value: Any) -> Any:
    if field == "rng":
        rng = np.random.RandomState()
        rng.set_state((value["name"], value["keys"].numpy().astype(np.uint32), value["pos"], value["has_gauss"],
                       value["cached_gaussian"]))
        return rng
    return value


class TorchHookState(TrafficMeter):
    """Wraps PyTorch's own hooks (``none``: allreduce, ``fp16``, ``powersgd``) to count their traffic.

    Bytes are counted analytically: float32 for allreduce, 2 bytes per element for fp16, and for
    PowerSGD ``(rows + cols) * rank`` float32 per compressed matrix (PyTorch's own rule for which
    tensors it compresses) and float32 for the rest.

    Args:
        method: ``"none"``, ``"fp16"`` or ``"powersgd"``.
        process_group: the group (default: the world).
        rank: PowerSGD's matrix approximation rank.
        start_iter: PowerSGD's ``start_powerSGD_iter`` (plain allreduce before it; ``>= 2`` for PowerSGD).

    PowerSGD keys its state by bucket index and flat offset: after resuming from a checkpoint, the
    fresh DDP's first iteration (its buckets not rebuilt yet) reads that state in another layout, so
    a resumed PowerSGD run is close to, not bit-identical with, an uninterrupted one (the residual
    methods re-split their state by parameter name and are).
    """

    def __init__(
        self,
        method: str,
        *,
        process_group: Optional[dist.ProcessGroup] = None,
        rank: int = 1,
        start_iter: int = 2,
    ) -> None:
        if method not in TORCH_METHODS:
            raise ConfigurationError(f"TorchHookState wraps 'none', 'fp16' or 'powersgd', got {method!r}")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ConfigurationError(f"PowerSGD rank must be a positive int, got {rank!r}")
        super().__init__(process_group=process_group, start_iter=start_iter)
        if method == "powersgd" and start_iter < 2:
            raise ConfigurationError(
                f"PowerSGD needs start_iter >= 2 (DDP rebuilds its buckets after the first iteration), got {start_iter}"
            )
        self.kind = method
        self.rank = rank
        self.inner: Any = None
        if method == "powersgd":
            from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

            self.inner = powerSGD_hook.PowerSGDState(
                process_group=process_group,
                matrix_approximation_rank=rank,
                start_powerSGD_iter=start_iter,
                min_compression_rate=_POWERSGD_MIN_COMPRESSION_RATE,
            )

    def bind_model(self, model: nn.Module) -> None:
        """Nothing to bind (PyTorch's hooks keep per-bucket state only)."""

    def bucket_bytes(self, bucket: dist.GradBucket) -> int:
        """Bytes this rank sends for ``bucket`` in the current iteration."""
        n = bucket.buffer().numel()
        if self.kind == "none" or self.iter < self.start_iter:
            return 4 * n
        if self.kind == "fp16":
            return 2 * n
        total = 0
        for grad in bucket.gradients():
            if grad.dim() <= 1:
                total += 4 * grad.numel()
                continue
            rows, cols = grad.shape[0], grad.numel() // grad.shape[0]
            compressed = (rows + cols) * self.rank
            total += 4 * (compressed if compressed * _POWERSGD_MIN_COMPRESSION_RATE < rows * cols else rows * cols)
        return total

    def state_dict(self) -> Dict[str, Any]:
        """Traffic counters and, for PowerSGD, part of its own state (``PowerSGDState.__getstate__``):
        error feedback and warm-start tensors per bucket, random generator, iteration and counters."""
        out = self._meter_state()
        out["config"] = {"rank": self.rank, "start_iter": self.start_iter}
        if self.inner is not None:
            with _quiet_powersgd():
                full = self.inner.__getstate__()
            out["powersgd"] = {k: _to_saved(full[k]) for k in _POWERSGD_SAVED}
        return out

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (after the process group is initialised, as PowerSGD requires)."""
        self._load_meter_state(state)
        if self.inner is None:
            return
        saved = state.get("powersgd")
        missing = [k for k in _POWERSGD_SAVED if not isinstance(saved, dict) or k not in saved]
        if missing:
            raise CheckpointError(f"PowerSGD state lacks {missing}; it was saved by another version")
        with _quiet_powersgd():
            full = self.inner.__getstate__()
            full.update({k: _from_saved(k, saved[k]) for k in _POWERSGD_SAVED})
            self.inner.__setstate__(full)  # sets the default group: put this state's group back
        self.inner.process_group = self.process_group


def torch_hook(state: TorchHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Run PyTorch's allreduce / fp16 / PowerSGD hook on ``bucket`` and count its traffic."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    n = bucket.buffer().numel()
    nbytes = state.bucket_bytes(bucket)
    state.count_bucket(bucket, elements=n, sent=n, payload=nbytes, wire=nbytes)
    if state.kind == "fp16":
        return default_hooks.fp16_compress_hook(state.process_group, bucket)
    if state.kind == "powersgd":
        return powerSGD_hook.powerSGD_hook(state.inner, bucket)
    return default_hooks.allreduce_hook(state.process_group, bucket)
