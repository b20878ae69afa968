"""DDP communication hooks: variance-based compression and baselines, with PyTorch's hook shape.

Usage (every rank)::

    stats = attach_squared_gradient_statistics(model)         # before the first forward
    ddp = DistributedDataParallel(model)
    state = VarianceCompressionState(statistics=stats, alpha=4.0)
    ddp.register_comm_hook(state, variance_hook)

Conventions shared by every state here (after ``torch/distributed/algorithms/ddp_comm_hooks``):

* ``hook(state, bucket) -> Future[Tensor]``; the future's tensor is the bucket's flat gradient,
  averaged over ranks (sum of the decoded updates of every rank divided by the world size).
* Per-bucket state is keyed by ``bucket.index()``. Until ``state.iter >= start_iter`` (default 2:
  DDP rebuilds its buckets after the first iteration) the hook runs a plain allreduce.
* Residuals follow *parameters*, not buckets: when a bucket's parameter list changes (a fresh DDP
  after resuming from a checkpoint builds different buckets for one iteration) the residuals are
  re-split by parameter name. Names come from the statistics object or ``named_parameters=``.
* ``state_dict()`` / ``load_state_dict()`` hold residuals (and accumulated variances), the iteration,
  and the traffic counters, as tensors keyed by parameter name (``torch.load(weights_only=True)``-safe).
* Traffic: :meth:`statistics` returns a :class:`CompressionStatistics`; the compression ratio is
  dense float32 bytes over bytes really transmitted by this rank (plain-allreduce steps count as
  dense, ratio 1).
"""

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from sturdy.compression import accel, codec
from sturdy.compression.collective import all_gather_slots, all_gather_variable, all_gather_with_capacity
from sturdy.compression.compressor import (
    Selection,
    max_payload_bytes,
    strom_select,
    topk_select,
    validate_rate,
    variance_select,
)
from sturdy.compression.statistics import SquaredGradientStatistics, attach_squared_gradient_statistics
from sturdy.errors import CheckpointError, ConfigurationError, DistributedError

__all__ = [
    "METHODS",
    "CompressionStatistics",
    "VarianceCompressionState",
    "StromState",
    "TopKState",
    "TorchHookState",
    "variance_hook",
    "strom_hook",
    "topk_hook",
    "torch_hook",
    "create_compression",
]

METHODS = ("vgc", "strom", "topk", "fp16", "powersgd", "none")
GATHER_MODES = ("exact", "capacity", "bounded")
Hook = Callable[[Any, dist.GradBucket], torch.futures.Future]


@dataclass(frozen=True)
class CompressionStatistics:
    """Traffic of one rank since the state was created (or loaded).

    Attributes:
        steps: optimizer steps seen (iterations of the hook).
        dense_bytes: float32 bytes of the uncompressed gradients over all steps.
        payload_bytes: bytes of the encoded messages of this rank.
        wire_bytes: bytes this rank really transmitted (size exchange and padding included).
        elements: gradient elements over all steps.
        elements_sent: elements this rank sent (dense steps count every element).
        compression_ratio: ``dense_bytes / wire_bytes``.
        payload_compression_ratio: ``dense_bytes / payload_bytes``.
        never_sent_fraction: share of the elements of compressed buckets never sent so far.
        elements_sent_per_step: elements sent in each step.
        wire_bytes_per_step: bytes transmitted in each step.
    """

    steps: int
    dense_bytes: int
    payload_bytes: int
    wire_bytes: int
    elements: int
    elements_sent: int
    compression_ratio: float
    payload_compression_ratio: float
    never_sent_fraction: float
    elements_sent_per_step: Tuple[int, ...]
    wire_bytes_per_step: Tuple[int, ...]

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able dict (tuples become lists)."""
        out = dict(self.__dict__)
        out["elements_sent_per_step"] = list(self.elements_sent_per_step)
        out["wire_bytes_per_step"] = list(self.wire_bytes_per_step)
        return out


class _TrafficMeter:
    """Counts traffic per step; the base of every state here."""

    kind = "meter"

    def __init__(self, *, process_group: Optional[dist.ProcessGroup], start_iter: int) -> None:
        if not isinstance(start_iter, int) or isinstance(start_iter, bool) or start_iter < 0:
            raise ConfigurationError(
                f"start_iter must be a non-negative int, got {start_iter!r}; use 2 (the default) so that "
                "DDP has rebuilt its buckets before compression starts"
            )
        self.process_group = process_group
        self.start_iter = start_iter
        self.iter = 0
        self._counters = {"dense_bytes": 0, "payload_bytes": 0, "wire_bytes": 0, "elements": 0, "elements_sent": 0}
        self._step = {"elements_sent": 0, "wire_bytes": 0}
        self._history: Dict[str, List[int]] = {"elements_sent": [], "wire_bytes": []}
        self._never_sent = (0, 0)  # (never-sent elements, elements) of compressed buckets, last step

    def _record(self, *, elements: int, sent: int, payload: int, wire: int) -> None:
        c = self._counters
        c["dense_bytes"] += 4 * elements
        c["payload_bytes"] += payload
        c["wire_bytes"] += wire
        c["elements"] += elements
        c["elements_sent"] += sent
        self._step["elements_sent"] += sent
        self._step["wire_bytes"] += wire

    def _end_bucket(self, bucket: dist.GradBucket) -> None:
        if bucket.is_last():
            for key in self._history:
                self._history[key].append(self._step[key])
                self._step[key] = 0
            self._never_sent = self._count_never_sent()
            self.iter += 1

    def _count_never_sent(self) -> Tuple[int, int]:
        return self._never_sent

    def statistics(self) -> CompressionStatistics:
        """Traffic so far (see :class:`CompressionStatistics`)."""
        c = self._counters
        never, total = self._never_sent
        return CompressionStatistics(
            steps=len(self._history["elements_sent"]),
            dense_bytes=c["dense_bytes"],
            payload_bytes=c["payload_bytes"],
            wire_bytes=c["wire_bytes"],
            elements=c["elements"],
            elements_sent=c["elements_sent"],
            compression_ratio=c["dense_bytes"] / c["wire_bytes"] if c["wire_bytes"] else math.inf,
            payload_compression_ratio=c["dense_bytes"] / c["payload_bytes"] if c["payload_bytes"] else math.inf,
            never_sent_fraction=never / total if total else 0.0,
            elements_sent_per_step=tuple(self._history["elements_sent"]),
            wire_bytes_per_step=tuple(self._history["wire_bytes"]),
        )

    def _meter_state(self) -> Dict[str, Any]:
        return {
            "kind": self.kind,
            "iter": self.iter,
            "counters": dict(self._counters),
            "history": {k: torch.tensor(v, dtype=torch.int64) for k, v in self._history.items()},
            "never_sent": list(self._never_sent),
        }

    def _load_meter_state(self, state: Dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("kind") != self.kind:
            found = state.get("kind") if isinstance(state, dict) else type(state).__name__
            raise CheckpointError(
                f"compression state of kind {found!r} cannot be loaded into a {self.kind!r} state; resume "
                "with the same --compress method the checkpoint was trained with"
            )
        self.iter = int(state["iter"])
        self._counters = {k: int(v) for k, v in state["counters"].items()}
        self._history = {k: [int(x) for x in v.tolist()] for k, v in state["history"].items()}
        self._never_sent = (int(state["never_sent"][0]), int(state["never_sent"][1]))
        self._step = {"elements_sent": 0, "wire_bytes": 0}

    def _rank_and_world(self) -> Tuple[int, int]:
        """``(rank, world size)`` in the state's group, looked up once per group."""
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        cached = getattr(self, "_group_cache", None)
        if cached is None or cached[0] is not group:
            cached = (group, dist.get_rank(self.process_group), dist.get_world_size(self.process_group))
            self._group_cache = cached
        return cached[1], cached[2]

    def _plain_allreduce(self, bucket: dist.GradBucket) -> torch.futures.Future:
        buffer = bucket.buffer()
        world = dist.get_world_size(self.process_group)
        self._record(elements=buffer.numel(), sent=buffer.numel(), payload=4 * buffer.numel(), wire=4 * buffer.numel())
        self._end_bucket(bucket)
        fut = dist.all_reduce(buffer, group=self.process_group, async_op=True).get_future()
        return fut.then(lambda f: f.value()[0].div_(world))


@dataclass
class _Segment:
    name: str
    offset: int
    numel: int


class _ResidualState(_TrafficMeter):
    """Per-bucket flat buffers (residual, ...) that follow parameters across bucket rebuilds."""

    buffer_kinds: Tuple[str, ...] = ("residual", "ever_sent")

    def __init__(
        self,
        *,
        process_group: Optional[dist.ProcessGroup],
        start_iter: int,
        named_parameters: Optional[Iterable[Tuple[str, Tensor]]],
        parameter_names: Optional[Dict[int, str]] = None,
        gather: str = "capacity",
        slack: float = 1.25,
    ) -> None:
        super().__init__(process_group=process_group, start_iter=start_iter)
        if gather not in GATHER_MODES:
            raise ConfigurationError(f"gather must be one of {GATHER_MODES}, got {gather!r}")
        if gather == "bounded" and self.kind != "vgc":
            raise ConfigurationError("gather='bounded' truncates selections and is implemented for 'vgc' only")
        self.gather = gather
        self.slack = validate_rate("slack", slack, low=1.0, high=math.inf, hint="e.g. 1.25")
        self._capacity: Dict[int, int] = {}
        self._names: Dict[int, str] = dict(parameter_names or {})
        if named_parameters is not None:
            self._names = {id(p): name for name, p in named_parameters}
        self._layout: Dict[int, Tuple[int, ...]] = {}
        self._segments: Dict[int, List[_Segment]] = {}
        self._boundaries: Dict[int, Tensor] = {}
        self._buffers: Dict[str, Dict[int, Tensor]] = {k: {} for k in self.buffer_kinds}
        self._pending: Dict[str, Dict[str, Tensor]] = {k: {} for k in self.buffer_kinds}

    def bind_model(self, model: nn.Module) -> None:
        """Take parameter names from the model DDP wraps (for states built before the model)."""
        self._names = {id(p): name for name, p in model.named_parameters()}

    def _bucket_buffers(self, bucket: dist.GradBucket) -> Dict[str, Tensor]:
        index = bucket.index()
        params = bucket.parameters()
        self._last_params = (index, params)  # reused by _select in the same hook call
        key = tuple(id(p) for p in params)
        if index in self._layout and self._layout[index] != key:
            if not self._names:
                raise DistributedError(
                    "DDP changed the parameters of a gradient bucket and the residuals cannot follow them: "
                    "pass named_parameters=model.named_parameters() (or statistics=) to the state"
                )
            self._flush(clear=True)
        if index not in self._layout:
            buffer = bucket.buffer()
            segments, offset = [], 0
            for j, p in enumerate(params):
                name = self._names.get(id(p), f"bucket{index}.{j}" if not self._names else None)
                if name is None:
                    raise DistributedError(
                        f"a parameter of shape {tuple(p.shape)} in bucket {index} is not among the named "
                        "parameters given to the compression state; build the state from the model DDP wraps"
                    )
                segments.append(_Segment(name, offset, p.numel()))
                offset += p.numel()
            if offset != buffer.numel():
                raise DistributedError(
                    f"bucket {index} holds {buffer.numel()} elements but its parameters {offset}; "
                    "mixed-dtype or sparse buckets are not supported"
                )
            for kind in self.buffer_kinds:
                dtype = torch.bool if kind == "ever_sent" else buffer.dtype
                flat = torch.zeros(buffer.numel(), dtype=dtype, device=buffer.device)
                for seg in segments:
                    saved = self._pending[kind].pop(seg.name, None)
                    if saved is not None:
                        if saved.numel() != seg.numel:
                            raise CheckpointError(
                                f"saved {kind} of '{seg.name}' has {saved.numel()} elements, the parameter "
                                f"{seg.numel}; the checkpoint belongs to another model"
                            )
                        flat[seg.offset : seg.offset + seg.numel] = saved.reshape(-1).to(flat)
                self._buffers[kind][index] = flat
            self._layout[index] = key
            self._segments[index] = segments
            self._boundaries[index] = torch.tensor([seg.offset for seg in segments] + [offset], dtype=torch.int64)
            self._buffers_built(index, params)
        return {kind: self._buffers[kind][index] for kind in self.buffer_kinds}

    def _buffers_built(self, index: int, params: List[Tensor]) -> None:
        """Called once a bucket's flat buffers exist (subclasses attach to them)."""

    def _buffers_dropped(self) -> None:
        """Called when every bucket's buffers are discarded (bucket rebuild, checkpoint load)."""

    def _per_name(self) -> Dict[str, Dict[str, Tensor]]:
        out = {kind: {n: t.clone() for n, t in self._pending[kind].items()} for kind in self.buffer_kinds}
        for index, segments in self._segments.items():
            for kind in self.buffer_kinds:
                flat = self._buffers[kind][index]
                for seg in segments:
                    out[kind][seg.name] = flat[seg.offset : seg.offset + seg.numel].detach().cpu().clone()
        return out

    def _flush(self, *, clear: bool) -> None:
        self._pending = self._per_name()
        if clear:
            self._buffers_dropped()
            self._layout.clear()
            self._segments.clear()
            self._boundaries.clear()
            self._buffers = {k: {} for k in self.buffer_kinds}

    def _count_never_sent(self) -> Tuple[int, int]:
        flags = list(self._buffers["ever_sent"].values())
        total = sum(f.numel() for f in flags)
        sent = sum(int(np.count_nonzero(f.numpy())) if f.device.type == "cpu" else int(f.sum()) for f in flags)
        return (total - sent, total)

    def config(self) -> Dict[str, Any]:
        """The settings of this state (JSON-able)."""
        return {"start_iter": self.start_iter}

    def state_dict(self) -> Dict[str, Any]:
        """Residuals (per parameter name), iteration, settings and traffic counters."""
        out = self._meter_state()
        out["config"] = self.config()
        out["buffers"] = self._per_name()
        return out

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; buffers are rebuilt per bucket on the next hook call."""
        self._load_meter_state(state)
        buffers = state.get("buffers", {})
        missing = [k for k in self.buffer_kinds if k not in buffers]
        if missing:
            raise CheckpointError(f"compression state lacks buffers {missing}; it was saved by another version")
        self._pending = {k: {n: t.clone() for n, t in buffers[k].items()} for k in self.buffer_kinds}
        self._buffers_dropped()
        self._layout.clear()
        self._segments.clear()
        self._boundaries.clear()
        self._buffers = {k: {} for k in self.buffer_kinds}

    def _select(
        self, bucket: dist.GradBucket, buffers: Dict[str, Tensor], max_bytes: Optional[int] = None
    ) -> Selection:
        raise NotImplementedError

    def _before_plain_step(self, bucket: dist.GradBucket) -> None:
        """Hook for states that must consume per-step data during the plain-allreduce phase."""


def _sparse_hook(state: _ResidualState, bucket: dist.GradBucket) -> torch.futures.Future:
    if state.iter < state.start_iter:
        state._before_plain_step(bucket)
        return state._plain_allreduce(bucket)
    buffer = bucket.buffer()
    rank, world = state._rank_and_world()
    buffers = state._bucket_buffers(bucket)
    buffers["residual"].add_(buffer)
    index = bucket.index()
    boundaries = state._boundaries[index]
    if state.gather == "bounded":
        return _bounded_exchange(state, bucket, buffers, world)
    selection = state._select(bucket, buffers)
    _mark_sent(buffers["ever_sent"], selection)
    if state.gather == "exact":
        gathered = all_gather_variable(selection.payload, process_group=state.process_group, device=buffer.device)
    else:
        gathered = all_gather_with_capacity(
            selection.payload, capacity=state._capacity.get(index, 0), process_group=state.process_group,
            device=buffer.device,
        )
        state._capacity[index] = math.ceil(state.slack * max(gathered.sizes))  # every rank saw the same sizes
    state._record(
        elements=buffer.numel(),
        sent=selection.count,
        payload=int(selection.payload.numel()),
        wire=gathered.wire_bytes,
    )
    state._end_bucket(bucket)

    def combine(fut: torch.futures.Future) -> Tensor:
        _sum_updates(buffer, fut.value(), boundaries, rank, selection)
        return buffer.div_(world)

    return gathered.future.then(combine)


def _mark_sent(ever_sent: Tensor, selection: Selection) -> None:
    if not selection.count:
        return
    if ever_sent.device.type == "cpu" and selection.indices.device.type == "cpu":
        ever_sent.numpy()[selection.indices.numpy()] = True
    else:
        ever_sent[selection.indices] = True


def _sum_updates(buffer: Tensor, payloads: List[Tensor], boundaries: Tensor, rank: int, selection: Selection) -> None:
    """``buffer = sum of the decoded payloads`` in rank order; this rank's own payload is not decoded:
    its selection holds exactly the decoded values (float32 buffers), added at the same point of the sum."""
    buffer.zero_()
    own = selection if buffer.dtype == torch.float32 and selection.count else None
    for index, payload in enumerate(payloads):
        if index == rank and own is not None:
            if buffer.device.type == "cpu" and own.indices.device.type == "cpu":
                buffer.numpy()[own.indices.numpy()] += own.values.numpy()
            else:
                buffer.index_add_(0, own.indices.to(buffer.device), own.values.to(buffer.device, buffer.dtype))
        else:
            codec.decode_add_(buffer, payload, boundaries=boundaries)


def _bounded_exchange(
    state: _ResidualState, bucket: dist.GradBucket, buffers: Dict[str, Tensor], world: int
) -> torch.futures.Future:
    """One asynchronous all-gather of fixed slots; what does not fit stays in the residual."""
    buffer = bucket.buffer()
    index = bucket.index()
    boundaries = state._boundaries[index]
    fmt = "4bit" if getattr(state, "quantize", None) == "4bit" else "float32"
    worst = max_payload_bytes(buffer.numel(), value_format=fmt, num_scales=boundaries.numel() - 1)
    capacity = min(state._capacity.get(index, worst), worst)
    selection = state._select(bucket, buffers, max_bytes=capacity)
    _mark_sent(buffers["ever_sent"], selection)
    gathered = all_gather_slots(
        selection.payload, capacity=capacity, wanted=selection.wanted_bytes, process_group=state.process_group,
        device=buffer.device,
    )
    state._record(elements=buffer.numel(), sent=selection.count, payload=int(selection.payload.numel()),
                  wire=gathered.wire_bytes)
    state._end_bucket(bucket)
    rank, _ = state._rank_and_world()

    def combine(fut: torch.futures.Future) -> Tensor:
        payloads, wanted = fut.value()
        state._capacity[index] = max(1, math.ceil(state.slack * max(wanted)))  # identical on every rank
        _sum_updates(buffer, payloads, boundaries, rank, selection)
        return buffer.div_(world)

    return gathered.future.then(combine)


class VarianceCompressionState(_ResidualState):
    """State of :func:`variance_hook` (DESIGN section 4).

    Args:
        process_group: the group to communicate in (default: the world).
        statistics: squared-gradient statistics attached to the model DDP wraps
            (:func:`~sturdy.compression.statistics.attach_squared_gradient_statistics`); required
            unless ``alpha == 0``. Also gives parameter names for checkpoints.
        alpha: send element ``i`` when ``r_i^2 > alpha * v_i``; ``>= 0``. Larger sends less.
        zeta: decay of ``v`` for elements not sent, in ``[0, 1]``.
        quantize: ``"4bit"`` (sign + 3-bit exponent relative to the largest sent ``|r|`` of each
            parameter in the bucket; never rounded up) or ``None`` (float32 values). With ``"4bit"``
            the constructor loads :mod:`~sturdy.compression.accel`'s compiled kernels when numba is
            installed (compiling them once, about 10 s, if numba's cache does not hold them yet).
        start_iter: plain allreduce before this iteration.
        named_parameters: ``model.named_parameters()`` when ``statistics`` is not given.
        defer_statistics: build the state before the model exists; :meth:`bind_model` then attaches
            the statistics (a compressed step without them raises ``DistributedError``).
        gather: how payloads travel (:mod:`sturdy.compression.collective`). ``"capacity"``: one
            synchronous round with slots of ``slack`` times the previous step's largest payload, a
            second round for what does not fit (numerics independent of the mode); ``"exact"``: a size
            round then a payload round; ``"bounded"``: one asynchronous round of fixed slots, the
            elements that do not fit stay in the residual (sends at most ``slack`` times the last
            step's largest wanted payload; not bit-identical across bucket layouts).
        slack: slot growth factor of ``"capacity"`` and ``"bounded"``, ``>= 1``.
    """

    kind = "vgc"
    buffer_kinds = ("residual", "variance", "ever_sent")

    def __init__(
        self,
        *,
        process_group: Optional[dist.ProcessGroup] = None,
        statistics: Optional[SquaredGradientStatistics] = None,
        alpha: float = 4.0,
        zeta: float = 0.999,
        quantize: Optional[str] = "4bit",
        start_iter: int = 2,
        named_parameters: Optional[Iterable[Tuple[str, Tensor]]] = None,
        defer_statistics: bool = False,
        gather: str = "capacity",
        slack: float = 1.25,
    ) -> None:
        self.alpha = validate_rate("alpha", alpha, low=0.0, high=math.inf, hint="typical values are 1 to 8")
        self.zeta = validate_rate("zeta", zeta, low=0.0, high=1.0, hint="typical value 0.999")
        if quantize not in ("4bit", None):
            raise ConfigurationError(f"quantize must be '4bit' or None, got {quantize!r}")
        if statistics is None and self.alpha != 0 and not defer_statistics:
            raise ConfigurationError(
                "variance-based compression with alpha > 0 needs squared-gradient statistics: pass "
                "statistics=attach_squared_gradient_statistics(model), or defer_statistics=True and call "
                "state.bind_model(model) before training"
            )
        if statistics is not None and not isinstance(statistics, SquaredGradientStatistics):
            raise ConfigurationError(
                f"statistics must be a SquaredGradientStatistics, got {type(statistics).__name__}"
            )
        self.quantize = quantize
        self.statistics_source = statistics
        if quantize == "4bit":
            accel.warm_up()  # compile or load the kernels now, not inside the first step's collective
        super().__init__(
            process_group=process_group,
            start_iter=start_iter,
            named_parameters=named_parameters,
            parameter_names=statistics.parameter_names if statistics is not None else None,
            gather=gather,
            slack=slack,
        )

    def config(self) -> Dict[str, Any]:
        return {"start_iter": self.start_iter, "alpha": self.alpha, "zeta": self.zeta, "quantize": self.quantize}

    def bind_model(self, model: nn.Module) -> None:
        """Attach squared-gradient statistics to ``model`` (the module DDP wraps) and take its names."""
        if self.statistics_source is None:
            self.statistics_source = attach_squared_gradient_statistics(model)
        self._names = dict(self.statistics_source.parameter_names)

    def _before_plain_step(self, bucket: dist.GradBucket) -> None:
        if self.statistics_source is not None:
            self.statistics_source.pop_flat(bucket.parameters())

    def _buffers_built(self, index: int, params: List[Tensor]) -> None:
        # from now on the statistics go straight into the accumulated variance (no storage of their own)
        if self.statistics_source is not None:
            variance = self._buffers["variance"][index]
            for p, seg in zip(params, self._segments[index]):
                self.statistics_source.route(p, variance[seg.offset : seg.offset + seg.numel])

    def _buffers_dropped(self) -> None:
        if self.statistics_source is not None:
            self.statistics_source.clear_routes()

    def _select(
        self, bucket: dist.GradBucket, buffers: Dict[str, Tensor], max_bytes: Optional[int] = None
    ) -> Selection:
        variance = buffers["variance"]
        if self.statistics_source is None and self.alpha != 0:
            raise DistributedError(
                "variance-based compression has no squared-gradient statistics: call state.bind_model(model) "
                "with the module DDP wraps before training"
            )
        if self.statistics_source is not None:
            index, params = getattr(self, "_last_params", (None, None))
            self.statistics_source.pop_add_(params if index == bucket.index() else bucket.parameters(), variance)
        return variance_select(
            buffers["residual"],
            variance,
            alpha=self.alpha,
            zeta=self.zeta,
            quantize=self.quantize,
            boundaries=self._boundaries[bucket.index()],
            max_bytes=max_bytes,
        )


def variance_hook(state: VarianceCompressionState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Variance-based gradient compression hook; register with ``ddp.register_comm_hook(state, variance_hook)``."""
    return _sparse_hook(state, bucket)


class StromState(_ResidualState):
    """State of :func:`strom_hook`: send ``+-tau`` where ``|r_i| > tau`` (Strom 2015), error feedback.

    Args:
        tau: threshold and sent magnitude, ``> 0``.
        process_group, start_iter, named_parameters, gather, slack: as in :class:`VarianceCompressionState`
            (``gather="bounded"`` is for ``vgc`` only).
    """

    kind = "strom"

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

    def _select(
        self, bucket: dist.GradBucket, buffers: Dict[str, Tensor], max_bytes: Optional[int] = None
    ) -> Selection:
        return strom_select(buffers["residual"], tau=self.tau)


def strom_hook(state: StromState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Strom threshold hook with error feedback."""
    return _sparse_hook(state, bucket)


class TopKState(_ResidualState):
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

    def _select(
        self, bucket: dist.GradBucket, buffers: Dict[str, Tensor], max_bytes: Optional[int] = None
    ) -> Selection:
        return topk_select(buffers["residual"], ratio=self.ratio)


def topk_hook(state: TopKState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Top-k hook with error feedback."""
    return _sparse_hook(state, bucket)


class TorchHookState(_TrafficMeter):
    """Wraps PyTorch's own hooks (``none``: allreduce, ``fp16``, ``powersgd``) to count their traffic.

    Bytes are counted analytically: float32 for allreduce, 2 bytes per element for fp16, and for
    PowerSGD ``(rows + cols) * rank`` float32 per compressed matrix (PyTorch's own rule for which
    tensors it compresses) and float32 for the rest.

    Args:
        method: ``"none"``, ``"fp16"`` or ``"powersgd"``.
        process_group: the group (default: the world).
        rank: PowerSGD's matrix approximation rank.
        start_iter: PowerSGD's ``start_powerSGD_iter`` (plain allreduce before it).
    """

    def __init__(
        self,
        method: str,
        *,
        process_group: Optional[dist.ProcessGroup] = None,
        rank: int = 1,
        start_iter: int = 2,
    ) -> None:
        if method not in ("none", "fp16", "powersgd"):
            raise ConfigurationError(f"TorchHookState wraps 'none', 'fp16' or 'powersgd', got {method!r}")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ConfigurationError(f"PowerSGD rank must be a positive int, got {rank!r}")
        super().__init__(process_group=process_group, start_iter=start_iter)
        self.kind = method
        self.rank = rank
        self.inner: Any = None
        if method == "powersgd":
            from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

            self.inner = powerSGD_hook.PowerSGDState(
                process_group=process_group,
                matrix_approximation_rank=rank,
                start_powerSGD_iter=max(start_iter, 1),
                min_compression_rate=2,
            )

    def bind_model(self, model: nn.Module) -> None:
        """Nothing to bind (PyTorch's hooks keep per-bucket state only)."""

    def _bytes(self, bucket: dist.GradBucket) -> int:
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
            total += 4 * (compressed if compressed * self.inner.min_compression_rate < rows * cols else rows * cols)
        return total

    def state_dict(self) -> Dict[str, Any]:
        """Traffic counters and, for PowerSGD, its error-feedback and warm-start tensors per bucket."""
        out = self._meter_state()
        out["config"] = {"rank": self.rank, "start_iter": self.start_iter}
        if self.inner is not None:
            out["powersgd"] = {
                "iter": int(self.inner.iter),
                "error": {str(k): v.cpu().clone() for k, v in self.inner.error_dict.items()},
                "p": {str(k): [t.cpu().clone() for t in v] for k, v in self.inner.p_memory_dict.items()},
                "q": {str(k): [t.cpu().clone() for t in v] for k, v in self.inner.q_memory_dict.items()},
            }
        return out

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (PowerSGD tensors are keyed by bucket index)."""
        self._load_meter_state(state)
        if self.inner is not None and "powersgd" in state:
            saved = state["powersgd"]
            self.inner.iter = int(saved["iter"])
            self.inner.error_dict = {int(k): v for k, v in saved["error"].items()}
            self.inner.p_memory_dict = {int(k): list(v) for k, v in saved["p"].items()}
            self.inner.q_memory_dict = {int(k): list(v) for k, v in saved["q"].items()}


def torch_hook(state: TorchHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Run PyTorch's allreduce / fp16 / PowerSGD hook on ``bucket`` and count its traffic."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    n = bucket.buffer().numel()
    nbytes = state._bytes(bucket)
    state._record(elements=n, sent=n, payload=nbytes, wire=nbytes)
    state._end_bucket(bucket)
    if state.kind == "fp16":
        return default_hooks.fp16_compress_hook(state.process_group, bucket)
    if state.kind == "powersgd":
        return powerSGD_hook.powerSGD_hook(state.inner, bucket)
    return default_hooks.allreduce_hook(state.process_group, bucket)


def create_compression(
    method: str,
    *,
    model: Optional[nn.Module] = None,
    process_group: Optional[dist.ProcessGroup] = None,
    alpha: float = 4.0,
    zeta: float = 0.999,
    quantize: Optional[str] = "4bit",
    tau: float = 1e-3,
    ratio: float = 0.01,
    rank: int = 1,
    start_iter: int = 2,
    gather: str = "capacity",
    slack: float = 1.25,
) -> Tuple[Any, Hook]:
    """Build ``(state, hook)`` for a method of :data:`METHODS` by name.

    ``model`` is the module DDP wraps: ``vgc`` attaches its statistics to it and every state takes
    parameter names from it. Without ``model`` the state is built unbound: call
    ``state.bind_model(model)`` once the model exists (before training). ``slack`` applies to the
    sparse methods (``vgc``, ``strom``, ``topk``), like ``gather``: see :class:`VarianceCompressionState`.
    """
    if method not in METHODS:
        raise ConfigurationError(f"unknown compression method {method!r}; expected one of {METHODS}")
    named = list(model.named_parameters()) if model is not None else None
    if method == "vgc":
        vgc = VarianceCompressionState(
            process_group=process_group, alpha=alpha, zeta=zeta, quantize=quantize, start_iter=start_iter,
            defer_statistics=True, gather=gather, slack=slack,
        )
        if model is not None:
            vgc.bind_model(model)
        return vgc, variance_hook
    if method == "strom":
        state = StromState(process_group=process_group, tau=tau, start_iter=start_iter, named_parameters=named,
                           gather=gather, slack=slack)
        return state, strom_hook
    if method == "topk":
        state = TopKState(process_group=process_group, ratio=ratio, start_iter=start_iter, named_parameters=named,
                          gather=gather, slack=slack)
        return state, topk_hook
    return TorchHookState(method, process_group=process_group, rank=rank, start_iter=start_iter), torch_hook
