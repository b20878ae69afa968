"""Traffic accounting of a DDP communication hook: what one rank sent, per step, and its sum over ranks.

Every compression state derives from :class:`TrafficMeter`. Its hook calls
:meth:`TrafficMeter.count_bucket` once per gradient bucket; the last bucket of a step closes the
step. :meth:`TrafficMeter.statistics` returns a :class:`CompressionStatistics` for this rank and
:meth:`CompressionStatistics.all_reduce` sums it over the ranks. The compression ratio is dense
float32 bytes over bytes really transmitted (plain-allreduce steps count as dense, ratio 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from sturdy.distributed import all_reduce_sum
from sturdy.errors import CheckpointError, ConfigurationError

__all__ = ["CompressionStatistics", "TrafficMeter"]


def _ratio(dense: int, sent: int) -> float:
    return dense / sent if sent else math.inf


@dataclass(frozen=True)
class CompressionStatistics:
    """Traffic of one rank since the state was created (or loaded), or its sum over ``ranks`` ranks.

    Attributes:
        steps: optimizer steps seen (iterations of the hook).
        dense_bytes: float32 bytes of the uncompressed gradients over all steps.
        payload_bytes: bytes of the encoded messages.
        wire_bytes: bytes really transmitted (size exchange and padding included).
        elements: gradient elements over all steps.
        elements_sent: elements sent (dense steps count every element).
        compression_ratio: ``dense_bytes / wire_bytes``.
        payload_compression_ratio: ``dense_bytes / payload_bytes``.
        never_sent_fraction: share of the elements of compressed buckets never sent so far (the mean
            over ranks after :meth:`all_reduce`).
        elements_sent_per_step: elements sent in each step.
        wire_bytes_per_step: bytes transmitted in each step.
        ranks: how many ranks these figures sum (1 for one rank's own statistics).
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
    ranks: int = 1

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able dict (tuples become lists)."""
        out = dict(self.__dict__)
        out["elements_sent_per_step"] = list(self.elements_sent_per_step)
        out["wire_bytes_per_step"] = list(self.wire_bytes_per_step)
        return out

    def all_reduce(self, *, process_group: Optional[dist.ProcessGroup] = None) -> CompressionStatistics:
        """Totals over the ranks of ``process_group`` (a collective: call it on every rank, in one step count).

        Byte and element counts and the per-step histories are summed, the ratios recomputed from the
        sums, and ``never_sent_fraction`` averaged; ``ranks`` says how many ranks were summed. One
        all-reduce of float64 (exact for counts below ``2**53``).
        """
        counts = [self.dense_bytes, self.payload_bytes, self.wire_bytes, self.elements, self.elements_sent]
        steps = len(self.elements_sent_per_step)
        flat = [*counts, self.never_sent_fraction, *self.elements_sent_per_step, *self.wire_bytes_per_step]
        total = all_reduce_sum(flat, process_group=process_group)
        ranks = dist.get_world_size(process_group)
        dense, payload, wire, elements, sent = (int(x) for x in total[:5])
        history = [int(x) for x in total[6:]]
        return replace(
            self, dense_bytes=dense, payload_bytes=payload, wire_bytes=wire, elements=elements, elements_sent=sent,
            compression_ratio=_ratio(dense, wire), payload_compression_ratio=_ratio(dense, payload),
            never_sent_fraction=total[5] / ranks, elements_sent_per_step=tuple(history[:steps]),
            wire_bytes_per_step=tuple(history[steps:]), ranks=self.ranks * ranks,
        )


class TrafficMeter:
    """Counts one rank's traffic per step; the base of every compression state.

    Attributes:
        process_group: the group the hook communicates in (``None``: the world).
        start_iter: plain allreduce before this iteration.
        iter: iterations (optimizer steps) seen so far.
        kind: the method's name, checked when a checkpoint is loaded.
        per_rank_state: ``True``: every rank's state differs (residuals, counters), so the training loop
            checkpoints every rank's (:mod:`sturdy.training`).
    """

    kind = "meter"
    per_rank_state = True

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
        self._group: Optional[Tuple[Any, int, int]] = None  # (group, rank, world size), looked up once

    def count_bucket(self, bucket: dist.GradBucket, *, elements: int, sent: int, payload: int, wire: int) -> None:
        """Count one bucket's traffic; the step ends (and :attr:`iter` grows) with the last bucket."""
        c = self._counters
        c["dense_bytes"] += 4 * elements
        c["payload_bytes"] += payload
        c["wire_bytes"] += wire
        c["elements"] += elements
        c["elements_sent"] += sent
        self._step["elements_sent"] += sent
        self._step["wire_bytes"] += wire
        if bucket.is_last():
            for key in self._history:
                self._history[key].append(self._step[key])
                self._step[key] = 0
            self._never_sent = self._count_never_sent()
            self.iter += 1

    def _count_never_sent(self) -> Tuple[int, int]:
        """``(never-sent elements, elements)`` of the compressed buckets (states with residuals override)."""
        return self._never_sent

    def statistics(self) -> CompressionStatistics:
        """This rank's traffic so far (see :class:`CompressionStatistics`)."""
        c = self._counters
        never, total = self._never_sent
        return CompressionStatistics(
            steps=len(self._history["elements_sent"]),
            dense_bytes=c["dense_bytes"],
            payload_bytes=c["payload_bytes"],
            wire_bytes=c["wire_bytes"],
            elements=c["elements"],
            elements_sent=c["elements_sent"],
            compression_ratio=_ratio(c["dense_bytes"], c["wire_bytes"]),
            payload_compression_ratio=_ratio(c["dense_bytes"], c["payload_bytes"]),
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

    def rank_and_world(self) -> Tuple[int, int]:
        """``(rank, world size)`` in the state's group, looked up once per group."""
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        if self._group is None or self._group[0] is not group:
            self._group = (group, dist.get_rank(self.process_group), dist.get_world_size(self.process_group))
        return self._group[1], self._group[2]

    def plain_allreduce(self, bucket: dist.GradBucket) -> torch.futures.Future:
        """Average ``bucket`` over the group with a dense allreduce, counted as dense traffic."""
        buffer = bucket.buffer()
        n = buffer.numel()
        world = dist.get_world_size(self.process_group)
        self.count_bucket(bucket, elements=n, sent=n, payload=4 * n, wire=4 * n)
        fut = dist.all_reduce(buffer, group=self.process_group, async_op=True).get_future()
        return fut.then(lambda f: f.value()[0].div_(world))
