"""Baselines in the same hook family: Strom's threshold method, top-k, and PyTorch's own hooks.

* :class:`StromState` / :func:`strom_hook` (Strom 2015): send ``+-tau`` where ``|r_i| > tau``, error feedback.
* :class:`TopKState` / :func:`topk_hook`: send the ``ceil(ratio * n)`` largest ``|r_i|`` per bucket,
  error feedback.
* :class:`TorchHookState` / :func:`torch_hook`: PyTorch's allreduce, fp16, bf16 and PowerSGD hooks, with
  their traffic counted.

The error-feedback baselines share the variance method's residual state and exchange
(:mod:`sturdy.compression.residual`, :mod:`sturdy.compression.exchange`).
"""

import logging
import math
from contextlib import contextmanager
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from sturdy.compression.compressor import Selection, strom_select, topk_select, validate_rate
from sturdy.compression.exchange import sparse_exchange
from sturdy.compression.residual import BucketView, ResidualState
from sturdy.compression.traffic import TrafficMeter
from sturdy.errors import CheckpointError, ConfigurationError, DistributedError

__all__ = ["StromState", "TopKState", "TorchHookState", "strom_hook", "topk_hook", "torch_hook", "TORCH_METHODS"]

TORCH_METHODS = ("none", "fp16", "bf16", "powersgd")


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
# The part of PowerSGDState.__getstate__() a checkpoint holds besides its per-bucket tensors: random
# generator and counters. The hyper-parameters come from the constructor; the process group is never
# saved (PyTorch's own rule). The per-bucket tensors (error feedback, warm-start Q) are saved per parameter.
_POWERSGD_SAVED = ("iter", "rng", "total_numel_before_compression", "total_numel_after_compression",
                   "next_stats_report")
_POWERSGD_PER_PARAMETER = ("error", "q")


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
    """Wraps PyTorch's own hooks (``none``: allreduce, ``fp16``, ``bf16``, ``powersgd``) to count their traffic.

    Bytes are counted analytically: float32 for allreduce, 2 bytes per element for fp16 and bf16, and for
    PowerSGD ``(rows + cols) * rank`` float32 per compressed matrix (PyTorch's own rule for which
    tensors it compresses) and float32 for the rest.

    Args:
        method: ``"none"``, ``"fp16"``, ``"bf16"`` or ``"powersgd"``.
        process_group: the group (default: the world).
        rank: PowerSGD's matrix approximation rank.
        start_iter: PowerSGD's ``start_powerSGD_iter`` (plain allreduce before it; ``>= 2`` for PowerSGD).

    PowerSGD keys its error feedback and warm-start matrices by bucket index and flat offset. This state
    follows *parameters* instead: whenever a bucket's parameter list differs from the one its PowerSGD
    tensors were made for (a fresh DDP after resuming from a checkpoint uses other buckets for one
    iteration, then rebuilds them), they are re-split by parameter name and reassembled in the new
    layout before PowerSGD's hook runs, and checkpoints hold them per parameter. PowerSGD's arithmetic is
    per tensor, so with two workers (sums of two values do not depend on the order) a resumed run
    continues bit for bit; with more, the allreduce's summation order may follow the bucket layout.
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
            raise ConfigurationError(f"TorchHookState wraps 'none', 'fp16', 'bf16' or 'powersgd', got {method!r}")
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
        self._names: Dict[int, str] = {}
        self._layout: Dict[int, Tuple[int, ...]] = {}  # bucket index -> parameter ids its PowerSGD tensors follow
        self._bucket_params: Dict[int, List[Tensor]] = {}
        self._pending: Dict[str, Dict[str, Tensor]] = {k: {} for k in _POWERSGD_PER_PARAMETER}
        if method == "powersgd":
            from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

            self.inner = powerSGD_hook.PowerSGDState(
                process_group=process_group,
                matrix_approximation_rank=rank,
                start_powerSGD_iter=start_iter,
                min_compression_rate=_POWERSGD_MIN_COMPRESSION_RATE,
            )

    def bind_model(self, model: nn.Module) -> None:
        """Take parameter names from the model DDP wraps (PowerSGD's state follows them)."""
        self._names = {id(p): name for name, p in model.named_parameters()}

    def _compressed(self, params: Sequence[Tensor]) -> List[Tuple[int, int, int]]:
        """``(position in bucket, rows, cols)`` of the tensors PowerSGD compresses, in the order of its Q memory
        (grouped by matrix shape in order of first appearance, as ``powerSGD_hook`` does)."""
        groups: Dict[Tuple[int, int], List[int]] = {}
        for j, p in enumerate(params):
            n = p.shape[0]
            m = p.numel() // n
            r = min(n, m, self.rank)
            if (n + m) * r * _POWERSGD_MIN_COMPRESSION_RATE < n * m:
                groups.setdefault((n, m), []).append(j)
        return [(j, n, m) for (n, m), js in groups.items() for j in js]

    def _split(self, index: int) -> None:
        """Move bucket ``index``'s PowerSGD tensors into the per-parameter store and drop them."""
        params = self._bucket_params.pop(index)
        self._layout.pop(index)
        names = [self._names[id(p)] for p in params]
        error = self.inner.error_dict.pop(index, None)
        if error is not None:
            offset = 0
            for name, p in zip(names, params):
                self._pending["error"][name] = error[offset : offset + p.numel()].detach().clone()
                offset += p.numel()
        q = self.inner.q_memory_dict.pop(index, None)
        self.inner.p_memory_dict.pop(index, None)
        if q is not None:
            offset = 0
            for j, _, m in self._compressed(params):
                size = m * min(params[j].shape[0], m, self.rank)
                self._pending["q"][names[j]] = q[offset : offset + size].detach().clone()
                offset += size

    def _assemble(self, index: int, params: Sequence[Tensor], like: Tensor) -> None:
        """Build bucket ``index``'s PowerSGD tensors from the per-parameter store (what it holds of them)."""
        names = [self._names[id(p)] for p in params]
        errors = [self._pending["error"].pop(n, None) for n in names]
        if any(e is not None for e in errors):
            self.inner.error_dict[index] = torch.cat([
                e.to(like) if e is not None else torch.zeros(p.numel(), dtype=like.dtype, device=like.device)
                for e, p in zip(errors, params)
            ])
        compressed = self._compressed(params)
        qs = [self._pending["q"].pop(names[j], None) for j, _, _ in compressed]
        if compressed and all(q is not None for q in qs):  # else PowerSGD draws fresh ones, as in a new run
            self.inner.q_memory_dict[index] = torch.cat([q.to(like) for q in qs])
            self.inner.p_memory_dict[index] = torch.zeros(
                sum(n * min(n, m, self.rank) for _, n, m in compressed), dtype=like.dtype, device=like.device
            )

    def follow_layout(self, bucket: dist.GradBucket) -> None:
        """Re-split PowerSGD's tensors by parameter when this bucket's parameters changed (before its hook).

        DDP runs a step's buckets in index order, so the buckets below ``bucket.index()`` are already
        this step's; those from it on are re-split.
        """
        index, params = bucket.index(), bucket.parameters()
        key = tuple(id(p) for p in params)
        if self._layout.get(index) == key:
            return
        if not self._names:
            raise DistributedError(
                "PowerSGD's state cannot follow the parameters: build the state with model= (or call "
                "state.bind_model(model) with the module DDP wraps)"
            )
        for stale in [i for i in self._layout if i >= index]:
            self._split(stale)
        self._assemble(index, params, bucket.buffer())
        self._layout[index] = key
        self._bucket_params[index] = list(params)

    def _per_parameter(self) -> Dict[str, Dict[str, Tensor]]:
        out = {k: {n: t.detach().cpu().clone() for n, t in v.items()} for k, v in self._pending.items()}
        for index, params in self._bucket_params.items():
            names = [self._names[id(p)] for p in params]
            error = self.inner.error_dict.get(index)
            if error is not None:
                offset = 0
                for name, p in zip(names, params):
                    out["error"][name] = error[offset : offset + p.numel()].detach().cpu().clone()
                    offset += p.numel()
            q = self.inner.q_memory_dict.get(index)
            if q is not None:
                offset = 0
                for j, _, m in self._compressed(params):
                    size = m * min(params[j].shape[0], m, self.rank)
                    out["q"][names[j]] = q[offset : offset + size].detach().cpu().clone()
                    offset += size
        return out

    def bucket_bytes(self, bucket: dist.GradBucket) -> int:
        """Bytes this rank sends for ``bucket`` in the current iteration."""
        n = bucket.buffer().numel()
        if self.kind == "none" or self.iter < self.start_iter:
            return 4 * n
        if self.kind in ("fp16", "bf16"):
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
        """Traffic counters and, for PowerSGD, its state: error feedback and warm-start Q per parameter
        name, and from ``PowerSGDState.__getstate__`` its random generator, iteration and counters."""
        out = self._meter_state()
        out["config"] = {"rank": self.rank, "start_iter": self.start_iter}
        if self.inner is not None:
            with _quiet_powersgd():
                full = self.inner.__getstate__()
            out["powersgd"] = {k: _to_saved(full[k]) for k in _POWERSGD_SAVED}
            out["powersgd"].update(self._per_parameter())
        return out

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (after the process group is initialised, as PowerSGD requires)."""
        self._load_meter_state(state)
        if self.inner is None:
            return
        saved = state.get("powersgd")
        missing = [k for k in (*_POWERSGD_SAVED, *_POWERSGD_PER_PARAMETER) if not isinstance(saved, dict)
                   or k not in saved]
        if missing:
            raise CheckpointError(f"PowerSGD state lacks {missing}; it was saved by another version")
        with _quiet_powersgd():
            full = self.inner.__getstate__()
            full.update({k: _from_saved(k, saved[k]) for k in _POWERSGD_SAVED})
            full.update(error_dict={}, p_memory_dict={}, q_memory_dict={})
            self.inner.__setstate__(full)  # sets the default group: put this state's group back
        self.inner.process_group = self.process_group
        self._layout.clear()
        self._bucket_params.clear()
        self._pending = {k: {n: t.clone() for n, t in saved[k].items()} for k in _POWERSGD_PER_PARAMETER}


def torch_hook(state: TorchHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Run PyTorch's allreduce / fp16 / bf16 / PowerSGD hook on ``bucket`` and count its traffic."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    n = bucket.buffer().numel()
    nbytes = state.bucket_bytes(bucket)
    state.count_bucket(bucket, elements=n, sent=n, payload=nbytes, wire=nbytes)
    if state.kind == "fp16":
        return default_hooks.fp16_compress_hook(state.process_group, bucket)
    if state.kind == "bf16":
        return default_hooks.bf16_compress_hook(state.process_group, bucket)
    if state.kind == "powersgd":
        if state.inner.iter >= state.inner.start_powerSGD_iter:
            state.follow_layout(bucket)
        return powerSGD_hook.powerSGD_hook(state.inner, bucket)
    return default_hooks.allreduce_hook(state.process_group, bucket)
