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

The residual lag cannot see a run that keeps up with its gradients but trains worse than plain allreduce
(``tokmlp`` of ``benchmarks/compression_embedding.py`` at alpha 5 without momentum correction: lag 5.5,
loss 0.7 -> 2.4). The **loss watch** does: the training loss, when the caller gives it
(:meth:`LagMonitor.observe_loss`; the command line gives every epoch's mean training loss), is averaged
over windows of ``loss_window`` observations, and :class:`CompressionLagWarning` is emitted once when

* **the loss climbs back**: ``RISE_WINDOWS`` windows in a row exceed ``LOSS_RISE`` times the best window mean
  so far plus ``LOSS_MARGIN`` (healthy runs only decrease up to noise, which window means, the margin and the
  repetition absorb: a single late spike of a small loss, 0.29 -> 0.50 -> 0.29 on ``tokmlp`` with momentum
  correction, does not count); or
* **the loss stalls**: after ``STALL_WINDOWS`` windows the best window mean is still above ``STALL_FRACTION``
  of the first window's (``tokmlp`` at alpha 5: 0.86 after 8 windows of 20 steps, where plain training is
  at 0.24 and momentum correction at 0.68). A model that learns slowly in any case (a large data set whose
  loss falls by less than a fifth in ``8 * loss_window`` steps) can trip this rule: the warning says to
  compare with an uncompressed run.

The monitor's state (averages, counts, whether it warned, the loss windows) is checkpointed with the
compression state (:meth:`LagMonitor.state_dict`), so a resumed run warns exactly when an uninterrupted
one would.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Optional, Union

from torch import Tensor

from sturdy.errors import CheckpointError

__all__ = ["CompressionLagWarning", "LagMonitor", "LagReport"]

LAG_LIMIT = 100.0  # sqrt(EMA |r|^2 / EMA |g|^2): steps' worth of gradient held in the residual
WARMUP_STEPS = 50  # compressed steps before the monitor may warn
EMA_STEPS = 50  # the averages' time constant, in steps
LOSS_RISE = 1.5  # a loss window above LOSS_RISE * best window + LOSS_MARGIN: the run falls behind
LOSS_MARGIN = 0.1  # nats: absorbs the noise of small losses late in training
LOSS_WINDOW = 20  # per-step losses averaged per window (the command line gives epoch means: window 1)
LOSS_WARMUP = 2  # windows before the loss watch may warn
RISE_WINDOWS = 2  # consecutive windows above the rise threshold
STALL_WINDOWS = 8  # windows after which the loss must have fallen below STALL_FRACTION of the first window's
STALL_FRACTION = 0.8

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
            step's local gradient (all buckets; with momentum correction the velocity).
        loss_windows: loss windows closed (:meth:`LagMonitor.observe_loss`).
        best_loss, last_loss: the best and the last window's mean loss (``None`` before the first window).
        lag_warned, loss_warned: whether the residual lag or the loss watch warned.
    """

    steps: int
    residual_lag: float
    loss_windows: int = 0
    best_loss: Optional[float] = None
    last_loss: Optional[float] = None
    lag_warned: bool = False
    loss_warned: bool = False

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able dict."""
        return dict(self.__dict__)


class LagMonitor:
    """Residual lag of one rank (see the module docstring)."""

    def __init__(self, *, warmup: int = WARMUP_STEPS, lag_limit: float = LAG_LIMIT,
                 loss_window: int = LOSS_WINDOW) -> None:
        self.warmup = warmup
        self.lag_limit = lag_limit
        self.loss_window = loss_window
        self.steps = 0
        self.warned = False
        self.loss_warned = False
        self._loss_sum: Number = 0.0  # current window's sum (a 0-d tensor is read once per window)
        self._loss_count = 0
        self._windows = 0
        self._above = 0  # consecutive windows above the rise threshold
        self._first: Optional[float] = None
        self._best: Optional[float] = None
        self._last: Optional[float] = None
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

    def observe_loss(self, loss: Number) -> None:
        """Add one training loss (a float or a 0-d tensor: read once per window, not per call)."""
        self._loss_sum = self._loss_sum + (loss.detach() if isinstance(loss, Tensor) else loss)
        self._loss_count += 1
        if self._loss_count < self.loss_window:
            return
        mean = float(self._loss_sum) / self._loss_count
        self._loss_sum, self._loss_count = 0.0, 0
        if not math.isfinite(mean):
            return
        self._windows += 1
        self._last = mean
        if self._first is None:
            self._first = mean
        if self._best is None or mean < self._best:
            self._best = mean
        self._above = self._above + 1 if mean > LOSS_RISE * self._best + LOSS_MARGIN else 0
        if self.loss_warned or self._windows <= LOSS_WARMUP:
            return
        if self._above >= RISE_WINDOWS:
            what = f"rose to {mean:.3g} from a best of {self._best:.3g}"
        elif self._windows >= STALL_WINDOWS and self._best > STALL_FRACTION * self._first:
            what = f"stalls: its best is {self._best:.3g} after starting at {self._first:.3g}"
        else:
            return
        self.loss_warned = True
        warnings.warn(
            f"variance compression falls behind: the training loss {what} (means of {self.loss_window} "
            f"observations, {self._windows} windows); delayed updates hold the run back: use momentum correction "
            "(momentum=, the command line's default), lower alpha, or compare with an uncompressed run",
            CompressionLagWarning, stacklevel=3,
        )

    def report(self) -> LagReport:
        """The averages so far (the current step counts once the next one closes it)."""
        lag = math.sqrt(self._avg_r2 / self._avg_g2) if self._avg_g2 > 0 else (math.inf if self._avg_r2 > 0 else 0.0)
        return LagReport(self.steps, lag, self._windows, self._best, self._last, self.warned, self.loss_warned)

    def state_dict(self) -> Dict[str, Any]:
        """Everything a resumed run needs to warn exactly when an uninterrupted one would (the step being summed
        is closed first)."""
        self._close()
        self._step = -1
        return {"steps": self.steps, "warned": self.warned, "loss_warned": self.loss_warned,
                "avg_r2": self._avg_r2, "avg_g2": self._avg_g2, "loss_sum": float(self._loss_sum),
                "loss_count": self._loss_count, "windows": self._windows, "above": self._above, "first": self._first,
                "best": self._best, "last": self._last}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        try:
            self.steps, self.warned = int(state["steps"]), bool(state["warned"])
            self.loss_warned = bool(state["loss_warned"])
            self._avg_r2, self._avg_g2 = float(state["avg_r2"]), float(state["avg_g2"])
            self._loss_sum, self._loss_count = float(state["loss_sum"]), int(state["loss_count"])
            self._windows, self._above = int(state["windows"]), int(state["above"])
            self._first = None if state["first"] is None else float(state["first"])
            self._best = None if state["best"] is None else float(state["best"])
            self._last = None if state["last"] is None else float(state["last"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"the lag monitor's saved state is incomplete or malformed ({exc})") from None
        self._step, self._r2, self._g2 = -1, 0.0, 0.0

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
