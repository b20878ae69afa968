"""Training-time Lipschitz estimate: persistent power iteration on the true operators.

:class:`LipschitzTracker` traces the model once (:mod:`.graph`, same composition as the guaranteed
bound) and keeps one power-iteration vector per weight operator as a buffer, so the vectors are
checkpointed and, under DDP, replicated. Its estimates are differentiable in the weights and are
*lower* estimates of the true norms: fine for training, never used for a certificate.

BatchNorm rule *(choice)*: certification bounds BatchNorm with its running statistics (eval mode),
``r_c = |gamma_c| / sqrt(running_var_c + eps)``, while in training mode the network normalises with the
batch's statistics, ``b_c = |gamma_c| / sqrt(batch_var_c + eps)``. Inside :meth:`LipschitzTracker.batch_statistics`
(the LMT objective wraps the model's forward in it) the tracker records each BatchNorm's batch variance and
uses the per-channel factor ``max(r_c, b_c)`` (never below the constant certification will use), with the
gradient of ``b_c`` (``b_c * stopgrad(max(1, r_c / b_c))``): it flows through ``gamma`` *and* through the
batch variance, i.e. through the weights before the BatchNorm. With the running factor alone the gradient
says "shrink the convolution before the BatchNorm", which changes nothing in training mode (BatchNorm
undoes the scale) but drives the running variance towards zero and the certified constant up (BENCHMARKS.md,
figures moved from docstrings). Without recorded statistics (a call outside
``batch_statistics``, or BatchNorms in eval mode) the factor is ``r_c``.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed
import torch.nn.functional as F
from torch import nn

from sturdy.errors import ConfigurationError
from sturdy.lipschitz.graph import build_program, compose
from sturdy.lipschitz.norms import guaranteed_norm
from sturdy.lipschitz.operators import BatchNormOp, Conv2dOp, LinearLayerOp, LinearOp
from sturdy.lipschitz.results import LipschitzEstimate
from sturdy.utils import model_device_dtype
from sturdy.validation import check_model

__all__ = ["LipschitzTracker", "LipschitzDriftWarning", "DRIFT_TOLERANCE"]

DRIFT_TOLERANCE = 0.25  # warn when |1 - estimate / guaranteed bound| exceeds this during training
RESYNC_TOLERANCE = 0.10  # resynchronise the power iteration when the estimate lags the bound by more than this
RESYNC_ITERATIONS = 30  # extra power iterations of a resynchronisation


class LipschitzDriftWarning(UserWarning):
    """The training-time estimate and the guaranteed bound of the same model drifted apart."""


class LipschitzTracker(nn.Module):
    """Training-time Lipschitz estimate with persistent power iteration.

    Each call does ``iterations`` power iterations per weight operator (conv, linear, folded
    conv+BN) on the true operator (real input shape, padding, stride; ``conv_transpose2d`` as
    adjoint) and returns a :class:`LipschitzEstimate` whose values are differentiable in the
    weights through ``||W u||`` with ``u`` held constant. The vectors ``u`` are buffers (saved in
    ``state_dict``); they start from a seeded random vector followed by ``warmup_iterations``
    iterations, so every DDP rank builds identical vectors; with ``sync`` they are averaged over ranks
    after each update and stay identical. Estimates are lower bounds of the true norms: never use them to certify.

    Args:
        model: the network (its parameters are used live, never copied).
        input_shape: shape of one input batch, e.g. ``(1, 1, 8, 8)``.
        iterations: power iterations per call (1 in training).
        warmup_iterations: iterations run at construction.
        seed: seed of the start vectors.
        sync: under ``torch.distributed``, average the vectors over ranks after each update (one small
            all-reduce per step), so they stay identical even when folded BatchNorm statistics differ per rank.
        batch_shapes: run the power iterations of convolutions of the same shape (input, kernel, stride, padding)
            as one grouped convolution: a few kernel launches per shape instead of a few per layer.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> tracker = LipschitzTracker(net, input_shape=(1, 4))
        >>> est = tracker()
        >>> est.lipschitz.requires_grad, sorted(tracker.state_dict())
        (True, ['u__1', 'u__3'])
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        input_shape: Sequence[int],
        iterations: int = 1,
        warmup_iterations: int = 30,
        seed: int = 0,
        sync: bool = True,
        batch_shapes: bool = True,
    ) -> None:
        super().__init__()
        check_model(model)
        if iterations < 1 or warmup_iterations < 0:
            raise ConfigurationError(
                f"iterations must be >= 1 and warmup_iterations >= 0, got {iterations} and {warmup_iterations}"
            )
        self._program = build_program(model, input_shape)
        self.iterations = int(iterations)
        self.sync = bool(sync)
        self._fixed: Dict[str, float] = {}
        self._power: Dict[str, Tuple[str, LinearOp]] = {}
        self._closed: Dict[str, LinearOp] = {}
        self._batchnorms: List[nn.modules.batchnorm._BatchNorm] = []
        self._batch_var: Dict[int, torch.Tensor] = {}  # id(BatchNorm) -> batch variance of the last forward
        gen = torch.Generator().manual_seed(int(seed))
        device, dtype = model_device_dtype(model)
        for s in self._program.steps:
            if s.kind != "op":
                continue
            op = s.op
            assert op is not None
            self._use_training_scale(op)
            if not op.parametric:
                self._fixed[s.name] = guaranteed_norm(op)[0]
            elif op.closed_form_norm() is not None:
                self._closed[s.name] = op
            else:
                buf = "u__" + s.path.replace(".", "_").replace("+", "__")
                u = torch.randn((1, *op.in_shape), generator=gen, dtype=torch.float32).to(dtype=dtype, device=device)
                self.register_buffer(buf, u / u.norm())
                self._power[s.name] = (buf, op)
        self._groups = self._shape_groups(batch_shapes)
        self._last: Optional[torch.Tensor] = None  # no device sync per step: read through last_value
        with torch.no_grad():
            for _ in range(warmup_iterations):
                self._iterate()

    def _use_training_scale(self, op: LinearOp) -> None:
        """Route a BatchNorm's factor (standalone or folded into the preceding operator) through
        :meth:`_bn_scale` (the tracker owns its traced operators)."""
        bn_op = op if isinstance(op, BatchNormOp) else getattr(getattr(op, "out_scale", None), "__self__", None)
        if not isinstance(bn_op, BatchNormOp):
            return
        module = bn_op.module
        self._batchnorms.append(module)
        if op is bn_op:
            op.closed_form_norm = lambda: self._bn_scale(module).abs().max()  # type: ignore[method-assign]
        else:
            op.out_scale = lambda: self._bn_scale(module)  # type: ignore[attr-defined]

    def _bn_scale(self, m: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
        """Per-channel factor of BatchNorm ``m``: ``max(running, batch)`` with the batch factor's gradient."""
        running = torch.rsqrt(m.running_var + m.eps)
        batch_var = self._batch_var.get(id(m))
        if batch_var is None:
            inv = running
        else:
            batch = torch.rsqrt(batch_var + m.eps)
            inv = batch * (running / batch).detach().clamp_min(1.0)
        return inv if m.weight is None else m.weight * inv

    @contextmanager
    def batch_statistics(self, model: Optional[nn.Module] = None) -> Iterator[None]:
        """Record the batch variance of every tracked BatchNorm (in training mode) during the forward passes
        run inside the block; the next calls of the tracker use them (see the module doc). The hooks are
        removed on exit, so the model carries none outside the block (certification refuses hooked modules).

        Args:
            model: unused; accepted so that call sites read ``with tracker.batch_statistics(model):``.
        """
        self._batch_var = {}
        handles = [m.register_forward_pre_hook(self._record) for m in self._batchnorms]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _record(self, module: nn.Module, args: Tuple[Any, ...]) -> None:
        if not module.training or not args or not isinstance(args[0], torch.Tensor):
            return
        x = args[0]
        dims = [d for d in range(x.dim()) if d != 1]
        var = x.var(dim=dims, unbiased=False)  # what BatchNorm normalises by in training mode
        self._batch_var[id(module)] = var.to(module.running_var.dtype)  # type: ignore[union-attr]

    def check_drift(self, model: nn.Module, *, tolerance: float = DRIFT_TOLERANCE, epoch: int = -1) -> Dict[str, Any]:
        """Compare the last training-time estimate with the guaranteed bound of ``model`` (eval mode, restored).

        Beyond :data:`RESYNC_TOLERANCE` (or ``tolerance`` if smaller) the vectors first get
        :data:`RESYNC_ITERATIONS` extra power iterations (they lag weights that moved fast); a
        :class:`LipschitzDriftWarning` follows only when ``|1 - estimate / upper|`` still exceeds ``tolerance``:
        training then optimises another constant than the one certification will use (e.g. BatchNorm statistics
        drifting). Returns ``{"epoch", "estimate", "upper", "relative_gap", "lagged_gap" (before the resync),
        "resynced", "warned"}``.
        """
        from sturdy.lipschitz.bounds import lipschitz_bound  # the bound composes the same traced program

        estimate = self.current_estimate()  # from the vectors as they are: the same in a resumed run
        upper = lipschitz_bound(model, input_shape=self._program.input_shape, power_iterations=0).upper
        gap = lagged = 1.0 - estimate / upper if upper > 0 else 0.0
        resynced = abs(gap) > min(tolerance, RESYNC_TOLERANCE)
        if resynced:  # the vectors lag weights that moved fast: a warm restart of the power iteration, then judge
            estimate = self.resync()
            gap = 1.0 - estimate / upper if upper > 0 else 0.0
        warned = abs(gap) > tolerance
        if warned:
            warnings.warn(
                f"LMT epoch {epoch}: the training-time Lipschitz estimate {estimate:.4g} and the guaranteed bound "
                f"{upper:.4g} differ by {abs(gap):.0%} (more than {tolerance:.0%}); training optimises another "
                "constant than the certificate uses (more power iterations per step, or check BatchNorm statistics)",
                LipschitzDriftWarning,
                stacklevel=2,
            )
        return {"epoch": epoch, "estimate": estimate, "upper": upper, "relative_gap": gap, "lagged_gap": lagged,
                "resynced": resynced, "warned": warned}

    @torch.no_grad()
    def resync(self, iterations: int = RESYNC_ITERATIONS) -> float:
        """Run ``iterations`` extra power iterations on the current weights (no gradient; vectors averaged over
        ranks with ``sync``) and return the new global estimate."""
        for _ in range(iterations):
            self._iterate()
        if self.sync:
            self._average_vectors()
        return self.current_estimate()

    @property
    def last_value(self) -> Optional[float]:
        """The global estimate of the last call (``None`` before the first)."""
        return None if self._last is None else float(self._last)

    @torch.no_grad()
    def _iterate(self) -> None:
        for buf, op in self._power.values():
            u, w = getattr(self, buf), op.weight()
            w = w.detach() if w is not None else None
            v = op.adjoint(op.apply(u, w), w)
            u.copy_(v / v.norm().clamp_min(1e-30))

    def _shape_groups(self, enabled: bool) -> List[List[str]]:
        """Power-iteration operators in groups of identical convolution geometry (singletons otherwise)."""
        groups: Dict[Any, List[str]] = {}
        for name, (_, op) in self._power.items():
            key: Any = ("single", name)
            if enabled and isinstance(op, Conv2dOp) and op.groups == 1 and op.padding_mode == "zeros":
                lh, rh, lw, rw = op.pads
                w = op.weight()
                if lh == rh and lw == rw:
                    key = (op.in_shape, tuple(w.shape), op.stride, op.pads, op.dilation, w.dtype, w.device)
            groups.setdefault(key, []).append(name)
        return list(groups.values())

    def _step_batched(self, names: List[str], norms: Dict[str, Any], updates: List[Tuple[str, torch.Tensor]]) -> None:
        """:meth:`forward`'s step for ``k`` same-shape convolutions as one grouped convolution (``groups=k``)."""
        ops = [self._power[n][1] for n in names]
        bufs = [self._power[n][0] for n in names]
        op, k = ops[0], len(ops)
        assert isinstance(op, Conv2dOp)
        weight = torch.cat([o.weight() for o in ops], 0)  # (k C_out, C_in, kh, kw), differentiable
        lh, _, lw, _ = op.pads
        u = torch.cat([getattr(self, b) for b in bufs], 1)  # (1, k C_in, H, W)
        h, w_ = op.in_shape[-2:]

        def conv(x: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
            return F.conv2d(x, wt.to(x.dtype), None, op.stride, (lh, lw), op.dilation, k)

        def adjoint(y: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
            out_pad = tuple(
                size - ((out - 1) * s - 2 * p + d * (kk - 1) + 1)
                for size, out, s, p, d, kk in zip((h, w_), y.shape[-2:], op.stride, (lh, lw), op.dilation, op.kernel)
            )
            return F.conv_transpose2d(y, wt.to(y.dtype), None, op.stride, (lh, lw), out_pad, k, op.dilation)

        with torch.no_grad():
            frozen = weight.detach()
            for _ in range(self.iterations - 1):
                v = adjoint(conv(u, frozen), frozen)
                u = (v.reshape(k, -1) / v.reshape(k, -1).norm(dim=1, keepdim=True).clamp_min(1e-30)).reshape(u.shape)
        y = conv(u, weight)
        per = y.reshape(k, -1).norm(dim=1)
        for i, name in enumerate(names):
            norms[name] = per[i]
        with torch.no_grad():
            v = adjoint(y.detach(), frozen)
            for buf, part in zip(bufs, v.chunk(k, dim=1)):
                updates.append((buf, part))

    def forward(self) -> LipschitzEstimate:
        """One step: estimates from the current vectors (differentiable), then update the vectors."""
        norms: Dict[str, Any] = dict(self._fixed)
        for name, op in self._closed.items():
            norms[name] = op.closed_form_norm()
        updates: List[Tuple[str, torch.Tensor]] = []
        for names in self._groups:
            if len(names) > 1:
                self._step_batched(names, norms, updates)
                continue
            name = names[0]
            buf, op = self._power[name]
            u = getattr(self, buf)
            weight = op.weight()  # differentiable; computed once for the forward and the adjoint
            with torch.no_grad():
                frozen = weight.detach() if weight is not None else None
                for _ in range(self.iterations - 1):
                    v = op.adjoint(op.apply(u, frozen), frozen)
                    u = v / v.norm().clamp_min(1e-30)
            w = op.apply(u, weight)
            norms[name] = w.norm()
            with torch.no_grad():  # next step's vector: u <- A^T A u (normalised below)
                updates.append((buf, op.adjoint(w.detach(), frozen)))
        if updates:
            with torch.no_grad():
                vs = [v for _, v in updates]
                scale = torch._foreach_norm(vs)
                torch._foreach_clamp_min_(scale, 1e-30)
                torch._foreach_div_(vs, scale)
            for buf, v in updates:  # new tensors: the old vectors stay intact for backward
                self._buffers[buf] = v
        if self.sync:
            self._average_vectors()
        ref = next(iter(self.buffers()), None)
        one = torch.ones((), dtype=ref.dtype if ref is not None else torch.float32,
                         device=ref.device if ref is not None else None)
        bound = compose(self._program, norms, one)
        last = self._program.last_linear
        body = weight = None
        if last is not None:
            body = bound[last.inputs[0]]
            assert isinstance(last.op, LinearLayerOp)
            weight = last.op.weight()
        total = bound[self._program.output]
        self._batch_var = {}  # statistics of one forward serve one estimate
        self._last = total.detach() if isinstance(total, torch.Tensor) else torch.tensor(float(total))
        return LipschitzEstimate(lipschitz=total, body=body, last_weight=weight)

    def norms(self) -> Dict[str, float]:
        """Current per-operator estimates ``{path: ||A u||}`` (no update, no gradient)."""
        by_name = {s.name: s for s in self._program.steps}
        return {by_name[name].path: value for name, value in self._current_norms().items()}

    def current_estimate(self) -> float:
        """The global estimate from the current vectors and weights (no update, no gradient; running BatchNorm
        statistics)."""
        bound = compose(self._program, self._current_norms(), 1.0)
        return float(bound[self._program.output] or 0.0)

    def _current_norms(self) -> Dict[str, float]:
        out: Dict[str, float] = dict(self._fixed)
        with torch.no_grad():
            for name, (buf, op) in self._power.items():
                out[name] = float(op.apply(getattr(self, buf)).norm())
            for name, op in self._closed.items():
                out[name] = float(op.closed_form_norm())
        return out

    @torch.no_grad()
    def _average_vectors(self) -> None:
        # Under DDP every rank holds the same weights, but eval-mode BatchNorm statistics (folded into the
        # operators) are updated from each rank's own batch, so the vectors would drift apart: average them.
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        world = torch.distributed.get_world_size()
        bufs = [getattr(self, buf) for buf, _ in self._power.values()]
        if world == 1 or not bufs:
            return
        flat = torch.cat([b.flatten() for b in bufs])
        torch.distributed.all_reduce(flat)
        flat /= world
        offset = 0
        for b in bufs:
            b.copy_(flat[offset : offset + b.numel()].view_as(b))
            offset += b.numel()

    def broadcast_(self, src: int = 0) -> None:
        """Copy the vectors of rank ``src`` to every rank (no-op without ``torch.distributed``)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for b in self.buffers():
                torch.distributed.broadcast(b, src)
