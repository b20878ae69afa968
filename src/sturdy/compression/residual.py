"""Residual state of the error-feedback methods: per-bucket flat buffers that follow *parameters*.

A :class:`ResidualState` keeps, per gradient bucket (keyed by ``bucket.index()``), flat buffers of the
bucket's size: the residual ``r`` (what was not sent yet), whether each element was ever sent, and
whatever a method adds (the variance method: its accumulated second moments). When a bucket's
parameter list changes (a fresh DDP after resuming from a checkpoint builds different buckets for
one iteration) the buffers are re-split by parameter name, so the run continues bit for bit. Names
come from the statistics object or ``named_parameters=``.

``state_dict()`` / ``load_state_dict()`` hold the buffers as tensors keyed by parameter name, the
iteration, the settings and the traffic counters (``torch.load(weights_only=True)``-safe). Each method
implements :meth:`ResidualState.select`; the exchange of the selections is
:func:`sturdy.compression.exchange.sparse_exchange`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from sturdy.compression.compressor import Selection, validate_rate
from sturdy.compression.traffic import TrafficMeter
from sturdy.errors import CheckpointError, ConfigurationError, DistributedError
from sturdy.validation import check_state_tensors

__all__ = ["GATHER_MODES", "BucketView", "ResidualState"]

GATHER_MODES = ("exact", "capacity", "bounded")


class BucketView(NamedTuple):
    """One gradient bucket as a :class:`ResidualState` sees it during one hook call (a tuple: cheap per step).

    Attributes:
        index: ``bucket.index()``.
        params: the bucket's parameters, in bucket order.
        gradient: the bucket's flat buffer (this rank's gradient; the hook writes the average into it).
        buffers: the bucket's flat state by kind (``"residual"``, ``"ever_sent"``, ...).
        boundaries: segment offsets ``[0, ..., n]``, one segment per parameter (int64, CPU).
    """

    index: int
    params: Sequence[Tensor]
    gradient: Tensor
    buffers: Mapping[str, Tensor]
    boundaries: Tensor


@dataclass(frozen=True)
class _Segment:
    name: str
    offset: int
    numel: int


class ResidualState(TrafficMeter):
    """Per-bucket flat buffers (residual, ever-sent flags, ...) that follow parameters across bucket rebuilds.

    Attributes:
        buffer_kinds: the flat buffers kept per bucket (``"ever_sent"`` is boolean, the others take
            the gradient's dtype, at least float32: bf16/fp16 buckets keep float32 residuals).
        value_format: the wire format of the selected values (:data:`sturdy.compression.wire.VALUE_FORMATS`).
        gather: how payloads travel (:mod:`sturdy.compression.collective`).
        slack: slot growth factor of the ``"capacity"`` and ``"bounded"`` gathers.
        slot_bytes: per bucket, the payload capacity of the next one-round gather (exchange state,
            agreed by every rank; not checkpointed).
    """

    buffer_kinds: Tuple[str, ...] = ("residual", "ever_sent")
    value_format = "float32"

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
        self.slot_bytes: Dict[int, int] = {}
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

    def bucket_view(self, bucket: dist.GradBucket) -> BucketView:
        """The bucket's buffers, built (or re-split after a bucket rebuild) on first sight."""
        index = bucket.index()
        params = bucket.parameters()
        key = tuple(id(p) for p in params)
        if index in self._layout and self._layout[index] != key:
            if not self._names:
                raise DistributedError(
                    "DDP changed the parameters of a gradient bucket and the residuals cannot follow them: "
                    "pass named_parameters=model.named_parameters() (or statistics=) to the state"
                )
            self._pending = self._per_name()  # re-split by parameter name below
            self._drop_buffers()
        buffer = bucket.buffer()
        if index not in self._layout:
            self._build(index, params, key, buffer)
        return BucketView(index, params, buffer, {kind: self._buffers[kind][index] for kind in self.buffer_kinds},
                          self._boundaries[index])

    def _build(self, index: int, params: Sequence[Tensor], key: Tuple[int, ...], buffer: Tensor) -> None:
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
            dtype = torch.bool if kind == "ever_sent" else torch.promote_types(buffer.dtype, torch.float32)
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

    def _buffers_built(self, index: int, params: Sequence[Tensor]) -> None:
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

    def _drop_buffers(self) -> None:
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

    def residual(self, index: int) -> Tensor:
        """The flat residual of bucket ``index`` (a live view of the state)."""
        return self._buffers["residual"][index]

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
        check_state_tensors(buffers, source="the compression state", finite=True)
        self._pending = {k: {n: t.clone() for n, t in buffers[k].items()} for k in self.buffer_kinds}
        self._drop_buffers()

    def accumulate(self, view: BucketView) -> None:
        """Add this step's gradient to the residual (error feedback; momentum correction overrides it)."""
        view.buffers["residual"].add_(view.gradient)

    def select(self, view: BucketView, *, max_bytes: Optional[int] = None) -> Selection:
        """Choose what this rank sends for the bucket; updates its buffers (``view.buffers``) in place.

        ``view.buffers["residual"]`` already holds this step's gradient. ``max_bytes`` (gather
        ``"bounded"`` only) caps the payload.
        """
        raise NotImplementedError

    def before_plain_step(self, bucket: dist.GradBucket) -> None:
        """Called for each bucket of the plain-allreduce phase (states that must consume per-step data)."""
