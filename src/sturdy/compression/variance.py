"""Variance-based gradient compression (Tsuzuku et al. 2018, docs/design.md section 4) as a DDP communication hook.

Usage (every rank)::

    stats = attach_squared_gradient_statistics(model)         # before the first forward
    ddp = DistributedDataParallel(model)
    state = VarianceCompressionState(statistics=stats, alpha=4.0)
    ddp.register_comm_hook(state, variance_hook)
    ...  # each step: loss.backward(); state.observe_loss(loss.detach()); opt.step()

With ``momentum=m`` (momentum correction) the optimizer must run SGD without momentum. The hook has
PyTorch's shape (``hook(state, bucket) -> Future[Tensor]``, after ``torch/distributed/algorithms/ddp_comm_hooks``):
the future's tensor is the bucket's gradient averaged over ranks (the sum of every rank's decoded update
divided by the world size). Until ``state.iter >= start_iter`` (default 2: DDP rebuilds its buckets after the
first iteration) it runs a plain allreduce. Residuals and accumulated variances follow parameters
(:class:`~sturdy.compression.residual.ResidualState`); traffic is counted by
:class:`~sturdy.compression.traffic.TrafficMeter`.
"""

import math
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from sturdy.compression.compressor import Selection, validate_rate, variance_select, warm_up
from sturdy.compression.exchange import sparse_exchange
from sturdy.compression.lag import LagMonitor, LagReport
from sturdy.compression.residual import BucketView, ResidualState
from sturdy.compression.statistics import SquaredGradientStatistics, attach_squared_gradient_statistics
from sturdy.errors import ConfigurationError, DistributedError, UnsupportedModuleError

__all__ = ["VarianceCompressionState", "variance_hook"]

FEEDBACK_MODES = ("all", "unsent")


class VarianceCompressionState(ResidualState):
    """State of :func:`variance_hook` (docs/design.md section 4).

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
            installed (compiling them once if numba's cache does not hold them yet; see BENCHMARKS.md).
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
        momentum: momentum correction (Deep Gradient Compression; docs/design.md section 4): ``0`` (off),
            or the SGD momentum ``m`` in ``[0, 1)`` that the state then applies itself: a local velocity
            ``u = m u + g`` is accumulated and the residual sums ``u`` instead of ``g``; the variance test
            compares it with the velocity's variance, ``r_i^2 > alpha * v_i / (1 - m^2)`` (``s / (1 - m^2)``
            is the variance of ``u`` for independent steps). The optimizer must then run **without**
            momentum (``SGD(momentum=0)``), or the update gets momentum twice; ``sturdy train`` does this.
        momentum_masking: with ``momentum > 0``, reset the velocity of every element sent (``u_i = 0``), so a
            sent element's momentum does not keep pushing it after its update landed.
        warmup_steps: ramp the threshold over the first compressed steps: compressed step ``c`` (from 0)
            uses ``alpha * min(1, (c + 1) / warmup_steps)``; ``0``: no ramp.
        feedback: what error feedback keeps of a sent element: ``"all"`` (``r_i - q(r_i)``, the rounding
            error of the 4-bit value) or ``"unsent"`` (``r_i = 0``: the rounding error is dropped).

    The state watches whether the run keeps up with its gradients (:mod:`sturdy.compression.lag`):
    :meth:`lag_report` gives the residual lag (steps' worth of gradient held back), and a
    :class:`~sturdy.compression.lag.CompressionLagWarning` is emitted once when it passes its limit.
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
        momentum: float = 0.0,
        momentum_masking: bool = True,
        warmup_steps: int = 0,
        feedback: str = "all",
    ) -> None:
        self.alpha = validate_rate("alpha", alpha, low=0.0, high=math.inf, hint="typical values are 1 to 8")
        self.momentum = validate_rate("momentum", momentum, low=0.0, high=1.0, hint="the SGD momentum, e.g. 0.9")
        if self.momentum >= 1.0:
            raise ConfigurationError(f"momentum must lie in [0, 1), got {momentum}; the SGD momentum, e.g. 0.9")
        if not isinstance(warmup_steps, int) or isinstance(warmup_steps, bool) or warmup_steps < 0:
            raise ConfigurationError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        if feedback not in FEEDBACK_MODES:
            raise ConfigurationError(f"feedback must be one of {FEEDBACK_MODES}, got {feedback!r}")
        self.momentum_masking = bool(momentum_masking)
        self.warmup_steps = warmup_steps
        self.feedback = feedback
        self.buffer_kinds = VarianceCompressionState.buffer_kinds + (("velocity",) if self.momentum else ())
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
        self.value_format = "4bit" if quantize == "4bit" else "float32"
        if quantize == "4bit":
            warm_up()  # compile or load the kernels now, not inside the first step's collective
        super().__init__(
            process_group=process_group,
            start_iter=start_iter,
            named_parameters=named_parameters,
            parameter_names=statistics.parameter_names if statistics is not None else None,
            gather=gather,
            slack=slack,
        )
        self._verified: set = set()  # buckets whose statistics were checked against their gradient
        self.lag = LagMonitor()

    def lag_report(self) -> LagReport:
        """Residual lag of this rank, averaged over compressed steps, and the loss watch's windows."""
        return self.lag.report()

    def observe_loss(self, loss: Union[float, Tensor]) -> None:
        """Give the watch this step's training loss (a float or a 0-d tensor, read once per window): a
        :class:`~sturdy.compression.lag.CompressionLagWarning` is emitted once when the loss climbs back
        (:mod:`sturdy.compression.lag`). Optional; call it after ``backward``."""
        self.lag.observe_loss(loss)

    def current_alpha(self) -> float:
        """The factor of ``v`` in the current step's test: ``alpha``, over ``1 - m^2`` with momentum correction,
        ramped over ``warmup_steps``."""
        alpha = self.alpha / (1.0 - self.momentum**2) if self.momentum else self.alpha
        if not self.warmup_steps:
            return alpha
        done = max(0, self.iter - self.start_iter)
        return alpha * min(1.0, (done + 1) / self.warmup_steps)

    def config(self) -> Dict[str, Any]:
        return {"start_iter": self.start_iter, "alpha": self.alpha, "zeta": self.zeta, "quantize": self.quantize,
                "momentum": self.momentum, "momentum_masking": self.momentum_masking,
                "warmup_steps": self.warmup_steps, "feedback": self.feedback}

    def state_dict(self) -> Dict[str, Any]:
        """Residuals, variances (and velocities), counters, and the lag monitor's state."""
        out = super().state_dict()
        out["lag"] = self.lag.state_dict()
        return out

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (a state saved before the monitor was checkpointed starts it afresh)."""
        super().load_state_dict(state)
        self.lag = LagMonitor(warmup=self.lag.warmup, lag_limit=self.lag.lag_limit, loss_window=self.lag.loss_window)
        if "lag" in state:
            self.lag.load_state_dict(state["lag"])

    def accumulate(self, view: BucketView) -> None:
        """``r += g``; with momentum correction ``u = m u + g`` and ``r += u``."""
        if not self.momentum:
            view.buffers["residual"].add_(view.gradient)
            return
        velocity = view.buffers["velocity"]
        velocity.mul_(self.momentum).add_(view.gradient)
        view.buffers["residual"].add_(velocity)

    def bind_model(self, model: nn.Module) -> None:
        """Attach squared-gradient statistics to ``model`` (the module DDP wraps) and take its names."""
        if self.statistics_source is None:
            self.statistics_source = attach_squared_gradient_statistics(model)
        self._names = dict(self.statistics_source.parameter_names)

    def before_plain_step(self, bucket: dist.GradBucket) -> None:
        """Drop the statistics of a plain-allreduce step (they are not accumulated before compression starts)."""
        if self.statistics_source is not None:
            self.statistics_source.pop_flat(bucket.parameters())

    def _buffers_built(self, index: int, params: Sequence[Tensor]) -> None:
        # from now on the statistics go straight into the accumulated variance (no storage of their own)
        if self.statistics_source is not None:
            variance = self._buffers["variance"][index]
            for p, seg in zip(params, self._segments[index]):
                self.statistics_source.route(p, variance[seg.offset : seg.offset + seg.numel])

    def _buffers_dropped(self) -> None:
        self._verified.clear()
        if self.statistics_source is not None:
            self.statistics_source.clear_routes()

    def _check_statistics(self, view: BucketView, variance: Tensor) -> None:
        """Refuse a parameter with a gradient but no statistics (checked on a bucket's first compressed step).

        A nonzero mean gradient implies a positive second moment, so ``v == 0`` on every element of a
        parameter with a nonzero gradient means no rule saw it: it was used outside its own module's
        forward, where the statistics' hooks cannot see it. Its elements would pass the test at every step.
        """
        for seg in self._segments[view.index]:
            grad = view.gradient[seg.offset : seg.offset + seg.numel]
            if bool((grad != 0).any()) and not bool((variance[seg.offset : seg.offset + seg.numel] != 0).any()):
                raise UnsupportedModuleError(
                    f"parameter '{seg.name}' has a gradient but no per-sample statistics: it is used outside its "
                    "own module's forward (e.g. nn.MultiheadAttention reads out_proj.weight without calling "
                    "out_proj; an embedding's .weight read directly), so variance-based compression would send it "
                    "at every step; call the module that owns it, or use Linear projections",
                    path=seg.name,
                )

    def select(self, view: BucketView, *, max_bytes: Optional[int] = None) -> Selection:
        """Send ``i`` iff ``r_i^2 > alpha * v_i`` after adding this step's statistics to ``v``."""
        variance = view.buffers["variance"]
        if self.statistics_source is None:
            if self.alpha != 0:
                raise DistributedError(
                    "variance-based compression has no squared-gradient statistics: call state.bind_model(model) "
                    "with the module DDP wraps before training"
                )
        else:
            self.statistics_source.pop_add_(view.params, variance)
            if view.index not in self._verified:
                if self.alpha != 0:
                    self._check_statistics(view, variance)
                self._verified.add(view.index)
        residual = view.buffers["residual"]
        selection = variance_select(
            residual,
            variance,
            alpha=self.current_alpha(),
            zeta=self.zeta,
            quantize=self.quantize,
            boundaries=view.boundaries,
            max_bytes=max_bytes,
        )
        if selection.count:
            if self.feedback == "unsent":
                _zero_at(residual, selection.indices)
            if self.momentum and self.momentum_masking:
                _zero_at(view.buffers["velocity"], selection.indices)
        step_update = view.buffers["velocity"] if self.momentum else view.gradient
        self.lag.observe(self.iter, residual_sq=_square_norm(residual), gradient_sq=_square_norm(step_update))
        return selection


def _square_norm(flat: Tensor) -> Union[float, Tensor]:
    """``|flat|^2`` without a bucket-sized temporary: one numpy call on a CPU float32 buffer (a fraction of
    torch's per-call cost), else a 0-d tensor on the device (read back once per step by the lag monitor)."""
    if flat.device.type == "cpu" and flat.dtype == torch.float32:
        x = flat.detach().numpy()
        return float(np.dot(x, x))
    return torch.dot(flat, flat).double()


def _zero_at(flat: Tensor, indices: Tensor) -> None:
    """``flat[indices] = 0`` (a numpy view on the CPU: a fraction of torch's per-call cost)."""
    if flat.device.type == "cpu" and indices.device.type == "cpu":
        flat.numpy()[indices.numpy()] = 0
    else:
        flat.index_fill_(0, indices.to(flat.device), 0.0)


def variance_hook(state: VarianceCompressionState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """Variance-based gradient compression hook; register with ``ddp.register_comm_hook(state, variance_hook)``."""
    return sparse_exchange(state, bucket)
