"""Whether a variance-compressed run keeps up with its gradients: the lag monitor and its warning.

Error feedback loses nothing in the sum, but it can *delay*: an element waits in the residual until its
accumulated value passes the variance test, and with 4-bit values until it also reaches the smallest
level of its parameter's scale (``scale * 2^-7``; values are never rounded up). The symptom of a run
that falls behind is visible to the hook without any extra communication:

* **residual lag**: the norm of the residual against the norm of one step's gradient, i.e. how many
  steps' worth of gradient the run holds back. Elements that pass the variance test but lie below the 4-bit
  floor, and elements whose test never passes, both show here.

:class:`LagMonitor` keeps exponential moving averages of ``|r|^2`` and ``|g|^2`` over compressed steps (all
buckets of a step summed; the lag is the square root of their ratio) and emits :class:`CompressionLagWarning`
once when, after ``warmup`` compressed steps, the lag passes ``lag_limit``. The limit is set well above what
healthy runs show (digits MLP and Embedding + LayerNorm models at alpha 5: 4 to 31 steps, the largest on a
256-row embedding whose rare rows wait; ``benchmarks/compression_embedding.py``), so the default path on such
models stays silent. The count of candidates left below the 4-bit floor is *not* a usable signal: on the
healthy digits MLP 70% of the candidates are such (elements of dead units with ``v = 0`` and a tiny residual).
The monitor is local (this rank's buckets) and costs two norms per bucket.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Union

from torch import Tensor

__all__ = ["CompressionLagWarning", "LagMonitor", "LagReport"]

LAG_LIMIT = 100.0  # sqrt(EMA |r|^2 / EMA |g|^2): steps' worth of gradient held in the residual
WARMUP_STEPS = 50  # compressed steps before the monitor may warn
EMA_STEPS = 50  # the averages' time constant, in steps

Number = Union[float, Tensor]


class CompressionLagWarning(RuntimeWarning):
    """A compressed run holds back its gradients: the residual keeps growing against the gradient.
    Training continues; the message names the measure and the remedy."""


@dataclass(frozen=True)
class LagReport:
    """The lag monitor's averages (exponential, over compressed steps).

    Attributes:
        steps: compressed steps seen.
        residual_lag: ``sqrt(EMA |r|^2 / EMA |g|^2)`` with ``r`` the residual after sending and ``g`` one
            step's local gradient (all buckets).
    """

    steps: int
    residual_lag: float

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able dict."""
        return dict(self.__dict__)


class LagMonitor:
    """Residual lag of one rank (see the module docstring)."""

    def __init__(self, *, warmup: int = WARMUP_STEPS, lag_limit: float = LAG_LIMIT) -> None:
        self.warmup = warmup
        self.lag_limit = lag_limit
        self.steps = 0
        self.warned = False
        self._step = -1
        self._r2: Number = 0.0  # current step's sums
        self._g2: Number = 0.0
        self._avg_r2 = 0.0
        self._avg_g2 = 0.0

    def observe(self, step: int, *, residual_sq: Number, gradient_sq: Number) -> None:
        """Add one bucket of compressed step ``step``; a new step closes the previous one.

        The squares may be 0-d tensors on the gradients' device: they are summed there and read back once,
        when the next step closes this one (not once per bucket).
        """
        if step != self._step:
            self._close()
            self._step = step
        self._r2 = self._r2 + residual_sq
        self._g2 = self._g2 + gradient_sq

    def _close(self) -> None:
        r2, g2 = float(self._r2), float(self._g2)
        self._r2 = self._g2 = 0.0
        if self._step < 0:
            return
        decay = 1.0 - 1.0 / EMA_STEPS
        self._avg_r2 = decay * self._avg_r2 + (1 - decay) * r2
        self._avg_g2 = decay * self._avg_g2 + (1 - decay) * g2
        self.steps += 1
        if self.steps >= self.warmup and not self.warned:
            self._check()

    def report(self) -> LagReport:
        """The averages so far (the current step counts once the next one closes it)."""
        lag = math.sqrt(self._avg_r2 / self._avg_g2) if self._avg_g2 > 0 else (math.inf if self._avg_r2 > 0 else 0.0)
        return LagReport(self.steps, lag)

    def _check(self) -> None:
        report = self.report()
        if report.residual_lag > self.lag_limit:
            self.warned = True
            warnings.warn(
                f"variance compression falls behind: the residual holds {report.residual_lag:.0f} steps' worth of "
                f"gradient (norm ratio, average over {report.steps} compressed steps; healthy runs hold 4 to 31); "
                "lower alpha (e.g. 1) or zeta, use quantize=None, or compare with an uncompressed run",
                CompressionLagWarning, stacklevel=2,
            )
