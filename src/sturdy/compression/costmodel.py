"""Cost model of one data-parallel step: compute + communication, dense ring allreduce vs. sparse all-gather.

Conventions (alpha-beta model, no overlap of compute and communication *(choice)*, conservative
for both methods alike):

* a message of ``m`` bytes over one link costs ``latency + m / bandwidth``;
* ring allreduce of ``n`` bytes over ``P`` workers: ``2 (P - 1) (latency + n / (P bandwidth))``
  (reduce-scatter then all-gather, each worker sends ``2 (P-1)/P n`` bytes);
* the compressed step (:mod:`sturdy.compression.collective`): a ring all-gather of the 8-byte sizes,
  then a ring all-gather of ``c = n / ratio`` bytes per worker: ``(P - 1)(latency + 8 / bandwidth)
  + (P - 1)(latency + c / bandwidth)``; every worker receives ``(P - 1) c`` bytes, so the sparse
  method loses its advantage when ``P`` approaches the compression ratio;
* ``codec_s``: measured encode + decode time per step, added to the compressed step;
* time to accuracy (:func:`predict_time_to_accuracy`): the epochs a method needs to reach a target
  accuracy (measured: compression changes *how many* steps, the model only how long each takes) times
  the steps per epoch times its predicted step, plus the per-epoch time outside the steps (evaluation,
  checkpoint). Allreduce-based methods (``none``, ``fp16``, ``bf16``, ``powersgd``) reduce ``n / ratio`` bytes with a
  ring; the sparse ones (``vgc``, ``strom``, ``topk``) all-gather ``n / ratio`` bytes per worker.

Bandwidth is in Gbit/s (``1 Gbit/s = 1.25e8 bytes/s``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, Sequence, Tuple

from sturdy.errors import ConfigurationError
from sturdy.validation import check_number

__all__ = [
    "CostPrediction",
    "ring_allreduce_seconds",
    "sparse_allgather_seconds",
    "predict_step_times",
    "crossover_bandwidth_gbps",
    "method_comm_seconds",
    "predict_time_to_accuracy",
    "MAX_MODEL_WORKERS",
]

ALLREDUCE_METHODS = ("none", "fp16", "bf16", "powersgd")

BYTES_PER_GBIT = 1.25e8
SIZE_BYTES = 8


@dataclass(frozen=True)
class CostPrediction:
    """Predicted step times for ``workers`` workers on links of ``bandwidth_gbps``.

    Attributes:
        workers, bandwidth_gbps, latency_s: the setting.
        compute_s: forward + backward + optimizer time of one step (measured).
        allreduce_s, compressed_comm_s: communication time of each method.
        dense_step_s, compressed_step_s: step times.
        speedup: ``dense_step_s / compressed_step_s``.
    """

    workers: int
    bandwidth_gbps: float
    latency_s: float
    compute_s: float
    allreduce_s: float
    compressed_comm_s: float
    dense_step_s: float
    compressed_step_s: float
    speedup: float

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able dict."""
        return asdict(self)


MAX_MODEL_WORKERS = 2**20
"""Most workers a prediction is made for (a ring of a million workers is beyond any cluster modelled)."""

def ring_allreduce_seconds(*, nbytes: float, workers: int, bandwidth_gbps: float, latency_s: float) -> float:
    """Ring allreduce time of ``nbytes`` over ``workers`` (0 for one worker)."""
    if workers == 1:
        return 0.0
    bw = bandwidth_gbps * BYTES_PER_GBIT
    return 2 * (workers - 1) * (latency_s + nbytes / (workers * bw))


def sparse_allgather_seconds(
    *, bytes_per_worker: float, workers: int, bandwidth_gbps: float, latency_s: float
) -> float:
    """Size exchange plus ring all-gather of ``bytes_per_worker`` per worker (0 for one worker)."""
    if workers == 1:
        return 0.0
    bw = bandwidth_gbps * BYTES_PER_GBIT
    return (workers - 1) * (latency_s + SIZE_BYTES / bw) + (workers - 1) * (latency_s + bytes_per_worker / bw)


def predict_step_times(
    *,
    compute_s: float,
    dense_bytes: float,
    compression_ratio: float,
    workers: Sequence[int],
    bandwidths_gbps: Sequence[float],
    latency_s: float = 50e-6,
    codec_s: float = 0.0,
) -> Tuple[CostPrediction, ...]:
    """Predicted step times for every ``(workers, bandwidth)`` pair.

    Args:
        compute_s: measured compute time of one step (seconds).
        dense_bytes: float32 gradient bytes of one step (``4 * number of parameters``).
        compression_ratio: measured dense bytes / bytes sent (per worker and step).
        workers: worker counts (``>= 1``).
        bandwidths_gbps: link bandwidths in Gbit/s.
        latency_s: per-message latency.
        codec_s: measured encode + decode time per step of the compressed method.

    Example:
        >>> p = predict_step_times(compute_s=0.01, dense_bytes=4e6, compression_ratio=100,
        ...                        workers=[4], bandwidths_gbps=[1.0])[0]
        >>> round(p.allreduce_s, 4), round(p.speedup, 2)
        (0.0483, 5.18)
    """
    check_number(compute_s, "compute_s", low=0)
    check_number(dense_bytes, "dense_bytes", low=0, low_open=True)
    check_number(compression_ratio, "compression_ratio", low=0, low_open=True)
    check_number(latency_s, "latency_s", low=0)
    check_number(codec_s, "codec_s", low=0)
    if not workers or not bandwidths_gbps:
        raise ConfigurationError("give at least one worker count and one bandwidth (e.g. 4 and 1.0)")
    for p in workers:
        if not isinstance(p, int) or isinstance(p, bool) or not 1 <= p <= MAX_MODEL_WORKERS:
            raise ConfigurationError(f"worker counts must be ints in [1, {MAX_MODEL_WORKERS}] (a ring of a million "
                                     f"workers is beyond any cluster the model describes), got {p!r}")
    for bw in bandwidths_gbps:
        check_number(bw, "bandwidth", low=0, low_open=True)
    out = []
    for p in workers:
        for bw in bandwidths_gbps:
            dense = ring_allreduce_seconds(nbytes=dense_bytes, workers=p, bandwidth_gbps=bw, latency_s=latency_s)
            sparse = sparse_allgather_seconds(
                bytes_per_worker=dense_bytes / compression_ratio, workers=p, bandwidth_gbps=bw, latency_s=latency_s
            )
            dense_step = compute_s + dense
            compressed_step = compute_s + codec_s + sparse
            out.append(
                CostPrediction(
                    workers=p,
                    bandwidth_gbps=float(bw),
                    latency_s=latency_s,
                    compute_s=compute_s,
                    allreduce_s=dense,
                    compressed_comm_s=sparse,
                    dense_step_s=dense_step,
                    compressed_step_s=compressed_step,
                    speedup=dense_step / compressed_step if compressed_step > 0 else 1.0,
                )
            )
    return tuple(out)


def crossover_bandwidth_gbps(
    *, compute_s: float, dense_bytes: float, compression_ratio: float, workers: int, latency_s: float = 50e-6,
    codec_s: float = 0.0,
) -> float:
    """Bandwidth above which plain allreduce is faster (``inf`` if compression always wins, 0 if never).

    Both step times are ``a + b / bandwidth``; the crossover solves ``a_d + b_d / x = a_c + b_c / x``.
    """
    if workers == 1:
        return 0.0
    a_dense = compute_s + 2 * (workers - 1) * latency_s
    b_dense = 2 * (workers - 1) * dense_bytes / workers / BYTES_PER_GBIT
    a_comp = compute_s + codec_s + 2 * (workers - 1) * latency_s
    b_comp = (workers - 1) * (SIZE_BYTES + dense_bytes / compression_ratio) / BYTES_PER_GBIT
    if b_comp >= b_dense:
        return 0.0
    if a_comp <= a_dense:
        return math.inf
    return (b_dense - b_comp) / (a_comp - a_dense)


def method_comm_seconds(
    method: str, *, dense_bytes: float, compression_ratio: float, workers: int, bandwidth_gbps: float,
    latency_s: float = 50e-6,
) -> float:
    """Communication time of one step of ``method`` (see the module docstring for which collective)."""
    check_number(compression_ratio, "compression_ratio", low=0, low_open=True)
    nbytes = dense_bytes / compression_ratio
    if method in ALLREDUCE_METHODS:
        return ring_allreduce_seconds(nbytes=nbytes, workers=workers, bandwidth_gbps=bandwidth_gbps,
                                      latency_s=latency_s)
    return sparse_allgather_seconds(bytes_per_worker=nbytes, workers=workers, bandwidth_gbps=bandwidth_gbps,
                                    latency_s=latency_s)


def predict_time_to_accuracy(
    *, epochs: float, steps_per_epoch: int, compute_codec_s: float, comm_s: float, epoch_overhead_s: float = 0.0
) -> float:
    """Seconds to reach an accuracy that takes ``epochs`` epochs (``inf`` when it is never reached).

    Args:
        epochs: epochs the method needed (measured); ``inf`` if it never got there.
        steps_per_epoch: optimizer steps per epoch.
        compute_codec_s: one step's compute plus the method's own encode/decode work (unthrottled, measured).
        comm_s: one step's communication (:func:`method_comm_seconds`).
        epoch_overhead_s: time per epoch outside the steps (evaluation, checkpoint).
    """
    if not math.isfinite(epochs):
        return math.inf
    return epochs * (steps_per_epoch * (compute_codec_s + comm_s) + epoch_overhead_s)
